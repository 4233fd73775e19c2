"""Rate budgets: what bol says of each endpoint's budget, and the arithmetic on it (no I/O).

bol limits each client per endpoint and method (25 order lists a minute, 25 single
orders a second, a few offer exports an hour), tells the state on every answer
(``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset``, in any letter
case) and answers 429 with ``Retry-After`` when a limit is hit. This module keeps one
:class:`Bucket` per credential set and endpoint:

* The endpoint is the method plus the path with its identifiers collapsed
  (:func:`bucket_of`: ``GET /retailer/orders/*``). bol's fixed path segments are
  lowercase words joined by dashes; anything else (order ids, EANs, UUIDs) is an
  identifier.
* A bucket learns its limit, remaining count and reset time from every answer, and
  counts the requests it has let go and not yet heard back about against what remains:
  bol has not counted those yet when it writes its headers for an earlier one.
* Until its first answer a bucket lets one request go at a time (the others wait for
  what bol says), so tools that start together do not spend a budget nobody knows.
  An endpoint that answers without budget headers is not metered: until a 429, and
  again from the first answer without them after it.
* A 429 blocks the bucket until ``Retry-After``, else the reset, else a short backoff
  that doubles while 429s repeat.

:class:`LocalBudgets` keeps the buckets of one process; replicas that share their
counts (:class:`SharedCount`, in Redis) mirror them there.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import NamedTuple, Protocol

from .config import CredentialSet

_FIXED_PATH = re.compile(r"(?:/[a-z]+(?:-[a-z]+)*)*/?\Z")
# A segment that is not one of bol's fixed words (lowercase, joined by dashes).
_IDENTIFIER = re.compile(r"(?<=/)(?![a-z]+(?:-[a-z]+)*(?:/|\Z))[^/]+")
EPOCH_SECONDS = 1e9  # a Reset this large is a moment (epoch seconds), not a duration
EPOCH_MILLISECONDS = 1e12
FIRST_BACKOFF = 1.0  # seconds a 429 without Retry-After or reset blocks its bucket
MAX_BACKOFF = 60.0
IDLE_BUCKET = 600.0  # seconds a bucket with nothing under way is kept after its reset
MAX_BUCKETS_PER_SET = 256  # bol has about a hundred endpoints (paths and methods)


def bucket_of(method: str, path: str) -> str:
    """``GET /retailer/orders/*``: the method and the path, identifiers collapsed."""
    if _FIXED_PATH.match(path):
        return method + " " + path  # nothing to collapse (lists, exports, ...)
    return method + " " + _IDENTIFIER.sub("*", path)


class Told(NamedTuple):
    """What one answer of bol said about its endpoint's budget."""

    limit: int | None = None
    remaining: int | None = None
    reset_in: float | None = None  # seconds until the budget refills
    retry_after: float | None = None  # from a 429
    refused: bool = False  # the answer was a 429


def read_told(status: int, headers: Iterable[tuple[bytes, bytes]], wall_now: float) -> Told:
    """Read bol's budget headers (any letter case) from a raw answer head (pure).

    ``X-RateLimit-Reset`` is seconds until the reset; a value too large for that is a
    moment: epoch seconds, or epoch milliseconds (bol documents seconds; some client
    libraries read it as epoch milliseconds, so either form is accepted)."""
    limit = remaining = reset = retry = None
    for raw_name, raw_value in headers:  # every answer: told apart by length first
        size = len(raw_name)
        if size == 17:
            name = raw_name.lower()
            if name == b"x-ratelimit-limit":
                limit = raw_value
            elif name == b"x-ratelimit-reset":
                reset = raw_value
        elif size == 21:
            if raw_name.lower() == b"x-ratelimit-remaining":
                remaining = raw_value
        elif size == 11 and raw_name.lower() == b"retry-after":
            retry = raw_value
    if limit is None and remaining is None and reset is None and status != 429:
        return _NOTHING_TOLD  # an endpoint bol does not meter, or a test double
    return _told((
        None if limit is None else _count(limit),
        None if remaining is None else _count(remaining),
        None if reset is None else _seconds_until(reset, wall_now),
        _retry_after(retry, wall_now) if retry is not None and status == 429 else None,
        status == 429,
    ))


_NOTHING_TOLD = Told()
_told = partial(tuple.__new__, Told)  # Told(...) without its __new__ (every answer)


def _number(raw: bytes) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


@lru_cache(maxsize=1024)
def _count(raw: bytes) -> int | None:
    """A count of bol's (remembered: an endpoint's counts are a few dozen values)."""
    try:
        count = int(raw)  # bol's counts are whole numbers; int() skips the whitespace
    except ValueError:
        value = _number(raw)
        return int(value) if value is not None else None
    return count if count >= 0 else None


def _seconds_until(raw: bytes, wall_now: float) -> float | None:
    seconds, moment = _reset(raw)
    if moment and seconds is not None:
        return min(max(seconds - wall_now, 0.0), 86400.0)
    return seconds


@lru_cache(maxsize=1024)
def _reset(raw: bytes) -> tuple[float | None, bool]:
    """``X-RateLimit-Reset`` as (seconds until it, False) or (the moment, True): a value
    too large for seconds until is an epoch time in seconds or milliseconds."""
    value = _number(raw)
    if value is None:
        return None, False
    if value >= EPOCH_MILLISECONDS:
        return value / 1000, True
    if value >= EPOCH_SECONDS:
        return value, True
    return min(value, 86400.0), False


def _retry_after(raw: bytes, wall_now: float) -> float | None:
    """Seconds, or an HTTP date (RFC 9110 §10.2.3)."""
    value = _number(raw)
    if value is not None:
        return min(value, 86400.0)
    try:
        moment = email.utils.parsedate_to_datetime(raw.decode("latin-1"))
    except (TypeError, ValueError):
        return None
    return min(max(moment.timestamp() - wall_now, 0.0), 86400.0)


@dataclass(slots=True)
class Bucket:
    """The budget of one set's endpoint, as this proxy knows it (times: monotonic)."""

    limit: int | None = None  # None: bol has not said (yet)
    remaining: int | None = None  # as of the latest answer
    reset_at: float | None = None  # when the budget refills; None: not known
    window: float = 0.0  # the longest reset bol announced: its refill period, roughly
    blocked_until: float = 0.0  # after a 429
    backoff: float = FIRST_BACKOFF
    in_flight: int = 0  # let go, and not heard back about
    answered: bool = False  # bol has answered at least once
    last_used: float = 0.0
    refusals: int = 0  # 429s from bol in a row

    def available(self, now: float) -> int | None:
        """Requests that may go now; None: no budget is known (not metered)."""
        if self.limit is None and self.remaining is None:
            return None
        remaining = self.remaining if self.remaining is not None else self.limit
        if self.reset_at is not None and now >= self.reset_at and self.limit is not None:
            remaining = self.limit  # refilled; the next answer will say how much
        return (remaining or 0) - self.in_flight

    def take(self, now: float) -> float | None:
        """Let one request go (None), or say when to ask again (inf: when told)."""
        self.last_used = now
        if now < self.blocked_until:
            return self.blocked_until
        if not self.answered:
            if self.in_flight:
                return math.inf  # the first request's answer tells the budget
            self.in_flight += 1
            return None
        available = self.available(now)
        if available is None or available > 0:
            self.in_flight += 1
            return None
        if self.reset_at is not None and self.reset_at > now:
            return self.reset_at
        if self.in_flight:
            return math.inf  # spent by requests under way: their answers will tell
        # Spent, no reset known and nothing under way to tell more: one request asks.
        self.in_flight += 1
        return None

    def learn(self, told: Told, now: float) -> None:
        """An answer came back for a request this bucket let go."""
        self.in_flight = max(0, self.in_flight - 1)
        self.answered = True
        self.last_used = now
        if told.reset_in is not None:
            reset_at = now + told.reset_in
            # A window that ended since: what bol says now replaces the old count.
            if self.reset_at is None or now >= self.reset_at or reset_at > self.reset_at + 1:
                self.remaining = None
            self.reset_at = reset_at
            self.window = max(self.window, told.reset_in)
        if told.limit is not None:
            self.limit = told.limit
        if told.remaining is not None:
            # Answers overtake each other: within one window the lowest count is the
            # latest word, as bol counts down.
            self.remaining = (told.remaining if self.remaining is None
                              else min(self.remaining, told.remaining))
        if told.refused:
            self.refusals += 1
            self.remaining = 0
            wait = told.retry_after
            if wait is None and self.reset_at is not None and self.reset_at > now:
                wait = self.reset_at - now
            if wait is None:
                wait, self.backoff = self.backoff, min(self.backoff * 2, MAX_BACKOFF)
            self.blocked_until = max(self.blocked_until, now + wait)
            # bol's word on when to come back is the budget's return, whatever the reset
            # said before.
            self.reset_at = self.blocked_until
        else:
            self.refusals = 0
            self.backoff = FIRST_BACKOFF
            if told.limit is None and told.remaining is None and told.reset_in is None:
                # An answer without a word of budget: not metered (any more). Else one
                # 429 would leave a count of 0 that no later answer ever raises.
                self.limit = self.remaining = self.reset_at = None

    def release(self, now: float) -> None:
        """A request this bucket let go was never sent (no token, the tool left)."""
        self.in_flight = max(0, self.in_flight - 1)
        self.last_used = now

    def estimate(self, ahead: int, now: float) -> float:
        """Seconds until a request with ``ahead`` requests queued before it may go: the
        next refill, then a window for every full budget queued before it. A guess
        where bol has said little; the wait itself stays bounded."""
        start = max(now, self.blocked_until)
        available = self.available(start) if self.answered else None
        if available is None or available > ahead:
            return start - now
        window = max(self.window, 1.0)
        refill = (self.reset_at if self.reset_at is not None and self.reset_at > start
                  else start + window)
        windows = math.ceil((ahead + 1 - max(available, 0)) / max(self.limit or 1, 1))
        return refill - now + (windows - 1) * window

    def snapshot(self, key: Key, now: float) -> Snapshot:
        reset_in = (self.reset_at - now if self.reset_at is not None and self.reset_at > now
                    else None)
        available = self.available(now) if self.answered else None
        return Snapshot(key[0], key[1], self.limit,
                        None if available is None else max(available, 0), reset_in,
                        max(0.0, self.blocked_until - now), self.in_flight)

    def idle(self, now: float) -> bool:
        return (self.in_flight == 0 and now >= self.blocked_until
                and now - self.last_used >= IDLE_BUCKET
                and (self.reset_at is None or now >= self.reset_at))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One bucket as ``/_proxy/limits`` and the metrics show it (times: seconds from now)."""

    set_name: str
    bucket: str
    limit: int | None
    remaining: int | None
    reset_in: float | None
    blocked_for: float
    in_flight: int


Key = tuple[str, str]  # (set name, bucket)


class SharedCount(Protocol):
    """Buckets counted by every replica together (in Redis). This process's
    :class:`LocalBudgets` mirror what it says, and count alone while it cannot be
    reached."""

    async def take(self, key: Key, now: float) -> float | None:
        """Let a request go (None), or when to ask again."""

    async def learn(self, key: Key, told: Told, now: float) -> None:
        """An answer came for a request that went."""

    async def release(self, key: Key, now: float) -> None:
        """A request that was let go never reached bol."""

    def follow(self, sets: Iterable[CredentialSet]) -> None:
        """A reload: the sets configured now."""

    def forget(self, set_names: Iterable[str]) -> None:
        """Sets removed or changed by a reload: this replica's part in them ends."""


class LocalBudgets:
    """The buckets of this process, in memory, at most ``MAX_BUCKETS_PER_SET`` a set:
    beyond, the least recently used one with nothing under way makes room (made-up paths
    cannot grow memory, and cost real endpoints at most a relearned budget). Idle
    buckets are dropped too. ``on_drop`` hears of every bucket dropped."""

    def __init__(self, on_drop: Callable[[Key], None] | None = None) -> None:
        self._sets: dict[str, OrderedDict[str, Bucket]] = {}
        self._on_drop = on_drop
        self._created = 0

    def bucket(self, key: Key, now: float) -> Bucket:
        set_name, name = key
        buckets = self._sets.get(set_name)
        if buckets is None:
            buckets = self._sets[set_name] = OrderedDict()
        bucket = buckets.get(name)
        if bucket is not None:
            buckets.move_to_end(name)  # most recently used last
            return bucket
        self._created += 1
        if self._created % 256 == 0:
            self._sweep(now)
        if len(buckets) >= MAX_BUCKETS_PER_SET:
            self._make_room(set_name, buckets)
        bucket = buckets[name] = Bucket(last_used=now)
        return bucket

    def take(self, key: Key, now: float) -> float | None:
        """Let a request go (None), or say when to ask again (inf: when an answer comes)."""
        return self.bucket(key, now).take(now)

    def learn(self, key: Key, told: Told, now: float) -> None:
        """An answer came for a request that went."""
        self.bucket(key, now).learn(told, now)

    def release(self, key: Key, now: float) -> None:
        """A request that was let go never reached bol."""
        bucket = self.get(key)
        if bucket is not None:
            bucket.release(now)

    def estimate(self, key: Key, ahead: int, now: float) -> float:
        """Seconds a request with ``ahead`` requests before it would wait (a guess)."""
        bucket = self.get(key)
        return 0.0 if bucket is None else bucket.estimate(ahead, now)

    def get(self, key: Key) -> Bucket | None:
        buckets = self._sets.get(key[0])
        return None if buckets is None else buckets.get(key[1])

    def snapshot(self, now: float) -> Iterator[Snapshot]:
        """Every bucket, for operators."""
        for set_name, buckets in list(self._sets.items()):
            for name, bucket in list(buckets.items()):
                yield bucket.snapshot((set_name, name), now)

    def peek(self, key: Key, now: float) -> Snapshot | None:
        """One bucket, if it is known."""
        bucket = self.get(key)
        return None if bucket is None else bucket.snapshot(key, now)

    def forget(self, set_names: Iterable[str]) -> None:
        """Drop the buckets of sets that were removed or changed."""
        for set_name in set_names:
            for name in self._sets.pop(set_name, {}):
                self._dropped((set_name, name))

    def __len__(self) -> int:
        return sum(len(buckets) for buckets in self._sets.values())

    def _make_room(self, set_name: str, buckets: OrderedDict[str, Bucket]) -> None:
        for name, bucket in buckets.items():  # the least recently used first
            if bucket.in_flight == 0:
                del buckets[name]
                self._dropped((set_name, name))
                return

    def _sweep(self, now: float) -> None:
        for set_name, buckets in self._sets.items():
            for name in [n for n, b in buckets.items() if b.idle(now)]:
                del buckets[name]
                self._dropped((set_name, name))

    def _dropped(self, key: Key) -> None:
        if self._on_drop is not None:
            self._on_drop(key)
