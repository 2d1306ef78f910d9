"""Admission control: at most ``GRERANK_MAX_QUEUE`` requests for model work at once; beyond that, 429.

Model work runs one job at a time (:mod:`service.model_worker`), so every admitted request beyond the first
waits in memory. Bounding the admitted requests bounds that queue, and so memory and latency, whatever the
offered load. The decision is made before the request body is read (a shed request costs almost nothing)
and before authentication. ``Retry-After`` is the recent time an admitted request took from arrival to
answer, which under overload is about the time the queue takes to drain.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.metrics import Metrics

log = logging.getLogger(__name__)

_SMOOTHING = 0.2  # weight of the newest request in the moving average of request durations
_MAX_RETRY_AFTER = 60


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], limit: int, metrics: Metrics) -> None:
        """``routes``: the routes whose requests need the model worker; only those are counted."""
        self.app = app
        self.routes = list(routes)
        self.limit = limit
        self.metrics = metrics
        self.admitted = 0
        self.mean_seconds = 1.0  # until a request has been timed

    def retry_after(self) -> int:
        return max(1, min(_MAX_RETRY_AFTER, math.ceil(self.mean_seconds)))

    def _model_route(self, scope: Scope) -> BaseRoute | None:
        for route in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._model_route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        # The event loop runs one coroutine at a time: this check and the increment below cannot interleave.
        if self.admitted >= self.limit:
            scope["route"] = route  # so the request metrics count it under its route, not as unmatched
            self.metrics.shed_requests.labels(getattr(route, "path", "unmatched")).inc()
            log.warning("shed: %d requests admitted (GRERANK_MAX_QUEUE)", self.admitted)
            await self._reject(send)
            return
        self.admitted += 1
        self.metrics.admitted_requests.set(self.admitted)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1
            self.metrics.admitted_requests.set(self.admitted)
            elapsed = time.perf_counter() - start
            self.mean_seconds += _SMOOTHING * (elapsed - self.mean_seconds)

    async def _reject(self, send: Send) -> None:
        retry_after = self.retry_after()
        body = json.dumps(
            {
                "detail": f"overloaded: {self.limit} requests are already queued for the model "
                f"(GRERANK_MAX_QUEUE); retry after {retry_after} s"
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
