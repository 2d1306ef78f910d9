"""The token-truncation policy: how much of a long text the models read, and which texts a request had cut.

Characters are limited per request (:mod:`service.api.request_limits`); tokens are limited per model input,
and a text over the token limit is cut, never rejected:

* reranker (``max_length``, 256 for the defaults, in the reranker's config): a bi-encoder reads the query
  and each document on their own, each cut to 256 tokens with its special tokens; a cross-encoder reads the
  pair ``[CLS] query [SEP] document [SEP]`` in 256 tokens, the query first cut to half of that (so every
  document keeps room, and a long query cannot make the pair impossible), then the document cut to fit;
* reader: each document (title and text) cut to its first ``max_document_tokens`` (256), the question (in
  its prompt) to its last ``max_question_tokens`` (128).

``/rerank`` reports in ``meta.truncation`` whether the query and which documents were cut; ``/info`` lists
the limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grerank.reranker import BiEncoderReranker, Reranker

_PAIR_SPECIALS = 3  # [CLS] q [SEP] d [SEP]
_SINGLE_SPECIALS = 2  # [CLS] t [SEP]


class TruncationPolicy:
    def __init__(self, reranker: Reranker, reader: Any) -> None:
        self.pair = not isinstance(reranker, BiEncoderReranker)
        self.tokenizer = reranker.tokenizer if self.pair else reranker.encoder.tokenizer
        self.max_tokens = int(reranker.max_length)
        self.max_query_tokens = self.max_tokens // 2 if self.pair else self.max_tokens - _SINGLE_SPECIALS
        self.reader_tokenizer = getattr(reader, "tokenizer", None)
        self.reader_document_tokens = getattr(reader, "max_document_tokens", None)
        self.reader_question_tokens = getattr(reader, "max_question_tokens", None)

    def describe(self) -> dict[str, Any]:
        return {
            "reranker_max_tokens": self.max_tokens,
            "reranker_input": "query-document pair" if self.pair else "query and each document on their own",
            "reranker_max_query_tokens": self.max_query_tokens,
            "reader_max_document_tokens": self.reader_document_tokens,
            "reader_max_question_tokens": self.reader_question_tokens,
        }

    def _token_count(self, text: str, tokenizer: Any = None) -> int:
        return len((tokenizer or self.tokenizer)(text, add_special_tokens=False)["input_ids"])

    def _over(self, texts: Sequence[str], budget: int, tokenizer: Any = None) -> list[int]:
        """Indices of the texts longer than ``budget`` tokens."""
        # A token covers at least one character, so only texts of more than ``budget`` characters can be.
        long = [i for i, t in enumerate(texts) if len(t) > budget]
        if not long:
            return []
        ids = (tokenizer or self.tokenizer)([texts[i] for i in long], add_special_tokens=False)["input_ids"]
        return [i for i, tokens in zip(long, ids, strict=True) if len(tokens) > budget]

    def fit_query(self, query: str) -> str:
        """The query as the reranker reads it: for a cross-encoder, cut to ``max_query_tokens``."""
        if not self.pair or not self._over([query], self.max_query_tokens):
            return query
        if not self.tokenizer.is_fast:  # no character offsets: cut the token list and decode it
            ids = self.tokenizer(query, add_special_tokens=False)["input_ids"][: self.max_query_tokens]
            return self.tokenizer.decode(ids)
        encoded = self.tokenizer(query, add_special_tokens=False, return_offsets_mapping=True)
        return query[: encoded["offset_mapping"][self.max_query_tokens - 1][1]]

    def report(self, query: str, texts: Sequence[str]) -> dict[str, Any]:
        """What the reranker did not read of this request: ``meta.truncation`` of ``/rerank``."""
        query_tokens = self._token_count(query)
        if self.pair:
            budget = self.max_tokens - _PAIR_SPECIALS - min(query_tokens, self.max_query_tokens)
        else:
            budget = self.max_tokens - _SINGLE_SPECIALS
        return {
            "max_tokens": self.max_tokens,
            "query_truncated": query_tokens > self.max_query_tokens,
            "truncated_documents": self._over(texts, budget),
        }

    def reader_report(self, query: str, texts: Sequence[str]) -> dict[str, Any]:
        """``meta.truncation`` when the reader's attention ranks: what the reader did not read."""
        return {
            "max_tokens": self.reader_document_tokens,
            "query_truncated": self._token_count(query, self.reader_tokenizer) > self.reader_question_tokens,
            "truncated_documents": self._over(texts, self.reader_document_tokens, self.reader_tokenizer),
        }
