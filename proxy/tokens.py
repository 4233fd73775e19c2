"""Access tokens: one per credential set, fetched once, renewed before bol would refuse it.

Where tokens are renewed, and why it is safe:

* One token per set, in a cachetools ``TLRUCache`` keyed by the set's frozen
  configuration: a changed set is a different key, so no request ever gets a token of
  another set or of an older configuration of its own set. An entry disappears from the
  cache at its ``usable_until``, so an expired token cannot be handed out.
* A token counts from the moment its request was *sent*, and is usable until one second
  before that count runs out: bol allows only one second of clock skew.
* Single flight: one fetch per set at any moment; every concurrent caller awaits the same
  task (shielded, so a caller that disconnects does not cancel it) and gets its outcome.
* Renewal (:class:`RenewalPolicy`, pure): ``refresh_margin`` before expiry less up to a
  quarter of it in jitter, never more than half the lifetime ahead. Failures back off
  exponentially with full jitter from 1 s to 60 s; refused credentials wait at least a
  minute, since a login endpoint hammered with bad secrets blocks the address.
* A background task per set renews it: always for ``prefetch`` sets, and for on-demand
  sets only while they are used within ``idle_after``.
* A 401 from the API invalidates a token only if it is still the current one (compare,
  then invalidate), so a late 401 for an old token cannot evict a fresh one.
* Replicas that share state (:mod:`proxy.shared_tokens`) renew through a :class:`Supply`
  instead of a token request of their own: it may hand over a token another replica
  obtained. When renewals happen is decided here all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from cachetools import TLRUCache

from .config import Config, CredentialSet, Secret, TokenPolicy
from .errors import TokenUnavailable
from .oauth import NO_REFRESH_TOKEN, REJECTIONS, Grant, TokenEndpointError

log = logging.getLogger("proxy.tokens")

EXPIRY_SLACK = 1.0  # seconds: bol allows one second of clock skew past ``exp``
MAX_BACKOFF = 60.0
REJECTED_BACKOFF = 60.0
REPLACED_401_HOLD = 10.0  # a token fetched after a 401 is not itself evicted within this
SHARED_RETRY = 1.0  # seconds between attempts that wait on the shared state, not on bol

# Failures of the shared state, not of bol: retried every second (no token request was
# refused, so there is nothing to back off from), and the set keeps its valid token.
SHARED_STATE_DOWN = "shared_state_down"  # Redis unreachable: refresh-token sets wait
SHARED_BUSY = "shared_busy"  # another replica holds the lease and has not delivered yet
SHARED_CONFLICT = "shared_conflict"  # another replica overtook this one's lease
SHARED_WAITS = frozenset({SHARED_STATE_DOWN, SHARED_BUSY, SHARED_CONFLICT})


@dataclass(frozen=True, eq=False, slots=True)
class Token:
    """An access token and when (on the monotonic clock) it is renewed and expires."""

    value: Secret
    obtained_at: float
    expires_at: float
    renew_at: float
    after_401: bool = False

    @property
    def usable_until(self) -> float:
        return self.expires_at - EXPIRY_SLACK


class Clock:
    """Time as the token code sees it; tests pass a fake that they move by hand."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        """Return when ``event`` is set or ``seconds`` have passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)


class RenewalPolicy:
    """When to renew and when to retry (pure; the random source is injectable)."""

    def __init__(self, settings: TokenPolicy, rand: Callable[[], float] = random.random) -> None:
        self.settings = settings  # the tokens: section of the configuration
        self._rand = rand

    def token(self, grant: Grant, sent_at: float, *, after_401: bool = False) -> Token:
        """Place a fresh grant on the clock; ``sent_at`` is when its request left."""
        ttl = grant.expires_in if grant.expires_in is not None else self.settings.default_ttl
        margin = self.settings.refresh_margin
        # Replicas renewing in step would hit login.bol.com together: spread them over
        # the last quarter of the margin. Never earlier than the margin, so that a set
        # costs at most one token per (lifetime - margin) seconds.
        lead = min(margin - self._rand() * margin / 4, ttl / 2)
        expires_at = sent_at + ttl
        return Token(grant.access_token, sent_at, expires_at, expires_at - lead, after_401)

    def retry_delay(self, failures: int, rejected: bool) -> float:
        """Seconds before attempt ``failures + 1``: 1 s doubling to 60 s, full jitter."""
        ceiling = min(MAX_BACKOFF, 2.0 ** max(0, failures - 1))
        delay = 1.0 + self._rand() * (ceiling - 1.0)
        return max(delay, REJECTED_BACKOFF) if rejected else delay


Obtain = Callable[[], Awaitable[Grant]]  # one token request to login.bol.com


@dataclass(frozen=True, slots=True)
class Obtained:
    """A grant and when its request was sent (monotonic); ``adopted``: obtained by another
    replica and read from the shared state, so no token request was made here."""

    grant: Grant
    sent_at: float
    adopted: bool = False


class Supply(Protocol):
    """Where a set's renewals get a token when replicas share state."""

    async def obtain(self, held: Token | None, refused: Secret | None,
                     settings: TokenPolicy) -> Obtained:
        """A token better than ``held`` (the current one, if any), never ``refused`` (the
        last token bol answered 401 to)."""
        ...


SupplyFactory = Callable[[CredentialSet], "Supply | None"]
FetchObserver = Callable[[str, str], None]  # (set name, outcome: ok | rejected | failed)


class TokenSource:
    """The token of one credential set: get, renew, invalidate."""

    def __init__(
        self,
        cred: CredentialSet,
        obtain: Obtain,
        policy: RenewalPolicy,
        cache: TLRUCache[CredentialSet, Token],
        clock: Clock,
        on_fetch: FetchObserver | None = None,
        token_host: str = "login.bol.com",
        supply: Supply | None = None,
    ) -> None:
        self.cred = cred
        self.token_host = token_host  # upstream.token_url's host, for messages
        self._obtain = obtain
        self._supply = supply
        self._refused: Secret | None = None  # the last token bol answered 401 to
        self.policy = policy
        self._cache = cache
        self._clock = clock
        self._on_fetch = on_fetch
        self.last_used = -math.inf
        self.last_renewal: float | None = None  # wall clock
        self.last_error: str | None = None
        self._last_detail = ""  # of the last failure, written by oauth (never a secret)
        self.failures = 0
        self._next_attempt = -math.inf
        self._inflight: asyncio.Task[Token | TokenEndpointError] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._after_401 = False
        self._wake = asyncio.Event()
        self._closed = False

    # -- for requests

    def current(self) -> Token | None:
        """The usable token, if any (no I/O)."""
        try:
            return self._cache[self.cred]  # one lookup: get() would look twice
        except KeyError:
            return None

    async def get(self) -> Token:
        """A usable token, fetching one if there is none; else :class:`TokenUnavailable`."""
        now = self._clock.monotonic()
        self.last_used = now
        token = self.current()
        if token is not None:
            if self._renewer is None:
                self._start_renewer()
            return token
        if self._inflight is None and now < self._next_attempt:
            raise self._unavailable(now)  # backing off: do not hammer login.bol.com
        return await self.refresh()

    def invalidate(self, token: Token) -> bool:
        """Drop ``token`` after bol answered 401 to it, if it is still the current one."""
        if self.current() is not token:
            return False  # a late 401 for an older token: the current one stays
        now = self._clock.monotonic()
        if token.after_401 and now - token.obtained_at < REPLACED_401_HOLD:
            # bol refused the token that replaced a refused one: the credentials, not the
            # token, are the problem. Fetching again per request would get us blocked.
            return False
        del self._cache[self.cred]
        self._refused = token.value
        self._next_attempt = -math.inf
        self._after_401 = True
        self._wake.set()  # the renewer fetches now, even if no request follows the 401
        log.info("set %s: token refused by the API (401), fetching a new one", self.cred.name)
        return True

    async def refresh(self) -> Token:
        """Fetch a token now, or join the fetch under way (single flight)."""
        if self._closed:
            # The set was removed or changed by a reload while this request was routed:
            # an unowned fetch would put a token of a stale set back into the cache.
            raise TokenUnavailable(f"credential set '{self.cred.name}' was just reconfigured; "
                                   "retry the request", 1.0)
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch())  # noqa: TID251 - owned
        outcome = await asyncio.shield(self._inflight)
        if isinstance(outcome, Token):
            return outcome
        raise self._unavailable(self._clock.monotonic())

    # -- the fetch

    async def _fetch(self) -> Token | TokenEndpointError:
        try:
            if self._supply is None:
                sent_at = self._clock.monotonic()
                grant = await self._obtain()
                adopted = False
            else:
                obtained = await self._supply.obtain(self.current(), self._refused,
                                                     self.policy.settings)
                grant, sent_at, adopted = obtained.grant, obtained.sent_at, obtained.adopted
        except TokenEndpointError as exc:
            return self._failed(exc)
        except Exception as exc:  # a bug or a disk error must not wedge the set
            if self.last_error != "internal":  # one traceback, not one per retry
                log.exception("set %s: token fetch failed unexpectedly", self.cred.name)
            return self._failed(TokenEndpointError("internal", type(exc).__name__))
        finally:
            self._inflight = None
        # Whether this token replaces one bol refused is decided now, not when the fetch
        # began: a 401 may arrive while it is under way, and a failed fetch replaces nothing.
        token = self.policy.token(grant, sent_at, after_401=self._after_401)
        if token.usable_until <= self._clock.monotonic():
            # Expired on arrival (a slow answer or a tiny expires_in): never hand it out,
            # and back off rather than fetch again at once.
            return self._failed(TokenEndpointError("expired", "the token expired on arrival"))
        self._after_401 = False
        self._refused = None
        self._cache[self.cred] = token
        if self.failures:
            log.info("set %s: token renewal recovered after %d failed attempts",
                     self.cred.name, self.failures)
        self.failures, self.last_error = 0, None
        self._next_attempt = -math.inf
        self.last_renewal = self._clock.wall()
        self._observe("adopted" if adopted else "ok")
        log.debug("set %s: %s token valid for %.0f s", self.cred.name,
                  "shared" if adopted else "new", token.expires_at - self._clock.monotonic())
        self._wake.set()
        if self._renewer is None:
            self._start_renewer()
        return token

    def _failed(self, exc: TokenEndpointError) -> TokenEndpointError:
        now = self._clock.monotonic()
        self.failures += 1
        if exc.code in SHARED_WAITS:
            # No token request was refused: try again soon, so that the set heals within
            # seconds of Redis (or the replica renewing it) answering again.
            self._next_attempt = now + SHARED_RETRY
            if self.last_error != exc.code:
                log.warning("set %s: cannot renew now: %s; trying again every %g s",
                            self.cred.name, exc.detail, SHARED_RETRY)
            self.last_error = exc.code
            self._wake.set()
            return exc
        delay = self.policy.retry_delay(self.failures, exc.needs_operator)
        self._next_attempt = now + delay
        self._observe("rejected" if exc.rejected else "failed")
        if exc.needs_operator and self.last_error != exc.code:
            what = (f"{self.token_host} refused the credentials ({exc.code})" if exc.rejected
                    else exc.detail)
            log.error("set %s: %s; retrying in %.0f s", self.cred.name, what, delay)
        elif exc.needs_operator:  # said once above; the retries only at debug level
            log.debug("set %s: still %s; retrying in %.0f s", self.cred.name, exc.code, delay)
        else:
            log.warning("set %s: token request failed (%s); attempt %d, retrying in %.1f s",
                        self.cred.name, exc.detail, self.failures, delay)
        self.last_error, self._last_detail = exc.code, exc.detail
        self._wake.set()
        return exc

    def _observe(self, outcome: str) -> None:
        if self._on_fetch is not None:
            self._on_fetch(self.cred.name, outcome)

    def _unavailable(self, now: float) -> TokenUnavailable:
        retry_after = max(1.0, self._next_attempt - now)
        why = {
            None: "no token fetched yet",
            "malformed": "the token endpoint gave an unusable answer",
            "timeout": "the token endpoint did not answer in time",
            "expired": "the token endpoint answered with an already expired token",
            SHARED_STATE_DOWN: "the shared state (Redis) is unreachable, and a refresh-token "
                               "set never refreshes without it",
            SHARED_BUSY: "another replica is renewing it and has not stored a token yet",
            SHARED_CONFLICT: "another replica renewed it meanwhile",
        }.get(self.last_error, f"the last token request failed ({self.last_error})")
        if self.last_error in REJECTIONS:
            why = f"{self.token_host} refused the credentials ({self.last_error})"
        elif self.last_error == "unreachable":
            # Which of DNS, a refused connection or TLS it was is the operator's next step.
            why = f"the token endpoint is unreachable: {self._last_detail}"
        elif self.last_error == NO_REFRESH_TOKEN:
            why = "there is no refresh token yet: run bol-proxy authorize " + self.cred.name
        return TokenUnavailable(
            f"no valid token for credential set '{self.cred.name}': {why}; "
            f"next attempt in {math.ceil(retry_after)} s",
            retry_after,
        )

    # -- background renewal

    def start(self) -> None:
        """Fetch now and keep renewing (``prefetch`` sets)."""
        self._start_renewer()

    def _start_renewer(self) -> None:
        # One renewer per set: Tokens.start() runs again on every reload.
        if not self._closed and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop())  # noqa: TID251 - owned

    async def _renew_loop(self) -> None:
        try:
            while True:
                now = self._clock.monotonic()
                idle = now - self.last_used >= self.policy.settings.idle_after
                if not self.cred.prefetch and idle:
                    log.debug("set %s: idle, no longer renewed", self.cred.name)
                    return  # idle on-demand sets cost no token requests
                token = self.current()
                due = max(token.renew_at if token else now, self._next_attempt)
                if now >= due and self._inflight is None:
                    with contextlib.suppress(TokenUnavailable):
                        await self.refresh()
                    continue
                self._wake.clear()
                await self._clock.wait(self._wake, max(due - now, 0.0) if now < due else 1.0)
        finally:
            self._renewer = None

    async def close(self) -> None:
        """Stop renewing and wait for the tasks of this set to end."""
        self._closed = True
        tasks = [t for t in (self._renewer, self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


ObtainFactory = Callable[[CredentialSet], Obtain]


class Tokens:
    """All token sources of the running configuration, created on first use."""

    def __init__(
        self,
        config: Config,
        obtain_for: ObtainFactory,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
        on_fetch: FetchObserver | None = None,
        supply_for: SupplyFactory | None = None,
    ) -> None:
        self._clock = clock or Clock()
        self._obtain_for = obtain_for
        self._supply_for = supply_for
        self._rand = rand
        self._on_fetch = on_fetch
        self._cache: TLRUCache[CredentialSet, Token] = TLRUCache(
            maxsize=math.inf, ttu=lambda _k, v, _now: v.usable_until, timer=self._clock.monotonic
        )
        self._sources: dict[str, TokenSource] = {}
        self.config = config
        self._token_host = config.upstream.token_host  # once, not per set
        self._policy = RenewalPolicy(config.tokens, rand)

    def source(self, name: str) -> TokenSource:
        """The source of set ``name`` (which must exist in the configuration)."""
        source = self._sources.get(name)
        if source is None:
            cred = self.config.credentials[name]
            supply = self._supply_for(cred) if self._supply_for is not None else None
            source = TokenSource(cred, self._obtain_for(cred), self._policy, self._cache,
                                 self._clock, self._on_fetch, token_host=self._token_host,
                                 supply=supply)
            self._sources[name] = source
        return source

    def active(self) -> Iterator[TokenSource]:
        """The sources created so far (prefetch sets and on-demand sets used once)."""
        return iter(list(self._sources.values()))

    def wall_time(self, monotonic: float) -> float:
        """A point on the monotonic clock as Unix time, for people to read."""
        return self._clock.wall() + (monotonic - self._clock.monotonic())

    def start(self) -> None:
        """Start renewing every ``prefetch`` set."""
        for cred in self.config.credentials.values():
            if cred.prefetch:
                self.source(cred.name).start()

    async def apply(self, config: Config) -> None:
        """Follow a reloaded configuration: unchanged sets keep their tokens."""
        old = self._sources
        self.config = config
        self._token_host = config.upstream.token_host
        if config.tokens != self._policy.settings:
            self._policy = RenewalPolicy(config.tokens, self._rand)
        keep = {n: s for n, s in old.items() if config.credentials.get(n) == s.cred}
        for source in keep.values():
            source.policy = self._policy  # applies from the next renewal on
            source.token_host = self._token_host
        self._sources = keep
        for name, source in old.items():
            if name not in keep:
                await source.close()
                self._cache.pop(source.cred, None)
        self.start()

    async def close(self) -> None:
        for source in list(self._sources.values()):
            await source.close()
        self._sources.clear()
