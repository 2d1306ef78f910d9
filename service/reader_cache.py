"""A memory-bounded LRU cache of per-document reader states.

Decoder documents are encoded independently of the question (DESIGN.md section 3), so a document's key/value
states can be reused by every query that selects it; the reader then runs only the question and the answer.
Entries are keyed by a hash of the passage content, so an edited document never reuses stale states.
Each miss is encoded on its own (no batch companions), so cached and fresh states are bit-identical.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from grerank.passage import Passage


def passage_key(passage: Passage) -> str:
    return hashlib.sha256(f"{passage.title}\0{passage.text}".encode()).hexdigest()


class ReaderStateCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_encode(
        self, passages: Sequence[Passage], encode: Callable[[list[Passage]], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """States for ``passages`` in order; ``encode`` is called once per missing passage."""
        out: list[torch.Tensor] = []
        for passage in passages:
            key = passage_key(passage)
            with self._lock:
                states = self._entries.get(key)
                if states is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
            if states is None:
                self.misses += 1
                states = encode([passage])[0]
                self._put(key, states)
            out.append(states)
        return out

    def _put(self, key: str, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = states
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()
