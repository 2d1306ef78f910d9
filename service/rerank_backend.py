"""The reranker as the batching queue runs it: sequences of any lengths packed end to end, without padding
(the ragged batching of text-embeddings-inference), and each sequence's output a function of that sequence
alone.

Batching requests together is only safe if it cannot change anyone's scores, and plain batching does: a
GEMM's rounding depends on its shape (on this machine a row computed in a 128-row matmul differs from the
same row in a 512-row one, with MKL in fp32 and oneDNN in bf16 alike), and padding to the longest sequence
of a pass changes the shapes attention and pooling see. So the encoder runs here in its own forward, over a
``[tokens, hidden]`` matrix holding the pass's sequences back to back:

* every linear layer runs as GEMMs over blocks of exactly ``TOKENS_PER_BLOCK`` rows (the matrix is padded
  with empty rows to whole blocks), so every GEMM a token takes part in has one shape,
  ``[TOKENS_PER_BLOCK, in] x [in, out]``, whoever shares the pass;
* attention runs sequence by sequence at the sequence's exact length: no padding and no mask, so a pass of
  mixed lengths wastes nothing (grouping by padded width did: 20 candidates of 20 different lengths made 20
  passes of mostly empty rows);
* embeddings, layer norm, GELU and residual sums are row-wise or element-wise already.

The forward covers BERT-style encoders (BERT, MiniLM, RoBERTa, XLM-R: what the reranker architectures load)
and reproduces Hugging Face's outputs within rounding. ``tests/test_batching_queue.py`` checks the bits,
alone and in mixed passes, in fp32 and bf16, and the agreement with the Hugging Face forward.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from grerank.reranker import BiEncoderReranker, CrossEncoderReranker, Reranker

# Rows per GEMM: measured here, 1024 ran as fast as 2048 in bulk, while a lone request of 20
# candidates pads at most one block; 256 lost about 20% of bulk throughput.
TOKENS_PER_BLOCK = 1024
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")


class BlockedLinear(torch.nn.Module):
    """``nn.Linear`` over ``[rows, in]``, computed as one GEMM per block of ``TOKENS_PER_BLOCK`` rows
    (``rows`` is a whole number of blocks)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], self.weight.shape[0])
        weight_t = self.weight.t()
        for start in range(0, x.shape[0], TOKENS_PER_BLOCK):
            block, target = x[start : start + TOKENS_PER_BLOCK], out[start : start + TOKENS_PER_BLOCK]
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


def whole_blocks(rows: int) -> int:
    return -(-rows // TOKENS_PER_BLOCK) * TOKENS_PER_BLOCK


@dataclass(frozen=True)
class Encoded:
    """One sequence the reranker reads: token ids (with special tokens) and segment ids, if the model has
    them."""

    ids: list[int]
    type_ids: list[int] | None = None


class RerankBackend:
    """A private inference copy of a reranker's encoder, in ``dtype``, run under the rules above."""

    def __init__(self, reranker: Reranker, dtype: torch.dtype) -> None:
        if isinstance(reranker, BiEncoderReranker):
            self.pair = False
            model, self.tokenizer = reranker.encoder.model, reranker.encoder.tokenizer
            self.scale = reranker.scale
        elif isinstance(reranker, CrossEncoderReranker):
            self.pair = True
            model, self.tokenizer = reranker.model, reranker.tokenizer
        else:
            raise ValueError(f"no batched inference for reranker architecture {reranker.architecture!r}")
        config = model.config
        if config.model_type not in ENCODER_TYPES:
            raise ValueError(
                f"batched reranking runs BERT-style encoders ({', '.join(ENCODER_TYPES)}), "
                f"not {config.model_type!r}"
            )
        self.device = reranker.device
        self.dtype = dtype
        self.max_length = reranker.max_length
        self.heads = config.num_attention_heads
        # A copy, so the served model (and anything holding it) keeps its own weights and precision.
        model = blocked(copy.deepcopy(model).to(dtype=dtype).eval().requires_grad_(False))
        self.model = model
        self.encoder = getattr(model, model.base_model_prefix) if self.pair else model
        # RoBERTa counts positions from after its padding index; BERT from 0.
        embeddings = self.encoder.embeddings
        self.first_position = embeddings.padding_idx + 1 if config.model_type != "bert" else 0

    def describe(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "tokens_per_block": TOKENS_PER_BLOCK}

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

    @torch.inference_mode()
    def forward(self, sequences: Sequence[Encoded]) -> torch.Tensor:
        """One pass over sequences of any lengths: a float32 CPU row per sequence, the normalised mean-pooled
        embedding (bi-encoder) or the score logit (cross-encoder)."""
        spans = _spans([len(s.ids) for s in sequences])
        pad = whole_blocks(spans[-1][1]) - spans[-1][1]
        ids, positions, types = [], [], []
        for s in sequences:
            ids += s.ids
            positions += range(self.first_position, self.first_position + len(s.ids))
            types += s.type_ids or [0] * len(s.ids)
        # Pad rows read token 0 at position 0; they attend to nothing and their outputs are dropped.
        tensor = lambda values: torch.tensor(values + [0] * pad, device=self.device)  # noqa: E731
        hidden = self._embed(tensor(ids), tensor(positions), tensor(types))
        for layer in self.encoder.encoder.layer:
            hidden = self._layer(layer, hidden, spans)
        if self.pair:
            first = hidden.new_zeros(whole_blocks(len(sequences)), hidden.shape[1])
            first[: len(sequences)] = hidden[[start for start, _ in spans]]
            return self._head(first)[: len(sequences), 0].float().cpu()
        pooled = torch.stack([hidden[start:end].float().mean(0) for start, end in spans])
        return F.normalize(pooled, dim=-1).cpu()

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        e = self.encoder.embeddings
        x = e.word_embeddings(ids) + e.token_type_embeddings(types)  # Hugging Face's order of sums
        return e.LayerNorm(x + e.position_embeddings(positions))

    def _layer(self, layer: torch.nn.Module, x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        attention = layer.attention.self
        q, k, v = attention.query(x), attention.key(x), attention.value(x)
        context = torch.zeros_like(q)
        width = q.shape[1] // self.heads
        for start, end in spans:
            # [1, heads, length, width]: four dimensions take the CPU flash kernel, three the slow math one.
            heads = [t[start:end].view(1, end - start, self.heads, width).transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*heads, scale=attention.scaling)
            context[start:end] = out[0].transpose(0, 1).reshape(end - start, -1)
        out = layer.attention.output
        x = out.LayerNorm(out.dense(context) + x)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        return layer.output.LayerNorm(layer.output.dense(inner) + x)

    def _head(self, first: torch.Tensor) -> torch.Tensor:
        """Cross-encoder logits from the first token's hidden state (BERT's pooler and classifier, or
        RoBERTa's classification head)."""
        if getattr(self.encoder, "pooler", None) is not None:
            return self.model.classifier(self.encoder.pooler.activation(self.encoder.pooler.dense(first)))
        head = self.model.classifier
        return head.out_proj(torch.tanh(head.dense(first)))

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """A request's scores ``[n]`` from the outputs of its sequences, in :meth:`encode` order."""
        if self.pair:
            return outputs
        return self.scale * outputs[1:] @ outputs[0]


def _spans(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` rows of each sequence packed back to back."""
    ends = list(itertools.accumulate(lengths))
    return [(end - n, end) for end, n in zip(ends, lengths, strict=True)]
