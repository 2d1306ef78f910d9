"""Differentiable masked attention (DMA): the additive attention masks that put a document mask into a reader.

Adding ``log M_i`` to the attention logits of every key token of document ``i`` multiplies those tokens'
unnormalised attention weights by ``M_i``; after the softmax renormalises, a 0/1 mask is ordinary masking
and a soft mask is its differentiable relaxation (G-Rerank, DESIGN.md section 2, step 5).

A document with ``M_i == 0`` exactly is removed (``-inf``), so a hard mask equals not giving the reader
that document at all. Below ``eps`` the log is clamped, so gradients stay finite.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def document_log_mask(mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``log(max(M, eps))`` with exact zeros mapped to ``-inf``; differentiable where ``M > 0``."""
    log_mask = torch.log(mask.clamp_min(eps))
    return log_mask.masked_fill(mask == 0, float("-inf"))


def key_bias(
    doc_log_mask: torch.Tensor,
    key_doc_index: torch.Tensor,
) -> torch.Tensor:
    """Per-key additive bias from per-document log-masks.

    ``doc_log_mask``: ``[B, n]``. ``key_doc_index``: ``[B, K]`` long, the document each key belongs to,
    ``-1`` for keys that belong to no document (always visible: prefix, question) and ``-2`` for padding
    (never visible). Returns ``[B, K]``.
    """
    batch, _ = doc_log_mask.shape
    # Two extra columns: index -1 -> 0 (visible), index -2 -> -inf (padding).
    extended = torch.cat(
        [
            doc_log_mask,
            doc_log_mask.new_zeros(batch, 1),
            doc_log_mask.new_full((batch, 1), float("-inf")),
        ],
        dim=1,
    )
    n = doc_log_mask.shape[1]
    index = torch.where(key_doc_index >= 0, key_doc_index, n - 1 - key_doc_index)  # -1 -> n, -2 -> n+1
    return torch.gather(extended, 1, index)


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
