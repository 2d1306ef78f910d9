"""Keeps a replica's FAISS index following the PostgreSQL store's change log.

A thread holds its own connection, LISTENs on the store's channel and, on each notification or every
``poll_seconds`` at the latest, applies the changes after the index's sequence
(:meth:`service.storage.document_index.DocumentIndex.catch_up`). A lost notification only delays a change
until the next poll; a lost connection (the database restarting) is retried with backoff, catching up
first thing after reconnecting. It reports the sequence applied and the lag, and whether the store is
reachable, for ``/readyz``, ``/info`` and the metrics.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from service.metrics import Metrics
from service.storage.document_index import DocumentIndex
from service.storage.postgres_store import CHANNEL, PostgresStore, StoreUnavailable

log = logging.getLogger(__name__)

_SAVE_EVERY = 60.0  # seconds between index file writes when changes arrived (a head start for restarts)
_MAX_BACKOFF = 5.0


class IndexFollower:
    def __init__(self, index: DocumentIndex, poll_seconds: float, metrics: Metrics) -> None:
        assert isinstance(index.store, PostgresStore)
        self.index = index
        self.store: PostgresStore = index.store
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.error: str | None = None  # why the store cannot be followed now, if it cannot
        self.lag = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grerank-index-follower", daemon=True)
        self._saved_at = time.monotonic()
        self._unsaved = False

    def start(self) -> IndexFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def sequence(self) -> int:
        return self.index.vectors.generation

    def describe(self) -> dict[str, object]:
        return {"sequence": self.sequence, "lag_seconds": round(self.lag, 3), "error": self.error}

    def sync(self) -> None:
        """Apply what the log holds beyond the index, then measure how far behind it still is."""
        if self.index.catch_up():
            self._unsaved = True
            self.metrics.documents_indexed.set(len(self.index))
        self.lag = self.store.lag_seconds(self.sequence)
        self.error = None
        self.metrics.index_sequence.set(self.sequence)
        self.metrics.index_lag.set(self.lag)
        if self._unsaved and time.monotonic() - self._saved_at > _SAVE_EVERY:
            self.index.save()
            self._saved_at, self._unsaved = time.monotonic(), False

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.store.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.sync()  # whatever was committed while this replica was not listening
                    backoff = 0.2
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.poll_seconds, stop_after=1):
                            pass
                        self.sync()
            except (psycopg.Error, StoreUnavailable) as exc:
                if self.error is None:
                    log.warning("cannot follow the document store; retrying: %s", exc)
                self.error = f"the PostgreSQL store is unreachable: {exc}".strip()
                self.metrics.index_lag.set(float("inf"))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except Exception:  # a bug: keep following rather than let the replica silently fall behind
                log.exception("the index follower failed; retrying")
                self._stop.wait(_MAX_BACKOFF)
