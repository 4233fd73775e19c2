"""Token lifecycle through the real proxy and the recording imitation of bol.

The proxy and the imitation share one :class:`FakeClock`: tokens live a few seconds of
fake time, renewals and expiries happen when a test moves the clock, and only real HTTP
exchanges are waited for (bounded, on a condition).
"""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import ProxyServer
from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, V10, FakeBol
from proxy.tokens import TokenSource
from tests.conftest import FakeClock, StartProxy, base_config, wait_until

TTL = 6  # seconds a token of the imitation lives
MARGIN = 2  # tokens.refresh_margin: with rand 0.5 a token is renewed 4.25 s after its request
RENEW_EVERY = TTL - MARGIN + 0.5 * MARGIN / 4
ORDER_PATH = "/retailer/orders"


@pytest.fixture
def fake(bol: tuple[FakeBol, str], clock: FakeClock) -> tuple[FakeBol, str]:
    """The imitation of bol on the test's fake clock, with short-lived tokens."""
    imitation, url = bol
    imitation.clock = clock.wall
    imitation.ttl = TTL
    return imitation, url


def one_set(url: str, **overrides: Any) -> dict[str, Any]:
    """``base_config`` with only set ``seta`` and the short renewal margin."""
    raw = base_config(url, tokens={"refresh_margin": MARGIN}, **overrides)
    del raw["credentials"]["setb"]
    return raw


def source_of(server: ProxyServer, name: str = "seta") -> TokenSource:
    return server.forwarder.tokens.source(name)


async def started(start_proxy: StartProxy, raw: dict[str, Any], clock: FakeClock,
                  name: str = "seta") -> tuple[ProxyServer, TokenSource]:
    """Start the proxy and wait for the set's first token."""
    server = await start_proxy(raw, clock=clock)
    source = source_of(server, name)
    await wait_until(lambda: source.current() is not None)
    return server, source


async def renewed(source: TokenSource, clock: FakeClock) -> None:
    """Wait for a renewal that the clock made due to complete."""
    await wait_until(lambda: (t := source.current()) is not None and t.renew_at > clock.now)


def url_of(server: ProxyServer, path: str = ORDER_PATH) -> str:
    return f"http://127.0.0.1:{server.port()}{path}"


async def get_status(http: aiohttp.ClientSession, server: ProxyServer) -> int:
    async with http.get(url_of(server), headers={"Accept": V10}) as resp:
        await resp.read()
        return resp.status


async def test_revoked_token_is_replaced_and_a_small_post_replayed_once_with_its_body(
    fake: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    bol, url = fake
    server, _ = await started(start_proxy, one_set(url), clock)
    bol.revoke_all()
    tokens_before, api_before = len(bol.token_requests), len(bol.api_requests)
    body = json.dumps({"orderItems": [{"orderItemId": "2012345678", "quantity": 1}]}).encode()
    async with http.post(url_of(server, "/retailer/shipments"), data=body,
                         headers={"Content-Type": V10, "Accept": V10}) as resp:
        assert resp.status == 202  # a shipment of the order item, accepted
        assert (await resp.json(content_type=None))["entityId"] == "2012345678"
    assert len(bol.token_requests) == tokens_before + 1
    seen = bol.api_requests[api_before:]
    assert len(seen) == 2  # the refused attempt and exactly one replay
    assert [s.client_id for s in seen] == [None, DEMO_CLIENT_ID]
    assert all(s.method == "POST" and s.body == body for s in seen)
    assert seen[0].headers["Authorization"] != seen[1].headers["Authorization"]
    assert seen[1].headers["Content-Type"] == V10


async def test_post_larger_than_the_replay_buffer_gets_the_401_back_and_the_next_request_works(
    fake: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    bol, url = fake
    server, _ = await started(start_proxy, one_set(url, limits={"replay_buffer": 1024}),
                              clock)
    bol.revoke_all()
    tokens_before, api_before = len(bol.token_requests), len(bol.api_requests)
    body = b"x" * 3000
    async with http.post(url_of(server), data=body, headers={"Content-Type": V10}) as resp:
        assert resp.status == 401  # bol's answer, as bol gave it
        assert resp.headers["Content-Type"] == V10
        problem = await resp.json(content_type=None)
    assert problem["title"] == "Expired JWT"
    assert problem["type"] == "https://api.bol.com/problems"
    assert len(bol.api_requests) == api_before + 1  # not replayed
    assert bol.api_requests[-1].body == body
    assert await get_status(http, server) == 200
    assert len(bol.token_requests) == tokens_before + 1


@pytest.mark.parametrize(("mode", "reason"), [
    ("error500", "the last token request failed (http_500)"),
    ("html", "the token endpoint gave an unusable answer"),
], ids=["error500", "html"])
async def test_failing_token_endpoint_is_invisible_while_the_token_is_valid_then_503(
    fake: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock, mode: str, reason: str,
) -> None:
    bol, url = fake
    server, source = await started(start_proxy, one_set(url), clock)
    bol.token_mode = mode
    await clock.advance(RENEW_EVERY)  # the renewal fails
    await wait_until(lambda: source.failures == 1)
    assert await get_status(http, server) == 200  # the current token is still valid
    await clock.advance(1.0)  # the first retry, 1 s later, fails too
    await wait_until(lambda: source.failures == 2)
    assert source.current() is None  # and the token is past its last usable moment
    api_before = len(bol.api_requests)
    async with http.get(url_of(server)) as resp:
        assert resp.status == 503
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert int(resp.headers["Retry-After"]) >= 1
        problem = await resp.json(content_type=None)
    assert problem["type"] == "urn:bol-proxy:token-unavailable"
    assert problem["status"] == 503
    assert reason in problem["detail"]
    assert len(bol.api_requests) == api_before  # bol never saw the request

    bol.token_mode = "ok"
    await clock.advance(60)  # past the longest backoff
    await wait_until(lambda: source.current() is not None)
    assert await get_status(http, server) == 200


async def test_invalid_credentials_make_the_proxy_unready_and_requests_get_503(
    fake: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    bol, url = fake
    raw = one_set(url)
    raw["credentials"]["seta"]["client_secret"] = "not-the-secret"
    server = await start_proxy(raw, clock=clock)
    source = source_of(server)
    await wait_until(lambda: source.last_error == "invalid_client")
    async with http.get(url_of(server, "/_proxy/ready")) as resp:
        assert resp.status == 503
        ready = await resp.json()
    assert ready["ready"] is False
    assert ready["sets"]["seta"]["state"] == "no-token"
    assert ready["sets"]["seta"]["last_error"] == "invalid_client"
    token_requests = len(bol.token_requests)
    for _ in range(3):
        async with http.get(url_of(server)) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            problem = await resp.json(content_type=None)
        assert problem["type"] == "urn:bol-proxy:token-unavailable"
        assert "refused the credentials (invalid_client)" in problem["detail"]
    assert len(bol.token_requests) == token_requests  # requests do not hammer login.bol.com
    assert bol.api_requests == []


async def test_ready_is_200_with_valid_tokens_and_never_shows_a_token_or_secret(
    fake: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    bol, url = fake
    server = await start_proxy(base_config(url), clock=clock)
    sources = [source_of(server, "seta"), source_of(server, "setb")]
    await wait_until(lambda: all(s.current() is not None for s in sources))
    async with http.get(url_of(server, "/_proxy/ready")) as resp:
        assert resp.status == 200
        text = await resp.text()
    ready = json.loads(text)
    assert ready["ready"] is True
    assert {name: s["state"] for name, s in ready["sets"].items()} == {
        "seta": "valid", "setb": "valid"}
    assert len(bol.tokens) == 2
    for secret in [*bol.tokens, DEMO_CLIENT_SECRET, "Bearer"]:
        assert secret not in text


async def test_rotated_refresh_tokens_are_kept_in_the_file_and_survive_a_restart(
    fake: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock, tmp_path: Path,
) -> None:
    bol, url = fake
    bol.rotate_refresh_tokens = True
    path = tmp_path / "partner.refresh"
    path.write_text(bol.new_refresh_token(DEMO_CLIENT_ID) + "\n")
    raw = base_config(url, tokens={"refresh_margin": MARGIN})
    raw["credentials"] = {"partner": {
        "grant": "refresh_token", "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET, "refresh_token_file": str(path),
        "redirect_uri": "https://partner.example/bol/callback",
    }}
    raw["default_credentials"] = "partner"

    def file_holds_the_newest_refresh_token() -> None:
        assert list(bol.refresh_tokens) == [path.read_text().strip()]  # only the newest works
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    server, source = await started(start_proxy, raw, clock, "partner")
    file_holds_the_newest_refresh_token()
    for rotation in range(2, 6):
        await clock.advance(RENEW_EVERY)
        await renewed(source, clock)
        assert len(bol.token_requests) == rotation
        file_holds_the_newest_refresh_token()
        assert await get_status(http, server) == 200
    sent = [r.body.decode() for r in bol.token_requests]
    assert all(b.startswith("grant_type=refresh_token&refresh_token=rt.") for b in sent)

    await server.stop()
    restarted, source = await started(start_proxy, raw, clock, "partner")
    file_holds_the_newest_refresh_token()
    assert await get_status(http, restarted) == 200
    await clock.advance(RENEW_EVERY)
    await renewed(source, clock)
    file_holds_the_newest_refresh_token()
    assert await get_status(http, restarted) == 200


async def test_bol_never_sees_an_expired_token_during_steady_traffic(
    fake: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    bol, url = fake
    server, source = await started(start_proxy, one_set(url), clock)
    statuses = []
    for _ in range(40):  # ten renewals, a request every quarter second
        statuses.append(await get_status(http, server))
        await clock.advance(RENEW_EVERY / 4)
        await renewed(source, clock)
    assert statuses == [200] * 40
    assert bol.expired_seen == 0
    assert len(bol.token_requests) == 1 + 10
    assert len(bol.api_requests) == 40



async def test_a_body_over_a_mebibyte_within_a_large_replay_buffer_is_replayed(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    received: list[bytes] = []

    async def upload(request: web.Request) -> web.Response:
        received.append(await request.content.read())
        return web.Response(status=201)

    fake.extra["/retailer/offers/upload"] = upload
    server = await start_proxy(base_config(url, limits={"replay_buffer": 4 * 1024 * 1024}))
    body = bytes(range(256)) * 6000  # 1.5 MB: aiohttp would warn if sent as raw bytes
    fake.revoke_all()
    async with http.post(f"http://127.0.0.1:{server.port()}/retailer/offers/upload",
                         data=io.BytesIO(body)) as resp:
        assert resp.status == 201
    assert received == [body]  # the 401 answer did not read it; the replay delivered it
