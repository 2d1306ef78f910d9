"""``/retrieve`` and ``/answer`` bodies: a query, a metadata filter, how many documents."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
)

from service.api.schemas.common import NON_EMPTY_TEXT, Count, Text, encodable, not_blank

# Metadata filters compare a top-level metadata key for equality; SQLite integers are 64-bit, and SQLite
# JSON paths can escape neither a double quote nor a NUL inside a quoted key.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
FilterKey = Annotated[StrictStr, Field(min_length=1, pattern=r'^[^"\u0000]+$'), AfterValidator(encodable)]
FilterValue = Text | bool | Int64 | Annotated[float, Field(allow_inf_nan=False)]


def _only_matching_keys(schema: dict[str, Any]) -> None:
    """Pydantic states a key pattern as ``patternProperties`` alone, which leaves other keys allowed; say
    that no other key is (``additionalProperties: false``), as validation does."""
    for variant in schema.get("anyOf", [schema]):
        if "patternProperties" in variant:
            variant["additionalProperties"] = False


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
        return not_blank(value, "query")


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
