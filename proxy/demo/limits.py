"""bol's rate limits, enforced: one budget per client id and endpoint (no I/O).

bol limits each client id per endpoint, an endpoint being the method plus the path with
its identifiers collapsed (``GET /retailer/orders/{order-id}``). A budget of N requests
refills whole when its window ends; every answer says how much is left
(``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, and ``X-RateLimit-Reset``: whole seconds
until the budget refills), and a request over budget gets 429 with ``Retry-After`` in
seconds and a problem saying when to retry, without reaching the resource.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .answers import Problem

Endpoint = tuple[str, str]  # (method, path template)
Limit = tuple[int, float]  # (requests, per this many seconds)

# The endpoint whose limit applies where the table names no other.
ANY_ENDPOINT: Endpoint = ("*", "*")

DEFAULT_LIMITS: dict[Endpoint, Limit] = {
    # bol's published numbers for the endpoints tools call most.
    ("GET", "/retailer/orders"): (25, 60.0),
    ("GET", "/retailer/orders/{order-id}"): (25, 1.0),
    ("POST", "/retailer/offers/export"): (9, 3600.0),
    # Everything else: generous, so that only a runaway loop meets it.
    ANY_ENDPOINT: (50, 1.0),
}


@dataclass(frozen=True)
class Budget:
    """The state of one budget after a request was counted (or refused)."""

    limit: int
    remaining: int
    reset: int  # whole seconds until the budget refills

    def headers(self) -> dict[str, str]:
        """The ``X-RateLimit-*`` headers bol puts on every answer."""
        return {"X-RateLimit-Limit": str(self.limit),
                "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset)}


class RateLimits:
    """Fixed-window budgets per (client id, endpoint), on the caller's clock."""

    def __init__(self, overrides: Mapping[Endpoint, Limit] | None = None) -> None:
        # Read on every request, so that a change to the mapping applies at once.
        self.overrides = {} if overrides is None else overrides
        self._windows: dict[tuple[str, Endpoint], tuple[float, int]] = {}  # -> (start, used)

    def limit(self, endpoint: Endpoint) -> Limit:
        """The budget of ``endpoint``: its own, else the one for every other endpoint."""
        for table in (self.overrides, DEFAULT_LIMITS):
            if endpoint in table:
                return table[endpoint]
        return self.overrides.get(ANY_ENDPOINT, DEFAULT_LIMITS[ANY_ENDPOINT])

    def spend(self, client: str, endpoint: Endpoint, now: float) -> Budget:
        """Count one request, or raise the 429 problem when the budget is spent."""
        capacity, seconds = self.limit(endpoint)
        start, used = self._windows.get((client, endpoint), (now, 0))
        if now >= start + seconds:  # the window is over: the budget is whole again
            start, used = now, 0
        # Rounded up: a client that waits the announced seconds finds the budget refilled.
        reset = max(1, math.ceil(start + seconds - now))
        if used >= capacity:
            budget = Budget(capacity, 0, reset)
            raise Problem(429, "Too Many Requests",
                          f"Too many requests, retry in {reset} seconds.",
                          headers={**budget.headers(), "Retry-After": str(reset)})
        self._windows[(client, endpoint)] = (start, used + 1)
        return Budget(capacity, capacity - used - 1, reset)
