"""Differentiable masked attention (DMA): the additive attention masks that put a document mask into a reader.

Adding ``log M_i`` to the attention logits of every key token of document ``i`` multiplies those tokens'
unnormalised attention weights by ``M_i``; after the softmax renormalises, a 0/1 mask is ordinary masking
and a soft mask is its differentiable relaxation (G-Rerank, DESIGN.md section 2, step 5).

A document with ``M_i == 0`` exactly is removed (``-inf``), so a hard mask equals not giving the reader
that document at all. Below ``eps`` the log is clamped, so gradients stay finite.

:func:`scaled_value_attention` computes the same attention without differentiating through a mask: since
``softmax(s + log M) v = (sum_k e^s_k M_k v_k) / (sum_k e^s_k M_k)``, it multiplies each key's weight by
``M_k`` and the mask's gradient arrives through plain matrix products, with a backward that recomputes the
weights instead of saving them; the eager alternative saved fp32 attention probabilities and grouped-query
copies of every key and value for backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-12


def document_log_mask(mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``log(max(M, eps))`` with exact zeros mapped to ``-inf``; differentiable where ``M > 0``."""
    log_mask = torch.log(mask.clamp_min(eps))
    return log_mask.masked_fill(mask == 0, float("-inf"))


def _per_key(
    per_doc: torch.Tensor, key_doc_index: torch.Tensor, visible: float, hidden: float
) -> torch.Tensor:
    """Per-document values ``[B, n]`` gathered to keys ``[B, K]``: ``visible`` at -1, ``hidden`` at -2."""
    batch, n = per_doc.shape
    extended = torch.cat(
        [per_doc, per_doc.new_full((batch, 1), visible), per_doc.new_full((batch, 1), hidden)], dim=1
    )
    index = torch.where(key_doc_index >= 0, key_doc_index, n - 1 - key_doc_index)  # -1 -> n, -2 -> n+1
    return torch.gather(extended, 1, index)


def key_bias(
    doc_log_mask: torch.Tensor,
    key_doc_index: torch.Tensor,
) -> torch.Tensor:
    """Per-key additive bias from per-document log-masks.

    ``doc_log_mask``: ``[B, n]``. ``key_doc_index``: ``[B, K]`` long, the document each key belongs to,
    ``-1`` for keys that belong to no document (always visible: prefix, question) and ``-2`` for padding
    (never visible). Returns ``[B, K]``.
    """
    return _per_key(doc_log_mask, key_doc_index, 0.0, float("-inf"))


def key_scale(mask: torch.Tensor, key_doc_index: torch.Tensor) -> torch.Tensor:
    """Per-key multiplier ``M`` ``[B, K]`` for :func:`scaled_value_attention`: ``exp`` of :func:`key_bias`
    (1 for keys of no document, 0 for padding), differentiable in ``mask``."""
    return _per_key(mask, key_doc_index, 1.0, 0.0)


def scaled_value_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: torch.Tensor,
    causal_tail: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, H, T, d]`` over ``key``/``value`` ``[B, kvh, K, d]`` (grouped-query:
    ``H`` a multiple of ``kvh``) with each key's unnormalised weight multiplied by ``scale`` ``[B, K]``;
    the last ``T`` keys are the queries' own tokens, seen causally. Returns ``[B, T, H, d]``.

    Equal to softmax attention under the additive bias ``log scale`` (``-inf`` where it is 0), and so are
    the gradients where ``scale > 0``; where it is 0 they are the one-sided derivative (a small mask's),
    where the bias has none. ``causal_tail`` is :func:`grouped_causal_mask`'s constant mask. At least one key
    of every row must have a nonzero scale (the reader's prefix and its own tokens always do).
    """
    batch, heads, length, width = query.shape
    kv_heads = key.shape[1]
    # The heads that share a key/value head attend as one longer query: no copies of keys and values.
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * length, width)
    # The mask's earlier columns are all zero (every cached key visible): only its causal tail is added.
    tail = causal_tail[..., -length:]
    out = _ScaledValueAttention.apply(grouped, key, value, scale.to(_wide(query.dtype)), tail, scaling)
    return out.view(batch, heads, length, width).transpose(1, 2).contiguous()


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention weights are formed in: fp32, or the inputs' own if wider."""
    return torch.promote_types(dtype, torch.float32)


class _ScaledValueAttention(torch.autograd.Function):
    """``softmax(q k^T * scaling + causal + log scale) v`` as plain matrix products that keep only each row's
    maximum and normaliser for the backward, which recomputes the weights (as flash attention does).

    A few dozen question/answer rows over a couple of thousand cached keys is a shape PyTorch's fused CPU
    kernel serves badly in bf16 (see ``bench train_throughput``), and the ones column it needed for the
    normaliser made the head width odd. Weights and their gradients are formed in fp32, in place; the
    products run in the inputs' dtype. Only the last ``T`` keys (the rows' own tokens) take the causal mask.
    """

    @staticmethod
    def _logits(grouped, key, causal_tail) -> torch.Tensor:  # noqa: ANN001
        logits = torch.matmul(grouped, key.transpose(-1, -2)).to(_wide(key.dtype))
        logits[..., -causal_tail.shape[-1] :] += causal_tail
        return logits

    @staticmethod
    def forward(ctx, grouped, key, value, scale, causal_tail, scaling):  # noqa: ANN001, ANN205
        grouped = grouped * scaling
        logits = _ScaledValueAttention._logits(grouped, key, causal_tail)
        peak = logits.amax(dim=-1, keepdim=True)
        weights = logits.sub_(peak).exp_().mul_(scale[:, None, None, :])  # [B, kvh, R, K]
        total = weights.sum(dim=-1, keepdim=True)
        out = torch.matmul(weights.to(value.dtype), value).to(total.dtype).div_(total).to(value.dtype)
        ctx.save_for_backward(grouped, key, value, scale, causal_tail, peak, total, out)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, d_out):  # noqa: ANN001, ANN205
        grouped, key, value, scale, causal_tail, peak, total, out = ctx.saved_tensors
        scale = scale[:, None, None, :]
        # Each key's weight before its scale, normalised: the attention probabilities are this times scale.
        unscaled = _ScaledValueAttention._logits(grouped, key, causal_tail).sub_(peak).exp_().div_(total)
        d_value = None
        if ctx.needs_input_grad[2]:
            d_value = torch.matmul((unscaled * scale).to(value.dtype).transpose(-1, -2), d_out)
        # d out / d weight_k = v_k - out: each key's share of the gradient is unscaled * (dO.v_k - dO.out).
        wide = unscaled.dtype
        shares = torch.matmul(d_out, value.transpose(-1, -2)).to(wide)
        shares.sub_((d_out.to(wide) * out.to(wide)).sum(dim=-1, keepdim=True)).mul_(unscaled)
        d_scale = shares.sum(dim=(1, 2)) if ctx.needs_input_grad[3] else None
        d_logits = shares.mul_(scale).to(grouped.dtype)
        d_grouped = torch.matmul(d_logits, key) * ctx.scaling if ctx.needs_input_grad[0] else None
        d_key = None
        if ctx.needs_input_grad[1]:
            d_key = torch.matmul(d_logits.transpose(-1, -2), grouped)  # grouped already carries scaling
        return d_grouped, d_key, d_value, d_scale, None, None


def grouped_causal_mask(
    length: int, keys: int, groups: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """``[1, 1, groups * length, keys]`` additive mask for :func:`scaled_value_attention`: every earlier key
    visible, the last ``length`` keys causal, for each of ``groups`` query heads stacked along the rows."""
    tail = causal_block(length, device).repeat(groups, 1)
    mask = torch.cat([tail.new_zeros(groups * length, keys - length), tail], dim=1)
    return to_additive(mask, dtype)[None, None]


def to_additive(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a bias with ``-inf`` entries to ``dtype``, replacing ``-inf`` by the dtype's minimum.

    Attention kernels turn a row of all ``-inf`` into NaN; the finite minimum gives a harmless uniform row
    (such rows only occur for padding, whose outputs are ignored).
    """
    bias = bias.to(dtype)
    return bias.masked_fill(torch.isneginf(bias), torch.finfo(dtype).min)


def causal_block(length: int, device: torch.device | None = None) -> torch.Tensor:
    """``[length, length]`` additive causal mask (0 on and below the diagonal, ``-inf`` above)."""
    return torch.full((length, length), float("-inf"), device=device).triu(1)


def concat_documents(
    docs_per_example: Sequence[Sequence[torch.Tensor]],
    seq_dim: int,
    batch_dim: int,
    lead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay each example's document states end to end and pad the examples to one batch.

    Each example becomes ``[lead] [doc 0] [doc 1] ...`` along ``seq_dim`` (``lead``, e.g. an instruction
    prefix, belongs to no document), zero-padded to the longest example and stacked on a new ``batch_dim``.
    Returns ``(states, key_doc_index [B, K])`` with index ``-1`` for ``lead`` and ``-2`` for padding, as
    :func:`key_bias` expects.
    """
    parts_per_example = [([lead] if lead is not None else []) + list(docs) for docs in docs_per_example]
    lengths = [sum(part.shape[seq_dim] for part in parts) for parts in parts_per_example]
    width = max(lengths)
    first = parts_per_example[0][0]
    shape = list(first.shape)
    shape[seq_dim] = width
    shape.insert(batch_dim, len(parts_per_example))
    # One allocation, each state copied once into its slot: a cat per example, a zero pad and a stack
    # copied the states three times (about a second of a training step at ten documents per question).
    states = first.new_empty(shape)
    index_rows = []
    for b, (docs, parts, length) in enumerate(zip(docs_per_example, parts_per_example, lengths, strict=True)):
        row = states.select(batch_dim, b)
        offset = 0
        for part in parts:
            row.narrow(seq_dim, offset, part.shape[seq_dim]).copy_(part)
            offset += part.shape[seq_dim]
        row.narrow(seq_dim, length, width - length).zero_()
        index_rows.append(
            torch.cat(
                ([torch.full((lead.shape[seq_dim],), -1, dtype=torch.long)] if lead is not None else [])
                + [torch.full((d.shape[seq_dim],), i, dtype=torch.long) for i, d in enumerate(docs)]
                + [torch.full((width - length,), -2, dtype=torch.long)]
            )
        )
    key_index = torch.stack(index_rows)
    return states, key_index.to(states.device)
