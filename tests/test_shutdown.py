"""Graceful shutdown of the real server process: on SIGTERM it stops accepting connections, finishes the
requests in flight (each answered 200 in full), closes the index and exits 0; what it acknowledged is on disk
and a restarted server serves it without rebuilding the vector index.

The server runs as deployed (``python -m service``, the image's command: uvicorn with a SIGTERM handler for
the exit code) with tiny random models, on loopback only, and every wait is bounded. Plain
``python -m uvicorn service.app:create_app --factory`` drains the same way but then re-raises SIGTERM and
dies by it (exit 143), except as PID 1 of a container, where the kernel ignores that re-raised signal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.uvicorn_server import free_port

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RERANKS = 4  # concurrent /rerank requests in flight at SIGTERM
DOCUMENTS = 200  # documents per /rerank request, scored one per forward pass: ~0.5-1 s of work each


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Server:
    """One ``uvicorn`` process; its combined output goes to a log file (no pipe to fill up)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        command = [
            sys.executable, "-m", "service", "--host", HOST, "--port", str(self.port),
            "--graceful-timeout", "60", "--log-level", "info",
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def queue_depth(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        match = re.search(r"^grerank_queue_depth (\S+)$", text, re.MULTILINE)
        assert match, "grerank_queue_depth is missing from /metrics"
        return float(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@contextmanager
def running(env: dict[str, str], log: Path) -> Iterator[Server]:
    server = Server(env, log)
    try:
        wait_for(server.ready, 180, "the server to become ready")
        yield server
    finally:
        server.stop()


@pytest.fixture
def service_env(tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRERANK_")}
    env.update(
        GRERANK_EMBEDDER=str(tiny_bert_dir),
        GRERANK_RERANKER=str(tiny_bert_dir),
        GRERANK_READER=str(tiny_llama_dir),
        GRERANK_INDEX_DIR=str(tmp_path / "index"),
        GRERANK_MODEL_CACHE=str(tmp_path / "model_cache"),
        GRERANK_DEVICE="cpu",
        GRERANK_PRECISION="fp32",
        GRERANK_RERANK_BATCH_SIZE="1",  # many small forward passes: slow enough to be caught mid-flight
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def rerank_request(url: str, seed: int) -> httpx.Response:
    documents = [
        f"passage {seed}-{i}: " + "the quick brown fox jumps over the lazy dog " * 6 for i in range(DOCUMENTS)
    ]
    body = {"query": f"which fox jumps? ({seed})", "documents": documents}
    return httpx.post(f"{url}/rerank", json=body, timeout=120)


def upsert(url: str, doc_id: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/documents", json=[{"id": doc_id, "title": doc_id, "text": text}], timeout=120)


def test_sigterm_finishes_in_flight_requests_and_exits_zero(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    with running(service_env, tmp_path / "first.log") as server:
        before = upsert(server.url, "before-sigterm", "written and acknowledged before the signal")
        assert before.status_code == 200, before.text
        idle_depth = server.queue_depth()

        pool = ThreadPoolExecutor(RERANKS + 1)
        reranks = [pool.submit(rerank_request, server.url, seed) for seed in range(RERANKS)]
        late_write = pool.submit(
            upsert, server.url, "during-drain", "queued behind the reranks at the signal"
        )

        # Every request has reached the model (waiting or running) before the signal is sent. The write may
        # be answered already: it gets the worker between two passes of the batched reranks.
        def all_arrived() -> bool:
            depth = server.queue_depth() - idle_depth
            return depth >= RERANKS + 1 or (late_write.done() and depth >= RERANKS)

        wait_for(all_arrived, 30, "all requests in flight")
        assert not any(f.done() for f in reranks), "the work finished before the signal"
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        # It stops accepting at once, while the requests it already has are still being worked on.
        def refuses_connections() -> bool:
            try:
                httpx.get(f"{server.url}/healthz", timeout=1)
            except httpx.ConnectError:
                return True
            return False

        wait_for(refuses_connections, 10, "the listening socket to close")
        still_working = sum(not f.done() for f in reranks)
        assert still_working > 0, "every request finished before the listener closed; make the work slower"

        responses = [f.result(timeout=120) for f in reranks]
        assert [r.status_code for r in responses] == [200] * RERANKS
        for r in responses:
            assert sorted(item["index"] for item in r.json()["results"]) == list(range(DOCUMENTS))
        assert late_write.result(timeout=120).status_code == 200
        pool.shutdown()

        returncode = server.proc.wait(timeout=60)
        drained = time.monotonic() - signalled
        log = server.log()
        assert returncode == 0, f"exit code {returncode} after SIGTERM\n{log[-3000:]}"
        assert "Waiting for connections to close" in log or "Waiting for background tasks" in log
        assert "Traceback" not in log, log[-3000:]
        print(f"drained {RERANKS + 1} in-flight requests in {drained:.1f} s ({still_working} still running)")

    # A restart on the same volume serves both documents from the index file as it was left (not rebuilt).
    with running(service_env, tmp_path / "second.log") as server:
        for doc_id in ("before-sigterm", "during-drain"):
            assert httpx.get(f"{server.url}/documents/{doc_id}", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/readyz", timeout=10).json()["documents_indexed"] == 2
        hits = httpx.post(f"{server.url}/retrieve", json={"query": "signal", "top_k": 10}, timeout=30)
        assert sorted(h["id"] for h in hits.json()["results"]) == ["before-sigterm", "during-drain"]
    assert "rebuilding the vector index" not in server.log()
