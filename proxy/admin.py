"""The proxy's own endpoints under ``/_proxy/``, answered here and never forwarded.

``health`` says the process serves; ``ready`` says every ``prefetch`` set holds a valid
token (and the proxy is not shutting down), so an orchestrator routes traffic to it only
when requests will not wait for or fail on a token; ``metrics`` is Prometheus text;
``limits`` lists every rate-limit bucket (limit, remaining, reset, blocked until,
requests waiting). Readiness stays driven by the sets' tokens: Redis being down is
shown in ``ready``'s ``shared_state`` object, but a replica with valid tokens still
serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiohttp import web

from .errors import MethodNotAllowed, NotFound, problem_response
from .metrics import CONTENT_TYPE, Metrics
from .tokens import Tokens, TokenSource

if TYPE_CHECKING:
    from .shared import SharedStore


def iso(wall: float | None) -> str | None:
    """A Unix time as people read it (UTC, whole seconds)."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")


class Admin:
    """Handlers for health, readiness and metrics."""

    def __init__(self, tokens: Tokens, metrics: Metrics,
                 limits: Callable[[], dict[str, object]],
                 shared: SharedStore | None = None) -> None:
        self._tokens = tokens
        self._metrics = metrics
        self._limits = limits
        self._shared = shared
        self.shutting_down = False

    async def health(self, request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.BaseRequest) -> web.Response:
        tokens = self._tokens
        sets = {}
        ready = not self.shutting_down
        for source in tokens.active():
            state = self._state(source, tokens)
            sets[source.cred.name] = state
            if source.cred.prefetch and state["state"] != "valid":
                ready = False
        for cred in tokens.config.credentials.values():
            if cred.prefetch and cred.name not in sets:
                sets[cred.name] = {"state": "starting", "prefetch": True}
                ready = False
        body = {"ready": ready, "shutting_down": self.shutting_down, "sets": sets,
                "shared_state": self._shared_state()}
        return web.Response(status=200 if ready else 503, text=json.dumps(body),
                            content_type="application/json")

    def _shared_state(self) -> dict[str, object]:
        if self._shared is None:
            return {"configured": False}
        health = self._shared.health
        return {"configured": True, "up": health.up, "since": iso(health.since),
                "last_error": health.last_error}

    @staticmethod
    def _state(source: TokenSource, tokens: Tokens) -> dict[str, object]:
        token = source.current()
        valid_until = None
        if token is not None:
            valid_until = tokens.wall_time(token.usable_until)
        return {
            "state": "valid" if token is not None else "no-token",
            "prefetch": source.cred.prefetch,
            "valid_until": iso(valid_until),
            "last_renewal": iso(source.last_renewal),
            "last_error": source.last_error,
            "failures": source.failures,
        }

    async def metrics(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=self._metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def limits(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text=json.dumps(self._limits()), content_type="application/json")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer a ``/_proxy/...`` request; unknown endpoints get problem answers."""
        endpoint = {
            "/_proxy/health": self.health,
            "/_proxy/ready": self.ready,
            "/_proxy/metrics": self.metrics,
            "/_proxy/limits": self.limits,
        }.get(request.raw_path.partition("?")[0])
        if endpoint is None:
            return problem_response(NotFound("the proxy has /_proxy/health, /_proxy/ready, "
                                             "/_proxy/metrics and /_proxy/limits"))
        if request.method not in ("GET", "HEAD"):
            return problem_response(MethodNotAllowed("the proxy's endpoints take GET"))
        return await endpoint(request)
