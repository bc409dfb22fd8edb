"""Logging for the CLI and the server: plain text for people, or one JSON object per line (IMSRC_LOG_FORMAT=json)
for log collectors. Every line written while a request is being answered carries that request's id, which the
server also returns in the X-Request-ID header, so a user's error report leads to its log lines."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]

# Set by the request middleware for the length of one request; copied into threadpool work by Starlette.
REQUEST_ID: ContextVar[str | None] = ContextVar("imsrc_request_id", default=None)

# Fields the access log (and anyone else) may pass with `extra=` and JSON lines then carry.
EXTRA_FIELDS = ("method", "path", "route", "status", "duration_ms", "client")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """time (UTC, ISO 8601), level, logger, message, request_id when there is one, the access fields, and the
    traceback as one string. json.dumps escapes newlines, so a record is always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.rid = getattr(record, "request_id", None) or "-"
        return super().format(record)


def json_logging() -> bool:
    """Whether stderr is a stream of JSON lines (then other messages should be log records too)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def log_handler(fmt: LogFormat, stream: IO[str], *, server: bool = False) -> logging.Handler:
    """A handler writing `fmt` lines that carry the current request id. The server's text lines have a timestamp
    and the request id; the CLI's stay short."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif server:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s [%(rid)s] %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return handler


def configure_logging(fmt: LogFormat, level: int, *, server: bool = False) -> None:
    """One handler on the root logger, writing to stderr (stdout stays for `--json` output)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(log_handler(fmt, sys.stderr, server=server))
    root.setLevel(level)
    if server:
        # uvicorn's own loggers: through the root handler (so JSON when asked), no access log of its own (ours
        # carries the request id, route and duration).
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
        logging.getLogger("uvicorn.access").disabled = True
