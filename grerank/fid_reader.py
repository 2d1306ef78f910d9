"""Fusion-in-Decoder (FiD) reader with differentiable masked attention (the G-Rerank paper's setting).

The T5 encoder encodes each ``question: ... title: ... context: ...`` pair on its own (DESIGN.md section 3),
so no encoder token has seen another document and the DMA bias removes a document exactly. The decoder
cross-attends to the concatenation of all documents' encoder states, with ``log M_i`` added to the
cross-attention logits of document ``i``'s tokens in every layer (:mod:`grerank.masked_attention`).

Unlike the decoder-only reader, document states depend on the question (it is part of the encoder input):
cache them per (example, passage), not per passage. ``questions`` in :meth:`FiDReader.answer_log_likelihood`
and ``question`` in :meth:`FiDReader.stream_answer` are accepted for interface parity and otherwise unused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from grerank.masked_attention import concat_documents, document_log_mask, key_bias, to_additive
from grerank.passage import Passage
from grerank.readers import Reader
from grerank.text_stream import IncrementalDecoder

FID_TEMPLATE = "question: {question} title: {title} context: {text}"


class FiDReader(Reader):
    """A frozen T5-style encoder-decoder reading independently encoded (question, passage) pairs.

    Document states are the encoder's last hidden states, one ``[length, d_model]`` tensor per passage.
    """

    auto_model = AutoModelForSeq2SeqLM
    family = "fid"
    states_depend_on_question = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_document_tokens: int = 256,
        max_answer_tokens: int = 32,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_document_tokens = max_document_tokens
        self.max_answer_tokens = max_answer_tokens
        config = model.config
        # The model's config is authoritative: a T5 may ship with a tokenizer whose eos differs (or is None).
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_id: int = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.pad_id: int = config.pad_token_id if config.pad_token_id is not None else 0
        self.start_id: int = (
            config.decoder_start_token_id if config.decoder_start_token_id is not None else self.pad_id
        )

    # ---- documents: no gradients, computed once per (question, passage) -----------------------------------

    def input_format(self) -> str:
        return f"{FID_TEMPLATE}|{self.max_document_tokens}"

    def document_ids(self, passage: Passage, question: str) -> list[int]:
        text = FID_TEMPLATE.format(question=question, title=passage.title, text=passage.text)
        # With the tokenizer's special tokens (T5: a closing </s>), as the model saw its inputs in training.
        return self.tokenizer(text, truncation=True, max_length=self.max_document_tokens)["input_ids"]

    @torch.no_grad()
    def encode_documents(
        self, passages: Sequence[Passage], question: str | None = None, batch_size: int = 1
    ) -> list[torch.Tensor]:
        """Encoder states of each (question, passage) pair, encoded on its own, ``[L_i, d_model]`` each."""
        if question is None:
            raise ValueError("FiD documents are encoded together with their question")
        token_lists = [self.document_ids(p, question) for p in passages]
        states: list[torch.Tensor | None] = [None] * len(passages)
        order = sorted(range(len(passages)), key=lambda i: len(token_lists[i]))  # length-sorted: less padding
        encoder = self.model.get_encoder()
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            lengths = [len(token_lists[i]) for i in chunk]
            width = max(lengths)
            ids = torch.tensor(
                [token_lists[i] + [self.pad_id] * (width - len(token_lists[i])) for i in chunk],
                device=self.device,
            )
            lengths_t = torch.tensor(lengths, device=self.device)
            attn = (torch.arange(width, device=self.device)[None] < lengths_t[:, None]).long()
            hidden = encoder(input_ids=ids, attention_mask=attn).last_hidden_state
            for row, (i, length) in enumerate(zip(chunk, lengths, strict=True)):
                states[i] = hidden[row, :length].clone()
        return states  # type: ignore[return-value]

    def _layout(self, doc_states: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated encoder states ``[B, K, d]`` (zero-padded) and key document index ``[B, K]``."""
        docs = [[d.to(self.device, self.dtype) for d in row] for row in doc_states]
        return concat_documents(docs, seq_dim=0, batch_dim=0)

    # ---- answer: the differentiable part ------------------------------------------------------------------

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][: self.max_answer_tokens]
        return ids + [self.eos_id]

    def answer_log_likelihood(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        doc_states: Sequence[Sequence[torch.Tensor]],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each answer (plus eos) given its documents under ``mask`` ``[B, n]``.

        Returns ``(sum of answer-token log-probs [B], number of answer tokens [B])``; differentiable in
        ``mask``. Every row of ``mask`` needs a non-zero entry: FiD has nothing to read without a document.
        """
        del questions  # already inside the encoder states
        if not bool((mask != 0).any(dim=1).all()):
            raise ValueError("every example needs at least one document with a non-zero mask")
        states, key_index = self._layout(doc_states)
        labels = [self.answer_ids(a) for a in answers]
        width = max(len(a) for a in labels)
        target = torch.tensor([a + [self.pad_id] * (width - len(a)) for a in labels], device=self.device)
        # Teacher forcing: the decoder sees the start token then the labels shifted right.
        start = torch.full((len(labels), 1), self.start_id, device=self.device)
        decoder_ids = torch.cat([start, target[:, :-1]], dim=1)

        bias = key_bias(document_log_mask(mask.to(self.device, torch.float32)), key_index)  # [B, K]
        # A 4D float mask reaches T5's cross-attention unchanged and is added to its logits in every layer.
        cross_mask = to_additive(bias[:, None, None, :].expand(-1, 1, width, -1), self.dtype)
        logits = self.model(
            encoder_outputs=(states,),
            attention_mask=cross_mask,
            decoder_input_ids=decoder_ids,
            use_cache=False,
        ).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(2, target[..., None])[..., 0]
        lengths = torch.tensor([len(a) for a in labels], device=self.device)
        # Right padding of the answers is harmless: causal self-attention keeps it out of real positions.
        valid = torch.arange(width, device=self.device)[None] < lengths[:, None]
        return (logprobs * valid).sum(dim=1), lengths

    # ---- generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def stream_answer(
        self, question: str, doc_states: Sequence[torch.Tensor], max_new_tokens: int = 32
    ) -> Iterator[str]:
        """Greedy answer given these documents (all fully visible), yielded as text pieces."""
        del question  # already inside the encoder states
        states, _ = self._layout([doc_states])  # one example: no padding, no mask needed
        cache = None  # the model starts an EncoderDecoderCache; cross-attention keys are computed once
        step = torch.tensor([[self.start_id]], device=self.device)
        text = IncrementalDecoder(self.tokenizer)
        for _ in range(max_new_tokens):
            out = self.model(
                encoder_outputs=(states,), decoder_input_ids=step, past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            if token == self.eos_id:
                break
            piece = text.push(token)
            if piece:
                yield piece
            step = torch.tensor([[token]], device=self.device)
        piece = text.finish()
        if piece:
            yield piece
