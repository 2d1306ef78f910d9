"""Load past capacity on loopback, bounded in count and time: the service sheds what it cannot take with 429
and Retry-After (counted in the metrics), fails nothing it admitted, keeps serving, and its memory does not
grow from one round of overload to the next.

Clients send requests back to back for a fixed time each round; after a 429 a client waits a moment (less than
Retry-After, to keep the test short) and goes on. Sized for CI on a shared 2-core machine: tiny models, a
few seconds per round, a few hundred requests in all.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.uvicorn_server import Server, tiny_env

MAX_QUEUE = 3
CLIENTS = 12  # concurrent clients past capacity: four times what is admitted
ROUND_SECONDS = 3.0
MAX_REQUESTS_PER_CLIENT = 60  # per round: a bound on the count whatever the speed
BACKOFF_SECONDS = 0.05
ROUNDS = 3  # the first warms up (allocator pools, reader cache); memory is compared after it and at the end
RSS_GROWTH_LIMIT_MB = 24
DOCUMENTS = [f"passage {i}: " + "the river runs past the old mill and the town " * 4 for i in range(24)]


@pytest.fixture(scope="module")
def server(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hardening-load")
    env = {
        **tiny_env(tiny_bert_dir, tiny_llama_dir, tmp / "index"),
        "GRERANK_MAX_QUEUE": str(MAX_QUEUE),
        "GRERANK_RERANK_BATCH_SIZE": "4",  # several forward passes per request: each takes a while
        "GRERANK_READER_MAX_NEW_TOKENS": "4",
        "GRERANK_LOG_LEVEL": "warning",  # no access line per request: the log stays small
        "OMP_NUM_THREADS": "1",
    }
    srv = Server(env, tmp / "server.log").start()
    try:
        srv.wait_ready()
        documents = [{"id": f"d{i}", "text": text} for i, text in enumerate(DOCUMENTS)]
        assert httpx.post(srv.url + "/documents", json=documents, timeout=60).status_code == 200
        yield srv
    finally:
        srv.stop()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def metric_sum(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def request(client: httpx.Client, i: int) -> tuple[int, str | None]:
    """One request of the mix (three reranks, then an answer), as (status, Retry-After)."""
    if i % 4 == 3:
        response = client.post("/answer", json={"query": f"where does the river run? {i}", "candidates": 8})
    else:
        response = client.post("/rerank", json={"query": f"old mill {i}", "documents": DOCUMENTS})
    return response.status_code, response.headers.get("retry-after")


def client_loop(client: httpx.Client, seed: int) -> list[tuple[int, str | None]]:
    """Requests back to back until the round's time is up; a short pause after each 429."""
    results: list[tuple[int, str | None]] = []
    deadline = time.monotonic() + ROUND_SECONDS
    i = seed
    while time.monotonic() < deadline and len(results) < MAX_REQUESTS_PER_CLIENT:
        results.append(request(client, i))
        if results[-1][0] == 429:
            time.sleep(BACKOFF_SECONDS)
        i += CLIENTS
    return results


def load_round(server: Server, clients: int) -> list[tuple[int, str | None]]:
    """``clients`` concurrent clients for ROUND_SECONDS; every request times out in 60 s."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with (
        httpx.Client(base_url=server.url, timeout=60, limits=limits) as client,
        ThreadPoolExecutor(clients) as pool,
    ):
        return [r for results in pool.map(lambda c: client_loop(client, c), range(clients)) for r in results]


def test_overload_is_shed_with_429_and_memory_stays_flat(server: Server) -> None:
    assert server.process is not None
    started = time.monotonic()

    # Within capacity: fewer concurrent clients than admitted requests, nothing is shed.
    within = Counter(status for status, _ in load_round(server, MAX_QUEUE - 1))
    assert set(within) == {200}, within

    shed = sent = 0
    rss = []
    for _ in range(ROUNDS):
        results = load_round(server, CLIENTS)
        statuses = Counter(status for status, _ in results)
        # Past capacity: every request is answered, either served or refused at once; nothing fails.
        assert set(statuses) <= {200, 429}, statuses
        assert statuses[200] > 0 and statuses[429] > 0, statuses
        retry_after = [value for status, value in results if status == 429]
        assert all(value is not None and value.isdigit() and int(value) >= 1 for value in retry_after)
        shed += statuses[429]
        sent += len(results)
        rss.append(rss_mb(server.process.pid))
        print(f"round: {dict(statuses)}, RSS {rss[-1]:.1f} MB")

    assert metric_sum(server, "grerank_shed_requests_total") == shed
    assert metric_sum(server, "grerank_admitted_requests") == 0
    assert metric_sum(server, "grerank_queue_depth") == 0
    assert rss[-1] - rss[0] < RSS_GROWTH_LIMIT_MB, f"RSS grew under repeated overload: {rss}"
    # And it serves normally afterwards.
    assert (
        httpx.post(server.url + "/rerank", json={"query": "q", "documents": DOCUMENTS[:2]}).status_code == 200
    )
    assert "Traceback" not in server.log_path.read_text(errors="replace")
    print(f"{shed} of {sent} requests shed in {time.monotonic() - started:.1f} s; RSS {rss} MB")
