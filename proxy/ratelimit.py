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

Only the head of a queue asks for budget, so the order holds however the budget is
counted: by this process (:class:`~proxy.budgets.LocalBudgets`), or by every replica
together (a :class:`~proxy.budgets.SharedCount` in Redis, mirrored in the local
buckets).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from .budgets import Key, LocalBudgets, SharedCount, Snapshot, Told, bucket_of, read_told
from .config import CredentialSet
from .errors import BadRequest, RateLimited
from .headers import MAX_WAIT_HEADER
from .metrics import Metrics
from .tokens import Clock

_LONGEST_WAIT = 3600.0  # what X-Bol-Proxy-Max-Wait may ask for
_REMEMBERED_KEYS = 4096  # requests whose bucket is remembered


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
    __slots__ = ("admitted", "wake")

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.admitted = False  # budget was taken for it while it slept


class RateLimiter:
    """Queues and budgets of every set: counted in ``local``, or by ``shared`` (every
    replica together) when configured, which ``local`` then mirrors."""

    def __init__(self, local: LocalBudgets, clock: Clock, wall: Callable[[], float],
                 metrics: Metrics | None = None, shared: SharedCount | None = None) -> None:
        self.local = local
        self.shared = shared
        self._clock = clock
        self._wall = wall
        self._metrics = metrics
        self._queues: dict[Key, deque[_Waiter]] = {}
        self._keys: dict[tuple[str, str, str], Key] = {}
        self._cutoff = math.inf  # at shutdown: nobody waits past the last moment

    def now(self) -> float:
        return self._clock.monotonic()

    def bucket(self, set_name: str, method: str, path: str) -> Key:
        """The bucket a request to ``path`` spends from (remembered: most requests
        repeat a few list endpoints)."""
        request = (set_name, method, path)
        key = self._keys.get(request)
        if key is None:
            if len(self._keys) >= _REMEMBERED_KEYS:
                self._keys.clear()  # identifiers in paths: forget rather than grow
            key = self._keys[request] = (set_name, bucket_of(method, path))
        return key

    async def _take(self, key: Key, now: float) -> float | None:
        shared = self.shared
        return self.local.take(key, now) if shared is None else await shared.take(key, now)

    def could_wait(self, key: Key, deadline: float) -> bool:
        """Whether budget is expected back before ``deadline``."""
        queue = self._queues.get(key)
        now = self.now()
        return self.local.estimate(key, len(queue) if queue else 0, now) <= deadline - now

    async def acquire(self, key: Key, deadline: float) -> float:
        """Budget for one request, after waiting in line if need be, and the seconds it
        waited; else :class:`RateLimited` (at once when the wait would pass
        ``deadline``). The request then reports what came back (:meth:`answered`), or
        that it never left (:meth:`release`)."""
        now = self.now()
        deadline = min(deadline, self._cutoff)
        queue = self._queues.get(key)
        if not queue:
            shared = self.shared
            when = (self.local.take(key, now) if shared is None  # the usual: no awaiting
                    else await shared.take(key, now))
            if when is None:
                return 0.0
            queue = self._queues.setdefault(key, deque())
        expected = self.local.estimate(key, len(queue), now)
        if now + expected > deadline:
            raise self._refusal(key, expected)
        waiter = _Waiter()
        queue.append(waiter)
        try:
            await self._wait_in_line(key, queue, waiter, deadline)
        except BaseException:
            if waiter.admitted:  # let go by another's _admit, then cancelled (tool gone)
                self.local.release(key, self.now())
                self._admit(key)
            raise
        finally:
            if not waiter.admitted:
                queue.remove(waiter)
                if queue:
                    queue[0].wake.set()  # the next one asks now: there may be budget
            if not queue and self._queues.get(key) is queue:
                del self._queues[key]
        waited = self.now() - now
        if self._metrics is not None:
            self._metrics.waited(key[0], key[1], waited)
        return waited

    async def _wait_in_line(self, key: Key, queue: deque[_Waiter], waiter: _Waiter,
                            deadline: float) -> None:
        while not waiter.admitted:
            now = self.now()
            deadline = min(deadline, self._cutoff)
            if queue[0] is waiter:
                when = await self._take(key, now)
                if when is None:
                    queue.popleft()
                    waiter.admitted = True
                    self._admit(key)  # budget may be there for those behind it too
                    return
                if when > deadline and not math.isinf(when):
                    raise self._refusal(key, when - now)
                until = min(when, deadline)
            else:
                until = deadline
            if now >= deadline:
                raise self._refusal(key, self.local.estimate(key, queue.index(waiter), now))
            waiter.wake.clear()
            await self._clock.wait(waiter.wake, until - now)

    def _admit(self, key: Key) -> None:
        """Let waiting requests go while there is budget, at once and in order: one by
        one, each on the next turn of the loop, the line would never empty under steady
        traffic, and every request after it would queue. Counted here only; with shared
        counts, the head asks Redis itself."""
        queue = self._queues.get(key)
        if not queue:
            return
        if self.shared is None:
            now = self.now()
            while queue and self.local.take(key, now) is None:
                admitted = queue.popleft()
                admitted.admitted = True
                admitted.wake.set()
        if queue:
            queue[0].wake.set()

    def _refusal(self, key: Key, wait: float) -> RateLimited:
        if self._metrics is not None:
            self._metrics.rate_limited(key[0], key[1])
        set_name, bucket = key
        known = self.local.peek(key, self.now())
        headers = {}
        if known is not None and known.limit is not None:
            # As bol would have said it, for tools that read these headers.
            headers = {"X-RateLimit-Limit": str(known.limit), "X-RateLimit-Remaining": "0",
                       "X-RateLimit-Reset": str(math.ceil(wait))}
        return RateLimited(
            f"the budget of set '{set_name}' for {bucket} is spent; it returns in about "
            f"{math.ceil(wait)} s, later than this request may wait (rate_limits.max_wait "
            f"or {MAX_WAIT_HEADER})", max(wait, 1.0), headers)

    def answered(self, key: Key, status: int,
                 raw_headers: Iterable[tuple[bytes, bytes]]) -> Awaitable[None] | None:
        """bol answered a request that had budget: its headers (and a 429) teach the
        bucket, and the next in line may go. Done here at once when this process counts
        (None); an awaitable when the count is shared (Redis)."""
        if status == 401:
            # Refused at the door (a token bol no longer takes): not a request that
            # counted, nor a word about the endpoint's budget.
            return self.release(key)
        told = read_told(status, raw_headers, self._wall())
        if told.refused and self._metrics is not None:
            self._metrics.refused_by_bol(key[0], key[1])
        if self.shared is not None:
            return self._learn_shared(key, told)
        self.local.learn(key, told, self.now())
        self._admit(key)
        return None

    async def _learn_shared(self, key: Key, told: Told) -> None:
        assert self.shared is not None
        await self.shared.learn(key, told, self.now())
        self._admit(key)

    def try_take(self, key: Key) -> bool:
        """Budget at once, without waiting or asking Redis, if this process counts and
        nobody waits before: the usual case, with no await at all."""
        if self.shared is not None or self._queues.get(key):
            return False
        return self.local.take(key, self.now()) is None

    def release(self, key: Key) -> Awaitable[None] | None:
        """A request that had budget never reached bol (no token, the tool left): done
        at once when this process counts (None), an awaitable when Redis counts."""
        if self.shared is not None:
            return self._release_shared(key)
        self.local.release(key, self.now())
        self._admit(key)
        return None

    async def _release_shared(self, key: Key) -> None:
        assert self.shared is not None
        await self.shared.release(key, self.now())
        self._admit(key)

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
                for s in self.local.snapshot(self.now())]

    def follow(self, sets: Iterable[CredentialSet], changed: Iterable[str]) -> None:
        """A reload: the sets configured now, and those removed or changed, whose
        buckets go (waiters finish as they are: their next question starts a fresh
        bucket)."""
        gone = list(changed)
        self.local.forget(gone)
        self._keys.clear()
        if self.shared is not None:
            self.shared.forget(gone)
            self.shared.follow(sets)
