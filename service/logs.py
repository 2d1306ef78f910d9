"""Structured logs: one JSON object per line, carrying the id of the request being served.

The request id lives in a context variable set by
:class:`service.api.http_middleware.RequestContextMiddleware` (and copied onto the model worker thread with
each job), so every line logged while serving a request, in the service, the models or uvicorn, names it.
Secrets are never logged: no route logs headers or bodies, and as a second line of defence anything shaped
like a bearer token or an API key header is redacted.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str | None] = ContextVar("grerank_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_SECRETS = re.compile(
    r"(?i)(\bbearer\s+|\bx-api-key[\"']?\s*[:=]\s*[\"']?|\bapi[_-]?keys?[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"
)
_HANDLER_NAME = "grerank-json"


def redact(text: str) -> str:
    return _SECRETS.sub(r"\1[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (test runners and servers may swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def configure(fmt: str, level: str) -> None:
    """JSON lines on stderr for the root logger and uvicorn's loggers; ``service.*`` at ``level``.

    Idempotent (several apps in one process configure it once). ``text`` leaves the logging setup as the
    process has it (uvicorn's defaults under uvicorn).
    """
    logging.getLogger("service").setLevel(level.upper())
    if fmt != "json":
        return
    formatter = JsonFormatter()
    root = logging.getLogger()
    if not any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # uvicorn's loggers have their own handlers and do not propagate: give those handlers the JSON format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
