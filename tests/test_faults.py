"""Hostile input and upstream faults: refused cleanly, nothing leaks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import ProxyServer
from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, V10, FakeBol
from tests.conftest import (
    MB,
    SECRET_B,
    STOCK_UPDATE,
    StartProxy,
    base_config,
    connected,
    free_port,
    problem,
    raw_request,
    serve,
    split_response,
    stock_update,
    wait_until,
)

# An upstream that misbehaves on the byte level: gets the request head, writes what it likes.
Behaviour = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]
StartRawUpstream = Callable[[Behaviour], Awaitable[str]]


def request(target: bytes, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    """One raw request that asks the server to close afterwards."""
    return (method + b" " + target + b" HTTP/1.1\r\nHost: proxy\r\n" + extra
            + b"Connection: close\r\n\r\n")


async def answers_normally(server: ProxyServer) -> None:
    """The proxy still serves a plain request on a fresh connection."""
    raw = await raw_request(server.port(), request(b"/retailer/orders"))
    assert split_response(raw)[0] == 200


def no_errors_logged(caplog: pytest.LogCaptureFixture, prefix: str = "") -> None:
    """No ERROR record and no traceback from loggers under ``prefix`` ('' for all)."""
    ours = [r for r in caplog.records if r.name.startswith(prefix)]
    assert [r.getMessage() for r in ours if r.levelno >= logging.ERROR] == []
    assert [r.getMessage() for r in ours if r.exc_info] == []


@pytest.fixture
async def raw_upstream() -> AsyncIterator[StartRawUpstream]:
    """Start byte-level upstreams; ``GET /retailer/ok`` always gets a normal answer."""
    servers: list[asyncio.Server] = []

    async def start(behaviour: Behaviour) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /retailer/ok "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")
                    await writer.drain()
                else:
                    await behaviour(head, writer)
            except ConnectionError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


# -------------------------------------------------------------------- hostile requests


async def test_absolute_form_target_is_400_and_never_forwarded(
    bol: tuple[FakeBol, str], start_proxy: StartProxy
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    raw = await raw_request(server.port(), request(b"http://evil.example/retailer/orders"))
    status, _, body = split_response(raw)
    assert status == 400
    assert json.loads(body)["type"] == "urn:bol-proxy:bad-request"
    await answers_normally(server)
    assert [seen.target for seen in fake.api_requests] == ["/retailer/orders"]


@pytest.mark.parametrize(
    ("method", "target", "allowed"),
    [(b"CONNECT", b"api.bol.com:443", (400, 405)), (b"TRACE", b"/retailer/orders", (405,))],
    ids=["CONNECT", "TRACE"],
)
async def test_connect_and_trace_are_refused_without_upstream_contact(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, method: bytes, target: bytes,
    allowed: tuple[int, ...],
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    raw = await raw_request(server.port(), request(target, method))
    status, headers, _ = split_response(raw)
    assert status in allowed
    assert headers["Content-Type"] == "application/problem+json"
    await answers_normally(server)
    assert [seen.method for seen in fake.api_requests] == ["GET"]


@pytest.mark.parametrize(
    "target",
    [b"/retailer/../token", b"/retailer/%2e%2e/x", b"/retailer/%2F..%2F/x", b"/retailer/..%2fx",
     b"/retailer/%2E%2E/%2E%2E/x", b"/retailer/a%00b", b"/retailer\\..\\x",
     b"//evil.example/retailer/orders"],
)
async def test_path_escape_attempt_is_refused_before_bol(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, target: bytes
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    for method in (b"GET", b"POST"):
        raw = await raw_request(server.port(), request(target, method))
        assert split_response(raw)[0] in (400, 404)
    await answers_normally(server)  # it arrives after anything a refused request caused
    assert [seen.target for seen in fake.api_requests] == ["/retailer/orders"]


SMUGGLED = b"0\r\n\r\nGET /retailer/smuggled HTTP/1.1\r\nHost: proxy\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(SMUGGLED),
     b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(SMUGGLED),
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"],
    ids=["cl-te", "te-cl", "short-cl"],
)
async def test_content_length_with_transfer_encoding_is_400_and_smuggles_nothing(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, framing: bytes
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    raw = await raw_request(server.port(), b"POST /retailer/orders HTTP/1.1\r\nHost: proxy\r\n"
                                           + framing + b"\r\n" + SMUGGLED)
    assert split_response(raw)[0] == 400
    await answers_normally(server)
    assert [seen.target for seen in fake.api_requests] == ["/retailer/orders"]
    assert [seen.method for seen in fake.api_requests] == ["GET"]


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
async def test_content_length_named_in_connection_still_frames_the_body_for_bol(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, streamed: bool,
) -> None:
    # Listing Content-Length in Connection drops the client's header (RFC 9110 §7.6.1);
    # the body must still reach bol framed, or bol reads it as a request of its own.
    smuggled = b"GET /internal/admin HTTP/1.1\r\nHost: bol\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    seen: list[tuple[bytes, bytes]] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")]
        body = await reader.readexactly(lengths[0]) if len(lengths) == 1 else b""
        seen.append((head, body))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        seen.append((await reader.read(), b""))  # anything more the proxy sent
        writer.close()

    _, url = bol  # the token endpoint
    async with await asyncio.start_server(record, "127.0.0.1", 0) as upstream:
        api_url = f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
        server = await start_proxy(base_config(
            url, upstream={"api_url": api_url}, limits={"replay_buffer": 64 if streamed else MB}))
        raw = await raw_request(server.port(), b"POST /retailer/upload HTTP/1.1\r\nHost: proxy\r\n"
                                b"Content-Length: %d\r\n" % len(smuggled)
                                + b"Connection: close, Content-Length\r\n\r\n" + smuggled)
        await wait_until(lambda: len(seen) == 2)
    assert split_response(raw)[0] == 200
    (head, body), (after, _) = seen
    assert head.lower().count(b"content-length:") == 1
    assert body == smuggled  # the whole body, as a body
    assert after == b""  # and nothing that bol could read as a second request


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
async def test_chunk_framing_broken_mid_body_is_400_at_once(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, caplog: pytest.LogCaptureFixture,
    streamed: bool,
) -> None:
    # aiohttp's parser gives up on such a body, but left the handler reading it waiting
    # for the rest until upstream.timeout (here 60 s, far beyond this test's patience).
    bol_got_head = asyncio.Event()
    received: list[bytes] = []

    async def wait_for_the_body(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        bol_got_head.set()
        received.append(await reader.read())  # until the proxy closes the connection
        writer.close()

    fake, url = bol  # the token endpoint
    async with await asyncio.start_server(wait_for_the_body, "127.0.0.1", 0) as upstream:
        api_url = f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
        server = await start_proxy(base_config(url, upstream={"api_url": api_url, "timeout": 60},
                                               limits={"replay_buffer": 1024 if streamed else MB}))
        async with connected(server.port()) as (reader, writer):
            writer.write(b"POST /retailer/upload HTTP/1.1\r\nHost: proxy\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n1000\r\n" + b"a" * 4096 + b"\r\n")
            await writer.drain()
            if streamed:
                await asyncio.wait_for(bol_got_head.wait(), 5)  # the body is on its way to bol
            else:
                await wait_until(lambda: server.metrics.in_flight == 1)  # the body is buffering
            writer.write(b"zz\r\nnot a chunk\r\n")
            async with asyncio.timeout(5):
                raw = await reader.read()
        status, _, body = split_response(raw)
        assert status == 400
        assert json.loads(body)["type"] == "urn:bol-proxy:bad-request"
        if streamed:
            await wait_until(lambda: bool(received))
            assert not received[0].endswith(b"0\r\n\r\n")  # bol never saw a complete body
        else:
            assert not bol_got_head.is_set()
        no_errors_logged(caplog)
        assert fake.api_requests == []


@pytest.mark.parametrize(
    ("framing", "body", "allowed"),
    [(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!", range(400, 500)),
     (b"Content-Length: 5, 6\r\n", b"hello!", range(400, 500)),
     (b"Transfer-Encoding: gzip, chunked\r\n", b"6\r\nhello!\r\n0\r\n\r\n", (400,)),
     (b"Transfer-Encoding: deflate, chunked\r\n", b"6\r\nhello!\r\n0\r\n\r\n", (400,)),
     (b"Transfer-Encoding: chunked, chunked\r\n", b"6\r\nhello!\r\n0\r\n\r\n", (400,))],
    ids=["duplicate-length", "list-length", "gzip-chunked", "deflate-chunked",
         "chunked-chunked"],
)
async def test_ambiguous_body_framing_is_refused_before_bol(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, framing: bytes, body: bytes,
    allowed: range | tuple[int, ...],
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    raw = await raw_request(server.port(), b"POST /retailer/offers/1 HTTP/1.1\r\nHost: proxy\r\n"
                                           + framing + b"Connection: close\r\n\r\n" + body)
    assert split_response(raw)[0] in allowed
    await answers_normally(server)
    assert [seen.method for seen in fake.api_requests] == ["GET"]


@pytest.mark.parametrize(
    "junk",
    [request(b"/retailer/orders", extra=b"X-Big: " + b"a" * 100_000 + b"\r\n"),
     request(b"/retailer/orders", extra=b"X-Note\xff: 1\r\n"),
     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 2,
     b"GET /retailer/orders HTTP/9.9\r\nHost: proxy\r\n\r\n",
     b"\r\n\r\n\x00\x00\x00\r\n\r\n"],
    ids=["100kB-header", "non-utf8-name", "tls-hello", "http-9.9", "nul"],
)
async def test_garbage_gets_at_most_a_4xx_and_the_next_request_succeeds(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, caplog: pytest.LogCaptureFixture,
    junk: bytes,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    raw = await raw_request(server.port(), junk)
    if raw:  # closing the connection without a word is an answer too
        assert split_response(raw)[0] < 500
    await answers_normally(server)
    no_errors_logged(caplog, "proxy")
    assert [seen.target for seen in fake.api_requests] == ["/retailer/orders"]


@pytest.mark.parametrize(
    ("value", "status"),
    [(b"caf\xc3\xa9 \xe2\x82\xac", 200), (b"caf\xe9", 400), (b"\xff\xfe", 400)],
    ids=["utf8-passes", "latin1-refused", "binary-refused"],
)
async def test_request_header_bytes_pass_unchanged_or_are_refused(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, raw_upstream: StartRawUpstream,
    value: bytes, status: int,
) -> None:
    # aiohttp reads bytes that are not UTF-8 as surrogates and its writer drops them:
    # forwarding "caf\xe9" as "caf" would change the request behind the tool's back.
    _, url = bol
    heads: list[bytes] = []

    async def record(head: bytes, writer: asyncio.StreamWriter) -> None:
        heads.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    upstream = await raw_upstream(record)
    server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
    raw = await raw_request(server.port(), request(b"/retailer/orders",
                                                   extra=b"X-Note: " + value + b"\r\n"))
    assert split_response(raw)[0] == status
    if status == 200:
        assert b"\r\nX-Note: " + value + b"\r\n" in heads[0]
    else:
        assert heads == []
        assert json.loads(split_response(raw)[2])["type"] == "urn:bol-proxy:bad-request"


@pytest.mark.parametrize("size", [50, 4096], ids=["buffered", "streamed"])
async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, size: int,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url, limits={"replay_buffer": 1024}))
    async with connected(server.port()) as (reader, writer):
        writer.write(b"PUT %s HTTP/1.1\r\nHost: proxy\r\nExpect: 100-continue\r\n"
                     b"Content-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (STOCK_UPDATE.encode(), V10.encode(), size))
        async with asyncio.timeout(3):  # a client that waits for it is not left waiting
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(stock_update(size))
        async with asyncio.timeout(5):
            answer = await reader.read()
    assert split_response(answer)[0] == 202  # bol accepted the write
    (seen,) = fake.api_requests
    assert seen.body == stock_update(size)
    assert "Expect" not in seen.headers


async def test_expect_100_continue_with_a_body_over_the_limit_gets_413_instead(
    bol: tuple[FakeBol, str], start_proxy: StartProxy,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url, limits={"max_body_size": 1000}))
    raw = await raw_request(server.port(), b"POST /retailer/offers HTTP/1.1\r\nHost: proxy\r\n"
                            b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 413 ")  # no 100 first: the body is not wanted
    assert fake.api_requests == []


# --------------------------------------------------------------------------- body limits


@pytest.mark.parametrize("replay_buffer", [1 * MB, 64 * 1024], ids=["buffered", "streamed"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_body_over_max_body_size_is_413(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    declared: bool, replay_buffer: int,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(
        url, limits={"max_body_size": 1_048_576, "replay_buffer": replay_buffer}))
    data = b"x" * (2 * MB)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 32 * 1024):
            yield data[start:start + 32 * 1024]

    body = io.BytesIO(data) if declared else pieces()
    async with http.post(f"http://127.0.0.1:{server.port()}/retailer/offers/1",
                         data=body) as resp:
        assert resp.status == 413
        assert (await problem(resp))["type"] == "urn:bol-proxy:body-too-large"
    await answers_normally(server)
    assert [seen.method for seen in fake.api_requests] == ["GET"]  # no POST reached bol


# -------------------------------------------------------------------- upstream failures


async def test_slow_upstream_gets_504_upstream_timeout_quickly(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    _, url = bol
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stall)
    runner, upstream = await serve(app)
    try:
        server = await start_proxy(base_config(url, upstream={"api_url": upstream,
                                                              "timeout": 1}))
        # The upstream never answers: only the proxy's 1 s timeout can end this, well
        # before the guard's 5 s.
        async with asyncio.timeout(5), \
                http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
            assert resp.status == 504
            assert (await problem(resp))["type"] == "urn:bol-proxy:upstream-timeout"
    finally:
        never.set()
        await runner.cleanup()


async def test_closed_upstream_port_is_502_upstream_unreachable(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    _, url = bol
    closed = f"http://127.0.0.1:{free_port()}"
    server = await start_proxy(base_config(url, upstream={"api_url": closed}))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        assert resp.status == 502
        assert (await problem(resp))["type"] == "urn:bol-proxy:upstream-unreachable"


async def _close(head: bytes, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _reset(head: bytes, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _garbage(head: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await writer.drain()


async def _half_head(head: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    await writer.drain()


@pytest.mark.parametrize("behaviour", [_close, _reset, _garbage, _half_head],
                         ids=["close", "reset", "not-http", "half-head"])
async def test_upstream_failing_before_answering_is_502(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    raw_upstream: StartRawUpstream, behaviour: Behaviour,
) -> None:
    _, url = bol
    upstream = await raw_upstream(behaviour)
    server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
    base = f"http://127.0.0.1:{server.port()}"
    async with http.get(f"{base}/retailer/orders") as resp:
        assert resp.status == 502
        assert (await problem(resp))["type"] == "urn:bol-proxy:upstream-unreachable"
    async with http.get(f"{base}/retailer/ok") as resp:
        assert resp.status == 200


async def _short_length(head: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MB + b"a" * 100_000)
    await writer.drain()


async def _short_chunked(head: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        writer.write(b"8000\r\n" + b"a" * 0x8000 + b"\r\n")
    writer.write(b"8000\r\n" + b"a" * 100)  # and gone in the middle of a chunk
    await writer.drain()


async def _short_chunked_between_chunks(head: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"8000\r\n" + b"a" * 0x8000 + b"\r\n")
    await writer.drain()


async def _short_length_reset(head: bytes, writer: asyncio.StreamWriter) -> None:
    await _short_length(head, writer)
    await _reset(head, writer)


@pytest.mark.parametrize(
    "behaviour", [_short_length, _short_chunked, _short_chunked_between_chunks,
                  _short_length_reset],
    ids=["content-length", "chunked-mid-chunk", "chunked-between-chunks", "reset"])
async def test_upstream_cut_mid_body_is_never_a_complete_looking_body(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    raw_upstream: StartRawUpstream, behaviour: Behaviour, caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = bol
    upstream = await raw_upstream(behaviour)
    server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
    base = f"http://127.0.0.1:{server.port()}"
    async with asyncio.timeout(3):  # the client is never left waiting
        async with http.get(f"{base}/retailer/orders") as resp:
            assert resp.status == 200  # the head was passed on before the cut
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
                await resp.read()
    async with http.get(f"{base}/retailer/ok") as resp:
        assert resp.status == 200
        assert await resp.read() == b"ok"
    no_errors_logged(caplog, "proxy")


async def test_an_http10_client_sees_a_reset_not_a_clean_end_when_bol_breaks_off(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, raw_upstream: StartRawUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # HTTP/1.0 has no chunking: the body runs to the close, so only a reset tells the
    # client that it is not all there.
    _, url = bol
    upstream = await raw_upstream(_short_chunked)
    server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
    caplog.set_level(logging.INFO, logger="proxy.access")
    received = b""
    async with connected(server.port()) as (reader, writer):
        writer.write(b"GET /retailer/orders HTTP/1.0\r\nHost: proxy\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(3):
                while chunk := await reader.read(65536):
                    received += chunk
    assert received.startswith(b"HTTP/1.0 200") or received == b""
    line = next(r.getMessage() for r in caplog.records if r.name == "proxy.access")
    assert " 502 " in line and "error=upstream-failed-mid-body" in line


async def test_upstream_stalling_mid_body_is_cut_off_at_the_timeout(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    raw_upstream: StartRawUpstream,
) -> None:
    never = asyncio.Event()

    async def stall(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MB + b"s" * 100_000)
        await writer.drain()
        await never.wait()

    _, url = bol
    try:
        upstream = await raw_upstream(stall)
        server = await start_proxy(base_config(url, upstream={"api_url": upstream,
                                                              "timeout": 1}))
        async with asyncio.timeout(3):  # upstream.timeout is 1 s: the client is not kept
            async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
                assert resp.status == 200
                with pytest.raises((aiohttp.ClientPayloadError,
                                    aiohttp.ClientConnectionError)):
                    await resp.read()
    finally:
        never.set()


async def test_small_upstream_body_cut_short_is_a_clean_502(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    raw_upstream: StartRawUpstream,
) -> None:
    async def short(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
        await writer.drain()

    _, url = bol
    upstream = await raw_upstream(short)
    server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        assert resp.status == 502  # nothing was sent yet, so the proxy can still say so
        assert (await problem(resp))["type"] == "urn:bol-proxy:upstream-unreachable"


@pytest.mark.parametrize(("sent", "passed"), [(b"Fine By Me", b"Fine By Me"),
                                             (b"Caf\xc3\xa9 \xff", b"OK"),
                                             (b"OK\x00X", b"OK"), (b"O\x7fK", b"OK")],
                         ids=["ascii-unchanged", "non-ascii", "nul", "delete"])
async def test_the_reason_phrase_passes_unchanged_or_becomes_the_standard_one(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, raw_upstream: StartRawUpstream,
    sent: bytes, passed: bytes,
) -> None:
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 " + sent + b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    _, url = bol
    server = await start_proxy(base_config(url, upstream={"api_url": await raw_upstream(answer)}))
    raw = await raw_request(server.port(), request(b"/retailer/orders"))
    assert raw.startswith(b"HTTP/1.1 200 " + passed + b"\r\n")  # never re-encoded


async def test_an_upstream_switching_protocols_is_a_502_without_a_traceback(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, raw_upstream: StartRawUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def upgrade(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        await writer.drain()

    _, url = bol
    server = await start_proxy(base_config(url, upstream={"api_url": await raw_upstream(upgrade)}))
    raw = await raw_request(server.port(), request(b"/retailer/orders"))
    assert split_response(raw)[0] == 502
    no_errors_logged(caplog)


@pytest.mark.parametrize(
    ("header", "status"),
    [(b"X-Track-And-Trace-Code: 3SBOL\xc3\xa9", 200), (b"X-Back: caf\xe9", 502),
     (b"X-Back: a\x01b", 502), (b"X-Back: a\x7fb", 502)],
    ids=["utf8-passes", "latin1", "control", "delete"],
)
async def test_upstream_header_that_cannot_pass_unchanged_is_502_not_altered(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, raw_upstream: StartRawUpstream,
    caplog: pytest.LogCaptureFixture, header: bytes, status: int,
) -> None:
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + header + b"\r\n\r\nok")
        await writer.drain()

    _, url = bol
    upstream = await raw_upstream(answer)
    server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
    raw = await raw_request(server.port(), request(b"/retailer/orders"))
    assert split_response(raw)[0] == status
    if status == 200:
        assert b"\r\n" + header + b"\r\n" in raw
    else:
        assert json.loads(split_response(raw)[2])["type"] == "urn:bol-proxy:upstream-unreachable"
    no_errors_logged(caplog)
    raw = await raw_request(server.port(), request(b"/retailer/ok"))
    assert split_response(raw)[0] == 200


# ----------------------------------------------------------------- client going away


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_clients_abandoning_downloads_leak_nothing(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, url = bol

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the proxy hangs up: expected
            for _ in range(1024):  # 64 MB, far more than any client below reads
                await response.write(b"b" * 65536)
            await response.write_eof()
        return response

    fake.extra["/retailer/export"] = endless
    server = await start_proxy(base_config(url))
    pool = server.forwarder.pool
    registry = server.forwarder.metrics.registry
    base = f"http://127.0.0.1:{server.port()}"
    async with http.get(f"{base}/retailer/orders") as resp:  # pool and token warmed up
        assert resp.status == 200
    before = open_fds()
    for _ in range(50):
        async with http.get(f"{base}/retailer/export") as resp:
            assert resp.status == 200
            await resp.content.readexactly(100_000)
            resp.close()  # the client hangs up mid-body
    await wait_until(lambda: pool.in_use == 0  # every upstream connection given back or closed
                     and registry.get_sample_value("bol_proxy_in_flight_requests") == 0
                     and open_fds() <= before + 4)
    async with http.get(f"{base}/retailer/orders") as resp:
        assert resp.status == 200
    assert len([s for s in fake.api_requests if s.target == "/retailer/export"]) == 50
    no_errors_logged(caplog)
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("when", ["waiting-for-bol", "mid-upload"])
async def test_client_leaving_mid_request_cancels_the_upstream_exchange(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, url = bol
    entered, cancelled, never = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        entered.set()
        try:
            if when == "mid-upload":
                while await request.content.readany():
                    pass  # the upload stops half-way and the proxy hangs up
            await never.wait()
        except (asyncio.CancelledError, aiohttp.ClientPayloadError, ConnectionError):
            cancelled.set()
            raise
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner, upstream = await serve(app)
    try:
        server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
        pool = server.forwarder.pool
        _, writer = await asyncio.open_connection("127.0.0.1", server.port())
        if when == "mid-upload":  # 4 MB announced, 2 MB sent: beyond the replay buffer
            writer.write(b"POST /retailer/upload HTTP/1.1\r\nHost: proxy\r\n"
                         b"Content-Length: %d\r\n\r\n" % (4 * MB) + b"u" * (2 * MB))
        else:
            writer.write(request(b"/retailer/orders"))
        await asyncio.wait_for(entered.wait(), 3)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 3)
        await wait_until(lambda: pool.in_use == 0)  # the upstream connection was released
    finally:
        never.set()
        await runner.cleanup()
    assert "client went away" in caplog.text  # logged at debug level, not as an error
    no_errors_logged(caplog)


# ------------------------------------------------------------------------------ secrets


async def test_secrets_and_tokens_never_reach_logs_error_bodies_or_metrics(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, url = bol
    server = await start_proxy(base_config(url))
    base = f"http://127.0.0.1:{server.port()}"
    issued: set[str] = set()
    bodies: list[bytes] = []

    async def call(path: str, status: int, **headers: str) -> None:
        async with http.get(URL(base + path, encoded=True), headers=headers) as resp:
            assert resp.status == status
            bodies.append(await resp.read())
            bodies.append(str(resp.headers).encode())

    await call("/retailer/orders", 200)
    await call("/setb/retailer/orders", 200)
    issued |= fake.tokens.keys()
    fake.revoke_all()
    await call("/retailer/orders", 200)  # 401 from bol, new token, replayed once
    assert server.forwarder.metrics.registry.get_sample_value(
        "bol_proxy_replays_total", {"set": "seta"}) == 1
    issued |= fake.tokens.keys()
    fake.token_mode = "invalid_client"
    fake.revoke_all()
    await call("/setb/retailer/orders", 503)  # 401, and the new token is refused
    fake.token_mode = "error500"
    await call("/retailer/orders", 401, Authorization="Bearer client-sent")
    await call("/nope/retailer/orders", 400)
    await call("/retailer/../x", 400)
    await call("/_proxy/metrics", 200)
    await call("/_proxy/ready", 503)

    basic = {seen.headers["Authorization"] for seen in fake.token_requests}
    secrets = ({DEMO_CLIENT_SECRET, SECRET_B} | issued | basic
               | {b.removeprefix("Basic ") for b in basic}
               | {seen.headers["Authorization"].removeprefix("Bearer ")
                  for seen in fake.api_requests})
    secrets.discard("client-sent")
    assert len(issued) >= 3 and len(basic) == 2
    assert base64.b64encode(f"{DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET}".encode()).decode() in str(
        basic)
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "token" in logged  # the log was captured at all
    for secret in secrets:
        assert secret not in logged
        assert all(secret.encode() not in body for body in bodies)


async def test_request_body_trickling_past_the_timeout_is_408_and_reaches_nobody(
    bol: tuple[FakeBol, str], start_proxy: StartProxy,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url, upstream={"timeout": 0.3}))
    head = request(b"/retailer/offers/1", b"POST", extra=b"Content-Length: 100\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
    writer.write(head + b"only ten b")  # and then nothing more
    async with asyncio.timeout(5):  # answered at upstream.timeout, not at a linger's end
        status, headers, _ = split_response(await reader.readuntil(b"\r\n\r\n"))
        body = await reader.readexactly(int(headers["Content-Length"]))
    writer.close()
    assert status == 408
    assert headers["Connection"] == "close"
    assert json.loads(body)["type"] == "urn:bol-proxy:request-timeout"
    assert fake.api_requests == []
    await answers_normally(server)


async def test_malformed_requests_leave_no_error_and_no_traceback_in_any_log(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    for junk in (b"GET /retailer/orders HTTP/9.9\r\nHost: p\r\n\r\n",
                 request(b"/retailer/orders", extra=b"Host: second\r\n"),
                 request(b"/retailer/orders", extra=b"X-Note\xff: 1\r\n")):
        assert split_response(await raw_request(server.port(), junk))[0] == 400
    await answers_normally(server)
    no_errors_logged(caplog)


# --------------------------------------------------------- the upstream connection pool


class KeepAliveUpstream:
    """A keep-alive upstream whose n-th answer, counted over all its connections, a test
    scripts with ``answer`` (None: hang up without a word). It records every request
    (request line and body) and every connection opened."""

    def __init__(self) -> None:
        self.answer: Callable[[int], bytes | None] = lambda n: b"HTTP/1.1 204 No Content\r\n\r\n"
        self.seen: list[bytes] = []
        self.connections = 0
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.seen.append(head.split(b"\r\n")[0] + b" " + await reader.readexactly(length))
                answer = self.answer(len(self.seen))
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def keepalive() -> AsyncIterator[KeepAliveUpstream]:
    upstream = KeepAliveUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield upstream
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(("method", "status", "times_seen"), [
    ("GET", 200, 2),   # idempotent: sent again on a fresh connection
    ("POST", 502, 1),  # bol may have acted on it: never sent twice
])
async def test_keep_alive_race_resends_only_idempotent_requests(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    keepalive: KeepAliveUpstream, method: str, status: int, times_seen: int,
) -> None:
    _, url = bol
    # The second request is read, then the connection closes without an answer: as when
    # bol closes an idle connection just as the proxy reuses it.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    keepalive.answer = lambda n: None if n == 2 else ok
    server = await start_proxy(base_config(url, upstream={"api_url": keepalive.url}))
    base = f"http://127.0.0.1:{server.port()}"
    async with http.get(f"{base}/retailer/warm") as resp:  # leaves a pooled connection
        assert resp.status == 200 and await resp.read() == b"ok"
    async with http.request(method, f"{base}/retailer/shipments", data=b"{}") as resp:
        assert resp.status == status
    sent = [s for s in keepalive.seen if s.startswith(method.encode() + b" /retailer/shipments")]
    assert len(sent) == times_seen


async def test_client_leaving_while_a_small_answer_arrives_frees_its_connection(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, raw_upstream: StartRawUpstream,
) -> None:
    _, url = bol
    stalled, done = asyncio.Event(), asyncio.Event()

    async def half_answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        stalled.set()
        await done.wait()  # the rest never comes

    upstream = await raw_upstream(half_answer)
    server = await start_proxy(base_config(url, upstream={"api_url": upstream}))
    _, writer = await asyncio.open_connection("127.0.0.1", server.port())
    try:
        writer.write(request(b"/retailer/orders"))
        await asyncio.wait_for(stalled.wait(), 5)
        writer.close()  # the tool gives up
        pool = server.forwarder.pool
        await wait_until(lambda: pool.in_use == 0 and pool.open_connections == 0)
        ok = await raw_request(server.port(), request(b"/retailer/ok"))
        assert split_response(ok)[0] == 200
    finally:
        done.set()  # lets the imitation close its side before the test ends


async def test_an_unexpected_error_costs_one_request_a_500_problem_and_one_log_line(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    working = server.forwarder.tokens

    class Broken:
        def source(self, name: str) -> None:
            raise RuntimeError("a bug")

    server.forwarder.tokens = Broken()  # type: ignore[assignment]
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        assert resp.status == 500
        assert (await problem(resp))["type"] == "urn:bol-proxy:internal-error"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "unexpected error forwarding GET /retailer/orders"]
    server.forwarder.tokens = working
    await answers_normally(server)


async def test_access_line_of_an_abandoned_download_says_499_and_the_bytes_sent(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    fake, url = bol
    total = 8 * MB

    async def export(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(total)})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            for _ in range(total // 65536):
                await response.write(b"e" * 65536)
        return response

    fake.extra["/retailer/export"] = export
    server = await start_proxy(base_config(url))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/export") as resp:
        await resp.content.readexactly(100_000)
        resp.close()
    await wait_until(lambda: any(r.name == "proxy.access" for r in caplog.records))
    (line,) = [r for r in caplog.records if r.name == "proxy.access"]
    fields = line.__dict__["access"]
    assert (fields["status"], fields["upstream_status"]) == (499, 200)
    assert 100_000 <= fields["bytes"] < total
    assert fields["error"] == "client-gone"


async def test_trailers_of_a_chunked_answer_never_join_its_head(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, keepalive: KeepAliveUpstream,
) -> None:
    _, url = bol
    keepalive.answer = lambda n: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nSet-Cookie: t=1\r\n\r\n")
    server = await start_proxy(base_config(url, upstream={"api_url": keepalive.url}))
    status, headers, _ = split_response(await raw_request(server.port(),
                                                          request(b"/retailer/orders")))
    assert status == 200
    assert "X-Checksum" not in headers and "Set-Cookie" not in headers


async def test_bytes_after_a_complete_answer_retire_the_connection_not_the_next_request(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, keepalive: KeepAliveUpstream,
) -> None:
    _, url = bol
    keepalive.answer = lambda n: (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\n" if n == 1
        else b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    server = await start_proxy(base_config(url, upstream={"api_url": keepalive.url}))
    first = await raw_request(server.port(), request(b"/retailer/orders"))
    assert split_response(first)[::2] == (200, b"first")
    second = await raw_request(server.port(), request(b"/retailer/orders"))
    assert split_response(second)[::2] == (200, b"second")  # on a fresh connection
    assert keepalive.connections == 2
