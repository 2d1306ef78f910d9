"""Faults, in process with tiny models: a failing reader, stages over their time limit, a cross-encoder given
a query longer than its input, a corrupt store, a tampered index file and what a killed writer leaves."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from service.app import create_app
from service.settings import Settings
from service.storage.document_index import INDEX_FILE, STORE_FILE, DocumentIndex
from service.storage.document_store import NewDocument
from tests.test_service_api import sse_events

TINY = 1e-9  # a stage limit every stage exceeds after its first unit of work
DOCS = [{"id": f"d{i}", "title": f"T{i}", "text": f"document {i} about rivers and towns"} for i in range(6)]


@pytest.fixture(autouse=True)
def _no_shell_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the settings given in each test: a GRERANK_* variable of the calling shell must not leak in.
    for name in [n for n in os.environ if n.startswith("GRERANK_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def broken_reader_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Loads like any reader, fails on reading: its vocabulary is smaller than its tokenizer's ids."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        eos_token_id=102,
    )
    folder = tmp_path_factory.mktemp("broken-reader")
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@contextmanager
def serving(settings: Settings, ready: bool = True) -> Iterator[TestClient]:
    """The app in process; waits (bounded) until it is ready, or has failed when ``ready`` is False."""
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readyz = client.get("/readyz")
            if readyz.status_code == 200 or "failed" in readyz.text:
                break
            time.sleep(0.05)
        assert (readyz.status_code == 200) == ready, readyz.text
        yield client


def settings_for(tmp_path: Path, embedder: Path, reader: Path, **overrides: object) -> Settings:
    return Settings(
        embedder=str(embedder),
        reranker=str(embedder),
        reader=str(reader),
        index_dir=tmp_path / "index",
        device="cpu",
        precision="fp32",
        reader_max_new_tokens=3,
        log_format="text",
        **overrides,
    )


def metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_a_reader_failure_returns_the_reranked_documents(
    tiny_bert_dir: Path, broken_reader_dir: Path, tmp_path: Path
) -> None:
    with serving(settings_for(tmp_path, tiny_bert_dir, broken_reader_dir, default_top_k=2)) as client:
        assert client.post("/documents", json=DOCS).status_code == 200
        body = {"query": "which river?", "candidates": 5}
        response = client.post("/answer", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["answer"] is None
        assert result["error"]["stage"] == "read" and "IndexError" in result["error"]["detail"]
        citations = result["citations"]
        assert len(citations) == 2 and citations[0]["rerank_score"] >= citations[1]["rerank_score"]
        assert {"embed", "retrieve", "rerank", "read"} <= set(result["timings_ms"])
        # The same documents the reranker puts first among the retrieved candidates.
        hits = client.post("/retrieve", json={"query": body["query"], "top_k": 5}).json()["results"]
        texts = [f"{h['title']}: {h['text']}" for h in hits]
        reranked = client.post("/rerank", json={"query": body["query"], "documents": texts}).json()["results"]
        assert [c["id"] for c in citations] == [hits[r["index"]]["id"] for r in reranked[:2]]

        with client.stream("POST", "/answer", json={**body, "stream": True}) as stream:
            stream.read()
        kind, done = sse_events(stream)[-1]
        assert kind == "done" and done["answer"] is None and done["error"]["stage"] == "read"
        assert done["citations"] == citations
        assert metric(client, "grerank_reader_failures_total") == 2


def test_stages_over_their_limit_answer_504_naming_the_stage(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path, tiny_bert_dir, tiny_llama_dir, stage_timeouts={"rerank": TINY, "index": TINY}
    )
    with serving(settings) as client:
        rerank = client.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert rerank.status_code == 504
        assert rerank.json()["stage"] == "rerank" and "GRERANK_STAGE_TIMEOUTS" in rerank.json()["detail"]
        # A write over its limit is refused before the commit: not acknowledged, and not there.
        write = client.post("/documents", json=DOCS[:2])
        assert write.status_code == 504 and write.json()["stage"] == "index"
        assert client.get("/documents/d0").status_code == 404
        assert client.get("/readyz").json()["documents_indexed"] == 0
        # The worker is free again: stages within their limits still work.
        assert client.post("/retrieve", json={"query": "q"}).status_code == 200
        text = client.get("/metrics").text
        assert 'grerank_stage_timeouts_total{stage="rerank"} 1.0' in text
        assert 'grerank_stage_timeouts_total{stage="index"} 1.0' in text


def test_a_reader_over_its_limit_still_answers_with_the_documents(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, tiny_bert_dir, tiny_llama_dir, stage_timeouts={"read": TINY})
    with serving(settings) as client:
        assert client.post("/documents", json=DOCS).status_code == 200
        result = client.post("/answer", json={"query": "which town?"}).json()
        assert result["answer"] is None and result["error"]["stage"] == "read"
        assert "exceeded" in result["error"]["detail"] and len(result["citations"]) == 3


def test_a_cross_encoder_reads_a_query_longer_than_its_input(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    # [CLS] query [SEP] document [SEP] in 256 tokens: a query of 300 tokens cannot fit as it is.
    settings = settings_for(
        tmp_path, tiny_bert_dir, tiny_llama_dir, reranker_architecture="cross-encoder", max_query_chars=5000
    )
    query = "river " * 300
    with serving(settings) as client:
        response = client.post("/rerank", json={"query": query, "documents": ["short", "town " * 200]})
        assert response.status_code == 200, response.text
        truncation = response.json()["meta"]["truncation"]
        # The query is cut to 128 tokens; 256 - 3 - 128 = 125 are left for a document.
        assert truncation == {"max_tokens": 256, "query_truncated": True, "truncated_documents": [1]}
        assert client.post("/documents", json=DOCS).status_code == 200
        assert client.post("/answer", json={"query": query}).status_code == 200
        info = client.get("/info").json()["truncation"]
        assert info["reranker_input"] == "query-document pair" and info["reranker_max_query_tokens"] == 128


def test_a_corrupt_store_keeps_the_service_unready(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / STORE_FILE).write_bytes(b"this is not an SQLite database" * 100)
    with serving(settings_for(tmp_path, tiny_bert_dir, tiny_llama_dir), ready=False) as client:
        readyz = client.get("/readyz")
        assert readyz.status_code == 503 and readyz.json()["components"]["index"] == "failed"
        assert "file is not a database" in readyz.json()["reason"]
        assert client.post("/rerank", json={"query": "q", "documents": ["a"]}).status_code == 503
        assert client.get("/healthz").status_code == 200  # alive, so the orchestrator shows the reason


def test_a_tampered_index_file_is_rebuilt_from_the_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = DocumentIndex(tmp_path, 8, "embedder")
    index.upsert([NewDocument(f"d{i}", "", f"text {i}") for i in range(5)], vectors)
    before = index.search(vectors[2], 3)
    index.close()
    data = bytearray((tmp_path / INDEX_FILE).read_bytes())
    data[-20] ^= 0xFF  # one flipped byte in the serialised vectors: same size, same header
    (tmp_path / INDEX_FILE).write_bytes(bytes(data))

    reopened = DocumentIndex(tmp_path, 8, "embedder")
    assert reopened.rebuilt and len(reopened) == 5
    assert [(h.document.id, round(h.score, 5)) for h in reopened.search(vectors[2], 3)] == [
        (h.document.id, round(h.score, 5)) for h in before
    ]
    reopened.close()


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    index = DocumentIndex(tmp_path, 8, "embedder")
    index.close()
    dead = tmp_path / f".{INDEX_FILE}.{2**22 + 1}.tmp"  # above any pid_max: no such process
    own = tmp_path / f".{INDEX_FILE}.{os.getpid()}.tmp"  # e.g. PID 1 of the container before a restart
    alive = tmp_path / f".{INDEX_FILE}.{os.getppid()}.tmp"  # a live process's write in progress
    for path in (dead, own, alive):
        path.write_bytes(b"half an index")
    DocumentIndex(tmp_path, 8, "embedder").close()
    assert not dead.exists() and not own.exists() and alive.exists()


def test_settings_reject_malformed_access_and_timeouts() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex digits") as rejected:
        Settings(api_keys=["plain-secret", "sha256:abc"])
    assert "plain-secret" not in str(rejected.value)  # the error names the setting, never its value
    with pytest.raises(ValueError, match="can be open"):
        Settings(open_paths=["/info"])
    with pytest.raises(ValueError, match="unknown stages"):
        Settings(stage_timeouts="rerank=1,reading=2")
    settings = Settings(stage_timeouts="rerank=1.5", open_paths="", read_api_keys="a, b", log_level="WARNING")
    assert settings.stage_timeouts["rerank"] == 1.5 and settings.stage_timeouts["read"] == 120
    assert (
        settings.open_paths == [] and settings.read_api_keys == ["a", "b"] and settings.log_level == "warning"
    )
    assert "secret-value" not in repr(Settings(api_keys=["secret-value"]))
    assert json.loads(json.dumps(settings.stage_timeouts))  # plain numbers, for /info
