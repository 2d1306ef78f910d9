"""What the routes depend on: the runtime and settings of the app, API-key checks, the ready pipeline and the
rerank batching queue; and the error responses each route documents."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from service.api.api_keys import Access, KeyRing
from service.api.schemas.common import ErrorResponse
from service.engine.batching_queue import BatchingQueue
from service.engine.pipeline import Pipeline
from service.engine.runtime import Runtime
from service.settings import Settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    """The app's settings, with API keys kept only as digests."""
    return request.app.state.runtime.settings


AppRuntime = Annotated[Runtime, Depends(get_runtime)]
AppSettings = Annotated[Settings, Depends(get_settings)]


def authenticate(request: Request) -> Access:
    """401 without a known key (when keys are configured); else what the key may do."""
    keys: KeyRing = request.app.state.keys
    if not keys.enabled:
        return Access.WRITE
    header = request.headers.get("authorization", "")
    token = (
        header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    )
    access = keys.access(token)
    if access is None:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return access


def require_write(access: Annotated[Access, Depends(authenticate)]) -> None:
    """403 for a valid read-only key on a route that changes the index."""
    if access < Access.WRITE:
        raise HTTPException(
            403, "this API key is read-only (GRERANK_READ_API_KEYS); writing needs a key of GRERANK_API_KEYS"
        )


def open_or_authenticated(request: Request) -> None:
    """Operations routes: open if listed in GRERANK_OPEN_PATHS, else like any API route."""
    if request.url.path not in get_settings(request).open_paths:
        authenticate(request)


def ready_pipeline(runtime: AppRuntime) -> Pipeline:
    if runtime.pipeline is None:
        raise HTTPException(503, f"not ready ({runtime.not_ready_reason()})", headers={"Retry-After": "5"})
    return runtime.pipeline


ReadyPipeline = Annotated[Pipeline, Depends(ready_pipeline)]


def rerank_queue(runtime: AppRuntime, pipeline: ReadyPipeline) -> BatchingQueue:
    assert runtime.rerank_queue is not None  # set before the pipeline
    return runtime.rerank_queue


RerankQueue = Annotated[BatchingQueue, Depends(rerank_queue)]


def error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Documented per route, so clients (and schema-driven tests) know every status a route can answer.
API_ERRORS: dict[int | str, dict[str, Any]] = {
    401: error("No API key, or an unknown one (when keys are configured)."),
    503: error("Not ready yet (models or index loading), or failed to load; see /readyz. Has Retry-After."),
}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: error("Outside a configured limit (GRERANK_MAX_*)."),
    413: error("Body over GRERANK_MAX_REQUEST_BYTES."),
    429: error("Overloaded: GRERANK_MAX_QUEUE requests already admitted. Has Retry-After."),
    504: error("A pipeline stage exceeded its GRERANK_STAGE_TIMEOUTS limit; 'stage' names it."),
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {403: error("A read-only API key (GRERANK_READ_API_KEYS).")}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: error("No document with this id.")}
