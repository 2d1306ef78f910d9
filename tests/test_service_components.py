"""The service's storage and model plumbing without HTTP: document store, vector index, their consistency
after crashes and corruption, the reader state cache, settings and reranker selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from grerank.passage import Passage
from service.engine.models import UNTRAINED, load_reranker
from service.settings import Settings
from service.storage.document_index import INDEX_FILE, DocumentIndex
from service.storage.document_store import DocumentStore, NewDocument
from service.storage.vector_index import VectorIndex, VectorIndexError

DIM = 8


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def documents(n: int, start: int = 0) -> list[NewDocument]:
    return [
        NewDocument(f"d{i}", f"T{i}", f"text {i}", {"i": i, "even": i % 2 == 0})
        for i in range(start, start + n)
    ]


def test_vector_index_round_trip_search_and_ties(tmp_path: Path) -> None:
    vectors = unit_vectors(5)
    vectors[3] = vectors[1]  # a tie: broken by key
    index = VectorIndex.from_vectors(np.arange(10, 15), vectors, DIM, generation=7)
    path = tmp_path / "v.faiss"
    index.save(path, embedder="e")
    loaded, header = VectorIndex.load(path)
    assert header["generation"] == 7 and header["embedder"] == "e" and len(loaded) == 5
    hits = loaded.search(vectors[1], 3)
    assert [k for k, _ in hits[:2]] == [11, 13] and hits[0][1] == pytest.approx(1.0, abs=1e-6)
    assert [k for k, _ in loaded.search(vectors[1], 5, allowed=[13, 14])] == [13, 14]
    assert loaded.search(vectors[1], 5, allowed=[]) == []
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_vector_index_refuses_a_truncated_or_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "v.faiss"
    VectorIndex.from_vectors(np.arange(4), unit_vectors(4), DIM, 1).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(VectorIndexError, match="checksum"):
        VectorIndex.load(path)
    path.write_bytes(b"something else")
    with pytest.raises(VectorIndexError, match="not a grerank vector index"):
        VectorIndex.load(path)


def test_store_upsert_keeps_keys_and_filters_metadata(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "s.sqlite3")
    keys, generation = store.upsert(documents(4), unit_vectors(4))
    again, generation2 = store.upsert([NewDocument("d1", "T", "new text", {"i": 9})], unit_vectors(1, 1))
    assert again == [keys[1]] and generation2 == generation + 1
    assert store.get("d1").text == "new text" and store.count() == 4
    assert store.keys_matching({"even": True}) == [keys[0], keys[2]]
    assert store.keys_matching({"i": 9}) == [keys[1]]
    removed, _ = store.delete("d0")
    assert removed == keys[0] and store.delete("d0")[0] is None
    new, _ = store.upsert(documents(1), unit_vectors(1))
    assert new[0] not in keys  # keys are never reused: a stale index entry cannot point at a new document


def test_index_rebuilds_after_a_crash_between_commit_and_index_write(tmp_path: Path) -> None:
    index = DocumentIndex(tmp_path, DIM, "embedder-a")
    index.upsert(documents(3), unit_vectors(3))
    # Simulate a crash after the SQLite commit but before the index file was replaced.
    vector = unit_vectors(1, 5)
    index.store.upsert(documents(1, start=3), vector)
    index.close()

    reopened = DocumentIndex(tmp_path, DIM, "embedder-a")
    assert reopened.rebuilt and len(reopened) == 4
    assert reopened.search(vector[0], 1)[0].document.id == "d3"
    reopened.close()
    assert not DocumentIndex(tmp_path, DIM, "embedder-a").rebuilt  # consistent now: loaded as is

    (tmp_path / INDEX_FILE).write_bytes(b"garbage")
    recovered = DocumentIndex(tmp_path, DIM, "embedder-a")
    assert recovered.rebuilt and len(recovered) == 4
    odd = [h.document.id for h in recovered.search(vector[0], 5, {"even": False})]
    assert odd[0] == "d3" and sorted(odd) == ["d1", "d3"]


def test_a_new_embedder_re_embeds_the_stored_documents(tmp_path: Path) -> None:
    index = DocumentIndex(tmp_path, DIM, "embedder-a")
    index.upsert(documents(3), unit_vectors(3))
    index.close()
    changed = DocumentIndex(tmp_path, 4, "embedder-b")
    assert changed.needs_reembedding
    seen: list[Passage] = []

    def embed(passages: list[Passage]) -> np.ndarray:
        seen.extend(passages)
        return np.eye(4, dtype=np.float32)[: len(passages)]

    changed.reembed(embed)
    assert [p.text for p in seen] == ["text 0", "text 1", "text 2"]
    assert changed.search(np.eye(4, dtype=np.float32)[2], 1)[0].document.id == "d2"
    changed.close()
    assert not DocumentIndex(tmp_path, 4, "embedder-b").needs_reembedding


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRERANK_API_KEYS", " one, two ,,")
    monkeypatch.setenv("GRERANK_MAX_DOCUMENTS", "12")
    monkeypatch.setenv("GRERANK_INDEX_DIR", "/tmp/somewhere")
    settings = Settings()
    assert settings.api_keys == ["one", "two"] and settings.max_documents == 12
    assert settings.index_dir == Path("/tmp/somewhere") and settings.reranker == "default"


def test_the_default_reranker_says_it_is_untrained(tiny_bert_dir: Path) -> None:
    reranker, info = load_reranker(Settings(artifact=None, reranker="default"), torch.device("cpu"))
    assert info.status == UNTRAINED and not info.trained and info.config["architecture"] == "bi-encoder"
    _, folder_info = load_reranker(Settings(artifact=None, reranker=str(tiny_bert_dir)), torch.device("cpu"))
    assert folder_info.status == "untrained reranker"


def test_reader_states_precomputed_at_indexing_serve_answer_after_a_restart(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from service.engine.models import load_models
    from service.engine.pipeline import Pipeline
    from service.metrics import Metrics
    from service.storage.document_index import DocumentIndex

    settings = Settings(
        embedder=str(tiny_bert_dir), reranker=str(tiny_bert_dir), reader=str(tiny_llama_dir),
        index_dir=tmp_path / "index", device="cpu", precision="fp32", reader_max_new_tokens=4,
        reader_cache_disk_mb=64, precompute_reader_states=True,
    )  # fmt: skip
    models = load_models(settings)

    def pipeline() -> Pipeline:
        index = DocumentIndex(settings.index_dir, models.embedder.dim, models.embedder_source)
        return Pipeline(models, index, settings, Metrics())

    first = pipeline()
    first.upsert(documents(6))
    assert first.reader_cache.misses == 6 and first.reader_cache.disk_bytes > 0
    fresh = first.answer("text 3", top_k=2, candidates=6)

    restarted = pipeline()  # a new process: an empty memory tier over the same disk tier
    again = restarted.answer("text 3", top_k=2, candidates=6)
    assert restarted.reader_cache.misses == 0 and restarted.reader_cache.disk_hits == 2
    assert again.answer == fresh.answer and again.answer is not None
    assert [c.document.id for c in again.citations] == [c.document.id for c in fresh.citations]
