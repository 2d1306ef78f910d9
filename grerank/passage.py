"""The unit every model in the project reads: a titled passage of text."""

from __future__ import annotations

from typing import NamedTuple


class Passage(NamedTuple):
    title: str
    text: str

    def as_text(self) -> str:
        """Title and text as one string, the form the rerankers and the embedder score."""
        return f"{self.title}: {self.text}" if self.title else self.text
