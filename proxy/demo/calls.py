"""What an operation receives, and the helpers that read it (no I/O): the call with its
path parameters, query and parsed body; query parameters read into bol's violations;
pages of 50.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from .answers import V10, Answer, Json, Violation, invalid, json_answer, not_allowed
from .processes import Process
from .shapes import parse_day
from .shop import Shop

PAGE_SIZE = 50


@dataclass(frozen=True)
class Call:
    """One request, as an operation sees it."""

    params: Mapping[str, str]  # from the path template
    query: Mapping[str, str]
    body: Any  # the parsed JSON body; None when the request had none
    now: float
    root: str  # the path root as sent: retailer, retailer-demo, shared, shared-demo
    origin: str  # scheme and host, for the links bol puts in a process status

    @property
    def shared_root(self) -> str:
        """Where the process statuses of this call's root are polled."""
        return "shared-demo" if self.root.endswith("-demo") else "shared"


Handler = Callable[[Shop, Call], Answer]


@dataclass(frozen=True)
class Operation:
    """One method on one path template, and what its requests and answers look like."""

    method: str
    template: str
    handler: Handler
    body: Json | None = None  # schema of the request body; None: no body expected
    consumes: tuple[str, ...] = (V10,)
    produces: tuple[str, ...] = (V10,)


class Query:
    """Reads query parameters, collecting a violation for each bad one."""

    def __init__(self, query: Mapping[str, str]) -> None:
        self._query = query
        self.violations: list[Violation] = []

    def choice(self, name: str, allowed: Sequence[str], default: str | None = None
               ) -> str | None:
        """One of ``allowed``, spelled exactly (bol's enumerations are upper case)."""
        value = self._query.get(name)
        if value is None:
            return default
        if value not in allowed:
            self.violations.append(Violation(name, not_allowed(value, allowed)))
        return value

    def integer(self, name: str, least: int, most: int | None = None,
                default: int | None = None) -> int | None:
        """A whole number within the bounds."""
        value = self._query.get(name)
        if value is None:
            return default
        if value.isascii() and value.isdigit() and least <= int(value) <= (most or int(value)):
            return int(value)
        bounds = f"at least {least}" + (f" and at most {most}" if most else "")
        self.violations.append(Violation(name, f"'{value}' is not a whole number {bounds}."))
        return default

    def number(self, name: str, least: float, most: float) -> float | None:
        """A required number within the bounds."""
        value = self._query.get(name)
        try:
            number = float(value) if value is not None else None
        except ValueError:
            number = None
        if number is None or not least <= number <= most:
            shown = "nothing" if value is None else f"'{value}'"
            self.violations.append(Violation(
                name, f"Required: a number from {least:g} to {most:g}, got {shown}."))
        return number

    def boolean(self, name: str) -> bool | None:
        """``true`` or ``false``."""
        value = self._query.get(name)
        if value is None:
            return None
        if value.lower() not in ("true", "false"):  # bol takes any letter case: False too
            self.violations.append(Violation(name, not_allowed(value, ("true", "false"))))
        return value.lower() == "true"

    def day(self, name: str) -> date | None:
        """A date written ``yyyy-MM-dd``."""
        value = self._query.get(name)
        if value is None:
            return None
        try:
            return parse_day(value)
        except ValueError:
            self.violations.append(Violation(name, f"'{value}' is not a date (yyyy-MM-dd)."))
            return None

    def check(self) -> None:
        """Refuse the request (400) if any parameter was bad, naming every one."""
        if self.violations:
            raise invalid(*self.violations)


def page_of(key: str, items: list[Json], page: int | None) -> Json:
    """Page ``page`` of a list answer, under ``key``."""
    start = ((page or 1) - 1) * PAGE_SIZE
    shown = items[start:start + PAGE_SIZE]
    return {key: shown} if shown else {}  # bol answers an empty list with {}


def accepted(process: Process, call: Call) -> Answer:
    """bol's answer to a write: 202 and the process status to poll."""
    return json_answer(process.view(call.origin), 202)
