"""The document stores, one suite over both: the embedded SQLite store and the shared PostgreSQL store
(on a throwaway cluster, see conftest). Then what only the shared store does: replicas' indexes following
its change log, by notification and, when one is lost, by polling."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psycopg
import pytest

from service.engine.runtime import Runtime
from service.metrics import Metrics
from service.settings import Settings
from service.storage.document_index import DocumentIndex
from service.storage.document_store import DocumentStore, NewDocument
from service.storage.index_follower import IndexFollower
from service.storage.postgres_store import PostgresStore
from tests.postgres_server import PostgresServer
from tests.test_service_components import DIM, documents, unit_vectors
from tests.test_shared_store import within


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DocumentStore | PostgresStore]:
    if request.param == "sqlite":
        opened: DocumentStore | PostgresStore = DocumentStore(tmp_path / "s.sqlite3")
    else:
        opened = PostgresStore(request.getfixturevalue("postgres_url"))
    try:
        yield opened
    finally:
        opened.close()


def test_upsert_keeps_keys_and_filters_metadata(store: DocumentStore | PostgresStore) -> None:
    keys, generation = store.upsert(documents(4), unit_vectors(4))
    again, generation2 = store.upsert([NewDocument("d1", "T", "new text", {"i": 9})], unit_vectors(1, 1))
    assert again == [keys[1]] and generation2 > generation == store.generation() - 1
    assert store.get("d1").text == "new text" and store.count() == 4
    assert store.keys_matching({"even": True}) == [keys[0], keys[2]]
    assert store.keys_matching({"even": 1}) == [keys[0], keys[2]]  # true equals 1, as JSON paths read it
    assert store.keys_matching({"i": 9}) == [keys[1]]
    assert store.keys_matching({"i": 9, "even": True}) == []
    removed, _ = store.delete("d0")
    assert removed == keys[0] and store.delete("d0")[0] is None
    new, _ = store.upsert(documents(1), unit_vectors(1))
    assert new[0] not in keys  # keys are never reused: a stale index entry cannot point at a new document


def test_reads_return_what_was_written(store: DocumentStore | PostgresStore) -> None:
    vectors = unit_vectors(3)
    keys, _ = store.upsert(documents(3), vectors)
    assert store.get("missing") is None
    many = store.get_many([keys[2], keys[0], 12345])
    assert set(many) == {keys[0], keys[2]} and many[keys[2]].metadata == {"i": 2, "even": True}
    stored_keys, stored = store.embeddings()
    assert list(stored_keys) == keys and np.array_equal(stored, vectors)
    passage_keys, passages = store.passages()
    assert passage_keys == keys and passages[1].title == "T1" and passages[1].text == "text 1"
    store.set_meta("embedder", "e")
    assert store.get_meta("embedder") == "e" and store.get_meta("nothing") is None
    generation = store.replace_embeddings(keys, unit_vectors(3, 7))
    assert generation == store.generation() and np.array_equal(store.embeddings()[1], unit_vectors(3, 7))


# ---- the shared store: replicas following its change log ----


def replica(url: str, folder: Path) -> DocumentIndex:
    return DocumentIndex(folder, DIM, "embedder-a", url)


def test_a_replica_applies_the_others_writes_in_order(postgres_url: str, tmp_path: Path) -> None:
    a, b = replica(postgres_url, tmp_path / "a"), replica(postgres_url, tmp_path / "b")
    vectors = unit_vectors(5)
    a.upsert(documents(5), vectors)
    assert len(a) == 5 and len(b) == 0  # a reads its own writes at once
    assert b.catch_up() == 5 and len(b) == 5
    assert b.delete("d3") and len(b) == 4
    a.upsert([NewDocument("d1", "T", "moved", {})], unit_vectors(1, 9))
    a.catch_up()
    b.catch_up()
    for index in (a, b):
        assert index.vectors.generation == a.store.generation()
        assert sorted(index.vectors.keys()) == sorted(index.store.embeddings()[0])
        assert index.search(unit_vectors(1, 9)[0], 1)[0].document.text == "moved"
        assert "d3" not in [h.document.id for h in index.search(vectors[3], 5)]
    b.close()
    # Restarted, a replica loads its index file and applies only what came after it.
    a.upsert(documents(2, start=10), unit_vectors(2, 3))
    reopened = replica(postgres_url, tmp_path / "b")
    assert not reopened.rebuilt and len(reopened) == len(a) == 6
    assert sorted(reopened.vectors.keys()) == sorted(a.vectors.keys())
    a.close()
    reopened.close()


def test_the_follower_catches_up_by_notification_and_by_polling(postgres_url: str, tmp_path: Path) -> None:
    a, b = replica(postgres_url, tmp_path / "a"), replica(postgres_url, tmp_path / "b")
    metrics = Metrics()
    follower = IndexFollower(b, poll_seconds=1.5, metrics=metrics).start()
    try:
        time.sleep(0.3)  # connected and listening
        a.upsert(documents(3), unit_vectors(3))
        assert within(0.8, lambda: len(b) == 3) is not None  # notified: well before the next poll

        def caught_up() -> bool:
            return follower.sequence == a.vectors.generation and follower.lag == 0

        assert within(1.0, caught_up) is not None
        assert follower.error is None
        # A change committed without its notification (a lost one) is found by the next poll.
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            key = conn.execute(
                "INSERT INTO documents(id, title, text, metadata, embedding) "
                "VALUES ('quiet', '', 'q', '{}', %s) RETURNING key",
                (unit_vectors(1, 5)[0].tobytes(),),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO changes(seq, key, op) SELECT max(seq) + 1, %s, 'u' FROM changes", (key,)
            )
        assert within(4.0, lambda: len(b) == 4) is not None
        assert b.search(unit_vectors(1, 5)[0], 1)[0].document.id == "quiet"
        assert within(2.0, lambda: metrics.index_sequence._value.get() == follower.sequence) is not None
    finally:
        follower.stop()
        a.close()
        b.close()


def test_a_new_embedder_re_embeds_through_the_log_for_all(postgres_url: str, tmp_path: Path) -> None:
    a = replica(postgres_url, tmp_path / "a")
    a.upsert(documents(3), unit_vectors(3))
    # A replica with another embedder re-embeds the shared store; the other replica follows the new vectors.
    changed = DocumentIndex(tmp_path / "b", DIM, "embedder-b", postgres_url)
    assert changed.needs_reembedding
    changed.reembed(lambda passages: np.eye(DIM, dtype=np.float32)[: len(passages)])
    assert changed.search(np.eye(DIM, dtype=np.float32)[2], 1)[0].document.id == "d2"
    assert a.catch_up() == 3
    assert a.search(np.eye(DIM, dtype=np.float32)[1], 1)[0].document.id == "d1"
    assert not DocumentIndex(tmp_path / "c", DIM, "embedder-b", postgres_url).needs_reembedding
    a.close()
    changed.close()


def test_readiness_follows_the_store(tmp_path: Path) -> None:
    runtime = Runtime(Settings(index_dir=tmp_path, max_index_lag_s=5))
    assert runtime.store_problem() is None  # the SQLite store: nothing to follow
    follower = SimpleNamespace(error=None, lag=0.5)
    runtime.follower = follower  # type: ignore[assignment]
    assert runtime.store_problem() is None
    follower.lag = 7.0
    assert "7.0 s behind" in runtime.store_problem() and "GRERANK_MAX_INDEX_LAG_S" in runtime.store_problem()
    follower.error = "the PostgreSQL store is unreachable: connection refused"
    assert "unreachable" in runtime.store_problem()
    runtime.worker.shutdown()


def test_an_index_file_of_another_store_is_not_taken(postgres: PostgresServer, tmp_path: Path) -> None:
    first = replica(postgres.fresh_database("first_" + tmp_path.name[-8:].lower()), tmp_path)
    first.upsert(documents(3), unit_vectors(3))
    first.close()  # saves its index file, at sequence 3
    other_url = postgres.fresh_database("other_" + tmp_path.name[-8:].lower())
    other = DocumentIndex(tmp_path / "o", DIM, "embedder-a", other_url)
    other.upsert(documents(4, start=5), unit_vectors(4, 1))  # sequence 4: past the file's 3
    other.close()
    reopened = replica(other_url, tmp_path)  # the first store's file, at a sequence the other store has too
    assert reopened.rebuilt
    ids = [d.id for d in reopened.store.get_many(list(reopened.vectors.keys())).values()]
    assert sorted(ids) == ["d5", "d6", "d7", "d8"]
    reopened.close()
