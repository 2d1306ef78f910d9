"""Prometheus metrics, one registry per app (so several apps in one process never collide).

Names follow the Prometheus conventions: counters end in ``_total``, durations are ``_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "grerank_requests",
            "HTTP requests by route template and status code.",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "grerank_request_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "grerank_stage_seconds",
            "Latency of one pipeline stage (embed, retrieve, rerank, read, index).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "grerank_batch_size",
            "Texts per model forward pass, by stage.",
            ["stage"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "grerank_batch_tokens",
            "Tokens per model forward pass, by stage.",
            ["stage"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "grerank_forward_seconds",
            "Duration of one model forward pass, by stage; its sum is the time the model was busy.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "grerank_queue_depth",
            "Model work waiting or running: jobs of the model worker and requests in the rerank queue.",
            registry=r,
        )
        self.admitted_requests = Gauge(
            "grerank_admitted_requests",
            "Requests for model work admitted and not yet answered (at most GRERANK_MAX_QUEUE).",
            registry=r,
        )
        self.shed_requests = Counter(
            "grerank_shed_requests",
            "Requests refused with 429 (predicted wait over GRERANK_MAX_WAIT_MS, or GRERANK_MAX_QUEUE "
            "admitted), by route.",
            ["route"],
            registry=r,
        )
        self.predicted_wait = Gauge(
            "grerank_predicted_wait_seconds",
            "Predicted time from admission to answer for a model request arriving now.",
            registry=r,
        )
        self.client_gone = Counter(
            "grerank_client_gone_requests",
            "Admitted requests whose client went away before the answer (dropped from the queues), by route.",
            ["route"],
            registry=r,
        )
        self.stage_timeouts = Counter(
            "grerank_stage_timeouts",
            "Pipeline stages stopped for exceeding their GRERANK_STAGE_TIMEOUTS limit, by stage.",
            ["stage"],
            registry=r,
        )
        self.reader_failures = Counter(
            "grerank_reader_failures",
            "/answer requests answered without the reader (it failed or timed out), with an error field.",
            registry=r,
        )
        self.documents_indexed = Gauge("grerank_documents_indexed", "Documents in the index.", registry=r)
        self.ready = Gauge("grerank_ready", "1 when models and index are loaded.", registry=r)
        self.index_sequence = Gauge(
            "grerank_index_sequence",
            "The store change this replica's index reflects (PostgreSQL store).",
            registry=r,
        )
        self.index_lag = Gauge(
            "grerank_index_lag_seconds",
            "How long ago the oldest change this replica's index has not applied was committed (PostgreSQL "
            "store; +Inf while the store is unreachable).",
            registry=r,
        )
        self.reader_cache_bytes = Gauge(
            "grerank_reader_cache_bytes", "Memory held by cached per-document reader states.", registry=r
        )
        self.rerank_cache_lookups = Counter(
            "grerank_rerank_cache_lookups",
            "Reranker outputs looked up in the cache of sequences read before, by result (hit, miss).",
            ["result"],
            registry=r,
        )
        self.rerank_cache_bytes = Gauge(
            "grerank_rerank_cache_bytes", "Memory held by cached reranker outputs.", registry=r
        )
        self.model_info = Info("grerank_model", "Served models and reranker artifact.", registry=r)

    @contextmanager
    def stage(self, name: str, timings_ms: dict[str, float] | None = None) -> Iterator[None]:
        """Time a stage into the histogram and, if given, into ``timings_ms[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(name, time.perf_counter() - start, timings_ms)

    def observe_stage(self, name: str, seconds: float, timings_ms: dict[str, float] | None = None) -> None:
        """Record a stage timed elsewhere, like :meth:`stage` does."""
        self.stage_seconds.labels(name).observe(seconds)
        if timings_ms is not None:
            timings_ms[name] = round(timings_ms.get(name, 0.0) + seconds * 1000, 3)

    def render(self) -> bytes:
        return generate_latest(self.registry)
