"""The relaxed top-k Gumbel mask and the deterministic top-k."""

from __future__ import annotations

import pytest
import torch

from grerank.gumbel_topk import hard_topk, hard_topk_mask, relaxed_prefix_masks, relaxed_topk_mask


@pytest.mark.parametrize("k", [1, 2, 5])
def test_mask_in_unit_interval_and_sums_to_at_most_k(k: int) -> None:
    scores = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    mask = relaxed_topk_mask(scores, k, tau=1.0, generator=torch.Generator().manual_seed(1))
    assert mask.shape == scores.shape
    assert torch.all(mask >= 0) and torch.all(mask <= 1)
    assert torch.all(mask.sum(-1) <= k + 1e-5)
    assert torch.all(mask.sum(-1) >= 1 - 1e-5)  # each draw contributes its maximum


def test_mask_tends_to_k_hot_of_the_top_scores_as_tau_shrinks() -> None:
    scores = torch.tensor([[0.0, 30.0, 10.0, 20.0, -5.0]])
    gaps = []
    for tau in (1.0, 0.1, 0.01):
        mask = relaxed_topk_mask(scores, 2, tau=tau, kappa=1.0, generator=torch.Generator().manual_seed(0))
        gaps.append((mask - torch.round(mask)).abs().max().item())
    assert gaps[-1] < 1e-4 and gaps[0] > gaps[-1]
    # With scores far apart relative to the noise, the k draws pick the best document; the max over
    # draws of a near one-hot is 1 there: the best document is always in.
    hard = relaxed_topk_mask(scores, 2, tau=0.01, generator=torch.Generator().manual_seed(0))
    assert hard[0, 1] == pytest.approx(1.0)


def test_draws_are_seeded_and_reproducible() -> None:
    scores = torch.randn(4, 7)
    a = relaxed_topk_mask(scores, 3, generator=torch.Generator().manual_seed(7))
    b = relaxed_topk_mask(scores, 3, generator=torch.Generator().manual_seed(7))
    c = relaxed_topk_mask(scores, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_flows_to_scores() -> None:
    scores = torch.randn(2, 6, requires_grad=True)
    mask = relaxed_topk_mask(scores, 2, tau=0.5, kappa=2.0, generator=torch.Generator().manual_seed(0))
    (mask * torch.arange(6.0)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_prefix_masks_nest_and_end_in_the_top_k_mask() -> None:
    scores = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    masks = relaxed_prefix_masks(scores, 3, 0.5, 2.0, torch.Generator().manual_seed(4))
    assert masks.shape == (3, 8, 6)
    assert masks[0].sum(-1) == pytest.approx(torch.ones(8))  # the top 1: one soft draw
    assert torch.all(masks[1:] >= masks[:-1])  # each top-k' inside the next
    assert torch.all(masks[1:].sum(-1) > masks[:-1].sum(-1))
    assert torch.equal(masks[-1], relaxed_topk_mask(scores, 3, 0.5, 2.0, torch.Generator().manual_seed(4)))


def test_hard_topk_breaks_ties_by_candidate_order() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9]])
    assert hard_topk(scores, 3).tolist() == [[1, 2, 4]]
    assert hard_topk_mask(scores, 2).tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0]]


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        relaxed_topk_mask(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError):
        relaxed_topk_mask(torch.zeros(1, 3), 1, tau=0.0)
