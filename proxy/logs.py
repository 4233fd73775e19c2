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
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class _SecondCache:
    """The formatted wall-clock second, made once a second instead of once a line."""

    def __init__(self, pattern: str) -> None:
        self._pattern = pattern
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self._pattern, time.gmtime(second))
        return self._text


class TextFormatter(logging.Formatter):
    """``2026-11-28T01:02:03.456Z INFO    proxy.access: message``, times in UTC."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._seconds = _SecondCache("%Y-%m-%dT%H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._seconds(record.created)}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """Every record, access lines included, as one JSON object."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache("%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
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
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(line, urgent=record.levelno >= logging.WARNING)

    def add(self, line: str, urgent: bool = False) -> None:
        """Queue one formatted line (also the entry point of :class:`AccessLog`)."""
        self._pending.append(line)
        if urgent or len(self._pending) >= self.MAX_PENDING:
            self.flush()
            return
        if self._timer is not None and self._timer_loop is not None \
                and self._timer_loop.is_running():
            return  # a flush is due within FLUSH_AFTER (the usual case: nothing to do)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # outside a loop (start-up errors, the CLI): at once
            return
        if self._timer is not None:
            self.flush()  # a timer of a loop that has ended would never fire
        self._timer, self._timer_loop = loop.call_later(self.FLUSH_AFTER, self.flush), loop

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


class AccessLog:
    """One line per request, the proxy's most frequent log record.

    Once :func:`configure` has installed the batching handler, a line is formatted here,
    exactly as the configured formatter would, and queued on the handler directly:
    building a LogRecord and passing it through logging's filters and formatters cost a
    quarter of the proxy's throughput. Before that (the proxy used as a library, tests),
    lines go through the ``proxy.access`` logger like any other record.
    """

    def __init__(self) -> None:
        self._handler: BatchingHandler | None = None
        self._json = False
        self._seconds = _SecondCache("%Y-%m-%dT%H:%M:%S")

    def route(self, handler: BatchingHandler | None, json_lines: bool) -> None:
        self._handler, self._json = handler, json_lines

    @staticmethod
    def enabled() -> bool:
        return _access.isEnabledFor(logging.INFO)

    @property
    def structured(self) -> bool:
        """Whether :meth:`write` uses its ``fields`` (JSON lines, or not configured yet);
        text lines need only the message, so the caller can skip building them."""
        return self._json or self._handler is None

    def write(self, message: str, fields: dict[str, Any] | None = None) -> None:
        """Log one request: ``message`` for text lines, ``fields`` for JSON ones."""
        if self._handler is None:
            _access.info("%s", message, extra={"access": fields or {}})
            return
        now = time.time()
        stamp = f"{self._seconds(now)}.{int(now * 1000) % 1000:03d}Z"
        if self._json:
            line = json.dumps({"time": stamp, "level": "info", "logger": "proxy.access",
                               "message": message, **(fields or {})}, default=str)
        else:
            line = f"{stamp} INFO    proxy.access: {message}"
        self._handler.add(line)


_access = logging.getLogger("proxy.access")
access_log = AccessLog()


def configure(level: str = "info", fmt: str = "text") -> None:
    """Install one handler on the root logger, writing to stderr."""
    handler = BatchingHandler()
    access_log.route(handler, fmt == "json")
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access logger formats every request even when nobody reads it.
    logging.getLogger("aiohttp.access").disabled = True

    logging.captureWarnings(True)
    # Nothing here prints the caller's file and line, thread or process: skip gathering
    # them for every record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
