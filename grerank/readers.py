"""Readers: the interface both reader families share, and picking the family for a model folder.

A reader is frozen. ``encode_documents`` gives per-passage states (computed without gradients, reusable),
``answer_log_likelihood`` reads them under a (soft) document mask and is differentiable in that mask, and
``stream_answer`` generates greedily with every given document visible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from grerank.passage import Passage

READER_FAMILIES = ("auto", "decoder", "fid")


class Reader:
    family: str
    auto_model: type  # the transformers Auto class that loads this family
    states_depend_on_question = False  # FiD encodes (question, passage) pairs; decoder documents stand alone
    adapter_id: str | None = None  # checksum of a trained adapter (grerank.reader_artifact), if any

    def __init__(self, model: torch.nn.Module, tokenizer, **limits) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> Reader:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # SDPA takes the additive DMA mask as a float ``attn_mask`` and differentiates through it exactly;
        # it encodes documents about a quarter faster than eager attention on CPU.
        model = cls.auto_model.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device), tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def state_signature(self) -> str:
        """Everything a document's states depend on besides the document: weights, precision, input format.

        Cached states (:mod:`grerank.doc_state_cache`) are keyed by it; the checksum of the input embeddings
        tells apart two models saved to the same folder. It hashes their bytes: a float sum rounds differently
        with another thread count, and a process with that count would miss every cached state.
        """
        embeddings = self.model.get_input_embeddings().weight.detach().cpu().contiguous()
        return "|".join(
            [
                self.family,
                str(getattr(self.model.config, "_name_or_path", "")),
                str(self.dtype),
                hashlib.sha256(embeddings.view(torch.uint8).numpy()).hexdigest()[:16],
                self.input_format(),
            ]
        )

    def reading_signature(self) -> str:
        """What the reader's outputs (answers, likelihoods, attention) depend on besides its inputs: the
        states' signature and the adapter, which acts on question and answer tokens only and so is not part
        of it. Without an adapter, the states' signature (signals stored before adapters stay valid)."""
        return self.state_signature() + (f"|adapter={self.adapter_id}" if self.adapter_id else "")

    def input_format(self) -> str:
        """The templates and limits that shape a document's tokens."""
        raise NotImplementedError

    def encode_documents(
        self, passages: Sequence[Passage], question: str | None = None, batch_size: int = 1
    ) -> list[torch.Tensor]:
        """States of each passage. ``batch_size`` 1 by default: a batch's GEMMs round a document's states
        differently from its own, enough to change greedy answers (README, "Results so far")."""
        raise NotImplementedError

    def answer_log_likelihood(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        doc_states: Sequence[Sequence[torch.Tensor]],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of answer-token log-probs [B], answer tokens [B])`` under ``mask`` ``[B, n]``."""
        raise NotImplementedError

    def answer_nll(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        doc_states: Sequence[Sequence[torch.Tensor]],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Mean negative log-likelihood per answer token, one value per question ``[B]``."""
        total, count = self.answer_log_likelihood(questions, answers, doc_states, mask)
        return -total / count.clamp_min(1)

    def stream_answer(
        self, question: str, doc_states: Sequence[torch.Tensor], max_new_tokens: int = 32
    ) -> Iterator[str]:
        raise NotImplementedError

    def generate(self, question: str, doc_states: Sequence[torch.Tensor], max_new_tokens: int = 32) -> str:
        return "".join(self.stream_answer(question, doc_states, max_new_tokens)).strip()


def load_reader(
    path: str | Path,
    family: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Reader:
    """A frozen reader for ``path``; ``auto`` picks FiD for encoder-decoder models, else decoder-only."""
    if family not in READER_FAMILIES:
        raise ValueError(f"unknown reader family {family!r}; expected one of {READER_FAMILIES}")
    if family == "auto":
        family = "fid" if AutoConfig.from_pretrained(path).is_encoder_decoder else "decoder"
    if family == "fid":
        from grerank.fid_reader import FiDReader

        return FiDReader.from_pretrained(path, device=device, dtype=dtype)
    from grerank.decoder_reader import DecoderReader

    return DecoderReader.from_pretrained(path, device=device, dtype=dtype)
