"""Reloading the configuration in place (SIGHUP): sets, tokens and listeners."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from proxy.app import ProxyServer
from proxy.config import validate
from proxy.demo import DEMO_CLIENT_ID, V10, FakeBol
from proxy.errors import ConfigError
from tests.conftest import (
    SECRET_B,
    STOCK_UPDATE,
    FakeClock,
    StartProxy,
    base_config,
    connected,
    free_port,
    raw_request,
    split_response,
    stock_update,
    wait_until,
)


async def status(http: aiohttp.ClientSession, port: int, path: str = "/retailer/orders") -> int:
    async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
        await resp.read()
        return resp.status


def endless(fake: FakeBol) -> asyncio.Event:
    """Give bol a ``/retailer/endless`` that never answers; the event is set once a
    request is waiting on it, which keeps a request in flight for as long as a test
    needs (stop() then waits its shutdown_timeout)."""
    entered = asyncio.Event()

    async def never_answer(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    fake.extra["/retailer/endless"] = never_answer
    return entered


async def test_added_set_works_and_removed_set_stops_without_a_restart(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    raw = base_config(url)
    server = await start_proxy(raw)
    port = server.port()
    assert await status(http, port, "/setc/retailer/orders") == 400

    raw["credentials"]["setc"] = {"client_id": "client-b", "client_secret": SECRET_B}
    del raw["credentials"]["setb"]
    await server.reload(validate(raw))

    assert await status(http, port, "/setc/retailer/orders") == 200
    assert fake.api_requests[-1].client_id == "client-b"
    assert await status(http, port, "/setb/retailer/orders") == 400


async def test_unchanged_sets_keep_their_token_and_changed_sets_get_a_new_one(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    fake.clients["client-c"] = "third-secret"
    raw = base_config(url)
    server = await start_proxy(raw)
    assert await status(http, server.port()) == 200
    assert await status(http, server.port(), "/setb/retailer/orders") == 200
    tokens = server.forwarder.tokens
    kept = tokens.source("seta").current()
    fetched = len(fake.token_requests)

    raw["credentials"]["setb"] = {"client_id": "client-c", "client_secret": "third-secret"}
    await server.reload(validate(raw))
    assert await status(http, server.port(), "/setb/retailer/orders") == 200
    assert await status(http, server.port()) == 200

    assert tokens.source("seta").current() is kept
    assert [seen.client_id for seen in fake.token_requests[fetched:]] == ["client-c"]
    assert fake.api_requests[-2].client_id == "client-c"


async def test_listeners_follow_port_changes(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    raw = base_config(url)
    old_port, set_port = free_port(), free_port()
    raw["listen"]["port"] = old_port
    server = await start_proxy(raw)

    new_port = free_port()
    raw["listen"]["port"] = new_port
    raw["credentials"]["setb"]["port"] = set_port
    await server.reload(validate(raw))

    assert await status(http, new_port) == 200
    assert await status(http, set_port) == 200
    assert fake.api_requests[-1].client_id == "client-b"  # the set's own listener
    with pytest.raises(aiohttp.ClientConnectionError):
        await status(http, old_port)
    assert fake.api_requests[-2].client_id == DEMO_CLIENT_ID


async def test_a_reload_that_cannot_listen_keeps_the_running_configuration(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    raw = base_config(url)
    server = await start_proxy(raw)
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    taken = blocker.sockets[0].getsockname()[1]
    try:
        raw["credentials"]["setc"] = {"client_id": "c", "client_secret": "s", "port": taken}
        with pytest.raises(ConfigError, match="cannot listen"):
            await server.reload(validate(raw))
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert "setc" not in server.config.credentials
    assert await status(http, server.port()) == 200


async def test_in_flight_request_finishes_across_a_reload(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    fake.extra["/retailer/slow"] = slow
    raw = base_config(url)
    server = await start_proxy(raw)
    pending = asyncio.get_running_loop().create_task(
        status(http, server.port(), "/retailer/slow"))
    await asyncio.wait_for(entered.wait(), 5)
    del raw["credentials"]["setb"]
    raw["listen"]["port"] = free_port()
    await server.reload(validate(raw))
    release.set()
    assert await asyncio.wait_for(pending, 5) == 200


async def test_stop_gives_in_flight_requests_the_shutdown_timeout_once_not_twice(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    fake, url = bol
    entered = endless(fake)
    server = await start_proxy(base_config(url, shutdown_timeout=30), clock=clock)
    pending = asyncio.get_running_loop().create_task(
        status(http, server.port(), "/retailer/endless"))
    await asyncio.wait_for(entered.wait(), 5)
    sleeping = clock.sleeping
    stopping = asyncio.get_running_loop().create_task(server.stop())
    await wait_until(lambda: clock.sleeping > sleeping)  # stop() waits for the request
    await clock.advance(29.9)
    assert not stopping.done()  # the request still has its shutdown_timeout
    await clock.advance(0.1)
    # Then it is cancelled at once: aiohttp alone would wait another 30 s (guard: 5 s).
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(pending, 5)


async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     target: bytes = b"/retailer/orders") -> bytes:
    """Send a keep-alive GET on an open connection and read its answer's head (the body,
    by its Content-Length, is read and dropped); b"" if the proxy closed the connection."""
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\n\r\n")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
              if line.lower().startswith(b"content-length:")]
    await reader.readexactly(length[0] if length else 0)
    return head


async def test_a_connection_to_a_port_a_reload_retired_never_falls_back_to_the_default_set(
    bol: tuple[FakeBol, str], start_proxy: StartProxy,
) -> None:
    # Set b's port was b's; after the reload it is nobody's. A request still arriving
    # over an old connection to it must not be forwarded with the default set's token.
    fake, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["port"] = free_port()
    server = await start_proxy(raw)
    async with connected(server.port("setb")) as (reader, writer):
        assert (await one_answer(reader, writer)).startswith(b"HTTP/1.1 200")
        assert fake.api_requests[-1].client_id == "client-b"
        raw["credentials"]["setb"]["port"] = free_port()
        await server.reload(validate(raw))
        assert await one_answer(reader, writer) == b""  # closed by the reload
    assert len(fake.api_requests) == 1


async def test_a_request_over_a_closed_listeners_connection_gets_503_and_a_close(
    bol: tuple[FakeBol, str], start_proxy: StartProxy,
) -> None:
    # The moment between a reload and the closing of the connections it retired.
    fake, url = bol
    server = await start_proxy(base_config(url))
    server.listeners.roles.clear()
    status, headers, body = split_response(
        await raw_request(server.port(), b"GET /retailer/orders HTTP/1.1\r\nHost: proxy\r\n\r\n"))
    assert status == 503
    assert headers["Connection"] == "close"
    assert json.loads(body)["type"] == "urn:bol-proxy:listener-closed"
    assert fake.api_requests == []


async def test_stop_closes_idle_connections_at_once_and_refuses_new_requests(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    entered = endless(fake)
    server = await start_proxy(base_config(url, shutdown_timeout=2))
    async with connected(server.port()) as (reader, writer):
        assert (await one_answer(reader, writer)).startswith(b"HTTP/1.1 200")
        loop = asyncio.get_running_loop()
        pending = loop.create_task(status(http, server.port(), "/retailer/endless"))
        await asyncio.wait_for(entered.wait(), 5)
        stopping = loop.create_task(server.stop())
        assert await one_answer(reader, writer) == b""  # closed, while stop() waits
        assert not stopping.done()
        await asyncio.wait_for(stopping, 5)
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(pending, 5)
    assert [seen.target for seen in fake.api_requests] == ["/retailer/orders",
                                                           "/retailer/endless"]


async def test_a_reloaded_shutdown_timeout_applies_to_the_next_stop(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    fake, url = bol
    entered = endless(fake)
    raw = base_config(url, shutdown_timeout=30)
    server = await start_proxy(raw, clock=clock)
    raw["shutdown_timeout"] = 1
    await server.reload(validate(raw))
    loop = asyncio.get_running_loop()
    pending = loop.create_task(status(http, server.port(), "/retailer/endless"))
    await asyncio.wait_for(entered.wait(), 5)
    sleeping = clock.sleeping
    stopping = loop.create_task(server.stop())
    await wait_until(lambda: clock.sleeping > sleeping)  # stop() waits for the request
    await clock.advance(0.9)
    assert not stopping.done()
    await clock.advance(0.1)
    await asyncio.wait_for(stopping, 5)  # 1 s, not 30
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(pending, 5)


@pytest.mark.parametrize("becomes", ["main", "other-set"])
async def test_a_connection_to_a_port_that_a_reload_gives_another_role_is_closed(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, becomes: str,
) -> None:
    # The port stays a listener, but no longer means set b: an open connection to it
    # must not carry on with the default set's or set a's token.
    fake, url = bol
    raw = base_config(url, default_credentials="seta")
    port = free_port()
    raw["credentials"]["setb"]["port"] = port
    server = await start_proxy(raw)
    async with connected(port) as (reader, writer):
        assert (await one_answer(reader, writer)).startswith(b"HTTP/1.1 200")
        del raw["credentials"]["setb"]["port"]
        if becomes == "main":
            raw["listen"]["port"] = port
        else:
            raw["credentials"]["seta"]["port"] = port
        await server.reload(validate(raw))
        assert await one_answer(reader, writer) == b""  # closed by the reload
    assert [seen.client_id for seen in fake.api_requests] == ["client-b"]
    async with aiohttp.ClientSession() as http:  # a new connection gets the new meaning
        assert await status(http, port) == 200
    assert fake.api_requests[-1].client_id == DEMO_CLIENT_ID


@pytest.mark.parametrize("event", ["stop", "reload"])
async def test_a_body_still_arriving_when_stop_or_reload_retires_its_connection_arrives_whole(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, event: str,
) -> None:
    fake, url = bol
    raw = base_config(url, shutdown_timeout=5)
    server = await start_proxy(raw)
    body = stock_update(400_000)
    async with connected(server.port()) as (reader, writer):
        writer.write(b"PUT %s HTTP/1.1\r\nHost: proxy\r\nContent-Type: %s\r\n"
                     b"Content-Length: %d\r\n\r\n" % (STOCK_UPDATE.encode(), V10.encode(),
                                                      len(body)) + body[:200_000])
        await writer.drain()
        await wait_until(lambda: server.metrics.in_flight == 1)
        loop = asyncio.get_running_loop()
        if event == "stop":
            retiring = loop.create_task(server.stop())
        else:
            raw["listen"]["port"] = free_port()  # the connection's port goes away
            await server.reload(validate(raw))
        writer.write(body[200_000:])
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.read()  # and then the connection closes
        if event == "stop":
            await asyncio.wait_for(retiring, 5)
    assert head.startswith(b"HTTP/1.1 202")  # bol accepted the write
    assert b"Connection: close" in head
    assert [len(seen.body) for seen in fake.api_requests] == [len(body)]


async def test_a_connection_accepted_while_the_proxy_still_opens_listeners_is_served(
    bol: tuple[FakeBol, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The main listener opens first; a tool may use it before the set ports are open.
    _, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["port"] = free_port()
    ports: list[int] = []
    go_on = asyncio.Event()
    original = web.TCPSite.start

    async def wait_then_start(site: web.TCPSite) -> None:
        if ports:  # the main listener is open: hold the set's until the test is done
            await go_on.wait()
        await original(site)
        assert site._server is not None and hasattr(site._server, "sockets")
        ports.append(site._server.sockets[0].getsockname()[1])

    monkeypatch.setattr(web.TCPSite, "start", wait_then_start)
    server = ProxyServer(validate(raw))
    loop = asyncio.get_running_loop()
    starting = loop.create_task(server.start())
    try:
        await wait_until(lambda: bool(ports))
        async with connected(ports[0]) as (reader, writer):
            answer = await one_answer(reader, writer)
        assert answer.startswith(b"HTTP/1.1 200")
        go_on.set()
        await asyncio.wait_for(starting, 5)
    finally:
        go_on.set()
        await server.stop()
