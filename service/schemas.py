"""Request and response bodies of the HTTP API (pydantic v2).

``/rerank`` follows the shape Cohere and Jina clients speak; unknown request fields those clients send
(``max_tokens_per_doc``, ``rank_fields``, ``priority``...) are accepted and ignored. Limits that depend on the
configuration (sizes, counts) are checked in :mod:`service.request_limits`, not here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

# Metadata filters compare a top-level metadata key for equality.
FilterValue = StrictStr | bool | int | float


def _not_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: StrictStr
    id: StrictStr | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: StrictStr = Field(description="The search query.")
    documents: list[StrictStr | RerankDocument] = Field(
        description="Texts to score, as strings or objects with 'text' and an optional 'id'."
    )
    top_n: int | None = Field(None, ge=1, description="Return only the best top_n results (default: all).")
    return_documents: bool = Field(False, description="Include each document's text in the results.")
    model: str | None = Field(None, description="Accepted for client compatibility; one model is served.")
    raw_scores: bool = Field(
        False, description="Return the reranker's raw scores instead of scores squashed into [0, 1]."
    )

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return _not_blank(value, "query")

    @field_validator("documents")
    @classmethod
    def _documents(cls, value: list[str | RerankDocument]) -> list[str | RerankDocument]:
        if not value:
            raise ValueError("documents must not be empty")
        return value

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResultDocument(BaseModel):
    text: str
    id: str | None = None


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankResultDocument | None = None


class RerankResponse(BaseModel):
    id: str
    results: list[RerankResult]
    meta: dict[str, Any]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    filter: dict[str, FilterValue] | None = Field(
        None, description="Only documents whose metadata has these key/value pairs."
    )

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return _not_blank(value, "query")


class RetrieveRequest(SearchRequest):
    top_k: int | None = Field(
        None, ge=1, description="Documents to return (default: GRERANK_DEFAULT_CANDIDATES)."
    )


class RetrievedDocument(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict[str, Any]
    retrieval_score: float


class RetrieveResponse(BaseModel):
    results: list[RetrievedDocument]
    timings_ms: dict[str, float]


class AnswerRequest(SearchRequest):
    top_k: int | None = Field(
        None, ge=1, description="Documents the reader sees (default: the artifact's k)."
    )
    candidates: int | None = Field(
        None, ge=1, description="Documents retrieved before reranking (default 20)."
    )
    stream: bool = Field(False, description="Stream answer tokens as server-sent events.")


class Citation(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    retrieval_score: float
    rerank_score: float


class AnswerResponse(BaseModel):
    answer: str
    citations: list[Citation]
    timings_ms: dict[str, float]


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = Field(
        None, min_length=1, max_length=512, description="Stable id; default: a hash of title and text."
    )
    title: StrictStr = ""
    text: StrictStr
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _not_blank(value, "text")


class DocumentsUpsert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn]


class UpsertResponse(BaseModel):
    upserted: int
    ids: list[str]
    documents_indexed: int


class DocumentOut(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict[str, Any]


class DeleteResponse(BaseModel):
    deleted: str
    documents_indexed: int
