"""Rate budgets counted across replicas in Redis (a real redis-server of the test's own).

The scripts that run in Redis repeat the arithmetic of ``proxy.budgets.Bucket``; the
first test holds the two to the same decisions. The others run replicas against an
imitation of bol that enforces a budget in real time (windows of a second).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.app import ProxyServer
from proxy.budgets import Bucket, LocalBudgets, Told
from proxy.config import CredentialSet, Secret, SharedState
from proxy.demo import FakeBol
from proxy.shared import SharedStore
from proxy.shared_budgets import POLL, SharedBudgets
from proxy.tokens import Clock
from tests.conftest import StartProxy, base_config, wait_until
from tests.metered import Metered
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]

CRED = CredentialSet("seta", "client-a", Secret("secret-a"))
KEY = ("seta", "GET /retailer/orders")


@pytest.fixture
async def budgets(redis_server: RedisServer) -> AsyncIterator[SharedBudgets]:
    store = SharedStore(SharedState(Secret(redis_server.url), "test:"))
    await store.start()
    yield SharedBudgets(store, [CRED], under_way_for=60, local=LocalBudgets())
    await store.close()


async def test_redis_and_this_process_count_a_budget_alike(budgets: SharedBudgets) -> None:
    # Times are far off (a reset in 100 s), so that only the counting decides; the one
    # refusal comes last, since it blocks the bucket for the rest of the test.
    local, pick = Bucket(), random.Random(7)
    under_way, decided = 0, []
    for step in range(301):
        action = "refusal" if step == 300 else pick.choice(["take", "take", "answer",
                                                              "answer", "silent", "release"])
        if action == "take":
            shared, alone = await budgets.take(KEY, 0.0), local.take(0.0)
            assert (shared is None) == (alone is None), step
            decided.append(shared is None)
            under_way += shared is None
        elif under_way:
            if action == "release":
                await budgets.release(KEY, 0.0)
                local.release(0.0)
            else:
                told = (Told(10, pick.randint(0, 10), 100.0) if action == "answer"
                        else Told() if action == "silent"  # no budget headers at all
                        else Told(refused=True, retry_after=100.0))
                await budgets.learn(KEY, told, 0.0)
                local.learn(told, 0.0)
            under_way -= 1
        mirror = budgets.local.get(KEY)
        if mirror is not None:
            assert (mirror.in_flight, mirror.remaining, mirror.limit) == (
                local.in_flight, local.remaining, local.limit), step
    assert decided.count(True) > 10 and decided.count(False) > 10  # both were tried
    assert await budgets.take(KEY, 0.0) is not None and local.take(0.0) is not None


async def test_a_bucket_waiting_for_answers_asks_redis_again_soon(
        budgets: SharedBudgets) -> None:
    assert await budgets.take(KEY, 0.0) is None  # the first request asks for everybody
    assert await budgets.take(KEY, 0.0) == POLL  # another replica's answer cannot wake us


async def test_budget_held_by_a_replica_that_vanished_returns_by_itself(
        redis_server: RedisServer) -> None:
    store = SharedStore(SharedState(Secret(redis_server.url), "test:"))
    await store.start()
    try:
        gone = SharedBudgets(store, [CRED], under_way_for=0.2, local=LocalBudgets())
        other = SharedBudgets(store, [CRED], under_way_for=0.2, local=LocalBudgets())
        assert await gone.take(KEY, 0.0) is None  # ...and its answer never comes
        assert await other.take(KEY, 0.0) is not None
        await asyncio.sleep(0.3)  # the time a request counts, in Redis's clock
        assert await other.take(KEY, 0.0) is None
    finally:
        await store.close()


# ------------------------------------------------------------ replicas, real time


@pytest.fixture
async def replicas(bol: tuple[FakeBol, str], redis_server: RedisServer,
                   start_proxy: StartProxy) -> AsyncIterator[tuple[Metered, list[ProxyServer]]]:
    fake, url = bol
    orders = Metered(Clock(), limit=4, window=1.0)
    fake.extra["/retailer/orders"] = orders
    raw = base_config(url, shared_state={"redis_url": redis_server.url})
    servers = [await start_proxy(raw, clock=Clock()) for _ in range(2)]
    yield orders, servers


async def get(http: aiohttp.ClientSession, server: ProxyServer) -> int:
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        await resp.read()
        return resp.status


async def test_replicas_spend_one_budget_together_and_bol_refuses_none(
    replicas: tuple[Metered, list[ProxyServer]], http: aiohttp.ClientSession,
) -> None:
    orders, servers = replicas
    statuses = await asyncio.gather(*(get(http, servers[i % 2]) for i in range(10)))
    assert statuses == [200] * 10
    assert (orders.served, orders.refused) == (10, 0)  # 4, 4 and 2 in three windows


async def test_with_redis_frozen_each_replica_counts_the_budget_alone(
    replicas: tuple[Metered, list[ProxyServer]], http: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    orders, servers = replicas
    assert await get(http, servers[0]) == 200
    redis_server.freeze()
    try:
        statuses = await asyncio.gather(*(get(http, servers[0]) for _ in range(6)))
        assert statuses == [200] * 6
        shared = servers[0].shared
        assert shared is not None and not shared.up
    finally:
        redis_server.resume()
    assert orders.refused <= 1  # at most the one the fallback learns from
    await wait_until(lambda: shared.up, within=5)




async def under_way(redis_server: RedisServer, budgets: SharedBudgets) -> int:
    client = redis_server.client()
    try:
        return int(await client.zcard(budgets._keys(KEY)[1]))
    finally:
        await client.aclose()


@pytest.fixture
async def two_replicas(redis_server: RedisServer) -> AsyncIterator[tuple[SharedStore,
                                                                         SharedBudgets,
                                                                         SharedBudgets]]:
    stores = [SharedStore(SharedState(Secret(redis_server.url), "test:")) for _ in range(2)]
    for store in stores:
        await store.start()
    yield (stores[0], SharedBudgets(stores[0], [CRED], 60, LocalBudgets()),
           SharedBudgets(stores[1], [CRED], 60, LocalBudgets()))
    for store in stores:
        await store.close()


async def test_a_ticket_taken_while_redis_froze_is_removed_once_it_answers(
    two_replicas: tuple[SharedStore, SharedBudgets, SharedBudgets],
    redis_server: RedisServer,
) -> None:
    store, mine, _ = two_replicas
    redis_server.freeze()
    try:
        assert await mine.take(KEY, 0.0) is None  # timed out: this replica's own count
    finally:
        redis_server.resume()  # Redis now runs the queued script: a ticket nobody holds
    await wait_until(lambda: store.up, within=5)
    await mine.learn(KEY, Told(10, 9, 100.0), 0.0)  # the request let go here answers
    assert await mine.take(KEY, 0.0) is None  # Redis again: the orphan goes first
    assert await under_way(redis_server, mine) == 1  # only the request just let go


async def test_while_redis_is_down_a_replica_counts_only_its_own_requests(
    two_replicas: tuple[SharedStore, SharedBudgets, SharedBudgets],
    redis_server: RedisServer,
) -> None:
    _, mine, other = two_replicas
    assert await other.take(KEY, 0.0) is None  # another replica's first request, unanswered
    assert await mine.take(KEY, 0.0) == POLL  # in Redis: wait for that answer
    redis_server.freeze()
    try:
        # Alone now, this replica cannot hear the other's answer: its own count decides.
        assert await mine.take(KEY, 0.0) is None
        await mine.learn(KEY, Told(10, 9, 100.0), 0.0)
        assert await mine.take(KEY, 0.0) is None
    finally:
        redis_server.resume()
