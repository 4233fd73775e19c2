"""Logging, configured once at start (as uvicorn does): text or one JSON object a line.

Loggers: ``proxy`` (forwarding, lifecycle), ``proxy.access`` (one line per request),
``proxy.tokens`` (fetches and renewals; never a token response). aiohttp's own access
logger is off: the proxy writes a cheaper line of its own with what operators need.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """Every record, access lines included, as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs each request its parser refuses at ERROR with a traceback, so any
    client could fill the log. The client already got its 400: note it at debug level,
    by exception type only (the parser's message can quote the client's bytes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            logging.getLogger("proxy").debug("refused a malformed request (%s)",
                                             type(exc).__name__)
            return False
        return True


def quiet_malformed_requests() -> None:
    """Install :class:`MalformedRequestFilter` on aiohttp's server logger (once)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server.filters):
        server.addFilter(MalformedRequestFilter())


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to stderr in batches: one write per ``FLUSH_AFTER`` seconds of access
    lines instead of one system call per request (which cost about a tenth of the
    proxy's throughput). Warnings and errors, and anything logged outside the event
    loop, are written at once; ``logging.shutdown()`` at exit flushes the rest."""

    FLUSH_AFTER = 0.25
    MAX_PENDING = 512

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._pending) >= self.MAX_PENDING:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._timer = loop.call_later(self.FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending:
                text = "\n".join(self._pending) + "\n"
                self._pending.clear()
                try:
                    self.stream.write(text)
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone (closed pipe): nothing left to tell


def configure(level: str = "info", fmt: str = "text") -> None:
    """Install one handler on the root logger, writing to stderr."""
    handler = BatchingHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access logger formats every request even when nobody reads it.
    logging.getLogger("aiohttp.access").disabled = True

    logging.captureWarnings(True)
