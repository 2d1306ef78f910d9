"""The FastAPI app: the routers of service.api.routes, error mapping and middleware, assembled. Run with

    uvicorn service.app:create_app --factory

Models load on the model worker when the app starts; until they (and the index) are in memory the model
routes answer 503 with the reason, as does ``/readyz``.

Status codes besides 200: 400 a configured limit, 401 no or an unknown API key, 403 a read-only key on a
write, 404, 405, 413 a body over GRERANK_MAX_REQUEST_BYTES, 422 a malformed request, 429 overloaded (a
predicted wait over GRERANK_MAX_WAIT_MS, or GRERANK_MAX_QUEUE requests admitted; with Retry-After), 503 not
ready (with Retry-After), 504 a stage over its GRERANK_STAGE_TIMEOUTS limit (naming the stage); 499 in the
logs and metrics only: the client went away before its answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import logs
from service.api.admission import AdmissionMiddleware
from service.api.api_keys import KeyRing, without_plain_keys
from service.api.http_middleware import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
    RequestMetricsMiddleware,
)
from service.api.request_limits import RequestRejected, state_in_schema
from service.api.routes import MODEL_ENDPOINTS, ROUTERS
from service.engine.batching_queue import QueueClosed, QueueFull
from service.engine.runtime import Runtime
from service.engine.stage_timeouts import StageTimeout
from service.settings import Settings
from service.storage.postgres_store import StoreUnavailable
from service.version import VERSION

# From the routers themselves: the app's route list holds the included routers rather than their routes.
API_ROUTES = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for ``settings`` (default: read from the ``GRERANK_*`` environment)."""
    settings = settings or Settings()
    logs.configure(settings.log_format, settings.log_level)
    keys = KeyRing.from_settings(settings)
    settings = without_plain_keys(settings)  # from here on, only digests of the keys are kept
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runtime.close)

    app = FastAPI(
        title="grerank",
        version=VERSION,
        description="Retrieval-augmented answering with a reranker trained by Gumbel Reranking.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.keys = keys

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return Response(_validation_body(exc.errors()), status_code=422, media_type="application/json")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "1"})

    @app.exception_handler(QueueClosed)
    async def queue_closed(request: Request, exc: QueueClosed) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette names the methods of the first route whose path matched; a path served by several
        # routes (GET and DELETE /documents/{id}) allows the methods of all of them.
        allowed = sorted(
            {m for r in API_ROUTES if r.matches(request.scope)[0] != Match.NONE for m in r.methods}
        )
        return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "2"})

    @app.exception_handler(StageTimeout)
    async def timed_out(request: Request, exc: StageTimeout) -> JSONResponse:
        runtime.metrics.stage_timeouts.labels(exc.stage).inc()
        return JSONResponse({"detail": str(exc), "stage": exc.stage}, status_code=504)

    for router in ROUTERS:
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once, with this configuration's limits stated in it
            app.openapi_schema = state_in_schema(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # Middleware, innermost first: the body limit; admission control over the routes that need the model
    # worker; request metrics; request ids and the access log (outermost, so every response is logged).
    # From the routers themselves: the app's route list may hold an included router rather than its routes.
    model_routes = [
        r
        for router in ROUTERS
        for r in router.routes
        if isinstance(r, APIRoute) and r.endpoint in MODEL_ENDPOINTS
    ]
    assert len(model_routes) == len(MODEL_ENDPOINTS) + 2  # /rerank has two aliases
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        AdmissionMiddleware,
        routes=model_routes,
        limit=settings.max_queue,
        max_wait_ms=settings.max_wait_ms,
        shed_delay_ms=settings.shed_delay_ms,
        metrics=runtime.metrics,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics)
    app.add_middleware(RequestContextMiddleware)
    return app


def _validation_body(errors: Any) -> bytes:
    """FastAPI's 422 body, which echoes each bad input. The input may be what made the request bad and
    then cannot be written as JSON (a lone surrogate, NaN): such a body is sent without the inputs."""
    detail = jsonable_encoder(errors)
    try:
        return json.dumps({"detail": detail}, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, UnicodeEncodeError):
        stripped = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in detail]
        return json.dumps({"detail": stripped}, default=str).encode()  # ASCII: surrogates escaped
