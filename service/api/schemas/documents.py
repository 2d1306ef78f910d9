"""``/documents`` bodies: documents in, stored documents out."""

from __future__ import annotations

import math
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

from service.api.schemas.common import NON_EMPTY_LIST, NON_EMPTY_TEXT, Text, encodable, not_blank

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
            encodable(value)
        elif isinstance(value, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    encodable(key)
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


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
        return not_blank(value, "text")

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
