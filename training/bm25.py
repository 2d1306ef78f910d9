"""BM25 (Robertson & Zaragoza 2009), the lexical baseline: scores a question's candidates by term overlap.

Term statistics (document frequencies, average length) come from a whole corpus, not from one question's
ten candidates, so a rare title word weighs as it should. ``k1 = 0.9, b = 0.4`` are Anserini's defaults.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


class BM25:
    def __init__(self, corpus: Iterable[str], k1: float = 0.9, b: float = 0.4) -> None:
        self.k1, self.b = k1, b
        self.df: Counter[str] = Counter()
        total = count = 0
        for text in corpus:
            tokens = tokenize(text)
            self.df.update(set(tokens))
            total += len(tokens)
            count += 1
        self.documents = max(count, 1)
        self.average_length = total / self.documents if count else 1.0

    def idf(self, term: str) -> float:
        df = self.df.get(term, 0)
        return math.log(1 + (self.documents - df + 0.5) / (df + 0.5))  # Lucene's non-negative IDF

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        terms = tokenize(query)
        out = []
        for text in documents:
            tokens = tokenize(text)
            tf = Counter(tokens)
            norm = self.k1 * (1 - self.b + self.b * len(tokens) / self.average_length)
            out.append(sum(self.idf(t) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if t in tf))
        return out
