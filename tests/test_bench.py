"""The benchmark harness's own logic on small inputs: what it reports must be true of what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import __main__ as harness
from bench import faiss_retrieval, rerank_throughput


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


def test_rerank_summary_compares_with_the_strongest_peer_that_ran() -> None:
    """On a CPU without bf16 instructions the bf16 peers are skipped, not counted as the weakest, and the
    summary names the strongest of those that ran, sentence-transformers, infinity-emb or onnxruntime;
    onnxruntime's int8 counts only in the figure at any precision."""
    run = {"pairs_per_s": 60.0, "p50_ms": 300.0, "p99_ms": 330.0, "model_busy_fraction": 0.9}
    peer = {"per_request": {"pairs_per_s": 35.0, "p50_ms": 500.0, "p99_ms": 520.0}, "bulk_pairs_per_s": 40.0}
    skipped = {"skipped": rerank_throughput.NO_BF16}
    distance = {"max_abs_score_diff": 0.02, "same_top5_fraction": 0.75}
    result = {
        "workload": {
            "documents_per_request": 20,
            "document_tokens": 128,
            "reranker": "default",
            "repeats": 3,
            "dtype": "float32",
            "service_precision": "float32",
        },
        "service": {"1": run, "8": run, "32": {**run, "pairs_per_s": 62.0}},
        "model_alone": {"pairs_per_s": 63.0},
        "sentence_transformers": peer,
        "sentence_transformers_other": dict.fromkeys(list(rerank_throughput.ST_CONFIGS)[1:], skipped),
        "infinity": {"version": "0.0.78", "concurrency": {"8": {**run, "pairs_per_s": 45.0}}},
        "onnxruntime": {
            "onnxruntime": "1.32.0",
            "fp32": {"bulk_pairs_per_s": 38.0, "vs_sentence_transformers_fp32": distance},
            "int8": {"bulk_pairs_per_s": 50.0, "vs_sentence_transformers_fp32": distance},
        },
        "agreement_with_sentence_transformers": {"max_abs_score_diff": 1e-6, "same_top5_fraction": 1.0},
        "peak": {"bf16": {"median_gflops": 0.3, "side": 512}, "fp32": {"median_gflops": 170.0, "side": 4096}},
    }
    summary = rerank_throughput.summarize(result, flops_per_pair=2.9e9, best=32)
    assert summary["strongest_st"] == "fp32"
    assert summary["at_8_clients_vs_strongest_st_bulk"] == pytest.approx(1.5)
    assert summary["strongest_peer"] == "infinity-emb 0.0.78, 8 clients"  # servers count too
    assert summary["at_8_clients_vs_strongest_peer"] == pytest.approx(60 / 45)
    assert summary["strongest_peer_any_precision"] == "onnxruntime 1.32.0 int8, one encode call"
    assert summary["at_8_clients_vs_strongest_peer_any_precision"] == pytest.approx(60 / 50)
    assert summary["peak_dtype"] == "fp32"
    assert summary["model_fraction_of_peak"] == pytest.approx(63 * 2.9 / 170)
    assert summary["overhead_at_8_clients"] == pytest.approx(63 / 60 - 1)
    result["summary"] = summary
    table = rerank_throughput.markdown(result)
    assert "sentence-transformers bf16 weights | skipped: this CPU has no bf16" in table
    # One row per peer, naming every role it plays and the targets that apply.
    assert (
        "8 clients / sentence-transformers fp32, one encode call (strongest sentence-transformers, its "
        "defaults) | 1.50x | >= 1.5x, >= 2x |" in table
    )
    assert "8 clients / infinity-emb 0.0.78, 8 clients (strongest peer) | 1.33x" in table
    assert 'int8 (sentence-transformers backend="onnx"), one encode call; scores vs' in table


def test_onnx_peer_failure_is_reported_not_raised(tmp_path: Path, monkeypatch) -> None:
    """A peer venv whose Python fails leaves a skipped row with the reason, and the rest of the bench runs."""
    venv = tmp_path / "bin"
    venv.mkdir()
    python = venv / "python"
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: optimum' >&2\nexit 3\n")
    python.chmod(0o755)
    monkeypatch.setenv("GRERANK_BENCH_INFINITY", str(venv / "infinity_emb"))
    work = rerank_throughput.Workload(["q"], [["d"] * 20])
    outcome = rerank_throughput.onnx_baseline(work, rerank_throughput.QUICK, tmp_path)
    assert outcome == {"skipped": "bench/onnx_peer.py failed (3): ModuleNotFoundError: optimum"}
