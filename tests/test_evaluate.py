"""`python -m training.evaluate`: ranking and answer metrics for baselines and saved rerankers."""

from __future__ import annotations

import json
from pathlib import Path

from grerank.reranker import build_reranker
from tests.synthetic_qa import synthetic_split
from training import evaluate
from training.bm25 import BM25


def test_bm25_prefers_rare_matching_terms_and_shorter_documents() -> None:
    corpus = ["the cat sat", "the dog sat", "the cat ran far away from the old house", "a zebra"]
    bm25 = BM25(corpus)
    assert bm25.idf("zebra") > bm25.idf("the")
    cat_short, dog, cat_long, zebra = bm25.scores("cat zebra", corpus)
    assert zebra > cat_short > cat_long > dog == 0.0


def test_evaluate_reports_by_type_and_reuses_stored_answers(
    copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    split = synthetic_split(tmp_path / "dev.jsonl", 6, 4, seed=5)
    folder = tmp_path / "reranker"
    build_reranker("bi-encoder", tiny_bert_dir).save(folder)
    common = [
        "--split", str(split), "--candidates", "4", "--k", "1", "2", "--reader", str(copy_reader_dir),
        "--precision", "fp32", "--max-new-tokens", "3", "--state-cache-dir", str(tmp_path / "states"),
    ]  # fmt: skip
    out = tmp_path / "results" / "tiny.json"
    first = evaluate.main([*common, "--reranker", str(folder), "--out", str(out)])
    assert first["questions"] == 6 and first["reranker"]["kind"] == "reranker folder"
    assert first["ranking"]["all"]["answer_recall@1"]["n"] == 6
    assert set(first["answers"]) == {"top1", "top2"}
    assert first["answers"]["top2"]["all"]["f1"]["n"] == 6
    assert first["command"].startswith("python -m training.evaluate --split")
    assert json.loads(out.read_text())["ranking"] == first["ranking"]
    predictions = out.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12 and all(len(json.loads(p)["read"]) in (1, 2) for p in predictions)

    stored = (tmp_path / "states" / "answers.jsonl").read_text()
    again = evaluate.main([*common, "--reranker", str(folder)])
    assert again["answers"] == first["answers"]
    assert (tmp_path / "states" / "answers.jsonl").read_text() == stored  # nothing generated twice

    bm25 = evaluate.main([*common, "--reranker", "bm25", "--k"])
    assert bm25["reranker"]["kind"] == "bm25" and bm25["answers"] == {}
    # 'which word?' shares no term with any candidate: all ties, broken by candidate order
    assert (
        bm25["ranking"]["all"]["answer_recall@1"]["value"]
        == 100 * sum(json.loads(line)["ctxs"][0]["has_answer"] for line in split.read_text().splitlines()) / 6
    )
