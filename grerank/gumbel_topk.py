"""The relaxed top-k Gumbel mask of G-Rerank, and the deterministic top-k used at evaluation and serving.

Training (DESIGN.md section 2, steps 2-4)::

    g^(j) = -log(-log u),  u ~ U(0, 1)                  per document, per draw j = 1..k
    m^(j) = softmax((kappa * w + g^(j)) / tau)          one soft draw over the n documents
    M     = max_j m^(j)                                 element-wise: relaxed subset sampling

``M_i`` lies in [0, 1], sums to at most k, and tends to a k-hot vector as tau -> 0. The running maxima
``M^(k') = max_{j <= k'} m^(j)`` are relaxed top-k' masks of the same draws (k' = 1..k): nested subsets, so a
loss on all of them rewards the order within the top k as well as the set.
Inference: no noise, the k highest scores, ties broken by candidate order.
"""

from __future__ import annotations

import itertools

import torch


def gumbel_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None, **tensor_kwargs
) -> torch.Tensor:
    """Standard Gumbel samples."""
    return _gumbel(torch.rand(shape, generator=generator, **tensor_kwargs))


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log u)`` of uniforms, ``u`` kept inside (0, 1) so the double log stays finite."""
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def antithetic_gumbel_noise(
    shape: tuple[int, ...], pairs_dim: int, generator: torch.Generator | None = None, **tensor_kwargs
) -> torch.Tensor:
    """Gumbel samples whose slices ``2j`` and ``2j + 1`` along ``pairs_dim`` (of even size) are antithetic:
    ``u`` and ``1 - u``, so a draw that favours a document is paired with one that disfavours it."""
    half = list(shape)
    if half[pairs_dim] % 2:
        raise ValueError(f"antithetic draws come in pairs; got {half[pairs_dim]}")
    half[pairs_dim] //= 2
    u = torch.rand(half, generator=generator, **tensor_kwargs)
    return _gumbel(torch.stack([u, 1.0 - u], dim=pairs_dim + 1).flatten(pairs_dim, pairs_dim + 1))


def standardized(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scores ``[B, n]`` shifted and scaled to mean 0 and standard deviation 1 per row: the order is kept,
    and ``kappa`` then sets how far apart the candidates are against the Gumbel noise in units of the row's
    spread (a bi-encoder's cosines span a narrow range that differs from question to question)."""
    centred = scores - scores.mean(dim=-1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)


def relaxed_topk_mask(
    scores: torch.Tensor,
    k: int,
    tau: float = 0.5,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft top-k mask ``[B, n]`` from reranker scores ``[B, n]``; differentiable in ``scores``.

    ``generator`` makes the draws reproducible (it must live on the scores' device); ``noise`` ``[k, B, n]``
    replaces the independent Gumbel draws (e.g. :func:`antithetic_gumbel_noise`).
    """
    return relaxed_prefix_masks(scores, k, tau, kappa, generator, noise)[-1]


def relaxed_prefix_masks(
    scores: torch.Tensor,
    k: int,
    tau: float = 0.5,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft top-1, top-2, ..., top-k masks ``[k, B, n]`` of the same draws (each the running maximum of the
    soft draws so far), so the top-k' of row ``k' - 1`` lies inside the top-(k' + 1); arguments as
    :func:`relaxed_topk_mask`, whose mask is the last row."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if noise is None:
        noise = gumbel_noise((k, *scores.shape), generator, device=scores.device, dtype=torch.float32)
    draws = torch.softmax((kappa * scores.float() + noise) / tau, dim=-1)  # [k, B, n]
    return draws.cummax(dim=0).values


def subset_probabilities(log_p: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """``P(S)`` ``[B, S]`` of drawing exactly each subset (rows of ``subsets`` ``[S, k]``) in k draws without
    replacement from ``exp(log_p)`` ``[B, n]``: the Gumbel top-k distribution the relaxed mask stands for.
    Summed over the k! orders of a subset, each the product of ``p_i / (1 - mass drawn before i)``;
    differentiable in ``log_p``."""
    k = subsets.shape[1]
    orders = torch.tensor(list(itertools.permutations(range(k))), device=subsets.device)  # [k!, k]
    picked = log_p.exp()[:, subsets[:, orders]]  # [B, S, k!, k]
    before = picked.cumsum(-1) - picked
    return (picked / (1 - before).clamp_min(torch.finfo(picked.dtype).tiny)).prod(-1).sum(-1)


def hard_topk(scores: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dim, best first; ties keep candidate order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order if k is None else order[..., :k]


def hard_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask with ones on the deterministic top-k (what the reader sees at inference)."""
    mask = torch.zeros_like(scores, dtype=torch.float32)
    return mask.scatter_(-1, hard_topk(scores, k), 1.0)
