"""Forwarding through the real proxy to the recording imitation of bol."""

from __future__ import annotations

import aiohttp
from yarl import URL

from tests.conftest import StartProxy, base_config

from proxy.demo import DEMO_CLIENT_ID, FakeBol


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
        assert resp.headers["X-RateLimit-Limit"] == "25"
    seen = fake.api_requests[-1]
    assert seen.target == target
    assert seen.client_id == DEMO_CLIENT_ID
    assert seen.headers["Authorization"].startswith("Bearer demo.")
    assert seen.headers["X-Custom"] == "kept"
    assert "X-Drop" not in seen.headers
    assert "Proxy-Authorization" not in seen.headers
