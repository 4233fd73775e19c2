"""One rate budget per set and endpoint, shared by every tool that uses the set.

Tools that share a credential set share bol's budgets without knowing of each other; the
proxy sees all of their traffic, so it keeps the budget (the arithmetic is in
:mod:`proxy.budgets`) and queues what does not fit:

* A request whose bucket has budget goes at once. One that has none waits, first come
  first served, until budget returns, at most its maximum wait: ``rate_limits.max_wait``,
  or ``X-Bol-Proxy-Max-Wait: SECONDS`` on the request (0: never wait). A request that
  would wait longer is answered ``429 rate-limited`` at once, with ``Retry-After``:
  the proxy does not send bol a request it knows bol will refuse.
* A tool that disconnects while it waits leaves the queue and costs nothing.
* Every answer tells its bucket what bol said; the next in line is woken when that
  frees budget, or when the reset comes.

Only the head of a queue asks the store for budget, so the order holds however the
store decides (this process's counts, or counts shared by replicas).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .budgets import BudgetStore, Key, Snapshot, Told, bucket_of, read_told
from .errors import BadRequest, RateLimited
from .headers import MAX_WAIT_HEADER
from .metrics import Metrics
from .tokens import Clock

_LONGEST_WAIT = 3600.0  # what X-Bol-Proxy-Max-Wait may ask for


def max_wait_of(header: str | None, default: float) -> float:
    """The request's own maximum wait, from its header, or the configured one."""
    if header is None:
        return default
    try:
        seconds = float(header.strip())
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= _LONGEST_WAIT:
        raise BadRequest(f"{MAX_WAIT_HEADER} must be a number of seconds from 0 to "
                         f"{_LONGEST_WAIT:g}")
    return seconds


class _Waiter:
    __slots__ = ("wake",)

    def __init__(self) -> None:
        self.wake = asyncio.Event()


class Permit:
    """Budget for one request to bol; say what came back, or that nothing was sent."""

    __slots__ = ("_key", "_limiter", "_open")

    def __init__(self, limiter: RateLimiter, key: Key) -> None:
        self._limiter = limiter
        self._key = key
        self._open = True

    async def answered(self, status: int, raw_headers: Iterable[tuple[bytes, bytes]]) -> Told:
        """bol answered: its budget headers (and a 429) update the bucket."""
        self._open = False
        return await self._limiter.answered(self._key, status, raw_headers)

    async def cancel(self) -> None:
        """The request never reached bol (no token, the tool left): give the budget back."""
        if self._open:
            self._open = False
            await self._limiter.release(self._key)


class _Unmetered(Permit):
    """What a disabled limiter hands out."""

    def __init__(self) -> None:
        pass

    async def answered(self, status: int, raw_headers: Iterable[tuple[bytes, bytes]]) -> Told:
        return Told()

    async def cancel(self) -> None:
        pass


UNMETERED = _Unmetered()


@dataclass(slots=True)
class Budget:
    """The budget side of one tool request: its bucket and how long it may still wait."""

    limiter: RateLimiter | None
    key: Key
    deadline: float  # clock time after which the request may not wait any more

    async def acquire(self) -> Permit:
        if self.limiter is None:
            return UNMETERED
        return await self.limiter.acquire(self.key, self.deadline)

    def could_wait(self) -> bool:
        """Whether budget is expected back before the request's wait runs out."""
        if self.limiter is None:
            return False
        return self.limiter.expected_wait(self.key) <= self.deadline - self.limiter.now()


class RateLimiter:
    """Queues and budgets of every set; ``store`` keeps the counts."""

    def __init__(self, store: BudgetStore, clock: Clock, wall: Callable[[], float],
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self._clock = clock
        self._wall = wall
        self._metrics = metrics
        self._queues: dict[Key, deque[_Waiter]] = {}
        self._cutoff = math.inf  # at shutdown: nobody waits past the last moment

    def now(self) -> float:
        return self._clock.monotonic()

    def budget(self, set_name: str, method: str, path: str, max_wait: float) -> Budget:
        return Budget(self, (set_name, bucket_of(method, path)), self.now() + max_wait)

    def expected_wait(self, key: Key) -> float:
        queue = self._queues.get(key)
        return self.store.estimate(key, len(queue) if queue else 0, self.now())

    async def acquire(self, key: Key, deadline: float) -> Permit:
        """Budget for one request, after waiting in line if need be; else
        :class:`RateLimited` (at once when the wait would pass ``deadline``)."""
        now = self.now()
        deadline = min(deadline, self._cutoff)
        queue = self._queues.get(key)
        if not queue:
            when = await self.store.take(key, now)
            if when is None:
                return Permit(self, key)
            queue = self._queues.setdefault(key, deque())
        expected = self.store.estimate(key, len(queue), now)
        if now + expected > deadline:
            raise self._refusal(key, expected)
        waiter = _Waiter()
        queue.append(waiter)
        try:
            await self._wait_in_line(key, queue, waiter, deadline)
        finally:
            queue.remove(waiter)
            if queue:
                queue[0].wake.set()  # the next one asks now: there may be budget for more
            elif self._queues.get(key) is queue:
                del self._queues[key]
        if self._metrics is not None:
            self._metrics.waited(key[0], key[1], self.now() - now)
        return Permit(self, key)

    async def _wait_in_line(self, key: Key, queue: deque[_Waiter], waiter: _Waiter,
                            deadline: float) -> None:
        while True:
            now = self.now()
            deadline = min(deadline, self._cutoff)
            if queue[0] is waiter:
                when = await self.store.take(key, now)
                if when is None:
                    return
                if when > deadline and not math.isinf(when):
                    raise self._refusal(key, when - now)
                until = min(when, deadline)
            else:
                until = deadline
            if now >= deadline:
                raise self._refusal(key, self.store.estimate(key, queue.index(waiter), now))
            waiter.wake.clear()
            await self._clock.wait(waiter.wake, until - now)

    def _refusal(self, key: Key, wait: float) -> RateLimited:
        if self._metrics is not None:
            self._metrics.rate_limited(key[0], key[1])
        set_name, bucket = key
        known = self.store.peek(key, self.now())
        headers = {}
        if known is not None and known.limit is not None:
            # As bol would have said it, for tools that read these headers.
            headers = {"X-RateLimit-Limit": str(known.limit), "X-RateLimit-Remaining": "0",
                       "X-RateLimit-Reset": str(math.ceil(wait))}
        return RateLimited(
            f"the budget of set '{set_name}' for {bucket} is spent; it returns in about "
            f"{math.ceil(wait)} s, later than this request may wait (rate_limits.max_wait "
            f"or {MAX_WAIT_HEADER})", max(wait, 1.0), headers)

    async def answered(self, key: Key, status: int,
                       raw_headers: Iterable[tuple[bytes, bytes]]) -> Told:
        told = read_told(status, raw_headers, self._wall())
        await self.store.learn(key, told, self.now())
        if told.refused and self._metrics is not None:
            self._metrics.refused_by_bol(key[0], key[1])
        self._poke(key)
        return told

    async def release(self, key: Key) -> None:
        await self.store.release(key, self.now())
        self._poke(key)

    def _poke(self, key: Key) -> None:
        queue = self._queues.get(key)
        if queue:
            queue[0].wake.set()

    def stop_waiting_at(self, moment: float) -> None:
        """Shutdown: a request that cannot have budget by ``moment`` is answered 429 now,
        not cut off when the proxy stops."""
        self._cutoff = moment
        for queue in self._queues.values():
            for waiter in queue:
                waiter.wake.set()

    def waiting(self, key: Key) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def snapshot(self) -> list[tuple[Snapshot, int]]:
        """Every bucket with the requests waiting for it."""
        return [(s, self.waiting((s.set_name, s.bucket)))
                for s in self.store.snapshot(self.now())]

    def forget(self, set_names: Iterable[str]) -> None:
        """Sets removed or changed by a reload: their buckets go (waiters finish as they
        are: their next question to the store starts a fresh bucket)."""
        self.store.forget(set_names)
