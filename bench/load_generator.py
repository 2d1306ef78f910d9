"""Closed-loop HTTP clients for overload tests: each client sends one request, waits for the answer, and
sends the next, for a fixed time. What a client does after a 429 is its policy:

* ``wait``: sleeps for ``Retry-After``, then sends it again (a well-behaved client);
* ``retry``: sends it again at once (a naive client, or a retry loop: a retry storm).

Every client runs on one asyncio loop in the calling process, with its own keep-alive connection, so the
load costs the machine little besides the service it is aimed at.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from bench.stats import percentile

Policy = Literal["wait", "retry"]
# One request: (path, JSON body); drawn per request from the client's random generator.
RequestFactory = Callable[[random.Random], tuple[str, dict[str, Any]]]


@dataclass
class LoadResult:
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # status code -> count; 0 for a transport error
    ok_seconds: list[float] = field(default_factory=list)  # latency of each request answered 200
    ok_by_path: Counter = field(default_factory=Counter)
    refusals: list[tuple[float, str | None]] = field(default_factory=list)  # 429s: (latency, Retry-After)

    @property
    def goodput(self) -> float:
        """Requests answered 200, per second."""
        return len(self.ok_seconds) / self.seconds

    def summary(self) -> dict[str, Any]:
        ok = self.ok_seconds
        return {
            "seconds": round(self.seconds, 1),
            "answered_200": len(ok),
            "goodput_per_s": round(self.goodput, 2),
            "by_path": dict(self.ok_by_path),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_s": round(percentile(ok, 50), 3) if ok else None,
            "p99_s": round(percentile(ok, 99), 3) if ok else None,
            "max_s": round(max(ok), 3) if ok else None,
        }


async def _client(
    url: str,
    make_request: RequestFactory,
    policy: Policy,
    until: float,
    seed: int,
    result: LoadResult,
    headers: dict[str, str],
    max_requests: int | None,
) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, limits=limits, headers=headers) as client:
        sent = 0
        retrying: tuple[str, dict[str, Any]] | None = None
        while time.monotonic() < until and (max_requests is None or sent < max_requests):
            path, body = retrying or make_request(rng)  # a refused request is sent again, not another
            retrying = None
            sent += 1
            start = time.monotonic()
            try:
                # No response may outlive the run by much: a request still waiting at the end is not counted.
                response = await client.post(path, json=body, timeout=max(until - start, 0.0) + 5.0)
            except httpx.HTTPError:
                result.statuses[0] += 1
                await asyncio.sleep(0.1)
                continue
            result.statuses[response.status_code] += 1
            if response.status_code == 200:
                result.ok_seconds.append(time.monotonic() - start)
                result.ok_by_path[path] += 1
            elif response.status_code in (429, 503):
                retrying = path, body
                if response.status_code == 429:
                    result.refusals.append((time.monotonic() - start, response.headers.get("retry-after")))
                if policy == "wait":
                    pause = float(response.headers.get("retry-after", "1"))
                    await asyncio.sleep(min(pause, max(until - time.monotonic(), 0.0)))


async def _run(
    url: str,
    make_request: RequestFactory,
    clients: int,
    policy: Policy,
    seconds: float,
    headers: dict[str, str],
    max_requests: int | None,
) -> LoadResult:
    result = LoadResult(seconds=seconds)
    start = time.monotonic()
    until = start + seconds
    await asyncio.gather(
        *(_client(url, make_request, policy, until, i, result, headers, max_requests) for i in range(clients))
    )
    result.seconds = time.monotonic() - start
    return result


def run_load(
    url: str,
    make_request: RequestFactory,
    *,
    clients: int,
    policy: Policy,
    seconds: float,
    headers: dict[str, str] | None = None,
    max_requests_per_client: int | None = None,
) -> LoadResult:
    """``clients`` closed-loop clients for ``seconds`` (each at most ``max_requests_per_client``)."""
    return asyncio.run(
        _run(url, make_request, clients, policy, seconds, headers or {}, max_requests_per_client)
    )
