"""One rate budget per set and endpoint, kept by the proxy for every tool of the set.

The imitation of bol meters one endpoint with a fixed window on the test's fake clock,
as bol does (a limit per window, the state in X-RateLimit-* headers, 429 and Retry-After
once spent); the proxy runs on the same clock, so waits of seconds take none.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import ProxyServer
from proxy.budgets import MAX_BUCKETS_PER_SET
from proxy.config import validate
from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, FakeBol, start_fake
from tests.conftest import FakeClock, StartProxy, base_config, settle, wait_until
from tests.metered import Metered

ORDERS = "/retailer/orders"


def spawn(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    """A task for the test to await or cancel (the test keeps the reference)."""
    return asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]


Start = Callable[..., Awaitable[tuple[ProxyServer, str]]]


@pytest.fixture
def metered_proxy(bol: tuple[FakeBol, str], start_proxy: StartProxy,
                  clock: FakeClock) -> Start:
    """The proxy on the fake clock in front of the imitation with metered endpoints."""
    fake, url = bol

    async def start(endpoints: dict[str, Metered], **overrides: Any) -> tuple[ProxyServer,
                                                                             str]:
        fake.extra.update(endpoints)
        server = await start_proxy(base_config(url, **overrides), clock=clock)
        return server, f"http://127.0.0.1:{server.port()}"

    return start


async def get(http: aiohttp.ClientSession, url: str, method: str = "GET",
              **headers: str) -> tuple[int, dict[str, str]]:
    async with http.request(method, url, headers=headers) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


def waiting(server: ProxyServer, bucket: str = f"GET {ORDERS}", set_name: str = "seta") -> int:
    return server.limiter.waiting((set_name, bucket))


async def test_tools_sharing_a_set_share_its_budget_and_bol_refuses_none(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=3, window=10)
    server, base = await metered_proxy({ORDERS: orders})
    tools = [spawn(get(http, base + ORDERS)) for _ in range(7)]
    await wait_until(lambda: waiting(server) == 4 and orders.served == 3)  # 4 wait
    await clock.advance(10)
    await wait_until(lambda: waiting(server) == 1)
    await clock.advance(10)
    statuses = [status for status, _ in await asyncio.gather(*tools)]
    assert statuses == [200] * 7
    assert (orders.served, orders.refused) == (7, 0)


async def test_a_request_that_would_wait_too_long_gets_429_at_once_without_asking_bol(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=1, window=60)
    _, base = await metered_proxy({ORDERS: orders}, rate_limits={"max_wait": 5})
    assert (await get(http, base + ORDERS))[0] == 200
    async with http.get(base + ORDERS) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "60"
        assert resp.headers["X-RateLimit-Limit"] == "1"
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        problem = await resp.json(content_type=None)
    assert problem["type"] == "urn:bol-proxy:rate-limited"
    assert "GET /retailer/orders" in problem["detail"]
    assert (orders.served, orders.refused) == (1, 0)  # bol was not asked


async def test_other_endpoints_and_other_sets_are_not_held_up_by_a_spent_budget(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=1, window=60)
    offers = Metered(clock, limit=5, window=60)
    _, base = await metered_proxy({ORDERS: orders, "/retailer/offers/1": offers},
                                  rate_limits={"max_wait": 0})
    assert (await get(http, base + ORDERS))[0] == 200
    assert (await get(http, base + ORDERS))[0] == 429  # seta's orders: spent
    assert (await get(http, base + "/retailer/offers/1"))[0] == 200
    orders.window_end = -math.inf  # bol counts per client: setb has its own
    assert (await get(http, base + "/setb" + ORDERS))[0] == 200


async def test_bols_429_without_budget_headers_blocks_the_bucket_briefly(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=1, window=1, headers=False)
    _, base = await metered_proxy({ORDERS: orders}, rate_limits={"max_wait": 0})
    assert (await get(http, base + ORDERS))[0] == 200
    status, _ = await get(http, base + ORDERS)  # bol's own 429: nothing to wait by
    assert status == 429 and orders.refused == 1
    assert (await get(http, base + ORDERS))[0] == 429  # the proxy's: blocked for 1 s
    assert orders.refused == 1
    await clock.advance(1)
    assert (await get(http, base + ORDERS))[0] == 200


async def test_a_read_that_bol_refused_is_asked_again_once_budget_returns(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=2, window=4)
    server, base = await metered_proxy({ORDERS: orders})
    assert (await get(http, base + ORDERS))[0] == 200  # one left, bol says
    orders.used += 1  # ...until another client of the same credentials spends it
    tool = spawn(get(http, base + ORDERS))
    await wait_until(lambda: orders.refused == 1 and waiting(server) == 1)
    await clock.advance(4)  # bol's Retry-After
    assert (await tool)[0] == 200
    assert orders.methods == ["GET", "GET", "GET"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_writes_that_bol_refused_get_its_429_unchanged(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock, method: str,
) -> None:
    orders = Metered(clock, limit=0, window=4)
    _, base = await metered_proxy({ORDERS: orders})
    status, headers = await get(http, base + ORDERS, method)
    assert status == 429
    assert headers["Retry-After"] == "4"
    assert orders.methods == [method]  # bol may queue writes: never sent twice


async def test_reset_in_epoch_milliseconds_is_understood(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    wall = clock.wall
    orders = Metered(clock, limit=1, window=3,
                     reset_as=lambda left: str(int((wall() + left) * 1000)))
    server, base = await metered_proxy({ORDERS: orders})
    assert (await get(http, base + ORDERS))[0] == 200
    tool = spawn(get(http, base + ORDERS))
    await wait_until(lambda: waiting(server) == 1)
    await clock.advance(2.9)
    await settle()
    assert not tool.done()  # 3 s, not 1.8 million years nor 0
    await clock.advance(0.1)
    assert (await tool)[0] == 200
    assert orders.refused == 0


async def test_a_tool_that_leaves_while_waiting_costs_nothing(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=1, window=10)
    server, base = await metered_proxy({ORDERS: orders})
    assert (await get(http, base + ORDERS))[0] == 200
    leaving = spawn(get(http, base + ORDERS))
    await wait_until(lambda: waiting(server) == 1)
    leaving.cancel()
    await wait_until(lambda: waiting(server) == 0)
    staying = spawn(get(http, base + ORDERS))
    await wait_until(lambda: waiting(server) == 1)
    await clock.advance(10)
    assert (await staying)[0] == 200
    assert orders.served == 2 and orders.refused == 0  # the one that left spent nothing


async def test_max_wait_header_zero_never_waits_and_a_bad_one_is_a_bad_request(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=1, window=2)
    _, base = await metered_proxy({ORDERS: orders})
    assert (await get(http, base + ORDERS))[0] == 200
    assert (await get(http, base + ORDERS, **{"X-Bol-Proxy-Max-Wait": "0"}))[0] == 429
    assert (await get(http, base + ORDERS, **{"X-Bol-Proxy-Max-Wait": "soon"}))[0] == 400
    assert (await get(http, base + ORDERS, **{"X-Bol-Proxy-Max-Wait": "-1"}))[0] == 400
    assert orders.served == 1


async def test_with_rate_limits_off_every_request_goes_and_bols_429_passes(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=1, window=60)
    _, base = await metered_proxy({ORDERS: orders}, rate_limits={"enabled": False})
    assert [(await get(http, base + ORDERS))[0] for _ in range(3)] == [200, 429, 429]
    assert orders.refused == 2


async def test_limits_endpoint_and_metrics_show_every_bucket(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=2, window=60)
    _, base = await metered_proxy({ORDERS: orders}, rate_limits={"max_wait": 1})
    for _ in range(3):
        await get(http, base + ORDERS)
    async with http.get(base + "/_proxy/limits") as resp:
        limits = await resp.json()
    assert limits["enabled"] is True and limits["max_wait"] == 1
    bucket = limits["sets"]["seta"]["GET /retailer/orders"]
    assert (bucket["limit"], bucket["remaining"], bucket["waiting"]) == (2, 0, 0)
    assert bucket["reset"] is not None and bucket["blocked_until"] is None
    async with http.get(base + "/_proxy/metrics") as resp:
        text = await resp.text()
    labels = '{bucket="GET /retailer/orders",set="seta"}'
    assert f"bol_proxy_rate_limit_limit{labels} 2.0" in text
    assert f"bol_proxy_rate_limit_remaining{labels} 0.0" in text
    assert f"bol_proxy_rate_limit_refusals_total{labels} 1.0" in text


async def test_a_reload_keeps_the_buckets_of_unchanged_sets_and_drops_the_others(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=5, window=60)
    server, base = await metered_proxy({ORDERS: orders})
    await get(http, base + ORDERS)
    await get(http, base + "/setb" + ORDERS)
    raw = base_config("http://127.0.0.1:1")
    raw["upstream"] = server.config.upstream.__dict__ | {"allowed_paths": ["/retailer"]}
    raw["upstream"]["allowed_paths"] = list(raw["upstream"]["allowed_paths"])
    raw["credentials"]["setb"]["client_id"] = "another-client"  # another account's budget
    await server.reload(validate(raw))
    assert {s.set_name for s, _ in server.limiter.snapshot()} == {"seta"}
    del raw["credentials"]["setb"]
    raw["credentials"]["seta"]["prefetch"] = False  # the same client: the same budget
    await server.reload(validate(raw))
    assert {s.set_name for s, _ in server.limiter.snapshot()} == {"seta"}


async def test_requests_waiting_for_budget_at_shutdown_are_answered_429_at_once(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    orders = Metered(clock, limit=1, window=30)
    server, base = await metered_proxy({ORDERS: orders}, shutdown_timeout=5,
                                       rate_limits={"max_wait": 60})
    await get(http, base + ORDERS)
    tool = spawn(get(http, base + ORDERS))
    await wait_until(lambda: waiting(server) == 1)
    stopping = spawn(server.stop())
    status, headers = await tool  # budget returns in 30 s; the proxy stops within 5
    assert status == 429 and headers["Retry-After"] == "30"
    await stopping
    assert orders.methods == ["GET"]


async def test_a_401_gives_its_budget_back_and_teaches_the_bucket_nothing(
    metered_proxy: Start, http: aiohttp.ClientSession, clock: FakeClock,
    bol: tuple[FakeBol, str],
) -> None:
    fake, _ = bol
    orders = Metered(clock, limit=2, window=60)
    server, base = await metered_proxy({ORDERS: orders})
    assert (await get(http, base + ORDERS))[0] == 200  # one of two left
    fake.revoke_all()  # bol refuses the token at the door; the replay gets a new one
    assert (await get(http, base + ORDERS))[0] == 200
    assert orders.served == 2 and orders.refused == 0
    bucket = server.limiter.local.get(("seta", f"GET {ORDERS}"))
    assert bucket is not None and bucket.limit == 2 and bucket.in_flight == 0


class HeldLogin(FakeBol):
    """bol whose token endpoint answers only once the test lets it (``hold``)."""

    hold: asyncio.Event | None = None
    held = 0  # token requests that came while held

    async def token(self, request: web.Request) -> web.Response:
        if self.hold is not None:
            self.held += 1
            await self.hold.wait()
        return await super().token(request)


async def test_a_replay_that_waits_long_for_budget_goes_with_the_token_current_then(
    start_proxy: StartProxy, http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    fake = HeldLogin(clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET}, ttl=30, clock=clock.wall)
    runner, url = await start_fake(fake)
    try:
        orders = Metered(clock, limit=2, window=60)
        fake.extra[ORDERS] = orders
        raw = base_config(url, rate_limits={"max_wait": 120})
        del raw["credentials"]["setb"]
        server = await start_proxy(raw, clock=clock)
        base = f"http://127.0.0.1:{server.port()}"
        assert (await get(http, base + ORDERS))[0] == 200  # one of two left
        fake.revoke_all()
        fake.hold = asyncio.Event()
        replayed = spawn(get(http, base + ORDERS))  # 401, then its renewal is held
        await wait_until(lambda: fake.held == 1)
        other = spawn(get(http, base + ORDERS))  # takes the budget the 401 gave back...
        await wait_until(lambda: orders.served == 1 and server.limiter.local.get(
            ("seta", f"GET {ORDERS}")).in_flight == 1)  # type: ignore[union-attr]
        fake.hold.set()  # ...and waits for the same renewal
        fake.hold = None
        assert (await other)[0] == 200
        await wait_until(lambda: waiting(server) == 1)  # the replay waits for the window
        for _ in range(6):
            await clock.advance(10)  # the token renews meanwhile, every 15 s
        assert (await replayed)[0] == 200
        assert fake.expired_seen == 0  # the replay did not go with the token of t=0
    finally:
        await runner.cleanup()


async def test_made_up_paths_cannot_crowd_a_real_endpoint_out_of_the_buckets_or_metrics(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    base = f"http://127.0.0.1:{server.port()}"
    for i in range(300):  # lowercase words: each one an endpoint of its own
        word = "".join(chr(ord("a") + int(d)) for d in f"{i:03d}")
        assert (await get(http, f"{base}/retailer/made-up-{word}"))[0] == 404
    assert (await get(http, base + ORDERS))[0] == 200
    assert len(server.limiter.local) <= MAX_BUCKETS_PER_SET
    async with http.get(base + "/_proxy/metrics") as resp:
        text = await resp.text()
    assert 'bol_proxy_rate_limit_limit{bucket="GET /retailer/orders",set="seta"}' in text
