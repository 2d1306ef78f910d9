"""``POST /rerank`` (and its ``/v1``, ``/v2`` aliases): the Cohere / Jina request and response shape."""

from __future__ import annotations

import math
import uuid

from fastapi import APIRouter, Depends

from grerank.passage import Passage
from service.api.dependencies import (
    API_ERRORS,
    MODEL_ERRORS,
    AppRuntime,
    AppSettings,
    ReadyPipeline,
    RerankQueue,
    authenticate,
)
from service.api.request_limits import check_rerank
from service.api.schemas.rerank import RerankRequest, RerankResponse, RerankResult, RerankResultDocument

router = APIRouter(tags=["rerank"], dependencies=[Depends(authenticate)], responses=API_ERRORS)


def sigmoid(x: float) -> float:
    # float64, so distinct large raw scores stay distinct much longer than in float32.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


async def rerank(
    request: RerankRequest,
    pipeline: ReadyPipeline,
    queue: RerankQueue,
    runtime: AppRuntime,
    settings: AppSettings,
) -> RerankResponse:
    by_attention = pipeline.models.router is not None
    check_rerank(request, settings, by_attention)
    texts = request.texts()
    timings: dict[str, float] = {}
    if by_attention:  # one reader pass over every document: a worker job of its own, not a batched one
        passages = [Passage("", text) for text in texts]
        scores = await runtime.worker.run(pipeline.rank, request.query, passages, timings)
        truncation = pipeline.truncation.reader_report(request.query, texts)
    else:
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
                index=i, relevance_score=raw if request.raw_scores else sigmoid(raw), document=document
            )
        )
    meta = {
        "api_version": {"version": "2"},
        "billed_units": {"search_units": 1},
        "model": settings.model_name,
        "reranker": pipeline.models.ranking_info.status,
        "timings_ms": timings,
        "truncation": truncation,
    }
    return RerankResponse(id=str(uuid.uuid4()), results=results, meta=meta)


DESCRIPTION = (
    "Scores and orders `documents` for `query`, best first (ties by input index). `relevance_score` is "
    "the reranker score squashed into [0, 1] by a sigmoid (order-preserving), or the raw score with "
    "`raw_scores`. Deterministic: the same request always gets the same scores and order. Texts longer "
    "than the reranker's token limit are cut, not rejected: `meta.truncation` lists the cut documents."
)
for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
    router.add_api_route(
        path,
        rerank,
        methods=["POST"],
        response_model=RerankResponse,
        response_model_exclude_none=True,
        responses=MODEL_ERRORS,
        summary="Rerank documents" + ("" if path == "/rerank" else f" ({path[1:3]} alias)"),
        description=DESCRIPTION,
        operation_id=f"rerank_{path.strip('/').replace('/', '_')}",
    )

MODEL_ENDPOINTS = (rerank,)
