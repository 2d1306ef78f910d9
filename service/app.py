"""The FastAPI app: routes, dependencies and error mapping. Run with

    uvicorn service.app:create_app --factory

Models load on the model worker when the app starts; until they (and the index) are in memory the model
routes answer 503 with the reason, as does ``/readyz``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.document_store import NewDocument, content_id
from service.http_middleware import BodySizeLimitMiddleware, RequestMetricsMiddleware
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
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankResultDocument,
    RetrievedDocument,
    RetrieveRequest,
    RetrieveResponse,
    UpsertResponse,
)
from service.settings import Settings

try:
    VERSION = metadata.version("grerank-rag")
except metadata.PackageNotFoundError:
    VERSION = "0+unknown"


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def require_api_key(request: Request) -> None:
    keys = _runtime(request).settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = (
        header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    )
    # Compare against every key in constant time so timing reveals nothing about valid keys.
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


def ready_pipeline(request: Request) -> Pipeline:
    runtime = _runtime(request)
    if runtime.pipeline is None:
        raise HTTPException(503, f"not ready ({runtime.not_ready_reason()})", headers={"Retry-After": "5"})
    return runtime.pipeline


ReadyPipeline = Annotated[Pipeline, Depends(ready_pipeline)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for ``settings`` (default: read from the ``GRERANK_*`` environment)."""
    settings = settings or Settings()
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
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    # ---- probes and metrics: open (orchestrators and scrapers carry no API key) ----

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is alive and serving HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> JSONResponse:
        """200 once models and index are loaded; 503 with the reason otherwise."""
        return JSONResponse(runtime.readiness(), status_code=200 if runtime.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(dependencies=[Depends(require_api_key)])

    @api.get("/info", tags=["operations"])
    async def info() -> dict[str, Any]:
        """Served models, the reranker artifact's manifest (or that the reranker is the untrained default)."""
        out: dict[str, Any] = {"service": "grerank", "version": VERSION, **runtime.readiness()}
        pipeline = runtime.pipeline
        if pipeline is not None:
            out["models"] = pipeline.models.describe()
            out["default_top_k"] = pipeline.default_top_k
            out["index"] = {"path": str(pipeline.index.folder), "documents": len(pipeline.index)}
        else:
            out["configured"] = {
                "embedder": settings.embedder,
                "reranker": str(settings.artifact) if settings.artifact else settings.reranker,
                "reader": settings.reader,
            }
        out["limits"] = {
            "max_documents": settings.max_documents,
            "max_document_chars": settings.max_document_chars,
            "max_query_chars": settings.max_query_chars,
            "max_upsert_documents": settings.max_upsert_documents,
            "max_candidates": settings.max_candidates,
            "default_candidates": settings.default_candidates,
        }
        return out

    # ---- rerank: the Cohere / Jina request and response shape ----

    async def rerank(request: RerankRequest, pipeline: ReadyPipeline) -> RerankResponse:
        check_rerank(request, settings)
        texts = request.texts()
        timings: dict[str, float] = {}
        scores = await runtime.worker.run(pipeline.rerank, request.query, texts, timings)
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
        }
        return RerankResponse(id=str(uuid.uuid4()), results=results, meta=meta)

    rerank_doc = (
        "Scores and orders `documents` for `query`, best first (ties by input index). `relevance_score` is "
        "the reranker score squashed into [0, 1] by a sigmoid (order-preserving), or the raw score with "
        "`raw_scores`. Deterministic: the same request always gets the same scores and order."
    )
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        api.add_api_route(
            path,
            rerank,
            methods=["POST"],
            response_model=RerankResponse,
            response_model_exclude_none=True,
            tags=["rerank"],
            summary="Rerank documents" + ("" if path == "/rerank" else f" ({path[1:3]} alias)"),
            description=rerank_doc,
            operation_id=f"rerank_{path.strip('/').replace('/', '_')}",
        )

    # ---- retrieval and answers ----

    @api.post("/retrieve", tags=["answer"])
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
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}
        },
    )
    async def answer(request: AnswerRequest, pipeline: ReadyPipeline) -> Any:
        """Retrieve `candidates`, rerank, keep the deterministic top `top_k`, read, answer with citations.

        With `stream: true` the answer arrives as server-sent events: `token` events (`{"text": ...}`), then
        one `done` event with the full response (answer, citations, timings), or an `error` event."""
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

    @api.post("/documents", tags=["documents"])
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

    @api.get("/documents/{doc_id:path}", tags=["documents"])
    async def get_document(doc_id: str, pipeline: ReadyPipeline) -> DocumentOut:
        document = await asyncio.to_thread(pipeline.index.get, doc_id)
        if document is None:
            raise HTTPException(404, f"no document with id {doc_id!r}")
        return DocumentOut(
            id=document.id, title=document.title, text=document.text, metadata=document.metadata
        )

    @api.delete("/documents/{doc_id:path}", tags=["documents"])
    async def delete_document(doc_id: str, pipeline: ReadyPipeline) -> DeleteResponse:
        if not await runtime.worker.run(pipeline.delete, doc_id):
            raise HTTPException(404, f"no document with id {doc_id!r}")
        return DeleteResponse(deleted=doc_id, documents_indexed=len(pipeline.index))

    app.include_router(api)
    return app


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
    return AnswerResponse(answer=result.answer, citations=citations, timings_ms=result.timings_ms)


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
        except Exception as exc:  # the stream has started with 200: report the failure in-band
            yield _sse("error", {"detail": f"{type(exc).__name__}: {exc}"})
            return
        yield _sse("done", _answer_response(result).model_dump())
    finally:
        stop.set()
