"""Cache of the frozen reader's document states, computed once and reused across steps and epochs.

With the reader frozen, a document's key/value (or encoder) states depend on neither the mask nor the
reranker, so they are constants of training (DESIGN.md section 3). Entries stay in memory up to a byte
budget; past it they are written to disk and read back on use. Keys are example ids: FiD states depend on
the question, so one entry holds all of one example's candidates.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import torch

from grerank.qa_data import Example


class DocStateCache:
    def __init__(
        self, reader, memory_budget_bytes: int = 4 << 30, spill_dir: str | Path | None = None
    ) -> None:
        self.reader = reader
        self.memory_budget = memory_budget_bytes
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._memory_bytes = 0
        self._spill_root = Path(spill_dir) if spill_dir else None
        self._spill_dir: Path | None = None
        self.hits = self.misses = 0

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def _disk_path(self, key: str) -> Path:
        if self._spill_dir is None:
            root = self._spill_root or Path(tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="doc-states-", dir=root))
        return self._spill_dir / (hashlib.sha1(key.encode()).hexdigest() + ".pt")

    def get(self, example: Example) -> list[torch.Tensor]:
        """The states of ``example``'s passages, computing and storing them on first use."""
        key = example.id
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self._disk_path(key)
        if path.is_file():
            self.hits += 1
            return torch.load(path, map_location=self.reader.device)
        self.misses += 1
        states = self.reader.encode_documents(example.passages, question=example.question)
        size = sum(s.numel() * s.element_size() for s in states)
        if self._memory_bytes + size <= self.memory_budget:
            self._memory[key] = states
            self._memory_bytes += size
        else:
            torch.save(states, path)
        return states

    def close(self) -> None:
        """Remove the spill folder."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
