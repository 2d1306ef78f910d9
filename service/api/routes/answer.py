"""``POST /retrieve`` (FAISS retrieval alone) and ``POST /answer`` (retrieve, rerank, read), as JSON or as
server-sent events."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.api.admission import MODEL_DONE
from service.api.dependencies import (
    API_ERRORS,
    MODEL_ERRORS,
    AppRuntime,
    AppSettings,
    ReadyPipeline,
    authenticate,
)
from service.api.request_limits import check_answer, check_retrieve
from service.api.schemas.answer import (
    AnswerRequest,
    AnswerResponse,
    Citation,
    RetrievedDocument,
    RetrieveRequest,
    RetrieveResponse,
    StageError,
)
from service.engine.pipeline import Answer, AnswerCancelled, Pipeline
from service.engine.runtime import Runtime
from service.engine.stage_timeouts import StageTimeout

router = APIRouter(tags=["answer"], dependencies=[Depends(authenticate)], responses=API_ERRORS)


@router.post("/retrieve", responses=MODEL_ERRORS)
async def retrieve(
    request: RetrieveRequest, pipeline: ReadyPipeline, runtime: AppRuntime, settings: AppSettings
) -> RetrieveResponse:
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


@router.post(
    "/answer",
    response_model=AnswerResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"},
        **MODEL_ERRORS,
    },
)
async def answer(
    request: AnswerRequest,
    pipeline: ReadyPipeline,
    runtime: AppRuntime,
    settings: AppSettings,
    http: Request,
) -> Any:
    """Retrieve `candidates`, rerank, keep the deterministic top `top_k`, read, answer with citations.

    With `stream: true` the answer arrives as server-sent events: `token` events (`{"text": ...}`), then
    one `done` event with the full response (answer, citations, timings), or an `error` event.

    If the reader fails or exceeds its time limit, the response is still 200: `answer` is null, `error`
    says why, and `citations` are the reranked documents."""
    top_k, candidates = check_answer(
        request, settings, pipeline.default_top_k, pipeline.models.router is not None
    )
    args = (request.query, top_k, candidates, request.filter)
    if not request.stream:
        return answer_response(await runtime.worker.run(pipeline.answer, *args))
    return StreamingResponse(
        answer_events(runtime, pipeline, args, http.scope.get(MODEL_DONE)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


MODEL_ENDPOINTS = (retrieve, answer)


def answer_response(result: Answer) -> AnswerResponse:
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


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def answer_events(
    runtime: Runtime, pipeline: Pipeline, args: tuple, model_done: Callable[[], None] | None = None
) -> AsyncIterator[str]:
    """Token events as the worker generates them, then the full response; stops the worker on disconnect.
    ``model_done`` is called once the worker has finished with it (admission's count of work ahead)."""
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
            yield sse("token", {"text": piece})
        if model_done is not None:
            model_done()
        try:
            result = future.result()
        except AnswerCancelled:
            return
        except StageTimeout as exc:  # the stream has started with 200: report the failure in-band
            runtime.metrics.stage_timeouts.labels(exc.stage).inc()
            yield sse("error", {"detail": str(exc), "stage": exc.stage})
            return
        except Exception as exc:
            yield sse("error", {"detail": f"{type(exc).__name__}: {exc}"})
            return
        yield sse("done", answer_response(result).model_dump())
    finally:
        stop.set()
        future.cancel()  # not started yet (the client went away while it waited): it never runs
