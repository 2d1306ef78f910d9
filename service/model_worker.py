"""One thread that runs all model and index work, one job at a time, off the event loop.

Serialising the jobs is what makes results independent of concurrent traffic: each request's documents are
scored as their own batches, on a model nobody else is using at that moment, so the numbers are the same
as when the request is served alone. (Cross-request batching would change that and is deliberately absent.)
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from service.metrics import Metrics

T = TypeVar("T")


class ModelWorker:
    def __init__(self, metrics: Metrics) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grerank-model")
        self._metrics = metrics
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    def _count(self, delta: int) -> None:
        with self._lock:
            self._pending += delta
            self._metrics.queue_depth.set(self._pending)

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Queue ``fn(*args)``; the queue depth counts it until it has finished, even if nobody waits.

        It runs in a copy of the caller's context, so what it logs carries the caller's request id."""
        self._count(1)
        future = self._executor.submit(contextvars.copy_context().run, fn, *args)
        future.add_done_callback(lambda _: self._count(-1))
        return future

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the worker thread and await its result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
