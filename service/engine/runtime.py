"""What one app instance serves: settings, metrics, the model worker and, once loaded, the pipeline.

Loading runs as the first job of the model worker, so the HTTP server is up at once (``/healthz`` answers
while models load) and ``/readyz`` turns 200 only when every model and the index are in memory. A failure
(a bad artifact, a missing model) is kept as the reason and the service never becomes ready.
"""

from __future__ import annotations

import logging
from typing import Any

from service.engine.batching_queue import BatchingQueue
from service.engine.model_worker import ModelWorker
from service.engine.models import load_models
from service.engine.pipeline import Pipeline
from service.metrics import Metrics
from service.settings import Settings
from service.storage.document_index import DocumentIndex
from service.storage.index_follower import IndexFollower

log = logging.getLogger(__name__)

COMPONENTS = ("embedder", "reranker", "reader", "index")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.worker = ModelWorker(self.metrics)
        self.pipeline: Pipeline | None = None
        self.rerank_queue: BatchingQueue | None = None  # set together with the pipeline
        self.follower: IndexFollower | None = None  # with a PostgreSQL store
        self.error: str | None = None
        self.components = dict.fromkeys(COMPONENTS, "pending")

    def start(self) -> None:
        self.worker.submit(self._load)

    @property
    def ready(self) -> bool:
        return self.pipeline is not None and self.store_problem() is None

    def store_problem(self) -> str | None:
        """Why the shared store keeps this replica from serving, if it does: unreachable, or the index too
        far behind its change log."""
        if self.follower is None:
            return None
        if self.follower.error is not None:
            return self.follower.error
        if self.follower.lag > self.settings.max_index_lag_s:
            return (
                f"the index is {self.follower.lag:.1f} s behind the document store "
                f"(GRERANK_MAX_INDEX_LAG_S={self.settings.max_index_lag_s:g})"
            )
        return None

    def not_ready_reason(self) -> str:
        if self.error is not None:
            return f"failed to load: {self.error}"
        if self.pipeline is not None:
            return self.store_problem() or ""
        waiting = [name for name, state in self.components.items() if state != "loaded"]
        return f"loading: {', '.join(waiting)}"

    def _load(self) -> None:
        try:
            self.components["embedder"] = "loading"

            def loaded(role: str) -> None:
                self.components[role] = "loaded"
                following = {"embedder": "reranker", "reranker": "reader", "reader": "index"}[role]
                self.components[following] = "loading"

            models = load_models(self.settings, loaded)
            index = DocumentIndex(
                self.settings.index_dir, models.embedder.dim, models.embedder_source, self.settings.store_url
            )
            pipeline = Pipeline(models, index, self.settings, self.metrics)
            if index.needs_reembedding:
                index.reembed(pipeline.embed_passages)
            self.components["index"] = "loaded"
            self.metrics.documents_indexed.set(len(index))
            info = models.describe()
            self.metrics.model_info.info(
                {
                    "embedder": info["embedder"]["source"],
                    "reranker": info["reranker"]["source"],
                    "reranker_architecture": info["reranker"]["architecture"],
                    "reranker_status": info["reranker"]["status"],
                    "reader": info["reader"]["source"],
                    "reader_status": info["reader"]["status"],
                    "device": info["device"],
                    "precision": info["precision"],
                }
            )
            self.rerank_queue = BatchingQueue(
                pipeline.rerank_backend,
                pipeline.truncation,
                self.worker,
                self.metrics,
                max_tokens=self.settings.max_batch_tokens,
                max_rows=self.settings.rerank_batch_size,
                capacity=self.settings.max_queue,
                timeout=self.settings.stage_timeouts["rerank"],
                cache=pipeline.rerank_cache,
            )
            if index.follows_log:
                self.follower = IndexFollower(index, self.settings.store_poll_ms / 1000, self.metrics).start()
            self.pipeline = pipeline
            self.metrics.ready.set(1)
            log.info(
                "ready: %d documents indexed, reranker: %s, reader: %s",
                len(index),
                info["reranker"]["status"],
                info["reader"]["status"],
            )
        except Exception as exc:  # any failure means "not ready", with the reason shown
            self.error = f"{type(exc).__name__}: {exc}"
            failed = next((n for n, s in self.components.items() if s == "loading"), None)
            if failed:
                self.components[failed] = "failed"
            log.exception("the service cannot become ready")

    def readiness(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "ready" if self.ready else "not ready",
            "components": dict(self.components),
        }
        if self.ready:
            assert self.pipeline is not None
            models = self.pipeline.models
            out["reranker"] = models.reranker_info.status
            out["reader"] = models.reader_info.status
            out["models"] = {"reranker": models.reranker_info.source, "reader": models.reader_info.source}
            if models.router_info is not None:  # documents are ranked by the reader's attention heads
                out["attention_reranker"] = models.router_info.status
                out["models"]["attention_reranker"] = models.router_info.source
            out["documents_indexed"] = len(self.pipeline.index)
        else:
            out["reason"] = self.not_ready_reason()
        if self.follower is not None:
            out["store"] = self.follower.describe()
        return out

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.rerank_queue is not None:
            self.rerank_queue.close()
        self.worker.shutdown()
        if self.rerank_queue is not None:  # the worker is gone: whatever it had not served fails, 503
            self.rerank_queue.abandon()
        if self.pipeline is not None:
            self.pipeline.index.close()
