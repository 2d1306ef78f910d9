"""Dynamic batching of rerank work across concurrent requests (the router -> queue -> backend split of
text-embeddings-inference).

``/rerank`` requests are put in this queue instead of each taking the model on its own. The queue runs on
the model worker (:mod:`service.engine.model_worker`) one forward pass per turn, and after each pass goes to
the back of the worker's line, so an ``/answer`` or a document write waiting there gets the model next: rerank
traffic delays other work by at most one pass. Each turn:

1. tokenizes the requests that arrived since the last turn (on the worker thread: tokenizers must not be
   shared between threads); their rerank stage, and its time limit, starts here; sequences the rerank cache
   holds need no pass, and a request it holds whole is answered at once;
2. fails the requests over their time limit (504) or no longer awaited;
3. runs one pass over the oldest waiting sequences, from any request and of any lengths, up to
   ``GRERANK_MAX_BATCH_TOKENS`` tokens and ``GRERANK_RERANK_BATCH_SIZE`` texts. The backend packs them end
   to end, so there is no padding to sort by length against;
4. answers every request whose last sequence was in the pass.

Scores do not depend on the batching: :mod:`service.engine.rerank_backend` makes each sequence's output a
function of that sequence alone, so a request gets the same bits alone, among others, scored inline by
:func:`rerank_inline` (``/answer``, which already holds the worker), or from
:mod:`service.engine.rerank_cache`, which answers the sequences read before without a pass.

The queue is bounded: at most ``GRERANK_MAX_QUEUE`` requests (the admission middleware refuses more before
they reach it; this bound also holds for callers in process), beyond it :class:`QueueFull` (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from service.api.request_limits import RequestRejected
from service.engine.model_worker import ModelWorker
from service.engine.rerank_backend import Encoded, RerankBackend
from service.engine.rerank_cache import RerankCache
from service.engine.stage_timeouts import StageClock
from service.engine.truncation import TruncationPolicy
from service.metrics import Metrics

log = logging.getLogger(__name__)

RerankResult = tuple[torch.Tensor, dict[str, Any]]  # scores in input order, and meta.truncation


class QueueFull(Exception):
    """More rerank requests are waiting than the queue holds (GRERANK_MAX_QUEUE)."""


class QueueClosed(Exception):
    """The service is shutting down."""


@dataclass(eq=False)
class RerankJob:
    """One request's rerank work: its sequences, and their outputs as passes produce them."""

    sequences: list[Encoded] = field(default_factory=list)
    outputs: list[torch.Tensor | None] = field(default_factory=list)
    remaining: int = 0

    def start(self, sequences: list[Encoded], cache: RerankCache | None = None) -> None:
        """Take the request's sequences; those ``cache`` holds are answered now, the rest wait for passes."""
        self.sequences = sequences
        self.outputs = [None if cache is None else cache.get(s) for s in sequences]
        self.remaining = self.outputs.count(None)

    @property
    def abandoned(self) -> bool:
        """Answered already (failed, timed out) or no longer awaited: its remaining sequences are skipped."""
        return False

    def scores(self, backend: RerankBackend) -> torch.Tensor:
        if not self.sequences:
            return torch.zeros(0)
        return backend.scores(torch.stack(self.outputs))  # type: ignore[arg-type]  # all set by now


@dataclass(eq=False)
class QueuedRequest(RerankJob):
    """A ``/rerank`` request in the queue; its sequences are set when the worker admits it."""

    query: str = ""
    texts: Sequence[str] = ()
    timings_ms: dict[str, float] | None = None
    future: Future[RerankResult] = field(default_factory=Future)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)  # for its request id
    truncation: dict[str, Any] = field(default_factory=dict)
    clock: StageClock | None = None
    started: float = 0.0

    @property
    def abandoned(self) -> bool:
        return self.future.done()


class PassPlanner:
    """Waiting sequences, oldest first. A pass takes the oldest, whatever their lengths (the backend packs
    them without padding), up to ``max_tokens`` tokens and ``max_rows`` sequences."""

    def __init__(self, max_tokens: int, max_rows: int) -> None:
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self._waiting: deque[tuple[RerankJob, int]] = deque()

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, job: RerankJob) -> None:
        self._waiting.extend((job, i) for i, output in enumerate(job.outputs) if output is None)

    def next_pass(self) -> list[tuple[RerankJob, int]]:
        """The next pass: ``(job, sequence index)`` pairs; empty when nothing is waiting."""
        entries: list[tuple[RerankJob, int]] = []
        tokens = 0
        while self._waiting and len(entries) < self.max_rows:
            job, i = self._waiting[0]
            if job.abandoned:
                self._waiting.popleft()
                continue
            length = len(job.sequences[i].ids)
            if entries and tokens + length > self.max_tokens:
                break
            self._waiting.popleft()
            entries.append((job, i))
            tokens += length
        return entries


def run_pass(
    backend: RerankBackend,
    entries: Sequence[tuple[RerankJob, int]],
    metrics: Metrics,
    cache: RerankCache | None = None,
) -> list[RerankJob]:
    """One forward pass over ``entries``: stores each output in its job (and ``cache``); returns the jobs it
    completed."""
    sequences = [job.sequences[i] for job, i in entries]
    start = time.perf_counter()
    outputs = backend.forward(sequences)
    metrics.forward_seconds.labels("rerank").observe(time.perf_counter() - start)
    metrics.batch_size.labels("rerank").observe(len(entries))
    metrics.batch_tokens.labels("rerank").observe(sum(len(s.ids) for s in sequences))
    completed = []
    for row, (job, i) in enumerate(entries):
        job.outputs[i] = outputs[row]
        job.remaining -= 1
        if cache is not None:
            cache.put(job.sequences[i], outputs[row])
        if job.remaining == 0:
            completed.append(job)
    return completed


def rerank_inline(
    backend: RerankBackend,
    query: str,
    texts: Sequence[str],
    max_tokens: int,
    max_rows: int,
    metrics: Metrics,
    check: Callable[[], None] = lambda: None,
    cache: RerankCache | None = None,
) -> torch.Tensor:
    """Scores ``[n]`` of one request on the calling thread, in the passes the queue would run for it alone
    (so with the same bits); ``check`` runs after each pass (the stage clock)."""
    job = RerankJob()
    job.start(backend.encode(query, texts), cache)
    planner = PassPlanner(max_tokens, max_rows)
    planner.add(job)
    while entries := planner.next_pass():
        run_pass(backend, entries, metrics, cache)
        check()
    return job.scores(backend)


class BatchingQueue:
    def __init__(
        self,
        backend: RerankBackend,
        truncation: TruncationPolicy,
        worker: ModelWorker,
        metrics: Metrics,
        *,
        max_tokens: int,
        max_rows: int,
        capacity: int,
        timeout: float,
        cache: RerankCache | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.truncation = truncation
        self.worker = worker
        self.metrics = metrics
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self.capacity = capacity
        self.timeout = timeout
        self._lock = threading.Lock()
        # Shared with the event loop, under the lock: arrivals, unanswered requests, whether a turn is due.
        self._incoming: deque[QueuedRequest] = deque()
        self._unanswered = 0
        self._scheduled = False
        self._closed = False
        # Only the worker thread touches these.
        self._planner = PassPlanner(max_tokens, max_rows)
        self._active: list[QueuedRequest] = []

    # ---- the event-loop side ----

    async def rerank(
        self, query: str, texts: Sequence[str], timings_ms: dict[str, float] | None = None
    ) -> RerankResult:
        """Scores ``[n]`` of ``texts`` for ``query`` in input order, and what the reranker did not read."""
        return await asyncio.wrap_future(self.submit(query, texts, timings_ms))

    def submit(
        self, query: str, texts: Sequence[str], timings_ms: dict[str, float] | None = None
    ) -> Future[RerankResult]:
        request = QueuedRequest(query=query, texts=texts, timings_ms=timings_ms)
        with self._lock:
            if self._closed:
                raise QueueClosed("the service is shutting down")
            if self._unanswered >= self.capacity:
                raise QueueFull(
                    f"overloaded: {self.capacity} rerank requests are already queued (GRERANK_MAX_QUEUE)"
                )
            self._unanswered += 1
            self._incoming.append(request)
            start_turn = not self._scheduled
            self._scheduled = True
        self.worker.track(1)  # the queue depth counts it, like a job of its own, until it is answered
        request.future.add_done_callback(self._answered)
        if start_turn:
            self._schedule()
        return request.future

    def _answered(self, _: Future) -> None:
        with self._lock:
            self._unanswered -= 1
        self.worker.track(-1)

    def _schedule(self) -> None:
        try:
            self.worker.submit(self._turn, counted=False)
        except RuntimeError:  # the worker has shut down: nothing will serve these requests any more
            self.abandon()

    # ---- the worker side ----

    def _turn(self) -> None:
        try:
            self._admit()
            self._expire()
            entries = self._planner.next_pass()
            if entries:
                self._run(entries)
        except Exception as exc:  # a bug, not a request's fault: fail what is in flight rather than spin
            log.exception("the rerank queue failed")
            for request in self._active:
                _fail(request, exc)
            self._active, self._planner = [], PassPlanner(self.max_tokens, self.max_rows)
        finally:
            with self._lock:
                again = bool(self._incoming) or bool(self._planner)
                self._scheduled = again
            if again:
                self._schedule()

    def _admit(self) -> None:
        with self._lock:
            arrived, self._incoming = self._incoming, deque()
        for request in arrived:
            if request.abandoned:  # cancelled while waiting
                continue
            request.started = time.perf_counter()
            request.clock = StageClock("rerank", self.timeout)
            try:
                sequences = self.backend.encode(self.truncation.fit_query(request.query), request.texts)
                request.start(sequences, self.cache)
                request.truncation = self.truncation.report(request.query, request.texts)
            except Exception as exc:  # this request's text, so this request's error (400), nobody else's
                request.context.run(log.warning, "the reranker cannot tokenize a request: %s", exc)
                _fail(request, RequestRejected(f"the reranker's tokenizer cannot read this request: {exc}"))
                continue
            self._active.append(request)
            if request.remaining:
                self._planner.add(request)
            else:
                self._finish(request)

    def _expire(self) -> None:
        for request in self._active:
            try:
                if not request.abandoned:
                    request.clock.check()  # type: ignore[union-attr]  # set on admission
            except Exception as exc:
                _fail(request, exc)
        self._active = [r for r in self._active if not r.abandoned]

    def _run(self, entries: list[tuple[RerankJob, int]]) -> None:
        try:
            completed = run_pass(self.backend, entries, self.metrics, self.cache)
        except Exception as exc:  # fails the requests in this pass, not the queue
            log.exception("a reranker forward pass failed")
            for job in {job for job, _ in entries}:
                _fail(job, exc)  # type: ignore[arg-type]  # the queue's jobs are its requests
            return
        for job in completed:
            self._finish(job)  # type: ignore[arg-type]

    def _finish(self, request: QueuedRequest) -> None:
        scores = request.scores(self.backend)
        self.metrics.observe_stage("rerank", time.perf_counter() - request.started, request.timings_ms)
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            request.future.set_result((scores, request.truncation))

    # ---- shutdown ----

    def close(self) -> None:
        """Refuse new requests (503)."""
        with self._lock:
            self._closed = True

    def abandon(self) -> None:
        """Fail every request not yet answered; for when the worker runs no more turns."""
        with self._lock:
            waiting, self._incoming = list(self._incoming), deque()
        for request in [*waiting, *self._active]:
            _fail(request, QueueClosed("the service shut down before this request was served"))
        self._active = []


def _fail(request: QueuedRequest, exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # already answered or cancelled
        request.future.set_exception(exc)
