"""Process statuses: how bol answers a write, and how the write later takes effect (no I/O).

bol does not carry out a write while the request waits: it answers 202 with a process
status (``PENDING``) to poll at ``/shared/process-status/{id}``, and the change becomes
visible once the status has moved to ``SUCCESS`` (or ``FAILURE``, with an error message,
when bol finds the write impossible). The imitation moves a status on at its second poll,
or after a few seconds without polls, so that a tool that does not poll sees its change
too; the change itself is applied at that moment, as at bol.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .answers import Json
from .shapes import stamp

# Seconds after which a write takes effect even when nobody polls its status.
SETTLES_AFTER = 5.0
# The poll at which a status leaves PENDING: the first poll still sees it pending.
SETTLING_POLL = 2

# Carries out a write when its process settles; returns an error message to fail it.
Effect = Callable[[float], str | None]


@dataclass
class Process:
    """One asynchronous write and its progress."""

    process_id: str
    entity_id: str
    event_type: str  # CREATE_SHIPMENT, UPDATE_OFFER_STOCK, ...
    description: str
    created: float
    effect: Effect
    root: str  # "shared" or "shared-demo", for the link a tool polls
    status: str = "PENDING"
    error: str | None = None
    polls: int = 0

    def view(self, origin: str) -> Json:
        """The process as bol shows it (``ProcessStatus``)."""
        answer: Json = {
            "processStatusId": self.process_id, "entityId": self.entity_id,
            "eventType": self.event_type, "description": self.description,
            "status": self.status, "createTimestamp": stamp(self.created),
            "links": [{"rel": "self", "href":
                       f"{origin}/{self.root}/process-status/{self.process_id}"}],
        }
        if self.error is not None:
            answer["errorMessage"] = self.error
        return answer


class Processes:
    """Every process of one run, by id."""

    def __init__(self) -> None:
        self._all: dict[str, Process] = {}
        self._ids: Iterator[int] = itertools.count(1_000_000_001)

    def start(self, entity_id: str, event_type: str, description: str, now: float,
              effect: Effect, root: str = "shared") -> Process:
        """Accept a write; it takes effect when the process settles."""
        process = Process(str(next(self._ids)), entity_id, event_type, description, now,
                          effect, root)
        self._all[process.process_id] = process
        return process

    def settle_due(self, now: float) -> None:
        """Carry out every write that has waited long enough, polled or not."""
        for process in self._all.values():
            if process.status == "PENDING" and now >= process.created + SETTLES_AFTER:
                self._settle(process, now)

    def poll(self, process_id: str, now: float) -> Process | None:
        """A tool asks for a status: count the poll, settle at the second one."""
        process = self._all.get(process_id)
        if process is not None:
            process.polls += 1
            if process.status == "PENDING" and process.polls >= SETTLING_POLL:
                self._settle(process, now)
        return process

    def of_entity(self, entity_id: str, event_type: str) -> list[str]:
        """The ids of the processes for one entity and event type, oldest first."""
        return [p.process_id for p in self._all.values()
                if p.entity_id == entity_id and p.event_type == event_type]

    @staticmethod
    def _settle(process: Process, now: float) -> None:
        process.error = process.effect(now)
        process.status = "SUCCESS" if process.error is None else "FAILURE"
