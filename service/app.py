"""The FastAPI app: routes, dependencies and error mapping. Run with

    uvicorn service.app:create_app --factory

Models load on the model worker when the app starts; until they (and the index) are in memory the model
routes answer 503 with the reason, as does ``/readyz``.

Status codes besides 200: 400 a configured limit, 401 no or an unknown API key, 403 a read-only key on a
write, 404, 405, 413 a body over GRERANK_MAX_REQUEST_BYTES, 422 a malformed request, 429 GRERANK_MAX_QUEUE
requests already admitted (with Retry-After), 503 not ready (with Retry-After), 504 a stage over its
GRERANK_STAGE_TIMEOUTS limit (naming the stage).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST

from service import logs
from service.admission import AdmissionMiddleware
from service.api_keys import Access, KeyRing, without_plain_keys
from service.batching_queue import BatchingQueue, QueueClosed, QueueFull
from service.document_store import NewDocument, content_id
from service.http_middleware import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
    RequestMetricsMiddleware,
)
from service.pipeline import Answer, AnswerCancelled, Pipeline
from service.request_limits import (
    RequestRejected,
    check_answer,
    check_rerank,
    check_retrieve,
    check_upsert,
)
from service.runtime import Runtime
from service.schemas import (
    AnswerRequest,
    AnswerResponse,
    Citation,
    DeleteResponse,
    DocumentIn,
    DocumentOut,
    DocumentsUpsert,
    ErrorResponse,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankResultDocument,
    RetrievedDocument,
    RetrieveRequest,
    RetrieveResponse,
    StageError,
    UpsertResponse,
)
from service.settings import Settings
from service.stage_timeouts import StageTimeout

try:
    VERSION = metadata.version("grerank-rag")
except metadata.PackageNotFoundError:
    VERSION = "0+unknown"


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


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
    if request.url.path not in _runtime(request).settings.open_paths:
        authenticate(request)


def ready_pipeline(request: Request) -> Pipeline:
    runtime = _runtime(request)
    if runtime.pipeline is None:
        raise HTTPException(503, f"not ready ({runtime.not_ready_reason()})", headers={"Retry-After": "5"})
    return runtime.pipeline


ReadyPipeline = Annotated[Pipeline, Depends(ready_pipeline)]


def rerank_queue(request: Request, pipeline: ReadyPipeline) -> BatchingQueue:
    queue = _runtime(request).rerank_queue
    assert queue is not None  # set before the pipeline
    return queue


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Documented per route, so clients (and schema-driven tests) know every status a route can answer.
API_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("No API key, or an unknown one (when keys are configured)."),
    503: _error("Not ready yet (models or index loading), or failed to load; see /readyz. Has Retry-After."),
}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Outside a configured limit (GRERANK_MAX_*)."),
    413: _error("Body over GRERANK_MAX_REQUEST_BYTES."),
    429: _error("Overloaded: GRERANK_MAX_QUEUE requests already admitted. Has Retry-After."),
    504: _error("A pipeline stage exceeded its GRERANK_STAGE_TIMEOUTS limit; 'stage' names it."),
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {403: _error("A read-only API key (GRERANK_READ_API_KEYS).")}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _error("No document with this id.")}


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

    @app.exception_handler(StageTimeout)
    async def timed_out(request: Request, exc: StageTimeout) -> JSONResponse:
        runtime.metrics.stage_timeouts.labels(exc.stage).inc()
        return JSONResponse({"detail": str(exc), "stage": exc.stage}, status_code=504)

    # ---- probes and metrics: open by default (orchestrators and scrapers carry no API key) ----

    operations = APIRouter(
        tags=["operations"], dependencies=[Depends(open_or_authenticated)], responses=API_ERRORS
    )

    @operations.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive and serving HTTP."""
        return {"status": "ok"}

    @operations.get("/readyz", responses={503: _error("Not ready; 'reason' says why.")})
    async def readyz() -> JSONResponse:
        """200 once models and index are loaded; 503 with the reason otherwise."""
        return JSONResponse(runtime.readiness(), status_code=200 if runtime.ready else 503)

    @operations.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(dependencies=[Depends(authenticate)], responses=API_ERRORS)

    @api.get("/info", tags=["operations"])
    async def info() -> dict[str, Any]:
        """Served models, the reranker artifact's manifest (or that the reranker is the untrained default)."""
        out: dict[str, Any] = {"service": "grerank", "version": VERSION, **runtime.readiness()}
        pipeline = runtime.pipeline
        if pipeline is not None:
            out["models"] = pipeline.models.describe()
            out["default_top_k"] = pipeline.default_top_k
            out["index"] = {"path": str(pipeline.index.folder), "documents": len(pipeline.index)}
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
            "max_documents": settings.max_documents,
            "max_document_chars": settings.max_document_chars,
            "max_query_chars": settings.max_query_chars,
            "max_upsert_documents": settings.max_upsert_documents,
            "max_candidates": settings.max_candidates,
            "default_candidates": settings.default_candidates,
            "max_request_bytes": settings.max_request_bytes,
            "max_queue": settings.max_queue,
            "max_batch_tokens": settings.max_batch_tokens,
            "rerank_batch_size": settings.rerank_batch_size,
            "stage_timeouts": settings.stage_timeouts,
        }
        return out

    # ---- rerank: the Cohere / Jina request and response shape ----

    async def rerank(
        request: RerankRequest,
        pipeline: ReadyPipeline,
        queue: Annotated[BatchingQueue, Depends(rerank_queue)],
    ) -> RerankResponse:
        check_rerank(request, settings)
        texts = request.texts()
        timings: dict[str, float] = {}
        scores, truncation = await queue.rerank(request.query, texts, timings)
        results = []
        for i in pipeline.order(scores, request.top_n):
            raw = float(scores[i])
            document = None
            if request.return_documents:
                item = request.documents[i]
                document = RerankResultDocument(text=texts[i], id=None if isinstance(item, str) else item.id)
            results.append(
                RerankResult(
                    index=i, relevance_score=raw if request.raw_scores else _sigmoid(raw), document=document
                )
            )
        meta = {
            "api_version": {"version": "2"},
            "billed_units": {"search_units": 1},
            "model": settings.model_name,
            "reranker": pipeline.models.reranker_info.status,
            "timings_ms": timings,
            "truncation": truncation,
        }
        return RerankResponse(id=str(uuid.uuid4()), results=results, meta=meta)

    rerank_doc = (
        "Scores and orders `documents` for `query`, best first (ties by input index). `relevance_score` is "
        "the reranker score squashed into [0, 1] by a sigmoid (order-preserving), or the raw score with "
        "`raw_scores`. Deterministic: the same request always gets the same scores and order. Texts longer "
        "than the reranker's token limit are cut, not rejected: `meta.truncation` lists the cut documents."
    )
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        api.add_api_route(
            path,
            rerank,
            methods=["POST"],
            response_model=RerankResponse,
            response_model_exclude_none=True,
            responses=MODEL_ERRORS,
            tags=["rerank"],
            summary="Rerank documents" + ("" if path == "/rerank" else f" ({path[1:3]} alias)"),
            description=rerank_doc,
            operation_id=f"rerank_{path.strip('/').replace('/', '_')}",
        )

    # ---- retrieval and answers ----

    @api.post("/retrieve", tags=["answer"], responses=MODEL_ERRORS)
    async def retrieve(request: RetrieveRequest, pipeline: ReadyPipeline) -> RetrieveResponse:
        """FAISS retrieval only (cosine similarity of the embedder), best first."""
        k = check_retrieve(request, settings)
        timings: dict[str, float] = {}
        hits = await runtime.worker.run(pipeline.retrieve, request.query, k, request.filter, timings)
        results = [
            RetrievedDocument(
                id=h.document.id,
                title=h.document.title,
                text=h.document.text,
                metadata=h.document.metadata,
                retrieval_score=h.score,
            )
            for h in hits
        ]
        return RetrieveResponse(results=results, timings_ms=timings)

    @api.post(
        "/answer",
        tags=["answer"],
        response_model=AnswerResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"},
            **MODEL_ERRORS,
        },
    )
    async def answer(request: AnswerRequest, pipeline: ReadyPipeline) -> Any:
        """Retrieve `candidates`, rerank, keep the deterministic top `top_k`, read, answer with citations.

        With `stream: true` the answer arrives as server-sent events: `token` events (`{"text": ...}`), then
        one `done` event with the full response (answer, citations, timings), or an `error` event.

        If the reader fails or exceeds its time limit, the response is still 200: `answer` is null, `error`
        says why, and `citations` are the reranked documents."""
        top_k, candidates = check_answer(request, settings, pipeline.default_top_k)
        args = (request.query, top_k, candidates, request.filter)
        if not request.stream:
            return _answer_response(await runtime.worker.run(pipeline.answer, *args))
        return StreamingResponse(
            _answer_events(runtime, pipeline, args),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---- documents ----

    @api.post(
        "/documents",
        tags=["documents"],
        dependencies=[Depends(require_write)],
        responses={**MODEL_ERRORS, **WRITE_ERRORS},
    )
    async def upsert_documents(
        body: Annotated[
            list[DocumentIn] | DocumentsUpsert,
            Body(description='A list of documents, or {"documents": [...]}; an existing id is replaced.'),
        ],
        pipeline: ReadyPipeline,
    ) -> UpsertResponse:
        """Add or replace documents. Acknowledged only after the SQLite commit and the index file replace."""
        items = body.documents if isinstance(body, DocumentsUpsert) else body
        documents = [
            NewDocument(d.id or content_id(d.title, d.text), d.title, d.text, d.metadata) for d in items
        ]
        check_upsert(documents, settings)
        await runtime.worker.run(pipeline.upsert, documents)
        return UpsertResponse(
            upserted=len(documents), ids=[d.id for d in documents], documents_indexed=len(pipeline.index)
        )

    @api.get("/documents/{doc_id:path}", tags=["documents"], responses=NOT_FOUND)
    async def get_document(doc_id: str, pipeline: ReadyPipeline) -> DocumentOut:
        document = await asyncio.to_thread(pipeline.index.get, doc_id)
        if document is None:
            raise HTTPException(404, f"no document with id {doc_id!r}")
        return DocumentOut(
            id=document.id, title=document.title, text=document.text, metadata=document.metadata
        )

    @api.delete(
        "/documents/{doc_id:path}",
        tags=["documents"],
        dependencies=[Depends(require_write)],
        responses={**NOT_FOUND, **WRITE_ERRORS, 429: MODEL_ERRORS[429], 504: MODEL_ERRORS[504]},
    )
    async def delete_document(doc_id: str, pipeline: ReadyPipeline) -> DeleteResponse:
        if not await runtime.worker.run(pipeline.delete, doc_id):
            raise HTTPException(404, f"no document with id {doc_id!r}")
        return DeleteResponse(deleted=doc_id, documents_indexed=len(pipeline.index))

    app.include_router(operations)
    app.include_router(api)

    # Middleware, innermost first: the body limit; admission control over the routes that need the model
    # worker; request metrics; request ids and the access log (outermost, so every response is logged).
    model_endpoints = {rerank, retrieve, answer, upsert_documents, delete_document}
    # From the router itself: the app's route list may hold the included router rather than its routes.
    model_routes = [r for r in api.routes if isinstance(r, APIRoute) and r.endpoint in model_endpoints]
    assert len(model_routes) == len(model_endpoints) + 2  # /rerank has two aliases
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        AdmissionMiddleware, routes=model_routes, limit=settings.max_queue, metrics=runtime.metrics
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


def _sigmoid(x: float) -> float:
    # float64, so distinct large raw scores stay distinct much longer than in float32.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _answer_response(result: Answer) -> AnswerResponse:
    citations = [
        Citation(
            id=s.document.id,
            title=s.document.title,
            text=s.document.text,
            metadata=s.document.metadata,
            retrieval_score=s.retrieval_score,
            rerank_score=s.rerank_score,
        )
        for s in result.citations
    ]
    error = StageError(**result.error) if result.error else None
    return AnswerResponse(
        answer=result.answer, citations=citations, timings_ms=result.timings_ms, error=error
    )


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _answer_events(runtime: Runtime, pipeline: Pipeline, args: tuple) -> AsyncIterator[str]:
    """Token events as the worker generates them, then the full response; stops the worker on disconnect."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    stop = threading.Event()

    def put(item: str | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            stop.set()

    future = runtime.worker.submit(pipeline.answer, *args, put, stop.is_set)
    future.add_done_callback(lambda _: put(None))
    try:
        while (piece := await queue.get()) is not None:
            yield _sse("token", {"text": piece})
        try:
            result = future.result()
        except AnswerCancelled:
            return
        except StageTimeout as exc:  # the stream has started with 200: report the failure in-band
            runtime.metrics.stage_timeouts.labels(exc.stage).inc()
            yield _sse("error", {"detail": str(exc), "stage": exc.stage})
            return
        except Exception as exc:
            yield _sse("error", {"detail": f"{type(exc).__name__}: {exc}"})
            return
        yield _sse("done", _answer_response(result).model_dump())
    finally:
        stop.set()
