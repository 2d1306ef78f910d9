"""``/rerank`` bodies, in the shape Cohere and Jina clients speak; unknown request fields those clients send
(``max_tokens_per_doc``, ``rank_fields``, ``priority``...) are accepted and ignored."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
)

from service.api.schemas.common import NON_EMPTY_LIST, NON_EMPTY_TEXT, Count, Text, not_blank


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
        return not_blank(value, "query")

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
