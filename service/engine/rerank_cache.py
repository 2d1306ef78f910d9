"""Reranker outputs of sequences read before, so a document the service has encoded once costs nothing the
next time it comes back.

The backend's output for a sequence is a function of that sequence's tokens alone
(:mod:`service.engine.rerank_backend`), so a stored output holds the very bits a new pass would give: the
cache cannot change a score. For a bi-encoder a sequence is one document (or one query), so a document that
returns is read once: ``/answer``'s candidates come from the index, and a corpus gets reranked for query
after query. For a cross-encoder a sequence is a (query, document) pair, so only a repeated pair hits.

Least recently used outputs are dropped beyond a byte budget (``GRERANK_RERANK_CACHE_MB``; 0 turns the cache
off). Only the model worker thread uses it, so it takes no lock.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from service.engine.rerank_backend import Encoded
from service.metrics import Metrics

# What an entry costs beside its output: the key, the tensor object and the dictionary slot.
ENTRY_OVERHEAD_BYTES = 256


class RerankCache:
    def __init__(self, budget_bytes: int, metrics: Metrics | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.metrics = metrics
        self._outputs: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.memory_bytes = 0

    @staticmethod
    def key(sequence: Encoded) -> bytes:
        digest = hashlib.blake2b(array("q", sequence.ids).tobytes(), digest_size=16)
        if sequence.type_ids is not None:
            digest.update(array("q", sequence.type_ids).tobytes())
        return digest.digest()

    @staticmethod
    def _cost(output: torch.Tensor) -> int:
        return output.numel() * output.element_size() + ENTRY_OVERHEAD_BYTES

    def get(self, sequence: Encoded) -> torch.Tensor | None:
        if not self.budget_bytes:
            return None
        key = self.key(sequence)
        output = self._outputs.get(key)
        if output is not None:
            self._outputs.move_to_end(key)
        if self.metrics is not None:
            self.metrics.rerank_cache_lookups.labels("miss" if output is None else "hit").inc()
        return output

    def put(self, sequence: Encoded, output: torch.Tensor) -> None:
        if self._cost(output) > self.budget_bytes:
            return
        output = output.clone()  # a row of a pass's output would keep the whole pass alive
        key = self.key(sequence)
        previous = self._outputs.pop(key, None)
        if previous is not None:
            self.memory_bytes -= self._cost(previous)
        self._outputs[key] = output
        self.memory_bytes += self._cost(output)
        while self.memory_bytes > self.budget_bytes:
            _, dropped = self._outputs.popitem(last=False)
            self.memory_bytes -= self._cost(dropped)
        if self.metrics is not None:
            self.metrics.rerank_cache_bytes.set(self.memory_bytes)

    def __len__(self) -> int:
        return len(self._outputs)
