"""Shared fixtures: a recording imitation of bol, the proxy in front of it, a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.app import ProxyServer
from proxy.config import Config, validate
from proxy.demo import (
    DEFAULT_LIMITS,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    OFFER,
    FakeBol,
    demo_config,
    start_fake,
)
from proxy.tokens import Clock

SECRET_B = "second-secret-value-0123456789"
MB = 1024 * 1024
# The suite sends the imitation of bol far more requests than bol's budgets allow, on
# purpose; the budgets themselves are tested in test_demo with bol's numbers.
ROOMY_LIMITS = {endpoint: (1_000_000, 1.0) for endpoint in DEFAULT_LIMITS}
# A write the imitation accepts (202): the stock of its first offer.
STOCK_UPDATE = f"/retailer/offers/{OFFER['offerId']}/stock"


def stock_update(size: int) -> bytes:
    """A valid body for ``STOCK_UPDATE``, padded with JSON whitespace to ``size`` bytes."""
    body = b'{"amount": 3, "managedByRetailer": false}'
    assert size >= len(body)
    return body + b" " * (size - len(body))


class FakeClock(Clock):
    """A clock that moves only when a test says so; waits end when it passes them."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_800_000_000.0 + self.now

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        if event.is_set():
            return
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + seconds, timer)
        self._sleepers.append(entry)
        woken = asyncio.get_running_loop().create_task(event.wait())
        try:
            await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            self._sleepers.remove(entry)

    @property
    def sleeping(self) -> int:
        """How many waits are pending on this clock now."""
        return len(self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move time on, wake every wait that is due, and let the loop settle."""
        self.now += seconds
        for deadline, timer in list(self._sleepers):
            if deadline <= self.now and not timer.done():
                timer.set_result(None)
        await settle()


async def settle(rounds: int = 50) -> None:
    """Let ready callbacks run (no wall-clock waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Wait, bounded, for a condition that real I/O elsewhere will make true."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the condition has no event to wait on
            await asyncio.sleep(0.005)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def bol() -> AsyncIterator[tuple[FakeBol, str]]:
    """The recording imitation of bol.com, with a second client registered."""
    fake = FakeBol(clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET, "client-b": SECRET_B},
                   limits=dict(ROOMY_LIMITS))
    runner, url = await start_fake(fake)
    yield fake, url
    await runner.cleanup()


@pytest.fixture
async def demo() -> AsyncIterator[tuple[FakeBol, str]]:
    """The demo's imitation of bol and the proxy in front of it (set ``demo``)."""
    fake = FakeBol()
    runner, upstream = await start_fake(fake)
    server = ProxyServer(validate(demo_config(upstream, 0), source="demo"))
    await server.start()
    await server.tokens.source("demo").get()
    yield fake, f"http://127.0.0.1:{server.port()}"
    await server.stop()
    await runner.cleanup()


def base_config(url: str, **overrides: Any) -> dict[str, Any]:
    """A raw configuration pointing at ``url`` with sets ``seta`` (default) and ``setb``."""
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"api_url": url, "token_url": url + "/token", "timeout": 10,
                     "connect_timeout": 2},
        "credentials": {
            "seta": {"client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET},
            "setb": {"client_id": "client-b", "client_secret": SECRET_B},
        },
        "default_credentials": "seta",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return copy.deepcopy(raw)


StartProxy = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Start a ProxyServer for a raw configuration; stopped after the test."""
    servers: list[ProxyServer] = []

    async def start(raw: dict[str, Any], clock: Clock | None = None,
                    rand: Callable[[], float] = lambda: 0.5) -> ProxyServer:
        config: Config = validate(raw, source="test")
        server = ProxyServer(config, clock=clock, rand=rand)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client, as a tool would be: no decompression, no cookies kept."""
    async with aiohttp.ClientSession(auto_decompress=False,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve an ad-hoc upstream on 127.0.0.1:0."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


# ------------------------------------------------------------ raw HTTP and answers


def free_port() -> int:
    """A port nobody listens on (bound once by the kernel, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                      asyncio.StreamWriter]]:
    """A raw client connection to 127.0.0.1:``port``, closed when the block ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def raw_request(port: int, data: bytes, seconds: float = 5.0) -> bytes:
    """Write ``data`` to the proxy and return all it answers until it closes the connection."""
    received = bytearray()
    async with connected(port) as (reader, writer):
        writer.write(data)
        try:
            async with asyncio.timeout(seconds):
                while chunk := await reader.read(65536):
                    received += chunk
        except ConnectionResetError:
            pass  # a server may reset after answering a request whose body it did not read
    return bytes(received)


def split_response(raw: bytes) -> tuple[int, CIMultiDict[str], bytes]:
    """Status, headers and the bytes after the head of one raw HTTP/1.x answer."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return status, headers, rest


async def problem(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The proxy's own problem document, as ``application/problem+json``."""
    assert resp.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(await resp.read())
    assert body["status"] == resp.status
    return body


@pytest.fixture
async def redis_server(tmp_path: Any) -> AsyncIterator[Any]:
    """A real redis-server of this test's own (append-only file on, noeviction)."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    server.kill()
