"""Documents plus their vector index, kept consistent.

The store is the source of truth; the FAISS index is derived from it. With the embedded SQLite store (one
process), a write commits to SQLite first, then updates the in-memory index and replaces the index file
atomically, and only then is acknowledged. On open, an index file that is missing, corrupt, or reflects
another store generation (a crash between the two steps) is rebuilt from the embeddings kept in the store,
without running a model. If the configured embedder differs from the one that produced the stored
embeddings, :meth:`reembed` recomputes them.

With the shared PostgreSQL store (:mod:`service.storage.postgres_store`), the index follows the store's
change log: it records the sequence it reflects, and :meth:`catch_up` applies the changes after it, in
order. A write here commits, then catches up at once (so this replica reads its own writes); other
replicas' writes arrive through :mod:`service.storage.index_follower`. The index file is then only a
head start for the next start-up, saved now and then by the follower.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grerank.passage import Passage
from service.storage.document_store import DocumentStore, NewDocument, StoredDocument
from service.storage.postgres_store import PostgresStore
from service.storage.vector_index import VectorIndex, VectorIndexError, remove_stale_temporaries

STORE_FILE = "documents.sqlite3"
INDEX_FILE = "vectors.faiss"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    document: StoredDocument
    score: float


class DocumentIndex:
    def __init__(
        self,
        folder: str | Path,
        dim: int,
        embedder_id: str,
        store_url: str | None = None,
    ) -> None:
        """Open (or create) the index in ``folder`` for an embedder of ``dim`` dimensions, over the
        PostgreSQL store at ``store_url``, or by default the SQLite store in ``folder``."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.embedder_id = embedder_id
        self.index_path = self.folder / INDEX_FILE
        for stale in remove_stale_temporaries(self.index_path):
            log.warning("removed %s, left by a writer that did not finish", stale.name)
        self.store = PostgresStore(store_url) if store_url else DocumentStore(self.folder / STORE_FILE)
        self.follows_log = isinstance(self.store, PostgresStore)
        self._lock = threading.RLock()
        recorded = (self.store.get_meta("embedder"), self.store.get_meta("dim"))
        has_documents = self.store.count() > 0
        self.needs_reembedding = has_documents and recorded != (embedder_id, str(dim))
        if not has_documents:
            self._record_embedder()
        self.rebuilt = False
        self.vectors = VectorIndex(dim, self.store.generation())
        if not self.needs_reembedding:
            self.vectors = self._load_or_rebuild()

    def _record_embedder(self) -> None:
        self.store.set_meta("embedder", self.embedder_id)
        self.store.set_meta("dim", str(self.dim))

    def _load_or_rebuild(self) -> VectorIndex:
        if self.follows_log:
            return self._load_and_follow()
        generation = self.store.generation()
        try:
            vectors, _ = VectorIndex.load(self.index_path)
            if (
                vectors.dim != self.dim
                or vectors.generation != generation
                or len(vectors) != self.store.count()
            ):
                raise VectorIndexError(
                    f"index reflects generation {vectors.generation} with {len(vectors)} vectors; "
                    f"the store is at generation {generation} with {self.store.count()} documents"
                )
            return vectors
        except VectorIndexError as exc:
            if self.index_path.exists() or self.store.count():
                log.warning("rebuilding the vector index from the document store: %s", exc)
            keys, embeddings = self.store.embeddings()
            vectors = VectorIndex.from_vectors(keys, embeddings, self.dim, generation)
            vectors.save(self.index_path, embedder=self.embedder_id)
            self.rebuilt = True
            return vectors

    def _load_and_follow(self) -> VectorIndex:
        """The index file if it is at a sequence the log continues from, else one built from a snapshot of
        the store; then caught up with the log."""
        assert isinstance(self.store, PostgresStore)
        try:
            vectors, header = VectorIndex.load(self.index_path)
            if header.get("store") != self.store.store_id or vectors.dim != self.dim:
                raise VectorIndexError("the index file is not one of this store's")
        except VectorIndexError as exc:
            if self.index_path.exists():
                log.warning("building the vector index from the document store: %s", exc)
            keys, embeddings, sequence = self.store.snapshot()
            vectors = VectorIndex.from_vectors(keys, embeddings, self.dim, sequence)
            self.rebuilt = True
        self.vectors = vectors
        self.catch_up()
        return self.vectors

    def catch_up(self) -> int:
        """Apply the store's changes after the sequence the index reflects, in order; returns how many
        (always 0 with the SQLite store, whose only writer is this process)."""
        if not self.follows_log:
            return 0
        assert isinstance(self.store, PostgresStore)
        applied = 0
        with self._lock:
            while changes := self.store.changes_since(self.vectors.generation):
                final = {key: op for _, key, op in changes}  # the last change to each key wins
                current = self.store.embeddings_of([k for k, op in final.items() if op == "u"])
                self.vectors.remove([k for k in final if k not in current])  # deleted, even if later
                if current:
                    self.vectors.upsert(list(current), np.stack(list(current.values())))
                self.vectors.generation = changes[-1][0]
                applied += len(changes)
        return applied

    def save(self) -> None:
        """Write the index file (atomically), as a head start for the next start-up."""
        store = self.store.store_id if self.follows_log else None  # type: ignore[union-attr]
        with self._lock:
            self.vectors.save(self.index_path, embedder=self.embedder_id, store=store)

    def reembed(self, embed: Callable[[list[Passage]], np.ndarray]) -> None:
        """Recompute every stored embedding with the configured embedder and rebuild the index."""
        with self._lock:
            keys, passages = self.store.passages()
            log.warning("re-embedding %d documents for embedder %s", len(keys), self.embedder_id)
            embeddings = embed(passages) if passages else np.zeros((0, self.dim), np.float32)
            generation = self.store.replace_embeddings(keys, embeddings)
            self._record_embedder()
            if self.follows_log:  # the new embeddings reach this index (and every other) through the log
                self.catch_up()
            else:
                self.vectors = VectorIndex.from_vectors(
                    np.asarray(keys, np.int64), embeddings, self.dim, generation
                )
                self.vectors.save(self.index_path, embedder=self.embedder_id)
            self.needs_reembedding = False

    def close(self) -> None:
        if self.follows_log:
            self.save()
        self.store.close()

    def __len__(self) -> int:
        return len(self.vectors)

    # ---- writes: acknowledged only after the SQLite commit and the index file replace ----

    def upsert(self, documents: Sequence[NewDocument], embeddings: np.ndarray) -> list[int]:
        with self._lock:
            keys, generation = self.store.upsert(documents, embeddings)
            if self.follows_log:
                self.catch_up()
                return keys
            self.vectors.upsert(keys, embeddings)
            self.vectors.generation = generation
            self.vectors.save(self.index_path, embedder=self.embedder_id)
            return keys

    def delete(self, doc_id: str) -> bool:
        with self._lock:
            key, generation = self.store.delete(doc_id)
            if key is None:
                return False
            if self.follows_log:
                self.catch_up()
                return True
            self.vectors.remove([key])
            self.vectors.generation = generation
            self.vectors.save(self.index_path, embedder=self.embedder_id)
            return True

    # ---- reads ----

    def get(self, doc_id: str) -> StoredDocument | None:
        return self.store.get(doc_id)

    def search(
        self, query: np.ndarray, k: int, metadata_filter: Mapping[str, Any] | None = None
    ) -> list[Hit]:
        """The ``k`` most similar documents (inner product), best first, ties by insertion order."""
        with self._lock:
            allowed = self.store.keys_matching(metadata_filter) if metadata_filter else None
            hits = self.vectors.search(query, k, allowed)
            documents = self.store.get_many([key for key, _ in hits])
        return [Hit(documents[key], score) for key, score in hits if key in documents]
