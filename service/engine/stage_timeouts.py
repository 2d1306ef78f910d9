"""Per-stage time limits (``GRERANK_STAGE_TIMEOUTS``), checked between units of model work.

A forward pass cannot be interrupted, so a stage checks its clock after each unit (a reranker chunk, a
generated token, a reader document) and stops with :class:`StageTimeout` once over its limit: the worker is
free again at most one unit late, and the client gets a 504 naming the stage instead of waiting on.
"""

from __future__ import annotations

import time


class StageTimeout(Exception):
    def __init__(self, stage: str, limit: float) -> None:
        super().__init__(f"the {stage} stage exceeded its {limit:g} s limit (GRERANK_STAGE_TIMEOUTS)")
        self.stage = stage
        self.limit = limit


class StageClock:
    """The time limit of one run of one stage, started on construction."""

    def __init__(self, stage: str, limit: float) -> None:
        self.stage = stage
        self.limit = limit
        self._start = time.perf_counter()

    def check(self) -> None:
        if time.perf_counter() - self._start > self.limit:
            raise StageTimeout(self.stage, self.limit)
