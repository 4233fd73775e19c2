"""An endpoint of the imitation of bol that enforces a budget, as bol does."""

from __future__ import annotations

import math
from collections.abc import Callable

from aiohttp import web

from proxy.tokens import Clock


class Metered:
    """One endpoint of bol with a budget of ``limit`` requests a ``window`` (fixed
    windows, on ``clock``: a test's fake one, or the real one), counting what it served
    and what it refused."""

    def __init__(self, clock: Clock, limit: int, window: float, *,
                 reset_as: Callable[[float], str] = lambda s: str(math.ceil(s)),
                 headers: bool = True) -> None:
        self.clock, self.limit, self.window = clock, limit, window
        self.reset_as, self.headers = reset_as, headers
        self.window_end = -math.inf
        self.used = self.served = self.refused = 0
        self.methods: list[str] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        now = self.clock.monotonic()
        self.methods.append(request.method)
        if now >= self.window_end:
            self.window_end, self.used = now + self.window, 0
        left = self.window_end - now
        if self.used >= self.limit:
            self.refused += 1
            headers = {"Retry-After": str(math.ceil(left))} if self.headers else {}
            return web.json_response({"title": "Too Many Requests", "status": 429},
                                     status=429, headers={**headers, **self._budget(left)})
        self.used += 1
        self.served += 1
        return web.json_response({"orders": []}, headers=self._budget(left))

    def _budget(self, left: float) -> dict[str, str]:
        if not self.headers:
            return {}
        return {"X-RateLimit-Limit": str(self.limit),
                "X-RateLimit-Remaining": str(self.limit - self.used),
                "X-RateLimit-Reset": self.reset_as(left)}
