"""Differentiable masked attention (DMA): the additive attention masks that put a document mask into a reader.

Adding ``log M_i`` to the attention logits of every key token of document ``i`` multiplies those tokens'
unnormalised attention weights by ``M_i``; after the softmax renormalises, a 0/1 mask is ordinary masking
and a soft mask is its differentiable relaxation (G-Rerank, DESIGN.md section 2, step 5).

A document with ``M_i == 0`` exactly is removed (``-inf``), so a hard mask equals not giving the reader
that document at all. Below ``eps`` the log is clamped, so gradients stay finite.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    rows, index_rows = [], []
    for docs in docs_per_example:
        parts = ([lead] if lead is not None else []) + list(docs)
        rows.append(torch.cat(parts, dim=seq_dim))
        index_rows.append(
            torch.cat(
                ([torch.full((lead.shape[seq_dim],), -1, dtype=torch.long)] if lead is not None else [])
                + [torch.full((d.shape[seq_dim],), i, dtype=torch.long) for i, d in enumerate(docs)]
            )
        )
    width = max(r.shape[seq_dim] for r in rows)

    def pad(row: torch.Tensor) -> torch.Tensor:
        shape = list(row.shape)
        shape[seq_dim] = width - row.shape[seq_dim]
        return torch.cat([row, row.new_zeros(shape)], dim=seq_dim)

    states = torch.stack([pad(r) for r in rows], dim=batch_dim)
    key_index = torch.stack(
        [torch.nn.functional.pad(r, (0, width - r.shape[0]), value=-2) for r in index_rows]
    )
    return states, key_index.to(states.device)
