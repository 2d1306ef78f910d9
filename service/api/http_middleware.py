"""ASGI middleware: request ids and the access log, per-route request metrics, a request body size limit.

Plain ASGI rather than ``BaseHTTPMiddleware`` so streamed (server-sent event) responses pass straight through.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.metrics import Metrics

REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept only if it is short and plain, so it cannot forge log lines or bloat them.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("service.access")


class RequestContextMiddleware:
    """Gives each request an id (the client's ``X-Request-ID`` if valid, else a new one), echoes it in the
    response header, and logs one access line per request with it: method, path (never the query string or
    headers, which may carry secrets), route, status and duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        start = time.perf_counter()
        status = 500  # if the app raises before sending a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Logged here, while the request id is still set; the server logs it again without it.
            access_log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)
            access_log.log(
                logging.WARNING if status >= 500 and status != 503 else logging.INFO,  # 503: loading
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
            logs.request_id.reset(token)


class RequestMetricsMiddleware:
    """Counts requests by route template (not raw path, to bound label cardinality) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before sending a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - start)


class BodySizeLimitMiddleware:
    """Answers 413 when a request declares (Content-Length) or sends more than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _reject(send, self.max_bytes)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Chunked bodies carry no length up front; stop reading once over the limit.
                    raise _BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await _reject(send, self.max_bytes)


def _too_large(max_bytes: int) -> str:
    return f"request body exceeds {max_bytes} bytes (GRERANK_MAX_REQUEST_BYTES)"


class _BodyTooLarge(HTTPException):
    # An HTTPException, because FastAPI turns any other error while reading the body into a 400; this one
    # it re-raises, and its handler answers 413. (Raised outside FastAPI's routes, the except above does.)
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(max_bytes))


async def _reject(send: Send, max_bytes: int) -> None:
    body = json.dumps({"detail": _too_large(max_bytes)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
