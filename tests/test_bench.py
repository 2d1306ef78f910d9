"""The benchmark harness's own logic on small inputs: what it reports must be true of what it measured."""

from __future__ import annotations

import json
from pathlib import Path

from bench import __main__ as harness
from bench import faiss_retrieval


def test_compressed_index_trade_off_is_measured_against_exact_search() -> None:
    result = faiss_retrieval.synthetic(20_000, queries=50, dim=96, lists=64)
    rows = {r["index"]: r for r in result["rows"]}
    assert rows["Flat (exact)"]["recall"] == 1.0
    plain = [rows[f"IVF-PQ, nprobe {p}"]["recall"] for p in faiss_retrieval.NPROBES]
    refined = [rows[f"IVF-PQ + exact re-rank of 100, nprobe {p}"]["recall"] for p in faiss_retrieval.NPROBES]
    assert plain == sorted(plain) and plain[0] < plain[-1]  # more lists probed: more neighbours found
    assert all(r >= p for r, p in zip(refined, plain, strict=True))  # exact re-ranking only helps
    assert refined[-1] > 0.9 and plain[-1] < 1.0  # 48-byte codes lose something that re-ranking recovers
    table = faiss_retrieval.markdown({"demo": _demo(), "synthetic": result})
    assert "| IVF-PQ, nprobe 64 | 48 |" in table


def _demo() -> dict:
    return {
        "documents": 10,
        "questions": 2,
        "index": "IndexFlatIP (exact)",
        "embed_p50_ms": 1.0,
        "search_p50_ms": 0.1,
        "search_p99_ms": 0.2,
        "supporting_recall@20": 0.5,
    }


def test_harness_reports_a_failing_benchmark_and_still_writes_the_others(tmp_path: Path, monkeypatch) -> None:
    def broken(quick: bool) -> dict:
        raise RuntimeError("no index here")

    monkeypatch.setattr(faiss_retrieval, "run", broken)
    assert harness.main(["--quick", "--only", "faiss_retrieval", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "no index here" in report["benchmarks"]["faiss_retrieval"]["error"]
    assert report["machine"] and report["versions"]["torch"]
    assert "no index here" in (tmp_path / "bench.md").read_text()


def test_rerunning_one_benchmark_keeps_the_others_results(tmp_path: Path, monkeypatch) -> None:
    earlier = {"benchmarks": {"train_throughput": {"skipped": "measured before", "seconds": 1.0}}}
    (tmp_path / "bench.json").write_text(json.dumps(earlier))
    monkeypatch.setattr(faiss_retrieval, "run", lambda quick: (_ for _ in ()).throw(RuntimeError("again")))
    harness.main(["--quick", "--only", "faiss_retrieval", "--out", str(tmp_path)])
    benchmarks = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    assert list(benchmarks) == ["faiss_retrieval", "train_throughput"]  # the harness's order
    assert benchmarks["train_throughput"]["skipped"] == "measured before"
    assert "--only faiss_retrieval" in benchmarks["faiss_retrieval"]["command"]
    assert "measured before" in (tmp_path / "bench.md").read_text()
