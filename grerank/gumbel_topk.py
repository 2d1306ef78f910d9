"""The relaxed top-k Gumbel mask of G-Rerank, and the deterministic top-k used at evaluation and serving.

Training (DESIGN.md section 2, steps 2-4)::

    g^(j) = -log(-log u),  u ~ U(0, 1)                  per document, per draw j = 1..k
    m^(j) = softmax((kappa * w + g^(j)) / tau)          one soft draw over the n documents
    M     = max_j m^(j)                                 element-wise: relaxed subset sampling

``M_i`` lies in [0, 1], sums to at most k, and tends to a k-hot vector as tau -> 0.
Inference: no noise, the k highest scores, ties broken by candidate order.
"""

from __future__ import annotations

import torch


def gumbel_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None, **tensor_kwargs
) -> torch.Tensor:
    """Standard Gumbel samples; ``u`` is kept inside (0, 1) so the double log stays finite."""
    u = torch.rand(shape, generator=generator, **tensor_kwargs)
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def relaxed_topk_mask(
    scores: torch.Tensor,
    k: int,
    tau: float = 0.5,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Soft top-k mask ``[B, n]`` from reranker scores ``[B, n]``; differentiable in ``scores``.

    ``generator`` makes the draws reproducible (it must live on the scores' device).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    noise = gumbel_noise((k, *scores.shape), generator, device=scores.device, dtype=torch.float32)
    draws = torch.softmax((kappa * scores.float() + noise) / tau, dim=-1)  # [k, B, n]
    return draws.max(dim=0).values


def hard_topk(scores: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dim, best first; ties keep candidate order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order if k is None else order[..., :k]


def hard_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask with ones on the deterministic top-k (what the reader sees at inference)."""
    mask = torch.zeros_like(scores, dtype=torch.float32)
    return mask.scatter_(-1, hard_topk(scores, k), 1.0)
