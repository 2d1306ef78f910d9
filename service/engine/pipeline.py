"""The request paths over the loaded models and the document index.

``/answer``: embed the query -> FAISS retrieval -> rerank the candidates (those read before come from
:mod:`service.engine.rerank_cache`; or, with a head router, rank them by the reader's own attention over
their cached states, which the reader then reuses) -> deterministic top-k (no noise,
ties by candidate order: the very ``hard_topk`` training evaluates with) -> the parallel-encoding reader.
If the reader fails or runs out of time, the answer is None with an ``error``, and the reranked documents
are still returned: they are most of the value, and were computed.

Each stage checks its time limit (:mod:`service.engine.stage_timeouts`) between units of work.

Every method here runs on the model worker thread (:mod:`service.engine.model_worker`), one call at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from grerank.doc_state_cache import DocStateCache
from grerank.gumbel_topk import hard_topk
from grerank.head_router import attention_scores
from grerank.passage import Passage
from grerank.runtime import resolve_dtype
from service.engine.batching_queue import rerank_inline
from service.engine.models import Models
from service.engine.rerank_backend import RerankBackend
from service.engine.rerank_cache import RerankCache
from service.engine.stage_timeouts import StageClock, StageTimeout
from service.engine.truncation import TruncationPolicy
from service.metrics import Metrics
from service.settings import Settings
from service.storage.document_index import DocumentIndex, Hit
from service.storage.document_store import NewDocument, StoredDocument

log = logging.getLogger(__name__)


class AnswerCancelled(Exception):
    """The client went away while the answer was being generated."""


@dataclass(frozen=True)
class Selected:
    document: StoredDocument
    retrieval_score: float
    rerank_score: float


@dataclass
class Answer:
    answer: str | None
    citations: list[Selected]
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] | None = None  # {"stage": "read", "detail": ...} when answered without the reader


class Pipeline:
    def __init__(self, models: Models, index: DocumentIndex, settings: Settings, metrics: Metrics) -> None:
        self.models = models
        self.index = index
        self.settings = settings
        self.metrics = metrics
        self.reader_cache = DocStateCache(
            models.reader,
            settings.reader_cache_mb * 2**20,
            settings.reader_cache_dir or settings.index_dir / "reader-states",
            settings.reader_cache_disk_mb * 2**20,
        )
        self.truncation = TruncationPolicy(models.reranker, models.reader)
        # bf16 on CPUs with AVX512-BF16/AMX, bf16 or fp16 on a GPU (GRERANK_PRECISION), fp32 otherwise.
        self.rerank_backend = RerankBackend(models.reranker, resolve_dtype(settings.precision, models.device))
        self.rerank_cache = RerankCache(settings.rerank_cache_mb * 2**20, metrics)

    def _clock(self, stage: str) -> StageClock:
        return StageClock(stage, self.settings.stage_timeouts[stage])

    @property
    def default_top_k(self) -> int:
        """GRERANK_TOP_K, else the k the artifact was trained with, else GRERANK_DEFAULT_TOP_K."""
        if self.settings.top_k is not None:
            return self.settings.top_k
        manifest = self.models.reranker_info.manifest or {}
        k = (manifest.get("hyperparameters") or {}).get("k")
        return int(k) if isinstance(k, int) and k > 0 else self.settings.default_top_k

    # ---- embedding ----

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        size = self.settings.embed_batch_size
        for start in range(0, len(texts), size):
            self.metrics.batch_size.labels("embed").observe(min(size, len(texts) - start))
        return self.models.embedder.encode(
            list(texts), batch_size=size, progress=progress, bf16=self.models.bf16
        )

    def embed_passages(self, passages: Sequence[Passage], progress: bool = False) -> np.ndarray:
        return self.embed([p.as_text() for p in passages], progress=progress)

    # ---- reranking ----

    def rerank(
        self, query: str, texts: Sequence[str], timings_ms: dict[str, float] | None = None
    ) -> torch.Tensor:
        """Scores ``[n]`` in input order, on this thread (``/answer``: its job holds the worker). The same
        bits as ``/rerank`` gets through the batching queue (:mod:`service.engine.batching_queue`)."""
        with self.metrics.stage("rerank", timings_ms):
            return rerank_inline(
                self.rerank_backend,
                self.truncation.fit_query(query),
                texts,
                self.settings.max_batch_tokens,
                self.settings.rerank_batch_size,
                self.metrics,
                self._clock("rerank").check,
                self.rerank_cache,
            )

    def rank(
        self, query: str, passages: Sequence[Passage], timings_ms: dict[str, float] | None = None
    ) -> torch.Tensor:
        """Scores ``[n]`` in input order by what ranks documents: the head router over the reader's attention
        when one is served (one pass over all of ``passages``, their states cached for the reader), else the
        reranker."""
        if self.models.router is None:
            return self.rerank(query, [p.as_text() for p in passages], timings_ms)
        with self.metrics.stage("rerank", timings_ms):
            clock = self._clock("rerank")
            states = self.reader_cache.states(passages, query, check=clock.check)
            clock.check()
            scores = attention_scores(self.models.reader, self.models.router, query, states)
            clock.check()
        return scores

    @staticmethod
    def order(scores: torch.Tensor, k: int | None = None) -> list[int]:
        """Indices best first, ties by input position."""
        return hard_topk(scores, k).tolist()

    # ---- retrieval and answering ----

    def retrieve(
        self,
        query: str,
        k: int,
        metadata_filter: Mapping[str, Any] | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> list[Hit]:
        with self.metrics.stage("embed", timings_ms):
            clock = self._clock("embed")
            vector = self.embed([query])[0]
            clock.check()
        with self.metrics.stage("retrieve", timings_ms):
            clock = self._clock("retrieve")
            hits = self.index.search(vector, k, metadata_filter)
            clock.check()
        return hits

    def answer(
        self,
        query: str,
        top_k: int,
        candidates: int,
        metadata_filter: Mapping[str, Any] | None = None,
        on_token: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Answer:
        timings: dict[str, float] = {}
        hits = self.retrieve(query, candidates, metadata_filter, timings)
        scores = self.rank(query, [h.document.passage() for h in hits], timings)
        chosen = self.order(scores, top_k)
        selected = [Selected(hits[i].document, hits[i].score, float(scores[i])) for i in chosen]
        try:
            text = self._read(query, selected, timings, on_token, cancelled)
        except AnswerCancelled:
            raise
        except Exception as exc:  # the reader failed or ran out of time: answer with the documents alone
            self.metrics.reader_failures.inc()
            if isinstance(exc, StageTimeout):
                self.metrics.stage_timeouts.labels("read").inc()
                log.warning("answering without the reader: %s", exc)
                detail = str(exc)
            else:
                log.exception("the reader failed; answering with the reranked documents only")
                detail = f"the reader failed: {type(exc).__name__}: {exc}"
            return Answer(None, selected, timings, {"stage": "read", "detail": detail})
        return Answer(text, selected, timings)

    def _read(
        self,
        query: str,
        selected: Sequence[Selected],
        timings: dict[str, float],
        on_token: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> str:
        reader = self.models.reader
        pieces: list[str] = []
        with self.metrics.stage("read", timings):
            clock = self._clock("read")
            passages = [s.document.passage() for s in selected]
            states = self.reader_cache.states(passages, query, check=clock.check)
            self.metrics.reader_cache_bytes.set(self.reader_cache.memory_bytes)
            for piece in reader.stream_answer(query, states, self.settings.reader_max_new_tokens):
                if cancelled is not None and cancelled():
                    raise AnswerCancelled
                pieces.append(piece)
                if on_token is not None:
                    on_token(piece)
                clock.check()
        return "".join(pieces).strip()

    # ---- document management ----

    def upsert(self, documents: Sequence[NewDocument]) -> list[int]:
        with self.metrics.stage("index"):
            clock = self._clock("index")
            vectors = self.embed_passages([Passage(d.title, d.text) for d in documents])
            clock.check()  # the last point of return: past it the write is committed and acknowledged
            keys = self.index.upsert(documents, vectors)
            if self.settings.precompute_reader_states:
                self.precompute_reader_states([Passage(d.title, d.text) for d in documents], clock.check)
        self.metrics.documents_indexed.set(len(self.index))
        return keys

    def precompute_reader_states(
        self, passages: Sequence[Passage], check: Callable[[], None] | None = None, chunk: int = 16
    ) -> int:
        """Encode and cache the reader states of ``passages`` now rather than at their first /answer; returns
        how many were encoded. Best effort: the documents are already indexed, so running out of time only
        leaves the rest to be encoded when first read."""
        if self.models.reader.states_depend_on_question:
            return 0
        done = 0
        try:
            for start in range(0, len(passages), chunk):  # in chunks: never all states in memory at once
                part = passages[start : start + chunk]
                self.reader_cache.states(part, check=check)
                done += len(part)
        except StageTimeout as exc:
            left = len(passages) - done
            log.warning("reader states of %d documents left for their first use: %s", left, exc)
        self.metrics.reader_cache_bytes.set(self.reader_cache.memory_bytes)
        return done

    def delete(self, doc_id: str) -> bool:
        deleted = self.index.delete(doc_id)
        self.metrics.documents_indexed.set(len(self.index))
        return deleted
