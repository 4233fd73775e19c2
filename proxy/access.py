"""What is recorded of each forwarded request: one access line and the request metrics.

The line names the set, method, path (never the query, which can carry order ids and
customer data), status, duration, bol's status, the body bytes passed to the tool,
whether the request was replayed after a 401, and an error code when the proxy answered
itself or the exchange broke off. Headers are never recorded.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .logs import access_log
from .metrics import Metrics

CLIENT_GONE = "client-gone"  # the tool left before its answer was complete (logged as 499)
UPSTREAM_BROKE_OFF = "upstream-failed-mid-body"  # bol's answer broke off (logged as 502)


class AccessRecord:
    """What the access log and the metrics learn about one request."""

    __slots__ = ("bytes", "deadline", "error", "method", "path", "replayed", "set_name",
                 "started", "status", "upstream_seconds", "upstream_status", "waited")

    def __init__(self, request: web.BaseRequest) -> None:
        self.started = time.perf_counter()
        self.method = request.method
        self.path = request.raw_path.partition("?")[0][:200]
        self.set_name = "-"
        self.status = 0
        self.upstream_status: int | None = None
        self.upstream_seconds = 0.0
        self.replayed = False
        self.error: str | None = None
        self.deadline = 0.0  # loop time by which the exchange with bol must be over
        self.bytes = 0  # body bytes passed to the client
        self.waited = 0.0  # seconds spent waiting for rate-limit budget

    def settle(self, answered: web.StreamResponse | None) -> None:
        """Fix the status to record: 499 (nginx's "client closed request") when the tool
        left, 502 when bol broke off mid-answer, else the status sent."""
        if answered is None or self.error == CLIENT_GONE:
            self.status = 499
        elif self.error == UPSTREAM_BROKE_OFF:
            self.status = 502
        else:
            self.status = answered.status

    def write(self, metrics: Metrics) -> None:
        """Record the request: metrics, then the access line (if INFO is on)."""
        duration = time.perf_counter() - self.started
        metrics.observe(self.set_name, self.method, self.status, duration,
                        self.upstream_seconds if self.upstream_status else None)
        if access_log.enabled():
            access_log.write(
                f"{self.set_name} {self.method} {self.path} {self.status} "
                f"{duration * 1000:.1f}ms upstream={self.upstream_status or '-'} "
                f"bytes={self.bytes} replayed={'yes' if self.replayed else 'no'}"
                + (f" waited={self.waited:.2f}s" if self.waited else "")
                + (f" error={self.error}" if self.error else ""),
                self.fields(duration) if access_log.structured else None,
            )

    def fields(self, duration: float) -> dict[str, Any]:
        """The access line's fields, for JSON logs."""
        return {"set": self.set_name, "method": self.method, "path": self.path,
                "status": self.status, "duration_ms": round(duration * 1000, 2),
                "upstream_status": self.upstream_status, "bytes": self.bytes,
                "replayed": self.replayed, "waited_s": round(self.waited, 3),
                "error": self.error}
