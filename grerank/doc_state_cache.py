"""Per-document reader states, computed once and reused: by training across steps, epochs and runs, and by
the service across queries.

With the reader frozen, a document's states depend on nothing but the reader and the document (and, for
FiD, the question), never on the mask or the reranker (DESIGN.md section 3). So they are cached by content:

* keys hash the reader's ``state_signature`` (weights, precision, prompt, limits), the passage, and the
  question when the reader's states depend on it; an edited document or another reader never reuses stale
  states;
* memory tier: least-recently-used entries leave first once a byte budget is reached;
* disk tier (optional): every computed state is written through, atomically, into a folder under its own
  byte budget (least-recently-used files removed first). It survives restarts and is shared by every run
  and process that uses the same reader, so a sweep pays for document encoding once.

Misses are encoded one document per encoder call: a batch's GEMM shapes change the rounding of its
documents' states, so batched misses would make a document's states (and the reader's greedy answers) depend
on which other documents happened to miss with it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from grerank.passage import Passage
from grerank.readers import Reader

STATES_FORMAT = "one-document-per-call"  # a new tag when how states are computed changes
# Disk budget of the training CLIs' shared state folder (runs/doc-states): the default reader's states of
# every train, extra-train and dev paragraph the shipped runs read take about 45 GB in bf16.
DEFAULT_DISK_GB = 60.0


def _nbytes(states: torch.Tensor) -> int:
    return states.numel() * states.element_size()


class DocStateCache:
    def __init__(
        self,
        reader: Reader,
        memory_bytes: int,
        disk_dir: str | Path | None = None,
        disk_bytes: int = 0,
    ) -> None:
        self.reader = reader
        self.memory_budget = memory_bytes
        self.disk_budget = disk_bytes if disk_dir else 0
        # States cached before the format tag were encoded in batches: the tag keeps them out.
        signature = f"{reader.state_signature()}|{STATES_FORMAT}"
        self.namespace = hashlib.sha256(signature.encode()).hexdigest()[:16]
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memory_bytes = 0
        self._lock = threading.Lock()
        self.hits = self.disk_hits = self.misses = 0
        self._disk: Path | None = None
        self._disk_files: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        if disk_dir and disk_bytes > 0:
            self._disk = Path(disk_dir) / self.namespace
            self._disk.mkdir(parents=True, exist_ok=True)
            files = sorted(self._disk.glob("*.pt"), key=lambda f: f.stat().st_mtime)
            self._disk_files.update((f.name, f.stat().st_size) for f in files)
        self.disk_bytes = sum(self._disk_files.values())
        # With a disk tier on the CPU, the memory tier holds memory-mapped files: page cache the kernel can
        # reclaim, not heap. Thousands of multi-megabyte states interleaved with a training step's transients
        # otherwise fragment the heap until the process is killed (24 GB resident for 12 GB of states).
        self._mmap = self._disk is not None and reader.device.type == "cpu"

    def __len__(self) -> int:
        return len(self._memory)

    def key(self, passage: Passage, question: str | None = None) -> str:
        parts = [self.namespace, passage.title, passage.text]
        if self.reader.states_depend_on_question:
            parts.append(question or "")
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def states(
        self,
        passages: Sequence[Passage],
        question: str | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[torch.Tensor]:
        """States of ``passages`` in order, encoding the missing ones; ``check`` runs after each encoder call
        (the service's stage deadline)."""
        keys = [self.key(p, question) for p in passages]
        found = [self._lookup(key) for key in keys]
        missing = [i for i, s in enumerate(found) if s is None]
        for i in missing:
            found[i] = self.reader.encode_documents([passages[i]], question=question)[0]
            self._store(keys[i], found[i])
            if check is not None:
                check()
        return found  # type: ignore[return-value]

    # ---- tiers --------------------------------------------------------------------------------------------

    def _lookup(self, key: str) -> torch.Tensor | None:
        with self._lock:
            states = self._memory.get(key)
            if states is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return states
        path = self._disk / f"{key}.pt" if self._disk else None
        if path is not None and path.is_file():
            try:
                states = self._load(path)
            except (OSError, RuntimeError, EOFError):  # removed by another process, or a damaged file
                states = None
            if states is not None:
                self.disk_hits += 1
                with self._lock:
                    if path.name in self._disk_files:
                        self._disk_files.move_to_end(path.name)
                os.utime(path)
                self._remember(key, states)
                return states
        self.misses += 1
        return None

    def _load(self, path: Path) -> torch.Tensor:
        return torch.load(path, map_location=self.reader.device, weights_only=True, mmap=self._mmap)

    def _store(self, key: str, states: torch.Tensor) -> None:
        if self._disk is None or _nbytes(states) > self.disk_budget:
            self._remember(key, states)
            return
        path = self._disk / f"{key}.pt"
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        torch.save(states, tmp)
        os.replace(tmp, path)  # readers never see a half-written file
        # The file's mapping, not this heap copy, is what stays (still in the page cache: no read).
        self._remember(key, self._load(path) if self._mmap else states)
        with self._lock:
            self._disk_files[path.name] = path.stat().st_size
            self.disk_bytes = sum(self._disk_files.values())
            while self.disk_bytes > self.disk_budget and self._disk_files:
                name, size = self._disk_files.popitem(last=False)
                (self._disk / name).unlink(missing_ok=True)
                self.disk_bytes -= size

    def _remember(self, key: str, states: torch.Tensor) -> None:
        size = _nbytes(states)
        if size > self.memory_budget:
            return
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = states
            self.memory_bytes += size
            while self.memory_bytes > self.memory_budget:
                _, evicted = self._memory.popitem(last=False)
                self.memory_bytes -= _nbytes(evicted)
