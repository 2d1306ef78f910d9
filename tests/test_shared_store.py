"""Two service processes on one PostgreSQL store (``GRERANK_STORE_URL``), tiny models, loopback: a write
through either is read through both (the writer at once, the other within a second), a crash loses
nothing acknowledged and the crashed replica catches up, and a database restart makes the replicas unready
and then ready again without restarting them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.postgres_server import PostgresServer
from tests.uvicorn_server import Server, tiny_env

PROPAGATION_S = 1.0  # the bound the shared store promises between replicas


@pytest.fixture
def replicas(
    tiny_bert_dir: Path, tiny_llama_dir: Path, postgres_url: str, tmp_path: Path
) -> Iterator[Callable[[str], Server]]:
    """Starts replicas by name (each with its own index folder) on one fresh database; stops them after."""
    started: list[Server] = []

    def start(name: str) -> Server:
        env = {
            **tiny_env(tiny_bert_dir, tiny_llama_dir, tmp_path / name),
            "GRERANK_STORE_URL": postgres_url,
            "GRERANK_STORE_POLL_MS": "200",
            "GRERANK_LOG_LEVEL": "warning",
            "OMP_NUM_THREADS": "1",
        }
        server = Server(env, tmp_path / f"{name}.log").start().wait_ready()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def doc(i: int, prefix: str = "d") -> dict:
    return {"id": f"{prefix}{i}", "title": f"T{i}", "text": f"{prefix} document {i} about river {i * 7}"}


def query_of(d: dict) -> str:
    return f"{d['title']}: {d['text']}"  # how documents are embedded: its own text is its nearest neighbour


def top_hit(server: Server, d: dict) -> str | None:
    results = httpx.post(server.url + "/retrieve", json={"query": query_of(d), "top_k": 1}).json()["results"]
    return results[0]["id"] if results else None


def within(seconds: float, condition: Callable[[], bool]) -> float | None:
    """How long until ``condition`` held, or None if it did not within ``seconds``."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            return None
        time.sleep(0.02)


def sequence(server: Server) -> int:
    return httpx.get(server.url + "/readyz").json()["store"]["sequence"]


def indexed(server: Server) -> int:
    return httpx.get(server.url + "/info").json()["index"]["documents"]


def store_ids(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM documents")}


def test_writes_through_one_replica_are_read_through_the_other(
    replicas: Callable[[str], Server], postgres_url: str
) -> None:
    a, b = replicas("a"), replicas("b")
    documents = [doc(i) for i in range(1000)]
    delays = []
    for start in range(0, 1000, 100):
        batch = documents[start : start + 100]
        assert httpx.post(a.url + "/documents", json=batch, timeout=60).status_code == 200
        last = batch[-1]
        assert top_hit(a, last) == last["id"]  # the writer reads its own write at once
        delay = within(5.0, lambda last=last: top_hit(b, last) == last["id"])
        assert delay is not None and delay <= PROPAGATION_S, delay
        delays.append(delay)
        assert httpx.get(b.url + f"/documents/{last['id']}").json()["text"] == last["text"]
    assert within(PROPAGATION_S, lambda: indexed(b) == 1000) is not None
    print(f"propagation A -> B after each of 10 batches of 100: max {max(delays):.3f} s")

    # A delete through B disappears from A's results within the bound.
    gone = documents[500]
    assert httpx.delete(b.url + f"/documents/{gone['id']}").status_code == 200
    assert top_hit(b, gone) != gone["id"]
    delay = within(5.0, lambda: top_hit(a, gone) != gone["id"])
    assert delay is not None and delay <= PROPAGATION_S, delay
    assert httpx.get(a.url + f"/documents/{gone['id']}").status_code == 404

    # The same question gets the same citations through either replica.
    body = {"query": query_of(documents[42]), "candidates": 8, "top_k": 3}
    answers = [httpx.post(s.url + "/answer", json=body, timeout=60).json() for s in (a, b)]
    assert [c["id"] for c in answers[0]["citations"]] == [c["id"] for c in answers[1]["citations"]]
    assert sequence(a) == sequence(b)
    assert len(store_ids(postgres_url)) == 999


def test_a_crash_loses_nothing_acknowledged_and_the_replica_catches_up(
    replicas: Callable[[str], Server], postgres_url: str
) -> None:
    a, b = replicas("a"), replicas("b")
    acknowledged: list[dict] = []
    stop = threading.Event()

    def ingest(server: Server, prefix: str) -> None:
        i = 0
        while not stop.is_set():
            batch = [doc(i + j, prefix) for j in range(20)]
            i += 20
            try:
                if httpx.post(server.url + "/documents", json=batch, timeout=30).status_code == 200:
                    acknowledged.extend(batch)
            except httpx.HTTPError:
                time.sleep(0.05)  # the crashed replica: nothing acknowledged

    writers = [threading.Thread(target=ingest, args=(s, p)) for s, p in ((a, "a"), (b, "b"))]
    for writer in writers:
        writer.start()
    time.sleep(2.0)
    a.stop(kill=True)  # kill -9 in the middle of its writes
    time.sleep(1.0)
    stop.set()
    for writer in writers:
        writer.join(timeout=60)
    assert {d["id"][0] for d in acknowledged} == {"a", "b"}, "both replicas acknowledged writes"

    stored = store_ids(postgres_url)
    assert {d["id"] for d in acknowledged} <= stored  # every acknowledged document is in PostgreSQL
    assert within(PROPAGATION_S, lambda: indexed(b) == len(stored)) is not None
    for d in acknowledged[:: max(1, len(acknowledged) // 20)]:
        assert top_hit(b, d) == d["id"]

    restarted = replicas("a")  # the same index folder: its file, then the log after it
    assert indexed(restarted) == len(stored)
    assert sequence(restarted) == sequence(b)
    for d in acknowledged[1 :: max(1, len(acknowledged) // 20)]:
        assert top_hit(restarted, d) == d["id"]


def test_a_database_restart_makes_replicas_unready_then_ready_without_their_restart(
    replicas: Callable[[str], Server], postgres: PostgresServer, postgres_url: str
) -> None:
    a, b = replicas("a"), replicas("b")
    before = [doc(i) for i in range(30)]
    assert httpx.post(a.url + "/documents", json=before, timeout=60).status_code == 200
    postgres.stop()
    try:
        for server in (a, b):
            server.wait_until("/readyz", 503, timeout=15)
            reason = httpx.get(server.url + "/readyz").json()["reason"]
            assert "unreachable" in reason, reason
        refused = httpx.post(b.url + "/documents", json=[doc(99)], timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert httpx.get(a.url + "/documents/d1", timeout=30).status_code == 503  # the pool waits 5 s
    finally:
        postgres.start()
    for server in (a, b):
        server.wait_ready(timeout=30)
    assert store_ids(postgres_url) == {d["id"] for d in before}  # nothing acknowledged was lost
    after = doc(100)
    assert httpx.post(b.url + "/documents", json=[after], timeout=60).status_code == 200
    assert within(PROPAGATION_S, lambda: top_hit(a, after) == after["id"]) is not None
    assert all(top_hit(a, d) == d["id"] for d in before[:5])
