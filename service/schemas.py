"""Request and response bodies of the HTTP API (pydantic v2).

``/rerank`` follows the shape Cohere and Jina clients speak; unknown request fields those clients send
(``max_tokens_per_doc``, ``rank_fields``, ``priority``...) are accepted and ignored. Limits that depend on the
configuration (sizes, counts) are checked in :mod:`service.request_limits`, not here, and stated in the
schema the running service publishes (:func:`configured_limits`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
)


def _encodable(value: str) -> str:
    # JSON can carry lone UTF-16 surrogates ("\ud800"), which no tokenizer, hash or database takes.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    return value


# Every text field of a request: a string (no coercion from numbers) that encodes as UTF-8.
Text = Annotated[StrictStr, AfterValidator(_encodable)]


def _json_integer(value: Any) -> Any:
    # JSON Schema's integer: 3 and 3.0, not true or "3" (which pydantic's int would take).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value


# Every count in a request: a JSON integer of at least 1.
Count = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]

# Metadata filters compare a top-level metadata key for equality; SQLite integers are 64-bit, and SQLite
# JSON paths can escape neither a double quote nor a NUL inside a quoted key.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
FilterKey = Annotated[StrictStr, Field(min_length=1, pattern=r'^[^"\u0000]+$'), AfterValidator(_encodable)]
FilterValue = Text | bool | Int64 | Annotated[float, Field(allow_inf_nan=False)]


def _only_matching_keys(schema: dict[str, Any]) -> None:
    """Pydantic states a key pattern as ``patternProperties`` alone, which leaves other keys allowed; say
    that no other key is (``additionalProperties: false``), as validation does."""
    for variant in schema.get("anyOf", [schema]):
        if "patternProperties" in variant:
            variant["additionalProperties"] = False


# What the validators below enforce, stated in the schema too (clients and schema-driven tests read it),
# while the validators keep their plainer error messages.
NON_EMPTY_TEXT = {"minLength": 1}
NON_EMPTY_LIST = {"minItems": 1}


def _not_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


MAX_METADATA_DEPTH = 32


def _check_metadata(metadata: dict[str, Any]) -> None:
    """Metadata must survive storage and a JSON round trip: finite numbers, encodable strings (keys too),
    and a bounded nesting depth (walked without recursion, so no depth can exhaust the stack here)."""
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("metadata numbers must be finite")
        if isinstance(value, str):
            _encodable(value)
        elif isinstance(value, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    _encodable(key)
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: Text
    id: Text | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: Text = Field(description="The search query.", json_schema_extra=NON_EMPTY_TEXT)
    documents: list[Text | RerankDocument] = Field(
        description="Texts to score, as strings or objects with 'text' and an optional 'id'.",
        json_schema_extra=NON_EMPTY_LIST,
    )
    top_n: Count | None = Field(None, description="Return only the best top_n results (default: all).")
    return_documents: StrictBool = Field(False, description="Include each document's text in the results.")
    model: Text | None = Field(None, description="Accepted for client compatibility; one model is served.")
    raw_scores: StrictBool = Field(
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

    query: Text = Field(json_schema_extra=NON_EMPTY_TEXT)
    filter: dict[FilterKey, FilterValue] | None = Field(
        None,
        description="Only documents whose metadata has these key/value pairs.",
        json_schema_extra=_only_matching_keys,
    )

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return _not_blank(value, "query")


class RetrieveRequest(SearchRequest):
    top_k: Count | None = Field(
        None, description="Documents to return (default: GRERANK_DEFAULT_CANDIDATES)."
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
    top_k: Count | None = Field(
        None, description="Documents the reader sees (default: the artifact's k), at most candidates."
    )
    candidates: Count | None = Field(None, description="Documents retrieved before reranking (default 20).")
    stream: StrictBool = Field(False, description="Stream answer tokens as server-sent events.")


class Citation(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    retrieval_score: float
    rerank_score: float


class StageError(BaseModel):
    stage: str = Field(description="The pipeline stage that failed or timed out.")
    detail: str


class AnswerResponse(BaseModel):
    answer: str | None = Field(description="None when the reader failed; see 'error'.")
    citations: list[Citation]
    timings_ms: dict[str, float]
    error: StageError | None = Field(
        None,
        description="Set when the reader failed or ran out of time: the citations are the reranked "
        "documents, the answer is None.",
    )


class ErrorResponse(BaseModel):
    detail: str
    stage: str | None = Field(None, description="For 504: the pipeline stage that ran out of time.")


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Text | None = Field(
        None, min_length=1, max_length=512, description="Stable id; default: a hash of title and text."
    )
    title: Text = ""
    text: Text = Field(json_schema_extra=NON_EMPTY_TEXT)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _not_blank(value, "text")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_metadata(value)
        return value


class DocumentsUpsert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(json_schema_extra=NON_EMPTY_LIST)


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
