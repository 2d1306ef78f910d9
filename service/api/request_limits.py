"""Configured request limits, checked before any model work; a violation is a 400 with the reason."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.api.schemas.answer import AnswerRequest, RetrieveRequest
from service.api.schemas.rerank import RerankRequest
from service.settings import Settings
from service.storage.document_store import NewDocument


class RequestRejected(ValueError):
    """The request is well-formed but outside the service's limits."""


def check_query(query: str, settings: Settings) -> None:
    if len(query) > settings.max_query_chars:
        raise RequestRejected(
            f"query has {len(query)} characters; "
            f"the limit is {settings.max_query_chars} (GRERANK_MAX_QUERY_CHARS)"
        )


def check_texts(texts: Sequence[str], settings: Settings, limit: int, limit_name: str) -> None:
    if len(texts) > limit:
        raise RequestRejected(f"{len(texts)} documents; the limit is {limit} per request ({limit_name})")
    for i, text in enumerate(texts):
        if len(text) > settings.max_document_chars:
            raise RequestRejected(
                f"document {i} has {len(text)} characters; the limit is {settings.max_document_chars} "
                "(GRERANK_MAX_DOCUMENT_CHARS)"
            )


def document_limit(settings: Settings, by_attention: bool) -> tuple[int, str]:
    """Documents one ranking may read, and the setting that says so: ranking by the reader's attention
    reads every document in one reader pass, so it has a limit of its own."""
    if by_attention and settings.max_attention_documents < settings.max_documents:
        return settings.max_attention_documents, "GRERANK_MAX_ATTENTION_DOCUMENTS"
    return settings.max_documents, "GRERANK_MAX_DOCUMENTS"


def check_rerank(request: RerankRequest, settings: Settings, by_attention: bool = False) -> None:
    check_query(request.query, settings)
    check_texts(request.texts(), settings, *document_limit(settings, by_attention))


def check_retrieve(request: RetrieveRequest, settings: Settings) -> int:
    """Validates and returns how many documents to retrieve."""
    check_query(request.query, settings)
    k = request.top_k or settings.default_candidates
    if k > settings.max_candidates:
        raise RequestRejected(
            f"top_k is {k}; the limit is {settings.max_candidates} (GRERANK_MAX_CANDIDATES)"
        )
    return k


def check_answer(
    request: AnswerRequest, settings: Settings, default_top_k: int, by_attention: bool = False
) -> tuple[int, int]:
    """Validates and returns (top_k, candidates)."""
    check_query(request.query, settings)
    documents, name_of_limit = document_limit(settings, by_attention)
    limit = min(settings.max_candidates, documents)
    if limit == settings.max_candidates:
        name_of_limit = "GRERANK_MAX_CANDIDATES"
    for name in ("candidates", "top_k"):
        if (value := getattr(request, name)) is not None and value > limit:
            raise RequestRejected(f"{name} is {value}; the limit is {limit} ({name_of_limit})")
    # Without an explicit candidates, a top_k above the default retrieves top_k candidates.
    candidates = request.candidates or min(max(settings.default_candidates, request.top_k or 0), limit)
    # The reader cannot see more documents than were retrieved; it sees them all.
    return min(request.top_k or default_top_k, candidates), candidates


def check_upsert(documents: Sequence[NewDocument], settings: Settings) -> list[NewDocument]:
    """Validates and returns the documents to write: an id given more than once is written once, as its
    last occurrence, as if the upserts were applied in order."""
    if not documents:
        raise RequestRejected("documents must not be empty")
    check_texts(
        [d.text for d in documents], settings, settings.max_upsert_documents, "GRERANK_MAX_UPSERT_DOCUMENTS"
    )
    return list({d.id: d for d in documents}.values())


def state_in_schema(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write the configured limits into the OpenAPI ``schema`` (in place, and returned), so that what the
    running service publishes says what it accepts: string lengths, list sizes, numeric bounds."""
    components = schema["components"]["schemas"]

    def bound(model: str, field: str, **limits: int) -> None:
        prop = components[model]["properties"][field]
        for variant in prop.get("anyOf", [prop]):  # an optional field: bound its non-null variant
            if variant.get("type") not in (None, "null"):
                variant.update(limits)

    query = {"maxLength": settings.max_query_chars}
    for model in ("RerankRequest", "RetrieveRequest", "AnswerRequest"):
        bound(model, "query", **query)
    text = {"maxLength": settings.max_document_chars}
    bound("RerankRequest", "documents", maxItems=settings.max_documents)
    components["RerankRequest"]["properties"]["documents"]["items"]["anyOf"][0].update(text)
    bound("RerankDocument", "text", **text)
    bound("DocumentIn", "text", **text)
    bound("RetrieveRequest", "top_k", maximum=settings.max_candidates)
    candidates = min(settings.max_candidates, settings.max_documents)
    bound("AnswerRequest", "candidates", maximum=candidates)
    bound("AnswerRequest", "top_k", maximum=candidates)
    upsert = {"minItems": 1, "maxItems": settings.max_upsert_documents}
    bound("DocumentsUpsert", "documents", **upsert)
    body = schema["paths"]["/documents"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    next(v for v in body["anyOf"] if v.get("type") == "array").update(upsert)
    return schema
