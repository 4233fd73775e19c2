"""Forwarding through the real proxy to the recording imitation of bol: set choice, streams."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, ORDER, V10, FakeBol
from tests.conftest import (
    MB,
    ROOMY_LIMITS,
    StartProxy,
    base_config,
    free_port,
    problem,
    raw_request,
    serve,
    split_response,
    wait_until,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = 64 * 1024


# ------------------------------------------------------------------------------ helpers


def on_demand(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every set fetched on first use, so that no token is fetched at start."""
    for cred in raw["credentials"].values():
        cred["prefetch"] = False
    return raw


def pattern(size: int, seed: int = 7) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


async def sink(request: web.Request) -> web.Response:
    """An upstream endpoint that streams the request body into a hash and reports it."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({
        "sha256": digest.hexdigest(), "size": size,
        "content_length": request.headers.get("Content-Length"),
        "content_encoding": request.headers.get("Content-Encoding"),
        "content_type": request.headers.get("Content-Type"),
    })


def canned(status: int, headers: CIMultiDict[str] | dict[str, str], body: bytes = b"") -> Handler:
    """An upstream endpoint that always gives the same answer."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=headers, body=body or None)

    return handler


def streamed(data: bytes, *, with_length: bool) -> Handler:
    """An upstream endpoint that streams ``data`` in pieces, with or without Content-Length."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if with_length:
            response.content_length = len(data)
        await response.prepare(request)
        for start in range(0, len(data), CHUNK):
            await response.write(data[start:start + CHUNK])
        await response.write_eof()
        return response

    return handler


# ----------------------------------------------------------------- credential selection


async def test_request_reaches_bol_with_the_sets_token_and_unchanged_query(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    target = "/retailer/orders?status=OPEN&x=%2F&y=&z=a+b"
    async with http.get(
        URL(f"http://127.0.0.1:{server.port()}{target}", encoded=True),
        headers={"Authorization": "junk", "X-Custom": "kept", "Connection": "X-Drop, keep-alive",
                 "X-Drop": "1", "Proxy-Authorization": "Basic abc"},
    ) as resp:
        assert resp.status == 200
        limit, _ = ROOMY_LIMITS[("GET", "/retailer/orders")]
        assert resp.headers["X-RateLimit-Limit"] == str(limit)  # bol's headers come back
    seen = fake.api_requests[-1]
    assert seen.target == target
    assert seen.client_id == DEMO_CLIENT_ID
    assert seen.headers["Authorization"].startswith("Bearer demo.")
    assert seen.headers["X-Custom"] == "kept"
    assert "X-Drop" not in seen.headers
    assert "Proxy-Authorization" not in seen.headers


@pytest.mark.parametrize(
    ("how", "client_id"),
    [("dedicated-port", "client-b"), ("path-prefix", "client-b"), ("header", "client-b"),
     ("default", DEMO_CLIENT_ID)],
)
async def test_credential_set_is_chosen_by_port_path_header_or_default(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    how: str, client_id: str,
) -> None:
    fake, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["port"] = free_port()
    server = await start_proxy(raw)
    port = server.port("setb") if how == "dedicated-port" else server.port()
    path = "/setb/retailer/orders" if how == "path-prefix" else "/retailer/orders"
    headers = {"X-Bol-Credentials": "setb"} if how == "header" else {}
    async with http.get(f"http://127.0.0.1:{port}{path}?page=2", headers=headers) as resp:
        assert resp.status == 200
    [seen] = fake.api_requests
    assert seen.client_id == client_id
    assert seen.target == "/retailer/orders?page=2"  # a set prefix is not forwarded
    assert "X-Bol-Credentials" not in seen.headers


@pytest.mark.parametrize(
    ("path", "headers", "default"),
    [("/retailer/orders", {"X-Bol-Credentials": "nope"}, "seta"),
     ("/nope/retailer/orders", {}, "seta"),
     ("/retailer/orders", {}, None)],
    ids=["unknown-header", "unknown-path-prefix", "none-and-no-default"],
)
async def test_unknown_or_missing_credential_set_is_400_without_upstream_contact(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    path: str, headers: dict[str, str], default: str | None,
) -> None:
    fake, url = bol
    server = await start_proxy(on_demand(base_config(url, default_credentials=default)))
    async with http.get(f"http://127.0.0.1:{server.port()}{path}", headers=headers) as resp:
        assert resp.status == 400
        body = await problem(resp)
    assert body["type"] == "urn:bol-proxy:unknown-credentials"
    assert fake.api_requests == [] and fake.token_requests == []


@pytest.mark.parametrize(
    "path", ["/tokens", "/retailerx/orders", "/", "/api/orders", "/setc/token",
             "/setb", "/Retailer/orders"],
)
async def test_path_outside_allowed_paths_is_404_and_bol_sees_nothing(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession, path: str
) -> None:
    fake, url = bol
    server = await start_proxy(on_demand(base_config(url)))
    for method in ("GET", "POST"):
        async with http.request(method, f"http://127.0.0.1:{server.port()}{path}") as resp:
            assert resp.status == 404
            assert (await problem(resp))["type"] == "urn:bol-proxy:not-found"
    assert fake.api_requests == [] and fake.token_requests == []


HOP_BY_HOP = ("Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
              "Proxy-Authorization", "TE", "Trailer", "Upgrade")


@pytest.mark.parametrize("case", [str.title, str.lower, str.upper], ids=["title", "lower", "upper"])
async def test_hop_by_hop_and_selector_headers_are_removed_whatever_their_case(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, case: Callable[[str], str]
) -> None:
    fake, url = bol
    fake.extra["/retailer/orders/1"] = canned(200, CIMultiDict(
        [(case("Connection"), "X-Back-Hop"), (case("x-back-hop"), "1"), (case("Upgrade"), "h2c"),
         (case("Proxy-Connection"), "keep-alive"), (case("Proxy-Authenticate"), "Basic"),
         (case("Trailer"), "X-Sum"), (case("X-End-To-End"), "kept")]), b"ok")
    server = await start_proxy(base_config(url))
    names = [(case("Connection"), "close, X-DROP"), (case("x-drop"), "1"),
             (case("Keep-Alive"), "timeout=5"), (case("Proxy-Connection"), "keep-alive"),
             (case("Proxy-Authorization"), "Basic eDp5"), (case("TE"), "trailers"),
             (case("Trailer"), "X-Sum"), (case("Upgrade"), "websocket"),
             (case("X-Bol-Credentials"), "seta"), (case("Authorization"), "Bearer mine"),
             (case("X-End-To-End"), "kept")]
    head = "".join(f"{name}: {value}\r\n" for name, value in names).encode()
    raw = await raw_request(server.port(), b"GET /retailer/orders/1 HTTP/1.1\r\n"
                                           b"Host: proxy\r\n" + head + b"\r\n")
    status, headers, body = split_response(raw)
    assert (status, body) == (200, b"ok")
    [seen] = fake.api_requests
    for name in (*HOP_BY_HOP, "X-Drop", "X-Bol-Credentials"):
        assert name not in seen.headers, name
    assert seen.headers.getall("Authorization") != ["Bearer mine"]
    assert seen.headers["X-End-To-End"] == "kept"
    for name in ("X-Back-Hop", *HOP_BY_HOP[1:]):
        assert name not in headers, name
    assert headers.getall("Connection", ["close"]) == ["close"]  # the proxy's own, if any
    assert headers["X-End-To-End"] == "kept"


# ---------------------------------------------------------------------- tokens on the way


async def test_300_concurrent_requests_share_one_token_request(
    bol: tuple[FakeBol, str], start_proxy: StartProxy
) -> None:
    fake, url = bol
    gate = asyncio.Event()

    async def held_token(request: web.Request) -> web.StreamResponse:
        await gate.wait()  # every request is waiting in the proxy before the token comes
        return await fake.token(request)

    token_app = web.Application(handler_args={"auto_decompress": False})
    token_app.router.add_post("/token", held_token)
    runner, token_url = await serve(token_app)
    try:
        server = await start_proxy(on_demand(base_config(
            url, upstream={"token_url": token_url + "/token"})))
        registry = server.forwarder.metrics.registry
        base = f"http://127.0.0.1:{server.port()}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

            async def one(i: int) -> int:
                async with client.get(f"{base}/retailer/orders/{ORDER['orderId']}?n={i}") as resp:
                    await resp.read()
                    return resp.status

            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i)) for i in range(300)]
                await wait_until(
                    lambda: registry.get_sample_value("bol_proxy_in_flight_requests") == 300
                    and len(fake.token_requests) == 0)
                gate.set()
    finally:
        gate.set()
        await runner.cleanup()
    assert [t.result() for t in tasks] == [200] * 300
    [token_request] = fake.token_requests
    assert token_request.method == "POST"
    assert token_request.target == "/token"  # nothing in the query string
    assert token_request.body == b"grant_type=client_credentials"
    assert token_request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    expected = base64.b64encode(f"{DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET}".encode()).decode()
    assert token_request.headers["Authorization"] == f"Basic {expected}"
    assert len({seen.headers["Authorization"] for seen in fake.api_requests}) == 1
    assert len(fake.api_requests) == 300


# --------------------------------------------------------------------- bodies, both ways


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
async def test_large_download_streams_back_byte_exact(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    with_length: bool,
) -> None:
    fake, url = bol
    data = pattern(24 * MB)
    fake.extra["/retailer/export"] = streamed(data, with_length=with_length)
    server = await start_proxy(base_config(url))
    digest = hashlib.sha256()
    size = 0
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/export") as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Length") == (str(len(data)) if with_length else None)
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
    assert size == len(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [1000, 200_000], ids=["small", "large"])
async def test_an_http10_keep_alive_client_gets_a_close_after_an_answer_without_length(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, size: int,
) -> None:
    # Without Content-Length an HTTP/1.0 body ends at the close: the close must come,
    # else the next pipelined answer is read as more body, or the tool waits.
    fake, url = bol
    fake.extra["/retailer/export"] = streamed(b"x" * size, with_length=False)
    server = await start_proxy(base_config(url))
    keep_alive = b"HTTP/1.0\r\nHost: p\r\nConnection: keep-alive\r\n\r\n"
    received = await raw_request(server.port(), b"GET /retailer/export " + keep_alive
                                 + b"GET /retailer/orders " + keep_alive, seconds=3)
    status, headers, body = split_response(received)
    assert status == 200
    assert "Content-Length" not in headers
    assert headers.get("Connection", "close").lower() == "close"
    assert body == b"x" * size  # and nothing after it


async def test_large_upload_streams_to_bol_byte_exact_with_its_length(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    fake, url = bol
    data = pattern(24 * MB, seed=11)
    fake.extra["/retailer/upload"] = sink
    server = await start_proxy(base_config(url, limits={"max_body_size": 64 * MB}))
    async with http.post(f"http://127.0.0.1:{server.port()}/retailer/upload",
                         data=io.BytesIO(data),
                         headers={"Content-Type": "application/octet-stream"}) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["sha256"] == hashlib.sha256(data).hexdigest()
    assert seen["size"] == len(data)
    assert seen["content_length"] == str(len(data))
    assert seen["content_type"] == "application/octet-stream"


@pytest.mark.parametrize("size", [100_000, 5 * MB], ids=["within-replay-buffer", "streamed"])
async def test_chunked_upload_without_length_arrives_byte_exact(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession, size: int
) -> None:
    fake, url = bol
    data = pattern(size, seed=3)
    fake.extra["/retailer/upload"] = sink
    server = await start_proxy(base_config(url))

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 10_000):
            yield data[start:start + 10_000]

    async with http.post(f"http://127.0.0.1:{server.port()}/retailer/upload",
                         data=pieces()) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["sha256"] == hashlib.sha256(data).hexdigest()
    assert seen["size"] == size


@pytest.mark.parametrize("size", [2_000, 300_000], ids=["small", "streamed"])
async def test_gzip_response_passes_compressed_with_its_content_encoding(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession, size: int
) -> None:
    fake, url = bol
    compressed = gzip.compress(pattern(size))
    fake.extra["/retailer/packed"] = canned(200, {"Content-Encoding": "gzip",
                                                  "Content-Type": V10}, compressed)
    server = await start_proxy(base_config(url))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/packed",
                        headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == compressed


@pytest.mark.parametrize("size", [5_000, 3 * MB], ids=["within-replay-buffer", "streamed"])
async def test_gzip_request_body_arrives_byte_identical_with_content_encoding(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession, size: int
) -> None:
    fake, url = bol
    compressed = gzip.compress(pattern(size), mtime=0)
    fake.extra["/retailer/offers/import"] = sink
    server = await start_proxy(base_config(url))
    async with http.post(f"http://127.0.0.1:{server.port()}/retailer/offers/import",
                         data=io.BytesIO(compressed),
                         headers={"Content-Encoding": "gzip", "Content-Type": V10}) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["sha256"] == hashlib.sha256(compressed).hexdigest()
    assert seen["size"] == len(compressed)
    assert seen["content_encoding"] == "gzip"
    assert seen["content_length"] == str(len(compressed))


# ------------------------------------------------------------ answers come back unchanged


async def test_repeated_response_headers_stay_repeated(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    fake, url = bol
    headers = CIMultiDict([("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly"),
                           ("Link", "</p/2>; rel=next"), ("Link", "</p/9>; rel=last")])
    fake.extra["/retailer/cookies"] = canned(200, headers, b"ok")
    server = await start_proxy(base_config(url))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/cookies") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
        assert resp.headers.getall("Link") == ["</p/2>; rel=next", "</p/9>; rel=last"]


async def test_redirect_is_passed_back_not_followed(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    fake, url = bol
    fake.extra["/retailer/moved"] = canned(302, {"Location": "/retailer/orders"})
    server = await start_proxy(base_config(url))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/moved",
                        allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/retailer/orders"
    assert [seen.target for seen in fake.api_requests] == ["/retailer/moved"]


BOL_404 = (b'{"type": "https://api.bol.com/problems", "title": "Not Found", "status": 404, '
           b'"detail": "Order 1 not found."}')
BOL_429 = (b'{"type": "https://api.bol.com/problems", "title": "Too Many Requests", '
           b'"status": 429, "detail": "Too many requests, retry in 4 seconds."}')


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [(404, [("Content-Type", V10), ("X-RateLimit-Limit", "25"),
            ("X-RateLimit-Remaining", "24"), ("X-RateLimit-Reset", "60")], BOL_404),
     (429, [("Content-Type", V10), ("Retry-After", "4"), ("X-RateLimit-Limit", "25"),
            ("x-ratelimit-remaining", "0"), ("X-RateLimit-Reset", "4")], BOL_429)],
    ids=["404", "429"],
)
async def test_error_answers_of_bol_pass_through_unchanged(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    status: int, headers: list[tuple[str, str]], body: bytes,
) -> None:
    fake, url = bol
    fake.extra["/retailer/orders/1"] = canned(status, CIMultiDict(headers), body)
    server = await start_proxy(base_config(url))
    # A request that may not wait gets bol's 429 as it came.
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders/1",
                        headers={"X-Bol-Proxy-Max-Wait": "0"}) as resp:
        assert resp.status == status
        for name, value in headers:
            assert resp.headers.getall(name) == [value]
        assert await resp.read() == body
    assert len(fake.api_requests) == 1
    assert "X-Bol-Proxy-Max-Wait" not in fake.api_requests[0].headers


@pytest.mark.parametrize("size", [500, 200_000], ids=["small", "large"])
async def test_head_keeps_content_length_and_sends_no_body(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, size: int
) -> None:
    fake, url = bol
    fake.extra["/retailer/export"] = canned(200, {"Content-Type": V10}, pattern(size))
    server = await start_proxy(base_config(url))
    raw = await raw_request(server.port(), b"HEAD /retailer/export HTTP/1.1\r\nHost: proxy\r\n"
                                           b"Connection: close\r\n\r\n")
    status, headers, rest = split_response(raw)
    assert status == 200
    assert headers["Content-Length"] == str(size)
    assert rest == b""
    assert fake.api_requests[-1].method == "HEAD"


async def test_204_answer_has_no_body_and_the_connection_stays_usable(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    fake, url = bol
    fake.extra["/retailer/offers/1"] = canned(204, {"X-RateLimit-Remaining": "7"})
    server = await start_proxy(base_config(url))
    for _ in range(2):  # the second one reuses the kept-alive connection
        async with http.delete(f"http://127.0.0.1:{server.port()}/retailer/offers/1") as resp:
            assert resp.status == 204
            assert resp.headers["X-RateLimit-Remaining"] == "7"
            assert await resp.read() == b""
    assert [seen.method for seen in fake.api_requests] == ["DELETE", "DELETE"]


@pytest.mark.parametrize("length", [b"Content-Length: 0\r\n", b""], ids=["length-0", "no-length"])
async def test_post_without_body_keeps_content_type_and_gains_no_headers(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, length: bytes
) -> None:
    fake, url = bol
    fake.extra["/retailer/upload"] = sink
    server = await start_proxy(base_config(url))
    raw = await raw_request(
        server.port(),
        b"POST /retailer/upload HTTP/1.1\r\nHost: proxy\r\n"
        b"Content-Type: " + V10.encode() + b"\r\n" + length + b"Connection: close\r\n\r\n",
    )
    status, _, answer = split_response(raw)
    assert status == 200
    assert json.loads(answer)["size"] == 0
    [seen] = fake.api_requests
    assert seen.method == "POST"
    assert seen.body == b""
    assert seen.headers["Content-Type"] == V10
    for added in ("Accept", "Accept-Encoding", "User-Agent"):
        assert added not in seen.headers


async def test_only_the_clients_own_headers_reach_bol(
    bol: tuple[FakeBol, str], start_proxy: StartProxy
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    sent = {"Accept": V10, "Accept-Language": "nl", "X-Fulfilment-Party": "BOL"}
    async with aiohttp.ClientSession(skip_auto_headers=("Accept", "Accept-Encoding",
                                                        "User-Agent")) as client:
        async with client.get(f"http://127.0.0.1:{server.port()}/retailer/orders",
                              headers=sent) as resp:
            assert resp.status == 200
        async with client.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
            assert resp.status == 200
    first, second = fake.api_requests
    for name, value in sent.items():
        assert first.headers[name] == value
    for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type"):
        assert name not in second.headers


@pytest.mark.parametrize(
    "target",
    ["/retailer/orders?status=OPEN&page=2",
     "/retailer/orders?q=%41%62c&sort=-date&t=%7E~",
     "/retailer/orders?a=1&a=2&b=&c&&d==",
     "/retailer/orders?q=a+b%20c%2B%2b",
     "/retailer/orders?back=http://x.example/y?z=1;w=%3D",
     "/retailer/orders?caf%C3%A9=%e9%E9",
     "/retailer/offers/%313722de8-8182-d161-5422-4a0a1caab5c8?x=%2F%2f",  # %31: "1"
     "/retailer-demo/orders?fulfilment-method=FBR"],
)
async def test_raw_path_and_query_are_forwarded_byte_for_byte(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession, target: str
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    async with http.get(URL(f"http://127.0.0.1:{server.port()}{target}", encoded=True)) as resp:
        assert resp.status == 200
    assert fake.api_requests[-1].target == target
