"""Turn generated token ids into text pieces as they arrive, for streaming answers."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDecoder:
    """Decodes the whole sequence each time and hands out only what grew.

    Decoding everything again (not token by token) keeps multi-token characters and the tokenizer's
    clean-up of spaces right; a piece is held back while it ends in an incomplete character (U+FFFD) or
    while decoding rewrote text already handed out. ``stop`` ends the answer where it appears.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop and self.stop in text:
            self.stopped = True
            text = text.split(self.stop)[0]
        return text

    def push(self, token: int) -> str:
        """Add one token; returns the new text it completes (often empty)."""
        self.tokens.append(token)
        text = self._text()
        if self.stopped:
            return self.finish()
        if len(text) > len(self.emitted) and text.startswith(self.emitted) and not text.endswith("\ufffd"):
            piece, self.emitted = text[len(self.emitted) :], text
            return piece
        return ""

    def finish(self) -> str:
        """Whatever is still held back once generation ends."""
        text = self._text()
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            piece, self.emitted = text[len(self.emitted) :], text
            return piece
        return ""
