"""Goodput and admitted latency under overload: the served models on the demo index (``make index``), a
mixed load of three quarters ``/rerank`` (a dev question and 20 candidate paragraphs) and one quarter
``/answer`` (a dev question, open retrieval), from closed-loop clients on loopback
(:mod:`bench.load_generator`), one service started afresh for each of three rounds:

* ``well_behaved``: 8 clients, each waiting ``Retry-After`` after a 429;
* ``retry_storm``: 48 clients that send again at once after a 429;
* ``retry_after``: 48 clients that wait ``Retry-After``.

Each round first warms the service up with every question and paragraph of the workload (so its caches
hold what the round reads). Reported per round: requests answered 200 per second (goodput) and by route,
the p50 / p99 latency of those, the status counts, and the service's resident memory and cache contents
before and after. ``storm_goodput_ratio`` is the retry storm's
goodput over the well-behaved clients', measured in the same run; the deadline is the service's
``GRERANK_MAX_WAIT_MS``.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load_generator import Policy, RequestFactory, run_load
from grerank import qa_data
from service.settings import Settings
from service.storage.document_index import STORE_FILE
from tests.uvicorn_server import ROOT, Server

ROUNDS: dict[str, tuple[int, Policy]] = {
    "well_behaved": (8, "wait"),
    "retry_storm": (48, "retry"),
    "retry_after": (48, "wait"),
}
POLICIES = {"wait": "waits Retry-After", "retry": "retries at once"}
RERANK_SHARE = 0.75


def index_dir() -> Path:
    return ROOT / "var" / "index"


def workload(count: int) -> tuple[RequestFactory, list[tuple[str, dict[str, Any]]]]:
    """The mix over ``count`` dev questions and their paragraphs, and warm-up requests that between them
    read everything the mix reads (every question answered once, every paragraph reranked once)."""
    examples = qa_data.load_examples(qa_data.split_path("dev"), count)
    paragraphs = [p.text for ex in examples for p in ex.passages]

    def make(rng: random.Random) -> tuple[str, dict[str, Any]]:
        question = rng.choice(examples).question
        if rng.random() < RERANK_SHARE:
            return "/rerank", {"query": question, "documents": rng.sample(paragraphs, 20), "top_n": 3}
        return "/answer", {"query": question}

    warm_up = [("/answer", {"query": ex.question}) for ex in examples]
    for i in range(0, len(paragraphs), 20):
        warm_up.append(("/rerank", {"query": "warm-up", "documents": paragraphs[i : i + 20]}))
    return make, warm_up


def cache_mb(url: str) -> float:
    """What the reader and rerank caches hold (from /metrics)."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("grerank_reader_cache_bytes ", "grerank_rerank_cache_bytes ")):
            total += float(line.split()[1])
    return total / 2**20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def one_round(
    folder: Path,
    clients: int,
    policy: Policy,
    seconds: float,
    make: RequestFactory,
    warm_up: list[tuple[str, dict[str, Any]]],
) -> dict[str, Any]:
    server = Server({"GRERANK_INDEX_DIR": str(index_dir()), "GRERANK_LOG_LEVEL": "warning"}, folder / "log")
    server.start()
    try:
        server.wait_ready(timeout=600)
        assert server.process is not None
        # Warm up: the caches hold what the round reads, and allocator pools are grown, so the round
        # measures steady serving and memory compares like with like.
        for path, body in warm_up:
            assert httpx.post(server.url + path, json=body, timeout=120).status_code == 200
        run_load(server.url, make, clients=2, policy="wait", seconds=min(10.0, seconds / 3))
        before, cache_before = rss_mb(server.process.pid), cache_mb(server.url)
        result = run_load(server.url, make, clients=clients, policy=policy, seconds=seconds)
        time.sleep(2.0)  # let what was in flight finish
        after, cache_after = rss_mb(server.process.pid), cache_mb(server.url)
        shed = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    return {
        "clients": clients,
        "policy": policy,
        **result.summary(),
        "rss_mb_before": round(before, 1),
        "rss_mb_after": round(after, 1),
        "rss_growth": round(after / before - 1, 3),
        "cache_mb_before": round(cache_before, 1),
        "cache_mb_after": round(cache_after, 1),
        "shed_lines": [line for line in shed.splitlines() if line.startswith("grerank_shed_requests_total")],
    }


def run(quick: bool) -> dict[str, Any]:
    if not (index_dir() / STORE_FILE).is_file():
        raise RuntimeError(f"no index in {index_dir()}: run `make index` first")
    seconds = 20.0 if quick else 60.0
    make, warm_up = workload(30)
    with tempfile.TemporaryDirectory(prefix="grerank-overload-") as tmp:
        rounds = {
            name: one_round(Path(tmp), clients, policy, seconds, make, warm_up)
            for name, (clients, policy) in ROUNDS.items()
        }
    settings = Settings()
    return {
        "seconds_per_round": seconds,
        "max_wait_ms": settings.max_wait_ms,
        "max_queue": settings.max_queue,
        "rounds": rounds,
        "storm_goodput_ratio": round(
            rounds["retry_storm"]["goodput_per_s"] / rounds["well_behaved"]["goodput_per_s"], 3
        ),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Mixed load (3/4 `/rerank` of 20 paragraphs, 1/4 `/answer`), {result['seconds_per_round']:.0f} s "
        f"per round, `GRERANK_MAX_WAIT_MS={result['max_wait_ms']}`, "
        f"`GRERANK_MAX_QUEUE={result['max_queue']}`.",
        "",
        "| round | clients | after a 429 | goodput (200/s) | answered | p50 s | p99 s | statuses "
        "| RSS MB before -> after | caches MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rounds"].items():
        lines.append(
            f"| {name} | {r['clients']} | {POLICIES[r['policy']]} | {r['goodput_per_s']} | {r['by_path']} "
            f"| {r['p50_s']} | {r['p99_s']} | {r['statuses']} "
            f"| {r['rss_mb_before']} -> {r['rss_mb_after']} ({100 * r['rss_growth']:+.1f}%) "
            f"| {r['cache_mb_before']} -> {r['cache_mb_after']} |"
        )
    lines += ["", f"Retry-storm goodput / well-behaved goodput: **{result['storm_goodput_ratio']}**"]
    return "\n".join(lines)
