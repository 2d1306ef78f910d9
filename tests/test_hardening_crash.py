"""``kill -9`` during ingestion: concurrent writers post documents, the server is killed with requests in
flight, and after a restart every acknowledged document is there as it was posted, each cut-off request is
there wholly or not at all, and the vector index agrees with the document store key for key and vector for
vector, with no temporary file left behind.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.storage.document_index import INDEX_FILE, STORE_FILE
from service.storage.document_store import DocumentStore
from service.storage.vector_index import VectorIndex
from tests.uvicorn_server import Server, tiny_env

WRITERS = 4
BATCH = 5  # documents per POST: one transaction, so all or none of them
ACKNOWLEDGED_BEFORE_KILL = 12  # batches
MAX_BATCHES_PER_WRITER = 200  # a bound, whatever the speed


def batch(writer: int, n: int) -> list[dict]:
    return [
        {
            "id": f"w{writer}-b{n}-{j}",
            "title": f"Writer {writer}",
            "text": f"document {j} of batch {n} from writer {writer}: " + f"w{writer}b{n}d{j} " * 20,
            "metadata": {"writer": writer, "batch": n},
        }
        for j in range(BATCH)
    ]


class Writers:
    """Concurrent writers posting batches back to back until the server goes away."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acknowledged: list[list[dict]] = []
        self.cut_off: list[list[dict]] = []  # sent, never answered: in flight at the kill
        self.other: list[int] = []  # any other status (there should be none)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(WRITERS)
        self._futures = [self._pool.submit(self._write, w) for w in range(WRITERS)]

    def _write(self, writer: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            for n in range(MAX_BATCHES_PER_WRITER):
                documents = batch(writer, n)
                try:
                    response = client.post("/documents", json=documents)
                except httpx.TransportError:
                    with self._lock:
                        self.cut_off.append(documents)
                    return
                with self._lock:
                    if response.status_code == 200:
                        self.acknowledged.append(documents)
                    else:
                        self.other.append(response.status_code)

    def wait(self) -> None:
        for future in self._futures:
            future.result(timeout=90)
        self._pool.shutdown()


def queue_depth(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(r"^grerank_queue_depth (\S+)$", text, re.MULTILINE)
    assert match
    return float(match.group(1))


@pytest.fixture
def env(tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {**tiny_env(tiny_bert_dir, tiny_llama_dir, tmp_path / "index"), "OMP_NUM_THREADS": "1"}


def test_kill_9_during_ingestion_loses_no_acknowledged_document(env: dict[str, str], tmp_path: Path) -> None:
    index_dir = Path(env["GRERANK_INDEX_DIR"])
    first = Server(env, tmp_path / "first.log").start().wait_ready()
    try:
        writers = Writers(first.url)
        deadline = time.monotonic() + 60
        while len(writers.acknowledged) < ACKNOWLEDGED_BEFORE_KILL and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(writers.acknowledged) >= ACKNOWLEDGED_BEFORE_KILL, first.log()
        # Kill the moment writes are waiting on or running on the model worker.
        while queue_depth(first) < 1 and time.monotonic() < deadline:
            pass
    finally:
        first.stop(kill=True)  # SIGKILL: no shutdown, no cleanup
    writers.wait()
    assert not writers.other, writers.other
    assert writers.cut_off, "no request was in flight at the kill"
    print(f"{len(writers.acknowledged)} batches acknowledged, {len(writers.cut_off)} cut off by the kill")

    second = Server(env, tmp_path / "second.log").start().wait_ready()
    try:
        with httpx.Client(base_url=second.url, timeout=30) as client:
            for documents in writers.acknowledged:
                for document in documents:
                    response = client.get(f"/documents/{document['id']}")
                    assert response.status_code == 200, document["id"]
                    assert response.json() == document
            present = len(writers.acknowledged) * BATCH
            for documents in writers.cut_off:
                found = [client.get(f"/documents/{d['id']}").status_code == 200 for d in documents]
                assert len(set(found)) == 1, f"a request was half written: {found}"
                present += BATCH * found[0]
            assert client.get("/readyz").json()["documents_indexed"] == present
            # The index serves what the store holds: a document's own text finds it first.
            probe = writers.acknowledged[-1][0]
            hits = client.post("/retrieve", json={"query": f"{probe['title']}: {probe['text']}", "top_k": 1})
            assert hits.json()["results"][0]["id"] == probe["id"]
    finally:
        second.stop()

    # After the restart (and a clean stop), the index file and the store agree key for key, vector for vector.
    store = DocumentStore(index_dir / STORE_FILE)
    try:
        keys, embeddings = store.embeddings()
        generation = store.generation()
    finally:
        store.close()
    vectors, header = VectorIndex.load(index_dir / INDEX_FILE)
    assert len(keys) == present and vectors.generation == generation
    assert sorted(vectors.keys().tolist()) == keys.tolist()
    assert embeddings is not None
    stored = np.stack([vectors.index.reconstruct(int(k)) for k in keys])
    np.testing.assert_array_equal(stored, embeddings)
    assert not list(index_dir.glob(".*.tmp")), list(index_dir.glob(".*.tmp"))
