"""What the imitation of bol answers with: media types, answers and bol's problem shape.

bol serves every JSON answer of Retailer API v10, problems included, as
``application/vnd.retailer.v10+json``; a problem is ``{"type": "https://api.bol.com/problems",
"title", "status", "detail"}`` with, for a request that failed validation, a list of
``violations`` each naming the field or parameter and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

V10 = "application/vnd.retailer.v10+json"
V10_CSV = "application/vnd.retailer.v10+csv"
ADVERTISER_V10 = "application/vnd.advertiser.v10+json"
PROBLEM_TYPE = "https://api.bol.com/problems"
INVALID_REQUEST = ("Error validating request. Consult the bol.com API documentation for more "
                   "information.")

Json = dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """One answer of the imitation, before it becomes an HTTP response."""

    status: int
    body: bytes
    content_type: str = V10
    headers: Mapping[str, str] = field(default_factory=dict)


def json_answer(data: object, status: int = 200, content_type: str = V10) -> Answer:
    """``data`` as bol's JSON, in the operation's media type."""
    return Answer(status, json.dumps(data).encode(), content_type)


@dataclass(frozen=True)
class Violation:
    """One reason a request was refused: the field or parameter, and why."""

    name: str
    reason: str


class Problem(Exception):
    """An answer in bol's problem shape; handlers raise it, the gateway renders it."""

    def __init__(self, status: int, title: str, detail: str,
                 violations: Sequence[Violation] = (),
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.violations = tuple(violations)
        self.headers = dict(headers or {})

    def answer(self) -> Answer:
        """The problem as bol sends it; ``violations`` only when there are some."""
        body: Json = {"type": PROBLEM_TYPE, "title": self.title, "status": self.status,
                      "detail": self.detail}
        if self.violations:
            body["violations"] = [{"name": v.name, "reason": v.reason}
                                  for v in self.violations]
        return Answer(self.status, json.dumps(body).encode(), V10, self.headers)


def not_found(what: str, ident: str) -> Problem:
    """404 for an identifier the imitation does not hold."""
    return Problem(404, "Not Found", f"{what} with id '{ident}' was not found.")


def invalid(*violations: Violation, detail: str = "Bad request") -> Problem:
    """400 for a request that breaks the operation's contract."""
    return Problem(400, INVALID_REQUEST, detail, violations)


def not_allowed(value: str, allowed: Sequence[str]) -> str:
    """bol's wording for a value outside an enumeration."""
    return f"Request contains invalid value(s): '{value}', allowed values: {', '.join(allowed)}."
