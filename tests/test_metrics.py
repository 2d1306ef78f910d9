"""Ranking and answer metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from grerank.passage import Passage
from grerank.qa_data import Example
from training.metrics import (
    exact_match,
    f1_score,
    hit_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
    reciprocal_rank,
)


def test_recall_and_reciprocal_rank() -> None:
    ranked = [False, True, False, True]
    assert recall_at_k(ranked, 1) == 0.0
    assert recall_at_k(ranked, 2) == 0.5
    assert recall_at_k(ranked, 4) == 1.0
    assert reciprocal_rank(ranked) == 0.5
    assert recall_at_k([False, False], 1) is None and reciprocal_rank([False]) is None
    # Two relevant, one in the top 2: recall counts it half, a hit whole.
    assert hit_at_k(ranked, 2) == 1.0 and hit_at_k(ranked, 1) == 0.0 and hit_at_k([False], 1) is None


def test_ndcg() -> None:
    # relevant at ranks 2 and 3: DCG = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3))
    assert ndcg_at_k([False, True, True, False], 5) == pytest.approx(expected)
    assert ndcg_at_k([True, True], 5) == pytest.approx(1.0)


def test_exact_match_and_f1_use_hotpotqa_normalisation() -> None:
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert f1_score("in Tulsa, Oklahoma", ["Tulsa"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert f1_score("yes", ["no"]) == 0.0 and f1_score("no it is", ["no"]) == 0.0
    assert f1_score("Paris", ["London", "paris"]) == 1.0


def test_ranking_metrics_by_type_with_counts() -> None:
    passages = [Passage("A", "alpha"), Passage("B", "the answer is tulsa"), Passage("C", "gamma")]
    bridge = Example("1", "q", ["Tulsa"], passages, "bridge", [True, True, False])
    comparison = Example("2", "q", ["yes"], passages, "comparison", [False, True, True])
    report = ranking_metrics([bridge, comparison], [[0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    # bridge: order A, B, C. The answer-bearing B is at rank 2, the indirect A at rank 1.
    assert report["bridge"]["answer_recall@1"] == {"value": 0.0, "n": 1}
    assert report["bridge"]["answer_mrr"]["value"] == 50.0
    assert report["bridge"]["answer_hit@2"] == {"value": 100.0, "n": 1}
    assert report["bridge"]["bridge_recall@2"]["value"] == 100.0
    # comparison: order C, B, A; both supporting in the top 2; "yes" is in no passage.
    assert report["comparison"]["support_recall@2"]["value"] == 100.0
    assert "answer_recall@1" not in report["comparison"]
    assert report["all"]["support_recall@2"] == {"value": 100.0, "n": 2}
