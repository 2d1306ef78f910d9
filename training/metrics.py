"""Ranking and answer metrics: what the reranker finds and what the reader answers.

Ranking metrics take the relevance labels *in ranked order* (best first). A question with no relevant
candidate is left out of that metric (returns ``None``), and every aggregate reports how many questions
stand behind it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from grerank.gumbel_topk import hard_topk
from grerank.qa_data import Example, normalize_answer


def recall_at_k(ranked: Sequence[bool], k: int) -> float | None:
    total = sum(ranked)
    return None if total == 0 else sum(ranked[:k]) / total


def hit_at_k(ranked: Sequence[bool], k: int) -> float | None:
    """1 if any relevant candidate is in the top k: for answer-bearing paragraphs and the k the reader reads,
    whether the reader could answer from them (a recall would count one of two answer-bearing paragraphs
    half)."""
    return None if not any(ranked) else float(any(ranked[:k]))


def reciprocal_rank(ranked: Sequence[bool]) -> float | None:
    for rank, relevant in enumerate(ranked, start=1):
        if relevant:
            return 1.0 / rank
    return None


def ndcg_at_k(ranked: Sequence[bool], k: int) -> float | None:
    total = sum(ranked)
    if total == 0:
        return None
    dcg = sum(1.0 / math.log2(rank + 2) for rank, rel in enumerate(ranked[:k]) if rel)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(total, k)))
    return dcg / ideal


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 against the best-matching answer; yes/no/noanswer must match exactly (HotpotQA rule)."""
    best = 0.0
    pred = normalize_answer(prediction)
    for answer in answers:
        gold = normalize_answer(answer)
        if (pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")) and pred != gold:
            continue
        common = Counter(pred.split()) & Counter(gold.split())
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(pred.split()), same / len(gold.split())
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


# name -> (label function, metric function)
RANKING_METRICS = {
    "answer_recall@1": ("answer_bearing", lambda r: recall_at_k(r, 1)),
    "answer_hit@2": ("answer_bearing", lambda r: hit_at_k(r, 2)),
    "answer_mrr": ("answer_bearing", reciprocal_rank),
    "support_recall@2": ("supporting", lambda r: recall_at_k(r, 2)),
    "support_recall@5": ("supporting", lambda r: recall_at_k(r, 5)),
    "support_ndcg@5": ("supporting", lambda r: ndcg_at_k(r, 5)),
    "support_mrr": ("supporting", reciprocal_rank),
    "bridge_recall@2": ("indirect", lambda r: recall_at_k(r, 2)),
    "bridge_recall@5": ("indirect", lambda r: recall_at_k(r, 5)),
}


def _labels(example: Example, kind: str) -> list[bool]:
    if kind == "supporting":
        return example.supporting
    return example.answer_bearing() if kind == "answer_bearing" else example.indirect()


def ranking_metrics(
    examples: Sequence[Example], scores: Sequence[Sequence[float]]
) -> dict[str, dict[str, dict[str, float | int]]]:
    """``{group: {metric: {"value": percent, "n": questions}}}`` for groups all, bridge, comparison."""
    import torch

    per_group: dict[str, dict[str, list[float]]] = {}
    for example, row in zip(examples, scores, strict=True):
        order = hard_topk(torch.as_tensor(list(row), dtype=torch.float32)).tolist()
        for group in ("all", example.type or "untyped"):
            bucket = per_group.setdefault(group, {})
            for name, (kind, fn) in RANKING_METRICS.items():
                labels = _labels(example, kind)
                if not labels:
                    continue
                value = fn([labels[i] for i in order])
                if value is not None:
                    bucket.setdefault(name, []).append(value)
    return {
        group: {name: {"value": 100 * sum(v) / len(v), "n": len(v)} for name, v in metrics.items()}
        for group, metrics in per_group.items()
    }
