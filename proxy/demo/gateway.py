"""What bol's API does with an authenticated request, in bol's order (no I/O).

1. The path must name a resource (else 404) and the method must be one it has (else 405
   with ``Allow``: a PUT is never answered as if it were a GET).
2. The client's budget for the endpoint is spent (else 429 with ``Retry-After``); every
   answer from here on carries the ``X-RateLimit-*`` headers.
3. A POST or PUT must say ``Content-Type: application/vnd.retailer.v10+json`` even when it
   has no body, and a body must be JSON that fits the operation's schema (else 400 with
   violations).
4. The operation answers, in the media type the ``Accept`` header picks from those the
   operation serves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .answers import INVALID_REQUEST, Answer, Problem, Violation, invalid
from .calls import Call, Operation
from .limits import Endpoint, Limit, RateLimits
from .resources import OPERATIONS
from .routes import Routes
from .schemas import violations
from .shop import Shop

WRITES = frozenset({"POST", "PUT"})


@dataclass(frozen=True)
class Incoming:
    """A request that passed authentication, as the gateway needs it."""

    method: str
    path: str  # decoded, without the query
    query: Mapping[str, str]
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    client: str  # the client id the token belongs to
    now: float
    origin: str  # scheme and host the request was sent to


class Gateway:
    """Routes, budgets and checks requests for one run's shop."""

    def __init__(self, limits: Mapping[Endpoint, Limit] | None = None) -> None:
        self.shop = Shop()
        self.limits = RateLimits(limits)
        self._routes = Routes(operation.template for operation in OPERATIONS)

    def handle(self, request: Incoming) -> Answer:
        """The answer bol would give."""
        try:
            return self._handle(request)
        except Problem as problem:
            return problem.answer()

    def _handle(self, request: Incoming) -> Answer:
        match = self._routes.match(request.path)
        if match is None:
            raise Problem(404, "Not Found", f"No endpoint {request.path}")
        # A server that has GET has HEAD, with the same head and no body (RFC 9110 9.3.2).
        method = "GET" if request.method == "HEAD" else request.method
        offered = [op for op in OPERATIONS if op.template in match.templates]
        operation = next((op for op in offered if op.method == method), None)
        if operation is None:
            methods = {op.method for op in offered}
            allowed = sorted(methods | ({"HEAD"} if "GET" in methods else set()))
            raise Problem(405, "Method Not Allowed",
                          f"Request method '{request.method}' is not supported.",
                          headers={"Allow": ", ".join(allowed)})
        budget = self.limits.spend(request.client, (operation.method, operation.template),
                                   request.now)
        try:
            self.shop.processes.settle_due(request.now)
            call = Call(match.params(operation.template), request.query,
                        self._body(operation, request), request.now, match.root,
                        request.origin)
            answer = operation.handler(self.shop, call)
            if answer.status < 300:
                answer = replace(answer, content_type=_negotiate(
                    request.headers.get("Accept"), operation.produces))
        except Problem as problem:
            answer = problem.answer()
        return replace(answer, headers={**budget.headers(), **answer.headers})

    @staticmethod
    def _body(operation: Operation, request: Incoming) -> Any:
        """The request's JSON body, checked against the operation's schema."""
        if operation.method in WRITES:
            sent = request.headers.get("Content-Type")
            media = (sent or "").partition(";")[0].strip().lower()
            if media not in operation.consumes:
                shown = f"Content type '{sent}' is" if sent else "A request without content type is"
                raise Problem(400, INVALID_REQUEST, f"{shown} not supported.", [Violation(
                    "Content-Type", f"Send one of: {', '.join(operation.consumes)}.")])
        if operation.body is None:
            return None
        if not request.body.strip():
            raise invalid(Violation("body", "The request needs a body."))
        try:
            body = json.loads(request.body)
        except ValueError as exc:  # also bytes that are not UTF-8
            reason = (f"{exc.msg} at line {exc.lineno} column {exc.colno}."
                      if isinstance(exc, json.JSONDecodeError) else "The body is not UTF-8.")
            raise invalid(Violation("body", f"Malformed JSON: {reason}"),
                          detail="Malformed JSON body") from None
        if found := violations(operation.body, body):
            raise invalid(*found)
        return body


def _negotiate(accept: str | None, produces: tuple[str, ...]) -> str:
    """The first media type the operation serves that ``Accept`` names; the operation's
    own when it names none (the imitation does not answer 406)."""
    wanted = (accept or "").lower()
    return next((media for media in produces if media in wanted), produces[0])
