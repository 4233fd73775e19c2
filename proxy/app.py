"""The running proxy: its resources, its listeners, reload and graceful stop.

:class:`ProxyServer` owns the upstream connection pool (:mod:`proxy.upstream`, which
forwards every request), one aiohttp ``ClientSession`` that only fetches tokens from the
token endpoint (no cookie jar, no redirects, no headers of aiohttp's own), the token
sources, the forwarder, the admin endpoints and the listeners
(:mod:`proxy.listeners`), opened in ``start()`` and closed in reverse order in
``stop()``. It serves through aiohttp's low-level ``web.Server`` with one handler: the
proxy has exactly two destinations (``/_proxy/`` or the forwarder), so a router,
middleware and the per-request exception aiohttp raises for unrouted paths would be pure
overhead, and an authority-form CONNECT target (which no route matches) still reaches
the forwarder to be refused with a problem answer.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from . import logs
from .admin import Admin, iso
from .budgets import LocalBudgets, SharedCount
from .config import Config, CredentialSet, changes
from .errors import ConfigError
from .forward import Forwarder, Settings
from .listeners import Listeners
from .metrics import Metrics
from .oauth import TOKEN_ANSWER_TIMEOUT, Grant, TokenClient, client_credentials_form
from .ratelimit import RateLimiter
from .refresh import RefreshGrant, RefreshTokenFile
from .server import Server, check_aiohttp
from .standin import StandIn, is_login_path
from .tokens import Clock, Obtain, Supply, Tokens
from .upstream import UpstreamPool

if TYPE_CHECKING:  # redis is imported only when shared_state is configured
    from .shared import SharedStore

log = logging.getLogger("proxy")

# Headers aiohttp's client would add on its own: token requests carry exactly the
# headers oauth.TokenClient sets.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
POOL_SIZE = 256  # connections to bol in use at most; its rate limits bite long before
KEEPALIVE = 75.0  # seconds an idle client connection is kept (as run_app does)
LINGER = 2.0  # seconds to drain a refused body before closing, so the answer is read
CANCEL_GRACE = 0.2  # aiohttp waits this, cancels what is left, and waits it again


def tls_context(config: Config) -> ssl.SSLContext:
    """The system's trust store, plus ``upstream.ca_file`` (corporate TLS interception)."""
    ctx = ssl.create_default_context()
    if config.upstream.ca_file:
        ctx.load_verify_locations(config.upstream.ca_file)
    return ctx


def upstream_pool(config: Config) -> UpstreamPool:
    """Connections to ``upstream.api_url`` for forwarded requests."""
    return UpstreamPool(config.upstream.api_url, tls_context(config),
                        config.upstream.connect_timeout, POOL_SIZE)


def client_session(config: Config) -> aiohttp.ClientSession:
    """The session to the token endpoint: transparent, kept alive, no cookies kept."""
    connector = aiohttp.TCPConnector(limit=64, ssl=tls_context(config),
                                     ttl_dns_cache=300, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # tools must not see each other's cookies
        skip_auto_headers=SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
    )


def _same_budget(old: CredentialSet, new: CredentialSet | None) -> bool:
    """Whether a reloaded set still spends the same budgets at bol (the same client)."""
    return new is not None and (new.client_id, new.grant, new.refresh_token_file) == (
        old.client_id, old.grant, old.refresh_token_file)


class ProxyServer:
    """The proxy behind its listeners, with reload and graceful stop."""

    def __init__(self, config: Config, clock: Clock | None = None,
                 rand: Callable[[], float] = random.random,
                 before_spend: Callable[[str], Awaitable[None]] | None = None) -> None:
        """``before_spend`` is awaited, with the set's name, by a replica that holds the
        lease on a refresh-token set, right before it confirms the lease and spends the
        refresh token: tests freeze a holder there."""
        self.config = config
        self._clock = clock or Clock()
        self._rand = rand
        self._before_spend = before_spend
        self.shared: SharedStore | None = None
        self.metrics = Metrics()
        self._refresh_files: dict[str, RefreshTokenFile] = {}
        self._started = self._stopped = False
        logs.quiet_malformed_requests()

    async def start(self) -> None:
        """Open the resources and every listener; raises :class:`CannotListen` (an
        ``OSError``) naming the port and whose it is if one cannot be opened."""
        check_aiohttp()
        config, clock = self.config, self._clock
        self.session = client_session(config)
        self.token_client = TokenClient(self.session, config.upstream.token_url,
                                        config.upstream.connect_timeout)
        if config.shared_state.enabled:
            from .shared import SharedStore

            rotations = any(cred.grant == "refresh_token"
                            for cred in config.credentials.values())
            self.shared = SharedStore(config.shared_state, clock, self.metrics.shared_error,
                                      rotations=rotations)
            await self.shared.start()  # if Redis is down, the proxy starts all the same
        self.tokens = Tokens(config, self._obtainer, clock, self._rand,
                             self.metrics.token_fetched,
                             self._supply if self.shared is not None else None)
        server = Server(
            self._handle,
            roles=lambda: self.listeners.roles,
            handler_cancellation=True,  # a vanished client cancels its upstream exchange
            access_log=None,  # the forwarder writes a cheaper line of its own
            keepalive_timeout=KEEPALIVE,
            auto_decompress=False,  # bodies pass as sent (a gzip upload stays gzip)
            lingering_time=LINGER,
        )
        # stop() waits for in-flight requests itself; aiohttp's own wait (which it would
        # spend twice: before and after cancelling) only covers what is left after it.
        self._runner = web.ServerRunner(server, shutdown_timeout=CANCEL_GRACE)
        await self._runner.setup()
        self.listeners = Listeners(self._runner, server)
        local = LocalBudgets(self.metrics.forget_bucket)
        self.limiter = RateLimiter(local, clock, clock.wall, self.metrics,
                                   self._shared_count(config, local))
        self.forwarder = Forwarder(Settings.from_config(config), self.tokens,
                                   upstream_pool(config), self.metrics, self.listeners.admits,
                                   self.limiter if config.rate_limits.enabled else None)
        self.admin = Admin(self.tokens, self.metrics, self._limits, self.shared)
        self.metrics.watch_shared(self.shared)
        self.metrics.watch_budgets(self.limiter.snapshot)
        self.standin = StandIn(config, self.metrics, self.listeners.admits,
                               lambda: self.listeners.roles, clock.wall)
        self.metrics.watch_tokens(self.tokens.active, clock.monotonic,
                                  self._authorisation_expiry)
        self._started = True
        try:
            await self.listeners.open(config, publish=True)
        except BaseException:
            await self._close()
            raise
        # Only once listening: a proxy that cannot start must not spend token requests.
        self.tokens.start()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.raw_path.startswith("/_proxy/"):
            return await self.admin.handle(request)
        if is_login_path(request.raw_path, self.config.credentials):
            return await self.standin.handle(request)
        return await self.forwarder.handle(request)

    def _refresh_file(self, cred: CredentialSet) -> RefreshTokenFile:
        assert cred.refresh_token_file is not None
        store = self._refresh_files.get(cred.name)
        if store is None or store.path != cred.refresh_token_file:
            store = RefreshTokenFile(cred.refresh_token_file, self._clock.wall)
            self._refresh_files[cred.name] = store
        return store

    def _obtainer(self, cred: CredentialSet) -> Obtain:
        """How set ``cred`` gets its tokens: client credentials, or its refresh token."""
        if cred.grant == "refresh_token" and cred.refresh_token_file is not None:
            return RefreshGrant(cred, self.token_client, self._refresh_file(cred),
                                self._clock.wall)
        client = self.token_client

        async def client_credentials() -> Grant:
            return await client.request(cred, client_credentials_form())

        return client_credentials

    def _shared_count(self, config: Config, local: LocalBudgets) -> SharedCount | None:
        """Rate budgets counted by every replica in Redis, when replicas share state."""
        if self.shared is None:
            return None
        from .shared_budgets import SharedBudgets

        # A request counts against the budget until bol answers, at most its timeout.
        return SharedBudgets(self.shared, config.credentials.values(), config.upstream.timeout,
                             local)

    def _limits(self) -> dict[str, object]:
        """``/_proxy/limits``: every bucket of every set."""
        sets: dict[str, dict[str, object]] = {}
        wall = self._clock.wall()
        for snapshot, waiting in self.limiter.snapshot():
            sets.setdefault(snapshot.set_name, {})[snapshot.bucket] = {
                "limit": snapshot.limit, "remaining": snapshot.remaining,
                "reset": iso(wall + snapshot.reset_in) if snapshot.reset_in is not None
                else None,
                "blocked_until": iso(wall + snapshot.blocked_for) if snapshot.blocked_for
                else None,
                "in_flight": snapshot.in_flight, "waiting": waiting,
            }
        rate_limits = self.config.rate_limits
        return {"enabled": rate_limits.enabled, "max_wait": rate_limits.max_wait,
                "sets": sets}

    def _supply(self, cred: CredentialSet) -> Supply:
        """How set ``cred`` renews through the shared state (shared_state is configured)."""
        from .shared_tokens import SharedRefresh, SharedSupply, TokenGroup, lease_ttl

        assert self.shared is not None
        group = TokenGroup(self.shared, cred, self._clock)
        lease = lease_ttl(self.config.upstream.connect_timeout, TOKEN_ANSWER_TIMEOUT)
        if cred.grant == "refresh_token" and cred.refresh_token_file is not None:
            refresh = SharedRefresh(group, self.token_client, self._refresh_file(cred),
                                    self._clock.wall, self._before_spend,
                                    self.metrics.refresh_conflict)
            return SharedSupply(group, self._clock, lease, refresh=refresh)
        return SharedSupply(group, self._clock, lease, fetch=self._obtainer(cred))

    def _authorisation_expiry(self, name: str) -> float | None:
        store = self._refresh_files.get(name)
        return store.authorisation_expiry() if store is not None else None

    def port(self, name: str | None = None) -> int:
        """The bound port of the main listener, or of set ``name``'s dedicated one."""
        return self.listeners.port(self.config, name)

    async def reload(self, config: Config) -> None:
        """Apply a new configuration without dropping in-flight requests."""
        if config.upstream.ca_file != self.config.upstream.ca_file:
            log.warning("upstream.ca_file changed: it takes effect after a restart")
        if config.shared_state != self.config.shared_state:
            log.warning("shared_state changed: it takes effect after a restart")
        try:
            opened, closed = await self.listeners.open(config)
        except OSError as exc:
            raise ConfigError(str(exc)) from exc
        self.token_client.url = config.upstream.token_url
        old_up, new_up = self.config.upstream, config.upstream
        if (old_up.api_url, old_up.connect_timeout) != (new_up.api_url, new_up.connect_timeout):
            retired, self.forwarder.pool = self.forwarder.pool, upstream_pool(config)
            retired.retire()  # in-flight answers finish on their connections
        self.forwarder.settings = Settings.from_config(config)
        self.forwarder.limiter = self.limiter if config.rate_limits.enabled else None
        self.limiter.follow(config.credentials.values(),
                            [name for name, cred in self.config.credentials.items()
                             if not _same_budget(cred, config.credentials.get(name))])
        self.standin.config = config
        # Connections to a port that is gone, or now means another set, or no set, close.
        self.listeners.publish(config)
        await self.forwarder.tokens.apply(config)
        old, self.config = self.config, config
        log.info("configuration reloaded from %s: %s; listening on %s", config.source,
                 "; ".join(changes(old, config, opened, closed)),
                 ", ".join(self.listeners.addresses()))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within ``shutdown_timeout``.
        Harmless before ``start()`` and when called twice."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = self.admin.shutting_down = True
        await self.listeners.close()
        log.info("listeners closed; %d requests in flight", self.metrics.in_flight)
        self.limiter.stop_waiting_at(self._clock.monotonic() + self.config.shutdown_timeout)
        await self._clock.wait(self.forwarder.drained, self.config.shutdown_timeout)
        if self.metrics.in_flight:
            log.warning("shutdown: %d requests still in flight after %.0f s are cancelled",
                        self.metrics.in_flight, self.config.shutdown_timeout)
        await self._close()

    async def _close(self) -> None:
        await self._runner.cleanup()  # stops the listeners, then waits for handlers
        self.listeners.forget()
        await self.tokens.close()
        if self.shared is not None:
            await self.shared.close()
        await self.forwarder.pool.close()
        await self.session.close()
