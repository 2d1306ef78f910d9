"""The exact Gumbel top-k subset probabilities and gradient that training.gradient_check compares G-Rerank's
relaxed gradient with."""

from __future__ import annotations

import itertools
from collections import Counter

import torch

from grerank.gumbel_topk import gumbel_noise, hard_topk
from training import report
from training.gradient_check import exact_gradient, subset_probabilities


def test_subset_probabilities_are_the_gumbel_top_k_frequencies() -> None:
    torch.manual_seed(0)
    log_p = torch.log_softmax(torch.randn(5) * 2, -1)
    subsets = list(itertools.combinations(range(5), 2))
    exact = subset_probabilities(log_p, subsets)
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
    subsets = list(itertools.combinations(range(4), 2))
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
    assert "| k=2 tau=0.5 kappa=10.0, 8 draws | 2 | 0.50 | 0.25 | 0.12 | 0.75 |" in text
    assert "`python -m training.gradient_check --questions 2`" in text
    assert report.gradient_check_table([]) == []


def test_pdist_gradient_is_kappa_times_p_minus_q() -> None:
    from training.gradient_check import pdist_gradient

    scores, loglik, kappa = torch.tensor([0.2, 0.5, -0.1]), torch.tensor([-3.0, -1.0, -2.0]), 4.0
    p, q = torch.softmax(kappa * scores, -1), torch.softmax(loglik, -1)
    assert torch.allclose(pdist_gradient(scores, loglik, kappa), kappa * (p - q), atol=1e-6)
