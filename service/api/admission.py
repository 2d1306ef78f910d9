"""Admission control for the routes that need the model worker: by predicted wait, by count, and cheaply.

Model work runs one job at a time (:mod:`service.engine.model_worker`), so every admitted request beyond the
first waits. A request is admitted only when its predicted wait (until the model starts on it: from the recent
service rate and the requests admitted ahead of it, the same for every route so that costly requests are not
starved by cheap ones) fits ``GRERANK_MAX_WAIT_MS`` (or nothing is ahead of it), and fewer than
``GRERANK_MAX_QUEUE`` are admitted (a bound on memory whatever the estimate says). Otherwise it gets 429 with
a ``Retry-After`` of the predicted time until it would fit.

Refusing must cost far less than serving, or a retry storm starves the model: on two cores, a few hundred
refusals a second take the interpreter lock and a core from the model's threads and cut goodput to a
quarter (measured: ``bench/overload.py``). So the decision is made before the request body is read or the
request authenticated, and a refusal is answered after ``GRERANK_SHED_DELAY_MS``: a client that retries at
once then retries a few times a second instead of hundreds, and a held refusal costs an idle coroutine.

A request whose client disconnects while it waits is cancelled, and with it its place in the model worker's
queue or the rerank queue, so the model never runs for nobody (499 in the access log and metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

log = logging.getLogger(__name__)

_MAX_RETRY_AFTER = 60
_MAX_HELD = 1024  # refusals held at once; beyond that they are answered at once (file descriptors)
_LOG_EVERY = 10.0  # seconds between log lines about refusals: a storm must not also flood the log
MODEL_DONE = "grerank.model_done"  # scope key: call it when the request's model work is over
CLIENT_GONE = 499  # the status nginx logs for a client that closed the connection before the answer


class WaitPredictor:
    """Predicts a request's time from admission to answer, per route: the model time of the requests
    admitted ahead of it and its own, times a correction learnt from how long requests of its route really
    took against that prediction.

    A route's model time is a moving average of the time between the previous answer and each of its answers
    while the model is busy: the worker serves one job at a time, so that is what a request cost (for rerank
    requests batched into one pass, their share of it). The correction accounts for the order of service,
    which is not first come first served: a rerank request gives the worker up after each pass, so
    ``/answer`` requests that arrive later are served within its wait."""

    def __init__(self, initial: float = 0.5) -> None:
        self.initial = initial
        self.cost: dict[str, float] = {}
        self.correction: dict[str, float] = {}
        self.ahead: Counter[str] = Counter()
        self._since = 0.0  # the last answer, or the start of the current busy period

    @property
    def in_flight(self) -> int:
        return self.ahead.total()

    def _work_ahead(self) -> float:
        return sum(n * self.cost.get(r, self.initial) for r, n in self.ahead.items())

    def predicted_seconds(self, route: str) -> float:
        """From now to the answer of a request for ``route`` admitted now."""
        return (self._work_ahead() + self.cost.get(route, self.initial)) * self.correction.get(route, 1.0)

    def predicted_wait(self, route: str) -> float:
        """From now until a request for ``route`` admitted now is served: the work ahead of it, corrected,
        whatever its own cost (so admission does not favour cheap requests over costly ones), and none when
        nothing is ahead (a lone client is never refused, however slow its requests)."""
        return self._work_ahead() * self.correction.get(route, 1.0)

    def started(self, route: str, now: float) -> float:
        """Counts the request in; returns its predicted time to answer, for :meth:`finished`."""
        predicted = self.predicted_seconds(route)
        if not self.ahead:
            self._since = now
        self.ahead[route] += 1
        return predicted

    def release(self, route: str) -> None:
        """The model is done with a request of ``route``: it is no longer work ahead of anyone."""
        self.ahead[route] -= 1
        if not self.ahead[route]:
            del self.ahead[route]

    def finished(
        self, route: str, now: float, took: float, predicted: float, served: bool, released: bool = False
    ) -> None:
        """``served``: answered by the model (not a quick error), so it times the route; ``released``:
        :meth:`release` was called for it already."""
        if not released:
            self.release(route)
        if served:
            self.cost[route] = _average(self.cost.get(route, self.initial), now - self._since, 0.05)
            ratio = min(max(took / predicted, 0.25), 10.0)
            correction = self.correction.get(route, 1.0)
            # Up fast, down slowly: a prediction that was too short costs the deadline, one too long only
            # refuses a request that would have fitted, while the model stays busy with the others.
            self.correction[route] = _average(correction, ratio, 0.4 if ratio > correction else 0.02)
            self._since = now


def _average(old: float, new: float, weight: float) -> float:
    return old + weight * (new - old)


class AdmissionMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        limit: int,
        max_wait_ms: int,
        shed_delay_ms: int,
        metrics: Metrics,
    ) -> None:
        """``routes``: the routes whose requests need the model worker; only those are admitted here."""
        self.app = app
        self.routes = list(routes)
        self.limit = limit
        self.max_wait = max_wait_ms / 1000
        self.shed_delay = shed_delay_ms / 1000
        self.metrics = metrics
        self.predictor = WaitPredictor()
        self.held = 0
        self._refused_since_log = 0
        self._logged_at = 0.0

    def _model_route(self, scope: Scope) -> BaseRoute | None:
        for route in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route
        return None

    def refusal(self, kind: str) -> str | None:
        """Why a request of ``kind`` (a route's endpoint) arriving now is refused, or None to admit it."""
        if self.predictor.in_flight >= self.limit:
            return f"{self.limit} requests are already admitted for the model (GRERANK_MAX_QUEUE)"
        wait = self.predictor.predicted_wait(kind)
        if self.predictor.in_flight and wait > self.max_wait:
            return (
                f"the predicted wait, {wait:.1f} s, exceeds GRERANK_MAX_WAIT_MS ({self.max_wait * 1000:.0f})"
            )
        return None

    def retry_after(self, kind: str) -> int:
        """Seconds until a request would fit: until enough of those ahead have been answered."""
        excess = self.predictor.predicted_wait(kind) - self.max_wait
        return max(1, min(_MAX_RETRY_AFTER, math.ceil(excess)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._model_route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        path = getattr(route, "path", "unmatched")
        kind = getattr(route, "name", path)  # the /rerank aliases are one kind of work
        # The event loop runs one coroutine at a time: this decision and the count below cannot interleave.
        reason = self.refusal(kind)
        if reason is not None:
            scope["route"] = route  # so the request metrics count it under its route, not as unmatched
            await self._refuse(path, kind, reason, send)
            return
        start = time.perf_counter()
        predicted = self.predictor.started(kind, start)
        self.metrics.admitted_requests.set(self.predictor.in_flight)
        released = False

        def model_done() -> None:
            nonlocal released
            if not released:
                released = True
                self.predictor.release(kind)

        # A streamed answer's model work ends before its response does (and a client that has read the
        # last event may ask again before the stream is closed): the route calls this when it does.
        scope[MODEL_DONE] = model_done
        status = 500
        try:
            status = await _serve_until_gone(self.app, scope, receive, send)
        finally:
            now = time.perf_counter()
            self.predictor.finished(kind, now, now - start, predicted, status < 400, released)
            released = True
            self.metrics.admitted_requests.set(self.predictor.in_flight)
            self.metrics.predicted_wait.set(self.predictor.predicted_wait(kind))
            if status == CLIENT_GONE:
                self.metrics.client_gone.labels(path).inc()

    async def _refuse(self, path: str, kind: str, reason: str, send: Send) -> None:
        self.metrics.shed_requests.labels(path).inc()
        retry_after = self.retry_after(kind)
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            count, seconds = self._refused_since_log, now - self._logged_at
            log.warning("shed %d requests in the last %.0f s; the latest: %s", count, seconds, reason)
            self._refused_since_log, self._logged_at = 0, now
        if self.held < _MAX_HELD and self.shed_delay > 0:
            self.held += 1
            try:
                await asyncio.sleep(min(self.shed_delay, retry_after))
            finally:
                self.held -= 1
        body = json.dumps({"detail": f"overloaded: {reason}; retry after {retry_after} s"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _serve_until_gone(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> int:
    """Runs ``app`` for the request and returns the status it answered; if the client disconnects before
    the answer is complete, cancels it (which takes its work off the queues) and returns 499.

    Once the body is read, this listens for the disconnect itself and hands the app a ``receive`` that
    reports it, since one ``receive`` must not be awaited twice at once."""
    gone = asyncio.Event()
    status = 500
    complete = False
    watcher: asyncio.Task | None = None

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not complete:  # after the answer, the server reports a disconnect to every receive
            gone.set()
            task.cancel()

    async def app_receive() -> Message:
        nonlocal watcher
        if watcher is not None:
            await gone.wait()
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            watcher = asyncio.create_task(watch())
        return message

    async def app_send(message: Message) -> None:
        nonlocal status, complete
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            complete = True
        await send(message)

    task = asyncio.ensure_future(app(scope, app_receive, app_send))
    try:
        await task
    except asyncio.CancelledError:
        if not gone.is_set():
            raise  # the server itself is cancelling this request
        if status == 500:  # nothing was sent: tell the outer middleware (the server drops it)
            with contextlib.suppress(Exception):
                await send({"type": "http.response.start", "status": CLIENT_GONE, "headers": []})
                await send({"type": "http.response.body", "body": b""})
        return CLIENT_GONE
    finally:
        if watcher is not None:
            watcher.cancel()
    return status
