"""The Redis that replicas share: its client, its health, its key names, and the lease.

This is the storage layer only; what is stored lives with its users (access tokens and
refresh tokens in :mod:`proxy.shared_tokens`). Anything else replicas come to share (a
rate budget counted across replicas, say) reuses :class:`SharedStore`: its client, its
:meth:`~SharedStore.key` names under ``shared_state.key_prefix``, :meth:`~SharedStore.run`
with its timeouts and circuit breaker, and :meth:`~SharedStore.script`.

Redis must never hold up a request, so every call is short and fails fast:

* socket and connect timeouts of half a second, no retries inside redis-py, and one
  deadline around each whole operation (a pipeline or a script);
* a circuit breaker (:class:`Health`): the first failure marks Redis down; while down,
  calls raise :class:`SharedStateDown` at once, without touching the network, and a
  probe PINGs about once a second (not the token endpoint's backoff: Redis is ours, and
  a lost Redis should heal within seconds of its return). The first answer marks it up.
  Each transition is logged once, with the class of the failure, never its text (a
  connection error may name the URL).

The lease (:class:`Lease`) is the lock: ``SET key owner NX PX ttl`` with a random owner
value; renewed while its work runs by a compare-and-pexpire script, and released by a
compare-and-delete script, so only its holder can extend or remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from .config import SharedState
from .tokens import Clock

log = logging.getLogger("proxy.shared")

SOCKET_TIMEOUT = 0.5  # seconds for Redis to accept a connection, and to answer a command
OPERATION_TIMEOUT = 1.0  # seconds for one whole operation (connect, then a pipeline)
PROBE_INTERVAL = 1.0  # seconds between PINGs while Redis is down

T = TypeVar("T")

# KEYS[1] = lock, ARGV[1] = owner, ARGV[2] = lease in ms. Only the owner extends it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] = lock, ARGV[1] = owner. Only the owner removes it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class SharedStateDown(Exception):
    """Redis did not answer in time, or is known to be down: nothing was read or written
    (or, for a write that timed out, it is unknown whether it was applied)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"shared state unreachable ({reason})")
        self.reason = reason


def reason_of(exc: BaseException) -> str:
    """A short, bounded class of a failure, fit for a log line and a metric label."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or "Timeout" in type(exc).__name__:
        return "timeout"
    if isinstance(exc, AuthenticationError):
        return "authentication"
    if isinstance(exc, ResponseError):
        return "refused"  # Redis answered with an error (out of memory, read-only, ...)
    if isinstance(exc, RedisError | OSError):
        return "connection"
    return "other"


@dataclass
class Health:
    """Whether Redis answers (the circuit breaker's state; pure, the clock injected)."""

    up: bool = True
    since: float | None = None  # wall clock of the last transition
    last_error: str | None = None
    errors: int = 0

    def failed(self, reason: str, wall: float) -> bool:
        """Note a failure; True when this is the transition to down."""
        self.errors += 1
        self.last_error = reason
        if not self.up:
            return False
        self.up, self.since = False, wall
        return True

    def answered(self, wall: float) -> bool:
        """Note an answer; True when this is the transition back to up."""
        if self.up:
            return False
        self.up, self.since = True, wall
        return True


ErrorObserver = Callable[[str], None]  # reason


class SharedStore:
    """The Redis client of this replica, behind short timeouts and a circuit breaker."""

    def __init__(self, settings: SharedState, clock: Clock | None = None,
                 on_error: ErrorObserver | None = None,
                 client: redis.Redis | None = None, rotations: bool = True) -> None:
        if client is None:
            assert settings.redis_url is not None
            client = connect(settings.redis_url.reveal())
        self._client = client
        self.prefix = settings.key_prefix
        self._clock = clock or Clock()
        self._on_error = on_error
        self.health = Health()
        self._probe: asyncio.Task[None] | None = None
        self._probe_wake = asyncio.Event()
        self._scripts: dict[str, AsyncScript] = {}
        self._orphans: set[tuple[str, str]] = set()  # (lock key, owner) to remove when up
        # Whether refresh tokens are kept here: only they make Redis's durability matter
        # (tokens and budgets are rebuilt within a renewal after a loss).
        self._checked = not rotations
        self._closed = False

    def __repr__(self) -> str:
        return f"SharedStore(prefix={self.prefix!r}, up={self.health.up})"

    def key(self, *parts: str) -> str:
        """A key name under the configured prefix."""
        return self.prefix + ":".join(parts)

    def script(self, source: str) -> AsyncScript:
        """A Lua script (EVALSHA, loaded again by redis-py when Redis has lost it)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        return script

    @property
    def up(self) -> bool:
        return self.health.up

    async def run(self, operation: Callable[[redis.Redis], Awaitable[T]]) -> T:
        """Run ``operation`` on the client within the deadline; :class:`SharedStateDown`
        at once while Redis is down, or when this call fails (which marks it down)."""
        if not self.health.up:
            raise SharedStateDown(self.health.last_error or "down")
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                return await operation(self._client)
        except (RedisError, OSError, TimeoutError) as exc:
            reason = reason_of(exc)
            self._failed(reason)
            raise SharedStateDown(reason) from None

    async def check(self) -> None:
        """PING once, outside the breaker (no log line): SharedStateDown if no answer."""
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise SharedStateDown(reason_of(exc)) from None

    async def start(self) -> None:
        """Check Redis once (it may be down: then the probe takes over)."""
        try:
            await self.run(lambda r: r.ping())
        except SharedStateDown:
            return
        await self._check_settings()

    def _failed(self, reason: str) -> None:
        if self._on_error is not None:
            self._on_error(reason)
        if self.health.failed(reason, self._clock.wall()):
            log.warning("shared state (Redis) unreachable (%s): client-credentials sets use "
                        "tokens of their own, refresh-token sets do not refresh until it is "
                        "back; trying again every %g s", reason, PROBE_INTERVAL)
            if self._probe is None and not self._closed:
                self._probe = asyncio.create_task(self._probe_loop())  # noqa: TID251 - owned

    async def _probe_loop(self) -> None:
        try:
            while not self.health.up:
                await self._clock.wait(self._probe_wake, PROBE_INTERVAL)
                try:
                    async with asyncio.timeout(OPERATION_TIMEOUT):
                        await self._client.ping()
                except (RedisError, OSError, TimeoutError) as exc:
                    reason = reason_of(exc)
                    if reason != self.health.last_error:
                        log.debug("shared state (Redis) still unreachable (%s)", reason)
                    self.health.failed(reason, self._clock.wall())
                    continue
                down_since = self.health.since or self._clock.wall()
                self.health.answered(self._clock.wall())
                log.warning("shared state (Redis) reachable again after %.0f s",
                            self._clock.wall() - down_since)
                await self._release_orphans()
                await self._check_settings()
        finally:
            self._probe = None

    def orphan(self, key: str, owner: str) -> None:
        """A lease this replica may hold without knowing it: its SET timed out (a frozen
        Redis runs the queued command once it resumes), or its release failed. Removed
        (only if still this owner's) as soon as Redis answers, so that no replica waits
        for a holder that will never deliver."""
        self._orphans.add((key, owner))

    async def _release_orphans(self) -> None:
        release = self.script(_RELEASE)
        for key, owner in list(self._orphans):
            try:
                await self.run(partial(release, [key], [owner]))
            except SharedStateDown:
                return  # down again: the next recovery tries again
            self._orphans.discard((key, owner))

    async def _check_settings(self) -> None:
        """Warn once when Redis is set up so that it could lose a rotated refresh token.

        INFO, not CONFIG GET: managed Redis services often disable CONFIG."""
        if self._checked:
            return
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                persistence = await self._client.info("persistence")
                memory = await self._client.info("memory")
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("shared state: cannot read INFO (%s); settings not checked",
                      reason_of(exc))
            return
        self._checked = True
        for warning in settings_warnings(persistence, memory):
            log.warning("shared state (Redis): %s", warning)

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def connect(url: str) -> redis.Redis:
    """A client for ``url`` (``redis://`` or ``rediss://``) with short timeouts and no
    retries of its own: a failure reaches the circuit breaker at once."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        client_name="bol-proxy",
        decode_responses=False,
    )


def settings_warnings(persistence: dict[str, object], memory: dict[str, object]) -> list[str]:
    """What in Redis's INFO could lose a rotated refresh token (pure)."""
    warnings = []
    if str(persistence.get("aof_enabled", "1")) == "0":
        warnings.append("no append-only file (appendonly no): a restart of Redis loses "
                        "every refresh token rotated since its last snapshot, and with it the "
                        "seller's authorisation; set appendonly yes")
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy.startswith("allkeys-"):
        # The refresh record has no TTL, so volatile-* policies never pick it.
        warnings.append(f"maxmemory-policy {policy} may evict a refresh token under memory "
                        "pressure, losing the seller's authorisation; use noeviction")
    return warnings


class Lease:
    """A lock in Redis held by this replica: ``SET NX PX`` with a random owner value.

    Used as ``async with lease:`` once acquired: while the block runs, a task renews it
    every third of its length; leaving the block releases it (only if still ours)."""

    def __init__(self, store: SharedStore, key: str, owner: str, ttl: float,
                 clock: Clock) -> None:
        self.store = store
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self._clock = clock
        self.lost = False
        self._keeper: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def __repr__(self) -> str:
        return f"Lease({self.key!r}, lost={self.lost})"

    @classmethod
    async def acquire(cls, store: SharedStore, key: str, ttl: float,
                      clock: Clock) -> Lease | None:
        """The lease on ``key`` if nobody holds it; None if somebody does."""
        owner = secrets.token_hex(16)
        ms = max(1, round(ttl * 1000))
        try:
            taken = await store.run(lambda r: r.set(key, owner, nx=True, px=ms))
        except SharedStateDown:
            store.orphan(key, owner)  # the SET may still be applied
            raise
        return cls(store, key, owner, ttl, clock) if taken else None

    async def confirm(self) -> bool:
        """Extend the lease if it is still ours: False when it expired and maybe went
        to another replica, or when Redis cannot say (then it must be taken as lost)."""
        if self.lost:
            return False
        ms = max(1, round(self.ttl * 1000))
        try:
            renewed = await self.store.run(
                lambda r: self.store.script(_RENEW)(keys=[self.key], args=[self.owner, ms],
                                                    client=r))
        except SharedStateDown:
            renewed = 0
        if not renewed:
            self.lost = True
        return not self.lost

    async def release(self) -> None:
        """Remove the lease if it is still ours (if Redis is down, once it is back)."""
        try:
            await self.store.run(
                lambda r: self.store.script(_RELEASE)(keys=[self.key], args=[self.owner],
                                                      client=r))
        except SharedStateDown:
            self.store.orphan(self.key, self.owner)

    async def _keep(self) -> None:
        while not self.lost:
            await self._clock.wait(self._stop, self.ttl / 3)
            if self._stop.is_set():
                return
            if not await self.confirm():
                log.warning("lease %s lost while its work ran", self.key.rsplit(":", 1)[-1])

    async def __aenter__(self) -> Lease:
        self._keeper = asyncio.create_task(self._keep())  # noqa: TID251 - owned, awaited
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if not self.lost:
            await self.release()
