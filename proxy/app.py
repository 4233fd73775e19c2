"""Builds the aiohttp application and runs its listeners; follows reloads.

The application owns one ``ClientSession`` (no decompression, no cookie jar, no
redirects, no injected headers), the token sources and the forwarder; they live in a
``cleanup_ctx`` under typed ``AppKey``s and are closed in reverse order on shutdown.
:class:`ProxyServer` adds the listeners: the main one plus one per dedicated set port.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import http_parser, web

from . import logs
from .admin import Admin
from .config import Config, CredentialSet
from .errors import (
    ConfigError,
    MethodNotAllowed,
    NotFound,
    StartupError,
    problem_response,
)
from .forward import Forwarder, Settings
from .metrics import Metrics
from .oauth import Grant, TokenClient, client_credentials_form
from .refresh import RefreshGrant, RefreshTokenFile
from .tokens import Clock, Obtain, Tokens

log = logging.getLogger("proxy")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FORWARDER = web.AppKey("forwarder", Forwarder)
ADMIN = web.AppKey("admin", Admin)
METRICS = web.AppKey("metrics", Metrics)
REFRESH_FILES = web.AppKey("refresh_files", dict[str, RefreshTokenFile])
TOKEN_CLIENT = web.AppKey("token_client", TokenClient)

# Headers aiohttp's client would add on its own; only what the tool sent goes to bol.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
POOL_SIZE = 256  # upstream connections kept at most; bol's rate limits bite long before
KEEPALIVE = 75.0  # seconds an idle client connection is kept (as run_app does)


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


def client_session(config: Config) -> aiohttp.ClientSession:
    """The one session to bol: transparent, pooled, kept alive."""
    ctx = ssl.create_default_context()
    if config.upstream.ca_file:
        ctx.load_verify_locations(config.upstream.ca_file)  # corporate TLS interception
    connector = aiohttp.TCPConnector(limit=POOL_SIZE, ssl=ctx, ttl_dns_cache=300,
                                     keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # tools must not see each other's cookies
        skip_auto_headers=SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
    )


def build_app(config: Config, clock: Clock | None = None,
              rand: Callable[[], float] = random.random) -> web.Application:
    """The proxy application for ``config``; ``clock`` and ``rand`` are for tests."""
    app = web.Application(handler_args={"auto_decompress": False})
    metrics = Metrics()
    app[METRICS] = metrics
    app[REFRESH_FILES] = {}
    clock = clock or Clock()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        session = client_session(config)
        token_client = TokenClient(session, config.upstream.token_url,
                                   config.upstream.connect_timeout + 20)
        app[TOKEN_CLIENT] = token_client
        files = app[REFRESH_FILES]

        def obtain_for(cred: CredentialSet) -> Obtain:
            if cred.grant == "refresh_token" and cred.refresh_token_file is not None:
                store = files.get(cred.name)
                if store is None or store.path != cred.refresh_token_file:
                    store = files[cred.name] = RefreshTokenFile(cred.refresh_token_file,
                                                                clock.wall)
                return RefreshGrant(cred, token_client, store, clock.wall)

            async def client_credentials() -> Grant:
                return await token_client.request(cred, client_credentials_form())

            return client_credentials

        tokens = Tokens(config, obtain_for, clock, rand, metrics.token_fetched)
        forwarder = Forwarder(Settings.from_config(config), tokens, session, metrics)
        app[FORWARDER] = forwarder
        metrics.watch_tokens(lambda: forwarder.tokens.active(), clock.monotonic,
                             lambda name: _authorisation_expiry(files, name))
        yield
        await tokens.close()
        await session.close()

    app.cleanup_ctx.append(resources)

    admin = Admin(lambda: app[FORWARDER].tokens, metrics)
    app[ADMIN] = admin
    app.router.add_routes(admin.routes())

    @web.middleware
    async def dispatch(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Everything but /_proxy/ goes to the forwarder, including targets no route can
        # match (CONNECT's authority form), so that every refusal is a problem answer.
        if request.raw_path.startswith("/_proxy/"):
            refused = request.match_info.http_exception
            if refused is None:
                return await handler(request)
            if refused.status == 405:
                return problem_response(MethodNotAllowed("the proxy's endpoints take GET"))
            return problem_response(NotFound("the proxy has /_proxy/health, /_proxy/ready "
                                             "and /_proxy/metrics"))
        return await app[FORWARDER].handle(request)

    app.middlewares.append(dispatch)
    return app


def _authorisation_expiry(files: dict[str, RefreshTokenFile], name: str) -> float | None:
    store = files.get(name)
    return store.authorisation_expiry() if store is not None else None


class ProxyServer:
    """The application behind its listeners, with reload and graceful stop."""

    def __init__(self, config: Config, clock: Clock | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.config = config
        logs.quiet_malformed_requests()
        self.app = build_app(config, clock, rand)
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a vanished client cancels its upstream exchange
            access_log=None,
            keepalive_timeout=KEEPALIVE,
            auto_decompress=False,  # bodies pass as sent (a gzip upload stays gzip)
            shutdown_timeout=config.shutdown_timeout,
        )
        self._sites: dict[tuple[str, int], web.TCPSite] = {}

    @property
    def forwarder(self) -> Forwarder:
        return self.app[FORWARDER]

    async def start(self) -> None:
        """Start the application and every listener; raises OSError if a port is taken."""
        require_c_parser()
        await self._runner.setup()
        try:
            await self._listen(self.config)
        except BaseException:
            await self._runner.cleanup()
            raise
        # Only once listening: a proxy that cannot start must not spend token requests.
        self.forwarder.tokens.start()

    def port(self, name: str | None = None) -> int:
        """The bound port of the main listener, or of set ``name``'s dedicated one."""
        config = self.config
        wanted = config.listen.port if name is None else config.credentials[name].port
        key = (config.listen.host, wanted or 0)
        site = self._sites[key]
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def _listen(self, config: Config) -> None:
        host = config.listen.host
        wanted = {(host, config.listen.port)} | {(host, p) for p in config.dedicated_ports()}
        started: list[tuple[str, int]] = []
        try:
            for key in sorted(wanted - self._sites.keys()):
                site = web.TCPSite(self._runner, key[0], key[1], reuse_address=True)
                await site.start()
                self._sites[key] = site
                started.append(key)
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
        try:
            await self._listen(config)
        except OSError as exc:
            raise ConfigError(f"cannot listen as configured: {exc.strerror or exc}") from exc
        self.app[TOKEN_CLIENT].url = config.upstream.token_url
        self.forwarder.settings = Settings.from_config(config)
        await self.forwarder.tokens.apply(config)
        self.config = config
        names = ", ".join(sorted(config.credentials)[:20])
        log.info("configuration reloaded from %s: %d credential sets (%s)", config.source,
                 len(config.credentials), names)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within ``shutdown_timeout``."""
        if ADMIN in self.app:
            self.app[ADMIN].shutting_down = True
        await self._runner.cleanup()
        self._sites.clear()
