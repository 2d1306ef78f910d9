"""The reranker as the batching queue runs it: token sequences in, one output row per sequence out, and each
row's result independent of the other sequences that share its forward pass.

Batching requests together is only safe if it cannot change anyone's scores, and plain batching does: a
GEMM's rounding depends on its shape (on this machine a row computed in a 128-row matmul differs from the
same row in a 512-row one, with MKL in fp32 and oneDNN in bf16 alike), and padding to the longest sequence
of the pass changes the shapes attention and pooling see. Two rules make every row a function of itself:

* width: a sequence is padded to its own length rounded up to ``WIDTH_STEP`` tokens, never to the longest
  sequence of the pass, so its attention and pooling shapes are always the same;
* blocks: every linear layer runs as GEMMs over blocks of exactly ``ROWS_PER_BLOCK`` sequences (a pass is
  padded with empty rows to whole blocks), so every GEMM a sequence takes part in has one shape,
  ``[ROWS_PER_BLOCK * width, in] x [in, out]``, however many sequences the pass holds.

Everything else in a BERT-style encoder (embeddings, layer norm, per-sequence attention, GELU) is row-wise
already. ``tests/test_batching_queue.py`` checks the bits, alone and in mixed passes, in fp32 and bf16.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grerank.reranker import BiEncoderReranker, CrossEncoderReranker, Reranker

# Granularity of padded widths: fine enough to waste little (at most 15 pad tokens a sequence), coarse enough
# that sequences of similar length share a width, and so a pass.
WIDTH_STEP = 16
# Sequences per GEMM block: 8 x 128 tokens make GEMMs large enough to run near peak, while a lone request
# pads at most 7 empty rows.
ROWS_PER_BLOCK = 8


class BlockedLinear(torch.nn.Module):
    """``nn.Linear`` computed as one GEMM per block of ``ROWS_PER_BLOCK`` entries of the first dimension."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], self.weight.shape[0])
        weight_t = self.weight.t()
        for start in range(0, x.shape[0], ROWS_PER_BLOCK):
            block = x[start : start + ROWS_PER_BLOCK].reshape(-1, x.shape[-1])
            target = out[start : start + ROWS_PER_BLOCK].view(-1, out.shape[-1])
            if self.bias is None:
                torch.mm(block, weight_t, out=target)
            else:
                torch.addmm(self.bias, block, weight_t, out=target)
        return out


def blocked(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every ``nn.Linear`` replaced by a :class:`BlockedLinear` (in place)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, BlockedLinear(child))
    return module


@dataclass(frozen=True)
class Encoded:
    """One sequence the reranker reads: token ids (with special tokens) and segment ids, if the model has
    them."""

    ids: list[int]
    type_ids: list[int] | None = None


def padded_width(length: int) -> int:
    return -(-length // WIDTH_STEP) * WIDTH_STEP


class RerankBackend:
    """A private inference copy of a reranker's encoder, in ``dtype``, run under the two rules above."""

    def __init__(self, reranker: Reranker, dtype: torch.dtype) -> None:
        if isinstance(reranker, BiEncoderReranker):
            self.pair = False
            module, self.tokenizer = reranker.encoder.model, reranker.encoder.tokenizer
            self.scale = reranker.scale
        elif isinstance(reranker, CrossEncoderReranker):
            self.pair = True
            module, self.tokenizer = reranker.model, reranker.tokenizer
        else:
            raise ValueError(f"no batched inference for reranker architecture {reranker.architecture!r}")
        self.device = reranker.device
        self.dtype = dtype
        self.max_length = reranker.max_length
        self.pad_id = self.tokenizer.pad_token_id or 0
        # A copy, so the served model (and anything holding it) keeps its own weights and precision.
        self.model = blocked(copy.deepcopy(module).to(dtype=dtype).eval().requires_grad_(False))

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "width_step": WIDTH_STEP,
            "rows_per_block": ROWS_PER_BLOCK,
        }

    def encode(self, query: str, texts: Sequence[str]) -> list[Encoded]:
        """A request's sequences, in the order :meth:`scores` expects: the query then each text
        (bi-encoder), or each ``(query, text)`` pair (cross-encoder); truncated as the reranker truncates."""
        if self.pair:
            batch = self.tokenizer(
                [query] * len(texts), list(texts), truncation="only_second", max_length=self.max_length
            )
        else:
            batch = self.tokenizer([query, *texts], truncation=True, max_length=self.max_length)
        types = batch.get("token_type_ids")
        return [Encoded(ids, None if types is None else types[i]) for i, ids in enumerate(batch["input_ids"])]

    @staticmethod
    def width(sequence: Encoded) -> int:
        return padded_width(len(sequence.ids))

    @torch.inference_mode()
    def forward(self, sequences: Sequence[Encoded]) -> torch.Tensor:
        """One pass over sequences of one width: a float32 CPU row per sequence, the normalised mean-pooled
        embedding (bi-encoder) or the score logit (cross-encoder)."""
        width = self.width(sequences[0])
        rows = -(-len(sequences) // ROWS_PER_BLOCK) * ROWS_PER_BLOCK
        empty = rows - len(sequences)
        pad = [self.pad_id] * width
        ids = [s.ids + pad[len(s.ids) :] for s in sequences] + [pad] * empty
        # Empty rows see one token, so their attention is well defined; their outputs are dropped.
        mask = [[1] * len(s.ids) + [0] * (width - len(s.ids)) for s in sequences]
        mask += [[1] + [0] * (width - 1)] * empty
        inputs = {
            "input_ids": torch.tensor(ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
        }
        if sequences[0].type_ids is not None:
            types = [s.type_ids + [0] * (width - len(s.type_ids)) for s in sequences] + [[0] * width] * empty
            inputs["token_type_ids"] = torch.tensor(types, device=self.device)
        if self.pair:
            out = self.model(**inputs).logits[:, 0]
        else:
            hidden = self.model(**inputs).last_hidden_state.float()
            weights = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            out = torch.nn.functional.normalize(pooled, dim=-1)
        return out[: len(sequences)].float().cpu()

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """A request's scores ``[n]`` from the outputs of its sequences, in :meth:`encode` order."""
        if self.pair:
            return outputs
        return self.scale * outputs[1:] @ outputs[0]
