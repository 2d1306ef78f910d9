"""What every request and response body shares: strict text and count types, and the error body.

Bodies are pydantic v2 models, one module per resource beside its routes (:mod:`service.api.routes`).
Limits that depend on the configuration (sizes, counts) are checked in :mod:`service.api.request_limits`,
not here, and stated in the schema the running service publishes (:func:`state_in_schema`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    StrictStr,
)


def encodable(value: str) -> str:
    # JSON can carry lone UTF-16 surrogates ("\ud800"), which no tokenizer, hash or database takes.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    return value


# Every text field of a request: a string (no coercion from numbers) that encodes as UTF-8.
Text = Annotated[StrictStr, AfterValidator(encodable)]


def _json_integer(value: Any) -> Any:
    # JSON Schema's integer: 3 and 3.0, not true or "3" (which pydantic's int would take).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value


# Every count in a request: a JSON integer of at least 1.
Count = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]

# What the validators below enforce, stated in the schema too (clients and schema-driven tests read it),
# while the validators keep their plainer error messages.
NON_EMPTY_TEXT = {"minLength": 1}
NON_EMPTY_LIST = {"minItems": 1}


def not_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


class ErrorResponse(BaseModel):
    detail: str
    stage: str | None = Field(None, description="For 504: the pipeline stage that ran out of time.")
