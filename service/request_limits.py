"""Configured request limits, checked before any model work; a violation is a 400 with the reason."""

from __future__ import annotations

from collections.abc import Sequence

from service.document_store import NewDocument
from service.schemas import AnswerRequest, RerankRequest, RetrieveRequest
from service.settings import Settings


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


def check_filter(request: RetrieveRequest | AnswerRequest) -> None:
    for key in request.filter or {}:
        # SQLite JSON paths can escape neither a double quote nor a NUL inside a quoted key.
        if not key or '"' in key or "\0" in key:
            raise RequestRejected(
                f"metadata filter key {key!r} must be non-empty and contain no double quote or NUL"
            )


def check_rerank(request: RerankRequest, settings: Settings) -> None:
    check_query(request.query, settings)
    check_texts(request.texts(), settings, settings.max_documents, "GRERANK_MAX_DOCUMENTS")


def check_retrieve(request: RetrieveRequest, settings: Settings) -> int:
    """Validates and returns how many documents to retrieve."""
    check_query(request.query, settings)
    check_filter(request)
    k = request.top_k or settings.default_candidates
    if k > settings.max_candidates:
        raise RequestRejected(
            f"top_k is {k}; the limit is {settings.max_candidates} (GRERANK_MAX_CANDIDATES)"
        )
    return k


def check_answer(request: AnswerRequest, settings: Settings, default_top_k: int) -> tuple[int, int]:
    """Validates and returns (top_k, candidates)."""
    check_query(request.query, settings)
    check_filter(request)
    candidates = request.candidates or settings.default_candidates
    if candidates > min(settings.max_candidates, settings.max_documents):
        limit = min(settings.max_candidates, settings.max_documents)
        raise RequestRejected(f"candidates is {candidates}; the limit is {limit} (GRERANK_MAX_CANDIDATES)")
    top_k = request.top_k or default_top_k
    if top_k > candidates:
        raise RequestRejected(f"top_k ({top_k}) must not exceed candidates ({candidates})")
    return top_k, candidates


def check_upsert(documents: Sequence[NewDocument], settings: Settings) -> None:
    if not documents:
        raise RequestRejected("documents must not be empty")
    check_texts(
        [d.text for d in documents], settings, settings.max_upsert_documents, "GRERANK_MAX_UPSERT_DOCUMENTS"
    )
    seen: set[str] = set()
    for d in documents:
        if d.id in seen:
            raise RequestRejected(f"document id {d.id!r} appears more than once in the request")
        seen.add(d.id)
