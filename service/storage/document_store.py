"""The SQLite document store: the source of truth for documents and their embeddings.

Each row has a stable integer ``key`` (the FAISS id; never reused, thanks to AUTOINCREMENT), the public string
``id``, title, text, metadata (JSON) and the embedding (float32 bytes), so the vector index can always be
rebuilt from here without running a model. Every write bumps ``generation`` in the same transaction; the
vector index records the generation it reflects, which is how a stale index is detected after a crash.

WAL journal with ``synchronous=FULL``: a committed write survives a crash or power loss.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grerank.passage import Passage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StoredDocument:
    key: int
    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def passage(self) -> Passage:
        return Passage(self.title, self.text)


@dataclass(frozen=True)
class NewDocument:
    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


class DocumentStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the service's threads, serialised by a lock (writes are short).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- metadata ----

    def get_meta(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        with self._lock, self._transaction():
            self._set_meta(name, value)

    def _set_meta(self, name: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def _bump_generation(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        generation = int(row[0]) + 1 if row else 1
        self._set_meta("generation", str(generation))
        return generation

    # ---- writes ----

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def upsert(self, documents: Sequence[NewDocument], embeddings: np.ndarray) -> tuple[list[int], int]:
        """Insert or replace by ``id``; an existing id keeps its key. Returns (keys, new generation)."""
        if len(documents) != len(embeddings):
            raise ValueError("one embedding per document")
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        keys = []
        with self._lock, self._transaction():
            for doc, vector in zip(documents, vectors, strict=True):
                row = self._db.execute(
                    "INSERT INTO documents(id, title, text, metadata, embedding) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET title = excluded.title, text = excluded.text, "
                    "metadata = excluded.metadata, embedding = excluded.embedding RETURNING key",
                    (doc.id, doc.title, doc.text, json.dumps(doc.metadata), vector.tobytes()),
                ).fetchone()
                keys.append(int(row[0]))
            generation = self._bump_generation()
        return keys, generation

    def delete(self, doc_id: str) -> tuple[int | None, int]:
        """Remove by ``id``; returns (the removed key or None, generation)."""
        with self._lock, self._transaction():
            row = self._db.execute("DELETE FROM documents WHERE id = ? RETURNING key", (doc_id,)).fetchone()
            generation = self._bump_generation() if row else self.generation()
        return (int(row[0]) if row else None), generation

    def replace_embeddings(self, keys: Sequence[int], embeddings: np.ndarray) -> int:
        """Store new embeddings (after an embedder change); returns the new generation."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE documents SET embedding = ? WHERE key = ?",
                [(v.tobytes(), int(k)) for k, v in zip(keys, vectors, strict=True)],
            )
            return self._bump_generation()

    # ---- reads ----

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def get(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            row = self._db.execute(
                "SELECT key, id, title, text, metadata FROM documents WHERE id = ?", (doc_id,)
            ).fetchone()
        return _document(row) if row else None

    def get_many(self, keys: Sequence[int]) -> dict[int, StoredDocument]:
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        with self._lock:
            rows = self._db.execute(
                f"SELECT key, id, title, text, metadata FROM documents WHERE key IN ({marks})",
                [int(k) for k in keys],
            ).fetchall()
        return {row[0]: _document(row) for row in rows}

    def keys_matching(self, metadata_filter: Mapping[str, Any]) -> list[int]:
        """Keys of documents whose metadata has every given top-level key with that (scalar) value."""
        clauses, params = [], []
        for name, value in metadata_filter.items():
            # json_extract maps JSON true/false to 1/0, so compare booleans as integers.
            clauses.append("json_extract(metadata, ?) = ?")
            params += [_json_path(name), int(value) if isinstance(value, bool) else value]
        where = " AND ".join(clauses) or "1"
        with self._lock:
            rows = self._db.execute(
                f"SELECT key FROM documents WHERE {where} ORDER BY key", params
            ).fetchall()
        return [r[0] for r in rows]

    def embeddings(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(keys int64 [N], embeddings float32 [N, dim] or None when the store is empty)."""
        keys, vectors = [], []
        for key, blob in self._iter("SELECT key, embedding FROM documents ORDER BY key"):
            keys.append(key)
            vectors.append(np.frombuffer(blob, dtype=np.float32))
        return np.asarray(keys, dtype=np.int64), (np.stack(vectors) if vectors else None)

    def passages(self) -> tuple[list[int], list[Passage]]:
        """Every document's key and passage, in key order (for re-embedding)."""
        keys, passages = [], []
        for key, title, text in self._iter("SELECT key, title, text FROM documents ORDER BY key"):
            keys.append(key)
            passages.append(Passage(title, text))
        return keys, passages

    def _iter(self, sql: str) -> Iterator[tuple]:
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        yield from rows


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def content_id(title: str, text: str, prefix: str = "doc") -> str:
    """A stable id derived from the content, for documents posted without one."""
    digest = hashlib.sha256((title + "\0" + text).encode()).hexdigest()
    return f"{prefix}-{digest[:16]}"


def _json_path(name: str) -> str:
    # SQLite JSON paths cannot escape a double quote or a NUL inside a quoted key.
    if '"' in name or "\0" in name or not name:
        raise ValueError(f"metadata filter key {name!r} must be non-empty and contain no double quote or NUL")
    return f'$."{name}"'


def _document(row: tuple) -> StoredDocument:
    return StoredDocument(row[0], row[1], row[2], row[3], json.loads(row[4]))
