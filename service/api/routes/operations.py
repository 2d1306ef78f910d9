"""Probes and metrics (open by default: orchestrators and scrapers carry no API key), and ``/info``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.dependencies import API_ERRORS, AppRuntime, authenticate, error, open_or_authenticated
from service.version import VERSION

probes = APIRouter(tags=["operations"], dependencies=[Depends(open_or_authenticated)], responses=API_ERRORS)
router = APIRouter(tags=["operations"], dependencies=[Depends(authenticate)], responses=API_ERRORS)


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


@probes.get("/readyz", responses={503: error("Not ready; 'reason' says why.")})
async def readyz(runtime: AppRuntime) -> JSONResponse:
    """200 once models and index are loaded (naming the served reranker and reader); 503 with the reason
    otherwise."""
    return JSONResponse(runtime.readiness(), status_code=200 if runtime.ready else 503)


@probes.get("/metrics", response_class=Response)
async def metrics(runtime: AppRuntime) -> Response:
    """Prometheus text format."""
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/info")
async def info(runtime: AppRuntime) -> dict[str, Any]:
    """Served models (each trained artifact's manifest, or that a model is untrained), index, limits."""
    settings = runtime.settings
    out: dict[str, Any] = {"service": "grerank", "version": VERSION, **runtime.readiness()}
    pipeline = runtime.pipeline
    if pipeline is not None:
        out["models"] = pipeline.models.describe()
        out["default_top_k"] = pipeline.default_top_k
        store = "postgresql" if pipeline.index.follows_log else "sqlite"  # not the URL: it may hold secrets
        out["index"] = {"path": str(pipeline.index.folder), "documents": len(pipeline.index), "store": store}
        out["truncation"] = pipeline.truncation.describe()
        out["rerank_batching"] = pipeline.rerank_backend.describe()
    else:
        out["configured"] = {
            "embedder": settings.embedder,
            "reranker": settings.reranker,
            "artifact": settings.artifact,
            "reader": settings.reader,
            "reader_artifact": settings.reader_artifact,
        }
    out["limits"] = {
        name: getattr(settings, name)
        for name in (
            "max_documents", "max_document_chars", "max_query_chars", "max_upsert_documents",
            "max_candidates", "default_candidates", "max_request_bytes", "max_queue", "max_wait_ms",
            "shed_delay_ms", "max_batch_tokens", "rerank_batch_size", "stage_timeouts",
        )
    }  # fmt: skip
    return out
