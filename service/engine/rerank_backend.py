"""The reranker as the batching queue runs it: sequences of any lengths packed end to end, without padding
(the ragged batching of text-embeddings-inference), and each sequence's output a function of that sequence
alone.

Batching requests together is only safe if it cannot change anyone's scores, and plain batching does: a
GEMM's rounding depends on its shape (on this machine a row computed in a 128-row matmul differs from the
same row in a 512-row one, with MKL in fp32 and oneDNN in bf16 alike), and padding to the longest sequence
of a pass changes the shapes attention and pooling see. So the encoder runs here in its own forward, over a
``[tokens, hidden]`` matrix holding the pass's sequences back to back:

* the matrix is padded with empty rows to whole blocks of ``TOKENS_PER_BLOCK`` rows and held as a list of
  them; every linear layer runs as one GEMM per block, so every GEMM a token takes part in has one shape,
  ``[TOKENS_PER_BLOCK, in] x [in, out]``, whoever shares the pass, and everything row-wise after attention
  runs block by block while the block is in cache;
* attention runs sequence by sequence at the sequence's exact length: no padding and no mask, so a pass of
  mixed lengths wastes nothing (grouping by padded width did: 20 candidates of 20 different lengths made 20
  passes of mostly empty rows); on CUDA in half precision, as one variable-length flash-attention call over
  the packed pass (``torch.nn.attention.varlen``), whose work per sequence does not depend on the others;
* embeddings, layer norm, GELU and residual sums are row-wise or element-wise already.

The forward covers BERT-style encoders (BERT, MiniLM, RoBERTa, XLM-R: what the reranker architectures load)
and reproduces Hugging Face's outputs within rounding. ``tests/test_batching_queue.py`` checks the bits,
alone and in mixed passes, in fp32 and bf16, and the agreement with the Hugging Face forward.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from grerank.reranker import BiEncoderReranker, CrossEncoderReranker, Reranker
from grerank.runtime import best_times

try:  # CUDA's variable-length flash attention (torch 2.9 and later)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

# Rows per GEMM: measured here, 1024 ran as fast as 2048 in bulk, while a lone request of 20
# candidates pads at most one block; 256 lost about 20% of bulk throughput.
TOKENS_PER_BLOCK = 1024
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")


MKL_MIN_GAIN = 1.05


@functools.cache
def fp32_gemm_library() -> str:
    """``"mkl"`` or ``"onednn"``: which library runs this CPU's fp32 block GEMMs faster, measured once per
    process on the reranker's feed-forward up-projection with its GELU (oneDNN fuses it; after MKL it is a
    pass of its own).

    On an AMD Zen 3 (AVX2, no AVX-512) the whole forward ran 17% faster on MKL's packed weights than on
    oneDNN's fused GEMMs; the AVX-512 machines served oneDNN before this choice existed and were not compared
    since, so the measurement decides there too. oneDNN must lose by ``MKL_MIN_GAIN`` to be replaced, so
    the choice (and with it the last bits of the scores) does not flip between restarts on noise. About
    0.3 s.
    """
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        return "mkl" if torch.backends.mkl.is_available() else "onednn"
    generator = torch.Generator().manual_seed(0)
    hidden, inner = 384, 1536
    x = torch.randn(TOKENS_PER_BLOCK, hidden, generator=generator)
    weight, bias = torch.randn(inner, hidden, generator=generator), torch.zeros(inner)
    gemms = {library: BlockGemm(weight, bias, gelu=True, library=library) for library in ("onednn", "mkl")}
    best = best_times({library: functools.partial(gemm, x) for library, gemm in gemms.items()}, rounds=10)
    return "mkl" if best["onednn"] > MKL_MIN_GAIN * best["mkl"] else "onednn"


class BlockGemm:
    """``x @ weight.T + bias``, then optionally exact GELU or ``+ residual``, over one block of
    ``TOKENS_PER_BLOCK`` rows.

    On CPU the weight is reordered once into the GEMM library's own layout rather than in every call (about
    5% of GEMM time here): oneDNN's for bf16, and for fp32 oneDNN's or MKL's, whichever
    :func:`fp32_gemm_library` measured faster. With oneDNN, GELU or a residual sum runs in the GEMM's
    epilogue instead of as a pass over memory of its own (GELU alone was 6% of the forward).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False, library: str | None = None
    ) -> None:
        self.bias, self.gelu = bias, gelu
        self.epilogue = ("gelu", "none") if gelu else ("none", "")  # "none": erf, not the tanh approximation
        self.packed = self.mkl = self.weight_t = None  # the weight packed for oneDNN or MKL, or plain
        cpu = weight.device.type == "cpu"
        if cpu and weight.dtype == torch.float32 and (library or fp32_gemm_library()) == "mkl":
            # MKL's packed GEMM also takes the plain weight, for inputs of another row count than it was
            # packed for (never here: every block is full).
            self.mkl = (torch.ops.mkl._mkl_reorder_linear_weight(weight, TOKENS_PER_BLOCK), weight)
        elif (
            cpu
            and torch.backends.mkldnn.is_available()
            and (
                weight.dtype == torch.float32
                or (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
            )
        ):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, TOKENS_PER_BLOCK)
        else:
            self.weight_t = weight.t()

    @classmethod
    def of(cls, *linears: torch.nn.Linear, dtype: torch.dtype, gelu: bool = False) -> BlockGemm:
        """A copy in ``dtype`` of one linear layer, or of several reading the same input as one GEMM (their
        outputs side by side)."""
        biases = [linear.bias for linear in linears]
        bias = None if any(b is None for b in biases) else torch.cat(biases).to(dtype)  # type: ignore[arg-type]
        return cls(torch.cat([linear.weight for linear in linears]).to(dtype), bias, gelu)

    @property
    def library(self) -> str:
        """What runs the GEMM: ``onednn`` or ``mkl`` (packed weights), else ``torch`` (addmm)."""
        return "onednn" if self.packed is not None else "mkl" if self.mkl is not None else "torch"

    def __call__(self, block: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(
                    block, residual, self.packed, self.bias, "add"
                )
            attr, algorithm = self.epilogue
            return torch.ops.mkldnn._linear_pointwise(block, self.packed, self.bias, attr, [], algorithm)
        if self.mkl is not None:
            out = torch.ops.mkl._mkl_linear(block, *self.mkl, self.bias, TOKENS_PER_BLOCK)
        elif self.bias is None:
            out = block @ self.weight_t
        else:
            out = torch.addmm(self.bias, block, self.weight_t)
        if residual is not None:
            out.add_(residual)
        return torch._C._nn.gelu_(out) if self.gelu else out  # in place: the block is still in cache


class EncoderLayer:
    """One BERT layer over a pass held as blocks of ``TOKENS_PER_BLOCK`` rows. Everything but attention is
    row-wise, so it runs block by block while a block is in cache: the feed-forward's 4x wider activations
    never exist for the whole pass."""

    def __init__(self, layer: torch.nn.Module, config: PretrainedConfig, dtype: torch.dtype) -> None:
        attention = layer.attention.self
        self.qkv = BlockGemm.of(attention.query, attention.key, attention.value, dtype=dtype)
        self.heads, self.scaling = config.num_attention_heads, attention.scaling
        self.attention_out = BlockGemm.of(layer.attention.output.dense, dtype=dtype)
        self.attention_norm = copy.deepcopy(layer.attention.output.LayerNorm).to(dtype)
        # Exact GELU (every shipped model's) runs in the GEMM; another activation after it.
        exact_gelu = config.hidden_act == "gelu"
        self.up = BlockGemm.of(layer.intermediate.dense, dtype=dtype, gelu=exact_gelu)
        self.act = torch.nn.Identity() if exact_gelu else layer.intermediate.intermediate_act_fn
        self.down = BlockGemm.of(layer.output.dense, dtype=dtype)
        self.norm = copy.deepcopy(layer.output.LayerNorm).to(dtype)

    def __call__(
        self, blocks: list[torch.Tensor], spans: list[tuple[int, int]], starts: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """One layer over the pass; ``starts`` (CUDA, half precision): the sequences' first rows and the end,
        int32 on the device, for the variable-length attention kernel."""
        q, k, v = zip(*(self.qkv(block).chunk(3, dim=1) for block in blocks), strict=True)
        rows, hidden = len(blocks) * TOKENS_PER_BLOCK, blocks[0].shape[1]
        context = blocks[0].new_empty(rows, hidden)
        used = spans[-1][1]
        context[used:] = 0  # the padding rows, which attention skips
        width = hidden // self.heads
        if starts is not None:
            packed = [rows_of(t, 0, used).reshape(used, self.heads, width) for t in (q, k, v)]
            longest = max(end - start for start, end in spans)
            out = varlen_attn(*packed, starts, starts, longest, longest, scale=self.scaling)
            context[:used] = out.reshape(used, hidden)
        else:
            for start, length, count in _runs(spans):
                # [count, heads, length, width]: four dimensions take the CPU flash kernel, three the slow
                # math. The kernel works sequence by sequence and head by head, so a sequence's bits do not
                # depend on the others of its call; one call per run of equal lengths was 23% faster than
                # one per sequence (fp32, 128 tokens, AMD Zen 3).
                end = start + length * count
                heads = [
                    rows_of(t, start, end).view(count, length, self.heads, width).transpose(1, 2)
                    for t in (q, k, v)
                ]
                out = F.scaled_dot_product_attention(*heads, scale=self.scaling)
                context[start:end] = out.transpose(1, 2).reshape(end - start, hidden)
        out = []
        for x, c in zip(blocks, context.split(TOKENS_PER_BLOCK), strict=True):
            x = self.attention_norm(self.attention_out(c, residual=x))
            out.append(self.norm(self.down(self.act(self.up(x)), residual=x)))
        return out


def rows_of(blocks: Sequence[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of a pass held as blocks: a view when they lie in one block."""
    first, last = start // TOKENS_PER_BLOCK, (end - 1) // TOKENS_PER_BLOCK
    pieces = [
        blocks[b][max(start - b * TOKENS_PER_BLOCK, 0) : end - b * TOKENS_PER_BLOCK]
        for b in range(first, last + 1)
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


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
        self.config = config
        # Copies in ``dtype``: the served model (and anything holding it) keeps its own weights and precision.
        with torch.no_grad():
            encoder = getattr(model, model.base_model_prefix) if self.pair else model
            self.embeddings = copy.deepcopy(encoder.embeddings).to(dtype).eval()
            self.layers = [EncoderLayer(layer, config, dtype) for layer in encoder.encoder.layer]
            if self.pair:  # BERT's pooler and classifier, or RoBERTa's classification head: dense, tanh, out
                pooler = getattr(encoder, "pooler", None)
                dense, out = (
                    (pooler.dense, model.classifier)
                    if pooler is not None
                    else (model.classifier.dense, model.classifier.out_proj)
                )
                self.head = (BlockGemm.of(dense, dtype=dtype), BlockGemm.of(out, dtype=dtype))
        # RoBERTa counts positions from after its padding index; BERT from 0.
        self.first_position = self.embeddings.padding_idx + 1 if config.model_type != "bert" else 0

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "tokens_per_block": TOKENS_PER_BLOCK,
            "gemm_library": self.layers[0].qkv.library,
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
        blocks = list(self._embed(tensor(ids), tensor(positions), tensor(types)).split(TOKENS_PER_BLOCK))
        starts = None
        if self.device.type == "cuda" and self.dtype != torch.float32 and varlen_attn is not None:
            starts = torch.tensor([0] + [end for _, end in spans], dtype=torch.int32, device=self.device)
        for layer in self.layers:
            blocks = layer(blocks, spans, starts)
        if self.pair:
            dense, out = self.head
            first = blocks[0].new_zeros(whole_blocks(len(sequences)), blocks[0].shape[1])
            first[: len(sequences)] = torch.cat([rows_of(blocks, start, start + 1) for start, _ in spans])
            logits = torch.cat([out(torch.tanh(dense(block))) for block in first.split(TOKENS_PER_BLOCK)])
            return logits[: len(sequences), 0].float().cpu()
        pooled = torch.stack([rows_of(blocks, start, end).float().mean(0) for start, end in spans])
        return F.normalize(pooled, dim=-1).cpu()

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        x = e.word_embeddings(ids) + e.token_type_embeddings(types)  # Hugging Face's order of sums
        return e.LayerNorm(x + e.position_embeddings(positions))

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """A request's scores ``[n]`` from the outputs of its sequences, in :meth:`encode` order."""
        if self.pair:
            return outputs
        # Row by row, not a matrix-vector product: its rounding depended on the row's position (on an Intel
        # Xeon a document's score changed in the last bit when the request listed the documents reversed).
        return self.scale * (outputs[1:] * outputs[0]).sum(-1)


def _runs(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(start, length, count)``: consecutive sequences of one length that lie in one block (so that their
    rows are a view), or a sequence alone."""
    runs: list[list[int]] = []
    for start, end in spans:
        if runs:
            first, length, count = runs[-1]
            if (
                end - start == length
                and start == first + length * count
                and (end - 1) // TOKENS_PER_BLOCK == first // TOKENS_PER_BLOCK
            ):
                runs[-1][2] += 1
                continue
        runs.append([start, end - start, 1])
    return [(start, length, count) for start, length, count in runs]


def _spans(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` rows of each sequence packed back to back."""
    ends = list(itertools.accumulate(lengths))
    return [(end - n, end) for end, n in zip(ends, lengths, strict=True)]
