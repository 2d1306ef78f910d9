"""Our service in a subprocess on a loopback port, for benchmarks that measure it over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.uvicorn_server import Server


@contextmanager
def serving(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Start the service with ``env`` (logs to ``log_path``), wait until it is ready, yield its URL."""
    server = Server({"GRERANK_LOG_LEVEL": "warning", **env}, log_path).start()
    try:
        server.wait_ready(timeout=600)
        yield server.url
    finally:
        server.stop()
