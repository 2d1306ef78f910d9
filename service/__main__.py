"""Run the service: ``python -m service [--host H] [--port P]`` (what ``make serve`` runs)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import uvicorn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve /rerank, /answer, /retrieve, /documents, /metrics and the probes. Models and "
        "paths come from GRERANK_* environment variables (see README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="bind address ($HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="port ($PORT)")
    parser.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM"
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # On SIGTERM uvicorn stops accepting, drains in-flight requests, runs the app's shutdown, then re-raises
    # the signal to the handler installed before it started: exiting 0 there makes a drained stop clean.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=args.graceful_timeout,
        log_level=args.log_level,
        # The app logs one access line per request itself, with the request id (service.api.http_middleware).
        access_log=False,
    )


if __name__ == "__main__":
    main()
