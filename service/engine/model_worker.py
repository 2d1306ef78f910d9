"""One thread that runs all model and index work, one job at a time, off the event loop.

Serialising the jobs keeps the models free of concurrent use and the CPU free of oversubscription. Rerank
work of concurrent requests is batched by :mod:`service.engine.batching_queue`, which runs here one forward
pass per job and then queues again behind whatever else is waiting, so an ``/answer`` still gets its turn.
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

    def track(self, delta: int) -> None:
        """Count ``delta`` more units of model work waiting or running (the ``grerank_queue_depth`` gauge)."""
        with self._lock:
            self._pending += delta
            self._metrics.queue_depth.set(self._pending)

    def submit(self, fn: Callable[..., T], *args: object, counted: bool = True) -> Future[T]:
        """Queue ``fn(*args)``; the queue depth counts it until it has finished, even if nobody waits (unless
        not ``counted``: the rerank queue counts its requests, not its turns).

        It runs in a copy of the caller's context, so what it logs carries the caller's request id."""
        future = self._executor.submit(contextvars.copy_context().run, fn, *args)
        if counted:
            self.track(1)
            future.add_done_callback(lambda _: self.track(-1))
        return future

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the worker thread and await its result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
