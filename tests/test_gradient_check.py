"""The exact Gumbel top-k subset probabilities and gradient that training.gradient_check compares G-Rerank's
relaxed gradient with."""

from __future__ import annotations

import itertools
from collections import Counter

import torch

from grerank.gumbel_topk import antithetic_gumbel_noise, gumbel_noise, hard_topk, subset_probabilities
from training import objectives, report
from training.gradient_check import exact_gradient


def test_subset_probabilities_are_the_gumbel_top_k_frequencies() -> None:
    torch.manual_seed(0)
    log_p = torch.log_softmax(torch.randn(5) * 2, -1)
    subsets = list(itertools.combinations(range(5), 2))
    exact = subset_probabilities(log_p[None], torch.tensor(subsets))[0]
    assert abs(exact.sum().item() - 1) < 1e-6
    draws = 200_000
    top = hard_topk(log_p + gumbel_noise((draws, 5)), 2).sort(-1).values
    seen = Counter(map(tuple, top.tolist()))
    sampled = torch.tensor([seen[s] / draws for s in subsets])
    assert torch.allclose(exact.float(), sampled, atol=4e-3)
    # By hand, for a pair: p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j).
    p = log_p.exp()
    assert abs(exact[0].item() - (p[0] * p[1] / (1 - p[0]) + p[1] * p[0] / (1 - p[1])).item()) < 1e-6


def test_exact_gradient_matches_finite_differences() -> None:
    torch.manual_seed(1)
    scores, kappa = torch.randn(4), 3.0
    subsets = objectives.k_subsets(4, 2)
    nll = torch.rand(len(subsets)) * 5
    value, grad = exact_gradient(scores, kappa, subsets, nll)
    eps = 1e-4
    for i in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[i] = eps
        up, _ = exact_gradient(scores.double() + step, kappa, subsets, nll)
        down, _ = exact_gradient(scores.double() - step, kappa, subsets, nll)
        assert abs((up - down) / (2 * eps) - grad[i].item()) < 1e-4
    assert min(nll).item() < value < max(nll).item()  # an expectation over the subsets


def test_the_report_shows_each_setting_with_its_command() -> None:
    summary = {"relaxed_mean": 0.5, "relaxed_single": 0.25, "pdist": 0.125, "snr": 0.75, "expected_nll": 4.0}
    check = {
        "command": "python -m training.gradient_check --questions 2",
        "args": {"k": 2, "draws": 8},
        "summary": {"tau=0.5 kappa=10.0": summary},
        "questions": {"tau=0.5 kappa=10.0": [{"id": "a"}, {"id": "b"}]},
    }
    text = "\n".join(report.gradient_check_table([check]))
    assert (
        "| k=2 tau=0.5 kappa=10.0, 8 draws | untrained | 2 | 0.50 | 0.25 |  |  |  |  | 0.12 | 0.75 |" in text
    )
    assert "`python -m training.gradient_check --questions 2`" in text
    assert report.gradient_check_table([]) == []


def test_pdist_gradient_is_kappa_times_p_minus_q() -> None:
    from training.gradient_check import pdist_gradient

    scores, loglik, kappa = torch.tensor([0.2, 0.5, -0.1]), torch.tensor([-3.0, -1.0, -2.0]), 4.0
    p, q = torch.softmax(kappa * scores, -1), torch.softmax(loglik, -1)
    assert torch.allclose(pdist_gradient(scores, loglik, kappa), kappa * (p - q), atol=1e-6)


def test_subset_probabilities_of_three_sum_to_one_and_follow_the_scores() -> None:
    log_p = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]), -1)
    probabilities = subset_probabilities(log_p, objectives.k_subsets(5, 3))[0]
    assert abs(probabilities.sum().item() - 1) < 1e-6
    assert probabilities.argmax().item() == 2  # (0, 1, 4), the third subset: the three highest scores


def test_expected_objective_is_lowest_where_the_best_subset_is_likeliest() -> None:
    nll = torch.tensor([[5.0] * 6])
    nll[0, 0] = 1.0  # subset (0, 1) is the one the reader answers from
    scores = torch.zeros(1, 4, requires_grad=True)
    loss = objectives.expected_nll(scores, nll, 2, kappa=3.0)
    loss.backward()
    # Raising the scores of candidates 0 and 1 lowers the expected loss; raising the others raises it.
    assert torch.all(scores.grad[0, :2] < 0) and torch.all(scores.grad[0, 2:] > 0)
    standardized = objectives.expected_nll(torch.tensor([[1.0, 0.9, 0.0, 0.1]]) * 0.01, nll, 2, 3.0, True)
    assert standardized < objectives.expected_nll(torch.tensor([[1.0, 0.9, 0.0, 0.1]]) * 0.01, nll, 2, 3.0)


def test_antithetic_noise_pairs_u_with_one_minus_u() -> None:
    noise = antithetic_gumbel_noise((2, 3, 4, 5), 2, torch.Generator().manual_seed(0))
    u = torch.exp(-torch.exp(-noise))  # back to the uniforms
    assert torch.allclose(u[:, :, 0::2] + u[:, :, 1::2], torch.ones(2, 3, 2, 5), atol=1e-5)
    # Across the pairs the draws are independent: not all pairs are the same.
    assert not torch.allclose(u[:, :, 0], u[:, :, 2])
