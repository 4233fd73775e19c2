"""The running proxy: its resources, its listeners, reload and graceful stop.

:class:`ProxyServer` owns the upstream connection pool (:mod:`proxy.upstream`), one
aiohttp ``ClientSession`` for token requests (no cookie jar, no redirects, no injected
headers), the token sources, the forwarder and the admin endpoints, opened in
``start()`` and closed in reverse order in ``stop()``. It serves
through aiohttp's low-level ``web.Server`` with one handler: the proxy has exactly two
destinations (``/_proxy/`` or the forwarder), so a router, middleware and the
per-request exception aiohttp raises for unrouted paths would be pure overhead, and an
authority-form CONNECT target (which no route matches) still reaches the forwarder to be
refused with a problem answer. Listeners: the main one plus one per dedicated set port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import http_parser, web

from . import logs
from .admin import Admin
from .config import Config, CredentialSet
from .errors import ConfigError, StartupError
from .forward import Forwarder, Settings
from .metrics import Metrics
from .oauth import TOKEN_ANSWER_TIMEOUT, Grant, TokenClient, client_credentials_form
from .refresh import RefreshGrant, RefreshTokenFile
from .server import Roles, Server
from .tokens import Clock, Obtain, Supply, Tokens
from .upstream import UpstreamPool

if TYPE_CHECKING:  # redis is imported only when shared_state is configured
    from .shared import SharedStore

log = logging.getLogger("proxy")

# Headers aiohttp's client would add on its own; only what the tool sent goes to bol.
# Token requests carry exactly the headers oauth.TokenClient sets, nothing aiohttp adds.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
POOL_SIZE = 256  # connections to bol in use at most; its rate limits bite long before
KEEPALIVE = 75.0  # seconds an idle client connection is kept (as run_app does)
LINGER = 2.0  # seconds to drain a refused body before closing, so the answer is read
CANCEL_GRACE = 0.2  # aiohttp waits this, cancels what is left, and waits it again


def require_c_parser() -> None:
    """Refuse to serve on aiohttp's pure-Python HTTP parser.

    The C parser (llhttp) refuses Content-Length with Transfer-Encoding, duplicate
    Content-Length, obs-fold and NUL in targets; the Python fallback has had request
    smuggling flaws. It is missing when aiohttp was built without its extensions or
    AIOHTTP_NO_EXTENSIONS is set.
    """
    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        raise StartupError("aiohttp runs without its C HTTP parser (AIOHTTP_NO_EXTENSIONS set, "
                           "or an install without wheels); refusing to serve")


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    assert server is not None and hasattr(server, "sockets")
    port: int = server.sockets[0].getsockname()[1]
    return port


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
    """The session to login.bol.com: transparent, kept alive, no cookies kept."""
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
        self._sites: dict[tuple[str, int], web.TCPSite] = {}
        self._stopped = False
        logs.quiet_malformed_requests()

    async def start(self) -> None:
        """Open the resources and every listener; raises OSError if a port is taken."""
        require_c_parser()
        config, clock = self.config, self._clock
        self.session = client_session(config)
        self.token_client = TokenClient(self.session, config.upstream.token_url,
                                        config.upstream.connect_timeout)
        if config.shared_state.enabled:
            from .shared import SharedStore

            self.shared = SharedStore(config.shared_state, clock, self.metrics.shared_error)
            await self.shared.start()  # if Redis is down, the proxy starts all the same
        self.tokens = Tokens(config, self._obtainer, clock, self._rand,
                             self.metrics.token_fetched,
                             self._supply if self.shared is not None else None)
        self.forwarder = Forwarder(Settings.from_config(config), self.tokens,
                                   upstream_pool(config), self.metrics)
        self.admin = Admin(self.tokens, self.metrics, self.shared)
        self.metrics.watch_shared(self.shared)
        self.metrics.watch_tokens(self.tokens.active, clock.monotonic,
                                  self._authorisation_expiry)
        server = self._server = Server(
            self._handle,
            roles=lambda: self.forwarder.roles,
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
        try:
            await self._listen(config, publish=True)
        except BaseException:
            await self._close()
            raise
        # Only once listening: a proxy that cannot start must not spend token requests.
        self.tokens.start()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.raw_path.startswith("/_proxy/"):
            return await self.admin.handle(request)
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
        config = self.config
        wanted = config.listen.port if name is None else config.credentials[name].port
        return _bound_port(self._sites[(config.listen.host, wanted or 0)])

    async def _listen(self, config: Config, publish: bool = False) -> None:
        """Open the listeners ``config`` wants and close the others. With ``publish`` (at
        start, when the forwarder already routes by ``config``) each new port gets its
        role as soon as it listens; a reload publishes them once its settings apply."""
        host = config.listen.host
        dedicated = config.dedicated_ports()
        wanted = {(host, config.listen.port)} | {(host, p) for p in dedicated}
        started: list[tuple[str, int]] = []
        try:
            for key in sorted(wanted - self._sites.keys()):
                site = web.TCPSite(self._runner, key[0], key[1], reuse_address=True)
                await site.start()
                self._sites[key] = site
                started.append(key)
                if publish:
                    self.forwarder.roles[_bound_port(site)] = dedicated.get(key[1], "")
        except OSError:
            for key in started:
                await self._sites.pop(key).stop()
            raise
        for key in sorted(self._sites.keys() - wanted):
            await self._sites.pop(key).stop()  # open connections finish their requests

    async def reload(self, config: Config) -> None:
        """Apply a new configuration without dropping in-flight requests."""
        if config.upstream.ca_file != self.config.upstream.ca_file:
            log.warning("upstream.ca_file changed: it takes effect after a restart")
        if config.shared_state != self.config.shared_state:
            log.warning("shared_state changed: it takes effect after a restart")
        try:
            await self._listen(config)
        except OSError as exc:
            raise ConfigError(f"cannot listen as configured: {exc.strerror or exc}") from exc
        self.token_client.url = config.upstream.token_url
        old_up, new_up = self.config.upstream, config.upstream
        if (old_up.api_url, old_up.connect_timeout) != (new_up.api_url, new_up.connect_timeout):
            retired, self.forwarder.pool = self.forwarder.pool, upstream_pool(config)
            retired.retire()  # in-flight answers finish on their connections
        self.forwarder.settings = Settings.from_config(config)
        roles = self.forwarder.roles
        roles.clear()
        roles.update(self._roles(config))
        # Connections to a port that is gone, or now means another set, or no set.
        self._server.close_connections(roles)
        await self.forwarder.tokens.apply(config)
        self.config = config
        names = ", ".join(sorted(config.credentials)[:20])
        log.info("configuration reloaded from %s: %d credential sets (%s)", config.source,
                 len(config.credentials), names)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within ``shutdown_timeout``."""
        if self._stopped:
            return
        self._stopped = self.admin.shutting_down = True
        for site in self._sites.values():
            await site.stop()
        self._sites.clear()
        # Stop accepting on open connections too: idle ones close now, busy ones after
        # their answer, and a request that still arrives gets 503 listener-closed.
        self.forwarder.roles.clear()
        self._server.close_connections({})
        log.info("listeners closed; %d requests in flight", self.metrics.in_flight)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.forwarder.drained.wait(), self.config.shutdown_timeout)
        if self.metrics.in_flight:
            log.warning("shutdown: %d requests still in flight after %.0f s are cancelled",
                        self.metrics.in_flight, self.config.shutdown_timeout)
        await self._close()

    def _roles(self, config: Config) -> Roles:
        """What each listener's port means now: the main listener, or a set's own."""
        dedicated = config.dedicated_ports()
        return {_bound_port(site): dedicated.get(port, "") for (_, port), site in
                self._sites.items()}

    async def _close(self) -> None:
        await self._runner.cleanup()  # stops the listeners, then waits for handlers
        self._sites.clear()
        await self.tokens.close()
        if self.shared is not None:
            await self.shared.close()
        await self.forwarder.pool.close()
        await self.session.close()
