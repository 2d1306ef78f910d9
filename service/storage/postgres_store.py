"""The PostgreSQL document store (``GRERANK_STORE_URL=postgresql://...``): one corpus for every replica.

The same interface as :class:`service.storage.document_store.DocumentStore`, plus an ordered change log:
every upsert and delete appends ``(seq, key, op)`` rows in its own transaction, and a commit notifies the
``grerank_changes`` channel. Writers take one advisory lock per transaction, so sequence numbers are
handed out in commit order and a follower that has applied every change up to ``seq`` has missed none
below it. The store's generation is its latest sequence number; each replica's FAISS index records the
sequence it reflects and follows the log from there (:mod:`service.storage.index_follower`).

A write is acknowledged after its commit, as with SQLite. Connections come from a psycopg pool that checks
them before use, so a restarted database is reconnected to without restarting the service; while it is
away every call raises :class:`StoreUnavailable` (503).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from grerank.passage import Passage
from service.storage.document_store import NewDocument, StoredDocument

CHANNEL = "grerank_changes"
_WRITE_LOCK = 7_461_001  # pg_advisory_xact_lock key serialising writers (commit order = sequence order)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    key bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    title text NOT NULL,
    text text NOT NULL,
    metadata jsonb NOT NULL,
    embedding bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq bigint PRIMARY KEY,
    key bigint NOT NULL,
    op char(1) NOT NULL CHECK (op IN ('u', 'd')),
    committed timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (503 until it is back)."""


class PostgresStore:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.pool = ConnectionPool(
            url, min_size=1, max_size=4, timeout=timeout, check=ConnectionPool.check_connection, open=False
        )
        self.pool.open(wait=False)
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))  # one replica creates it
            conn.execute(_SCHEMA)
            # Which database this is, so an index file is never taken for one of another store's.
            conn.execute(
                "INSERT INTO meta(name, value) VALUES ('store_id', gen_random_uuid()::text) "
                "ON CONFLICT (name) DO NOTHING"
            )
            row = conn.execute("SELECT value FROM meta WHERE name = 'store_id'").fetchone()
            self.store_id: str = row[0]  # type: ignore[index]

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in a transaction (committed when the block ends without an error)."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"the PostgreSQL store is unreachable: {exc}") from exc

    # ---- metadata ----

    def get_meta(self, name: str) -> str | None:
        with self._connection() as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = %s", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO meta(name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET value = %s",
                (name, value, value),
            )

    def generation(self) -> int:
        """The latest change's sequence number (0 for none)."""
        with self._connection() as conn:
            return _latest(conn)

    # ---- writes: one transaction each, its changes logged in it ----

    def _log(self, conn: psycopg.Connection, changes: Sequence[tuple[int, str]]) -> int:
        """Appends ``changes`` (key, op) to the log; the caller holds the write lock."""
        first = _latest(conn) + 1
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO changes(seq, key, op) VALUES (%s, %s, %s)",
                [(first + i, key, op) for i, (key, op) in enumerate(changes)],
            )
        conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit
        return first + len(changes) - 1

    def upsert(self, documents: Sequence[NewDocument], embeddings: np.ndarray) -> tuple[list[int], int]:
        """Insert or replace by ``id``; an existing id keeps its key. Returns (keys, new sequence)."""
        if len(documents) != len(embeddings):
            raise ValueError("one embedding per document")
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            keys = []
            for doc, vector in zip(documents, vectors, strict=True):
                row = conn.execute(
                    "INSERT INTO documents(id, title, text, metadata, embedding) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET title = excluded.title, text = excluded.text, "
                    "metadata = excluded.metadata, embedding = excluded.embedding RETURNING key",
                    (doc.id, doc.title, doc.text, json.dumps(doc.metadata), vector.tobytes()),
                ).fetchone()
                keys.append(int(row[0]))  # type: ignore[index]
            sequence = self._log(conn, [(key, "u") for key in keys])
        return keys, sequence

    def delete(self, doc_id: str) -> tuple[int | None, int]:
        """Remove by ``id``; returns (the removed key or None, sequence)."""
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            row = conn.execute("DELETE FROM documents WHERE id = %s RETURNING key", (doc_id,)).fetchone()
            sequence = self._log(conn, [(int(row[0]), "d")]) if row else _latest(conn)
        return (int(row[0]) if row else None), sequence

    def replace_embeddings(self, keys: Sequence[int], embeddings: np.ndarray) -> int:
        """Store new embeddings (after an embedder change); every replica re-reads them from the log."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            with conn.cursor() as cur:
                cur.executemany(
                    "UPDATE documents SET embedding = %s WHERE key = %s",
                    [(v.tobytes(), int(k)) for k, v in zip(keys, vectors, strict=True)],
                )
            return self._log(conn, [(int(k), "u") for k in keys]) if len(keys) else _latest(conn)

    # ---- the change log ----

    def changes_since(self, sequence: int, limit: int = 10_000) -> list[tuple[int, int, str]]:
        """``(seq, key, op)`` of the changes after ``sequence``, in order."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT seq, key, op FROM changes WHERE seq > %s ORDER BY seq LIMIT %s", (sequence, limit)
            ).fetchall()
        return [(int(s), int(k), str(o)) for s, k, o in rows]

    def lag_seconds(self, sequence: int) -> float:
        """How long ago, by the database's clock, the first change after ``sequence`` was committed (0 if
        there is none): how far behind a replica that has applied ``sequence`` is."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM clock_timestamp() - committed) FROM changes "
                "WHERE seq > %s ORDER BY seq LIMIT 1",
                (sequence,),
            ).fetchone()
        return max(float(row[0]), 0.0) if row else 0.0

    def embeddings_of(self, keys: Sequence[int]) -> dict[int, np.ndarray]:
        """The current embeddings of those of ``keys`` still stored."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT key, embedding FROM documents WHERE key = ANY(%s)", ([int(k) for k in keys],)
            ).fetchall()
        return {int(k): np.frombuffer(blob, dtype=np.float32) for k, blob in rows}

    def snapshot(self) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Every (key, embedding) and the sequence they reflect, read in one consistent snapshot."""
        with self._connection() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = conn.execute("SELECT key, embedding FROM documents ORDER BY key").fetchall()
            sequence = _latest(conn)
        keys = np.asarray([int(k) for k, _ in rows], dtype=np.int64)
        vectors = np.stack([np.frombuffer(b, dtype=np.float32) for _, b in rows]) if rows else None
        return keys, vectors, sequence

    # ---- reads ----

    def count(self) -> int:
        with self._connection() as conn:
            return int(conn.execute("SELECT count(*) FROM documents").fetchone()[0])  # type: ignore[index]

    def get(self, doc_id: str) -> StoredDocument | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT key, id, title, text, metadata FROM documents WHERE id = %s", (doc_id,)
            ).fetchone()
        return _document(row) if row else None

    def get_many(self, keys: Sequence[int]) -> dict[int, StoredDocument]:
        if not keys:
            return {}
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT key, id, title, text, metadata FROM documents WHERE key = ANY(%s)",
                ([int(k) for k in keys],),
            ).fetchall()
        return {int(row[0]): _document(row) for row in rows}

    def keys_matching(self, metadata_filter: Mapping[str, Any]) -> list[int]:
        """Keys of documents whose metadata has every given top-level key with that (scalar) value; as in
        the SQLite store, true and false equal 1 and 0."""
        clauses, params = [], []
        for name, value in metadata_filter.items():
            same = [value]
            if isinstance(value, bool):
                same.append(int(value))
            elif isinstance(value, int) and value in (0, 1):
                same.append(bool(value))
            clauses.append("metadata -> %s = ANY(%s::jsonb[])")
            params += [name, [json.dumps(v) for v in same]]
        where = " AND ".join(clauses) or "true"
        with self._connection() as conn:
            rows = conn.execute(f"SELECT key FROM documents WHERE {where} ORDER BY key", params).fetchall()
        return [int(r[0]) for r in rows]

    def embeddings(self) -> tuple[np.ndarray, np.ndarray | None]:
        keys, vectors, _ = self.snapshot()
        return keys, vectors

    def passages(self) -> tuple[list[int], list[Passage]]:
        with self._connection() as conn:
            rows = conn.execute("SELECT key, title, text FROM documents ORDER BY key").fetchall()
        return [int(k) for k, _, _ in rows], [Passage(t, x) for _, t, x in rows]


def _latest(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])  # type: ignore[index]


def _document(row: tuple) -> StoredDocument:
    return StoredDocument(int(row[0]), row[1], row[2], row[3], row[4])
