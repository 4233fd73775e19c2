"""The shared-state layer against a real redis-server: lease, compare-and-set, breaker.

No mock of Redis: every test has a redis-server of its own (the ``redis_server`` fixture)
and freezes it with SIGSTOP where a test needs Redis to stop answering. Time that the
code waits on (the probe's second, the lease's renewals) is a :class:`FakeClock`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.config import CredentialSet, Secret, SharedState
from proxy.shared import (
    OPERATION_TIMEOUT,
    PROBE_INTERVAL,
    SOCKET_TIMEOUT,
    Health,
    Lease,
    SharedStateDown,
    SharedStore,
    settings_warnings,
)
from proxy.shared_tokens import LEASE_LOST, VERSION_MOVED, TokenGroup
from tests.conftest import FakeClock, settle, wait_until
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]

PARTNER = CredentialSet(name="partner", client_id="partner-id",
                        client_secret=Secret("partner-secret-0123456789"),
                        grant="refresh_token")
SHOP = CredentialSet(name="shop", client_id="shop-id", client_secret=Secret("shop-secret-987"))


@pytest.fixture
async def store(redis_server: RedisServer, clock: FakeClock) -> AsyncIterator[SharedStore]:
    shared = SharedStore(SharedState(Secret(redis_server.url)), clock)
    await shared.start()
    yield shared
    await shared.close()


async def raw(redis_server: RedisServer, *command: Any) -> Any:
    client = redis_server.client()
    try:
        return await client.execute_command(*command)
    finally:
        await client.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Wait, bounded, until an asynchronous look at Redis says yes."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - Redis has no event to wait on
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------- lease


async def test_a_held_lease_is_refused_to_everyone_else(store: SharedStore,
                                                        clock: FakeClock) -> None:
    first = await Lease.acquire(store, store.key("lock"), 10, clock)
    assert first is not None
    assert await Lease.acquire(store, store.key("lock"), 10, clock) is None


async def test_only_the_owner_renews_or_releases_a_lease(
    store: SharedStore, clock: FakeClock, redis_server: RedisServer
) -> None:
    key = store.key("lock")
    held = await Lease.acquire(store, key, 10, clock)
    assert held is not None
    stranger = Lease(store, key, "someone-else", 10, clock)
    assert not await stranger.confirm()
    await stranger.release()
    assert await raw(redis_server, "GET", key) == held.owner.encode()
    assert await held.confirm()
    await held.release()
    assert await raw(redis_server, "EXISTS", key) == 0


async def test_a_lease_that_expired_and_went_to_another_is_lost_for_good(
    store: SharedStore, clock: FakeClock, redis_server: RedisServer
) -> None:
    key = store.key("lock")
    held = await Lease.acquire(store, key, 10, clock)
    assert held is not None
    await raw(redis_server, "PEXPIRE", key, 1)  # its time ran out in Redis
    await eventually(lambda: _gone(redis_server, key))
    other = await Lease.acquire(store, key, 10, clock)
    assert other is not None
    assert not await held.confirm()
    assert held.lost
    await held.release()
    assert await raw(redis_server, "GET", key) == other.owner.encode()


async def _gone(redis_server: RedisServer, key: str) -> bool:
    return bool(await raw(redis_server, "EXISTS", key) == 0)


async def test_a_held_lease_is_renewed_while_its_work_runs_and_released_after(
    store: SharedStore, clock: FakeClock, redis_server: RedisServer
) -> None:
    key = store.key("lock")
    lease = await Lease.acquire(store, key, 3, clock)
    assert lease is not None
    async with lease:
        await raw(redis_server, "PEXPIRE", key, 100_000)  # a renewal sets it back to 3 s

        async def renewed() -> bool:
            return 0 < int(await raw(redis_server, "PTTL", key)) <= 3000

        assert not await renewed()
        await clock.advance(1.0)  # a third of the lease
        await eventually(renewed)
    assert await raw(redis_server, "EXISTS", key) == 0


# --------------------------------------------------------------- compare-and-set


async def test_compare_and_set_moves_the_version_for_the_lease_holder_only(
    store: SharedStore, clock: FakeClock
) -> None:
    group = TokenGroup(store, PARTNER, clock)
    lease = await Lease.acquire(store, group.lock_key, 10, clock)
    assert lease is not None
    assert await group.swap_refresh(0, lease.owner, Secret("rt-1")) == 1  # seeding
    assert await group.swap_refresh(1, "not-the-owner", Secret("rt-x")) == LEASE_LOST
    assert await group.swap_refresh(0, lease.owner, Secret("rt-x")) == VERSION_MOVED
    assert await group.swap_refresh(1, lease.owner, Secret("rt-2")) == 2
    record = await group.read_refresh()
    assert record.version == 2 and record.token == Secret("rt-2")


async def test_seeding_happens_only_while_the_record_is_absent(
    store: SharedStore, clock: FakeClock
) -> None:
    group = TokenGroup(store, PARTNER, clock)
    assert await group.swap_refresh(0, "", Secret("rt-from-a-file")) == 1
    assert await group.swap_refresh(0, "", Secret("rt-from-another-file")) == VERSION_MOVED
    assert (await group.read_refresh()).token == Secret("rt-from-a-file")


async def test_an_authorisation_replaces_whatever_version_was_there(
    store: SharedStore, clock: FakeClock
) -> None:
    group = TokenGroup(store, PARTNER, clock)
    assert await group.authorise(Secret("rt-new-chain")) == 1
    assert await group.swap_refresh(1, "", Secret("rt-2")) == 2
    assert await group.authorise(Secret("rt-newer-chain")) == 3
    assert (await group.read_refresh()).token == Secret("rt-newer-chain")


# --------------------------------------------------------------------- token records


async def test_a_stored_token_is_read_with_its_remaining_life(
    store: SharedStore, clock: FakeClock
) -> None:
    group = TokenGroup(store, SHOP, clock)
    assert (await group.read()).token is None
    await group.store_token(Secret("access-1"), 299, remaining=200)
    token = (await group.read()).token
    assert token is not None and token.value == Secret("access-1") and token.lifetime == 299
    assert clock.now + 199 < token.expires_at <= clock.now + 200


async def test_a_refused_token_is_deleted_only_while_it_is_the_stored_one(
    store: SharedStore, clock: FakeClock
) -> None:
    group = TokenGroup(store, SHOP, clock)
    await group.store_token(Secret("access-1"), 299, remaining=200)
    refused = (await group.read()).token
    assert refused is not None
    await group.store_token(Secret("access-2"), 299, remaining=250)  # another replica's
    assert not await group.delete_token(refused)
    current = (await group.read()).token
    assert current is not None and current.value == Secret("access-2")
    assert await group.delete_token(current)
    assert (await group.read()).token is None


async def test_a_value_that_does_not_open_counts_as_absent_and_is_logged_once(
    store: SharedStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    rotated = CredentialSet(name="shop", client_id="shop-id",
                            client_secret=Secret("the-secret-after-rotation"))
    await TokenGroup(store, SHOP, clock).store_token(Secret("access-1"), 299, remaining=200)
    group = TokenGroup(store, rotated, clock)
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        assert (await group.read()).token is None
    warnings = [r for r in caplog.records if "does not open" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "access-1" not in caplog.text


def test_sets_of_one_client_id_share_a_key_and_refresh_sets_are_per_seller(
    clock: FakeClock,
) -> None:
    settings = SharedState(Secret("redis://127.0.0.1:1"), "p:")
    store = SharedStore(settings, clock)
    other_name = CredentialSet(name="shop-2", client_id="shop-id",
                               client_secret=Secret("shop-secret-987"))
    assert TokenGroup(store, SHOP, clock).token_key == TokenGroup(store, other_name,
                                                                  clock).token_key
    seller_b = CredentialSet(name="seller-b", client_id="partner-id",
                             client_secret=PARTNER.client_secret, grant="refresh_token")
    assert TokenGroup(store, PARTNER, clock).refresh_key != TokenGroup(store, seller_b,
                                                                       clock).refresh_key
    for key in (TokenGroup(store, SHOP, clock).token_key,
                TokenGroup(store, PARTNER, clock).refresh_key):
        assert key.startswith("p:") and "shop-id" not in key and "partner-id" not in key


# ------------------------------------------------------------------ circuit breaker


def test_health_goes_down_on_the_first_failure_and_up_on_the_first_answer() -> None:
    health = Health()
    assert health.failed("timeout", 10.0)  # the transition: logged
    assert not health.failed("connection", 11.0)  # already down: counted only
    assert (health.up, health.since, health.last_error, health.errors) == (
        False, 10.0, "connection", 2)
    assert health.answered(12.0)
    assert not health.answered(13.0)
    assert (health.up, health.since) == (True, 12.0)


async def test_a_frozen_redis_fails_fast_then_heals_by_itself_once_it_answers(
    store: SharedStore, clock: FakeClock, redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.shared")
    redis_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(SharedStateDown) as info:
            await store.run(lambda r: r.get("k"))
        assert time.monotonic() - started <= OPERATION_TIMEOUT + 0.5  # never a hang
        assert info.value.reason == "timeout" and not store.up
        started = time.monotonic()
        for _ in range(100):  # while down: no network, no wait
            with pytest.raises(SharedStateDown):
                await store.run(lambda r: r.get("k"))
        # One call that reached the frozen Redis would alone take its socket timeout.
        assert time.monotonic() - started < SOCKET_TIMEOUT
        await settle()  # the probe starts and waits on the clock
        await clock.advance(PROBE_INTERVAL)  # a probe, which Redis does not answer
        await wait_until(lambda: store.health.errors >= 2)
        assert not store.up
    finally:
        redis_server.resume()
    await clock.advance(PROBE_INTERVAL)
    await wait_until(lambda: store.up)
    assert await store.run(lambda r: r.set("k", "v"))
    transitions = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(transitions) == 2
    assert "unreachable (timeout)" in transitions[0] and "reachable again" in transitions[1]


async def test_an_unreachable_redis_at_start_is_down_without_delaying_the_start(
    clock: FakeClock,
) -> None:
    from tests.conftest import free_port

    store = SharedStore(SharedState(Secret(f"redis://127.0.0.1:{free_port()}")), clock)
    try:
        await store.start()
        assert not store.up and store.health.last_error == "connection"
    finally:
        await store.close()


# ------------------------------------------------------------------ Redis settings


@pytest.mark.parametrize(("aof", "policy", "expected"), [
    ("1", "noeviction", []),
    ("1", "volatile-lru", []),  # the refresh record has no TTL: never evicted
    ("0", "noeviction", ["no append-only file"]),
    ("1", "allkeys-lru", ["maxmemory-policy allkeys-lru"]),
    ("0", "allkeys-random", ["no append-only file", "maxmemory-policy allkeys-random"]),
])
def test_settings_that_can_lose_a_rotation_are_named(
    aof: str, policy: str, expected: list[str]
) -> None:
    warnings = settings_warnings({"aof_enabled": aof}, {"maxmemory_policy": policy})
    assert len(warnings) == len(expected)
    for warning, words in zip(warnings, expected, strict=True):
        assert words in warning


async def test_a_redis_without_aof_that_evicts_any_key_is_warned_about_once_at_start(
    tmp_path: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "careless", "--appendonly", "no",
                         "--maxmemory-policy", "allkeys-lru")
    await server.start()
    caplog.set_level(logging.WARNING, logger="proxy.shared")
    store = SharedStore(SharedState(Secret(server.url)), clock)
    try:
        await store.start()
        await store.start()
    finally:
        await store.close()
        server.kill()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "append-only" in lines[0] and "allkeys-lru" in lines[1]


async def test_without_refresh_token_sets_redis_durability_is_not_warned_about(
    tmp_path: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "careless", "--appendonly", "no",
                         "--maxmemory-policy", "allkeys-lru")
    await server.start()
    caplog.set_level(logging.WARNING, logger="proxy.shared")
    store = SharedStore(SharedState(Secret(server.url)), clock, rotations=False)
    try:
        await store.start()
    finally:
        await store.close()
        server.kill()
    assert caplog.records == []  # tokens and budgets come back with the next renewal


async def test_a_lease_whose_set_timed_out_in_a_frozen_redis_is_removed_once_it_answers(
    store: SharedStore, clock: FakeClock, redis_server: RedisServer
) -> None:
    key = store.key("lock")
    redis_server.freeze()
    try:
        with pytest.raises(SharedStateDown):
            await Lease.acquire(store, key, 30, clock)  # the SET waits in Redis's socket
        await settle()
    finally:
        redis_server.resume()
    await eventually(lambda: _exists(redis_server, key))  # Redis ran it on resuming
    await clock.advance(PROBE_INTERVAL)
    await wait_until(lambda: store.up)
    await eventually(lambda: _gone(redis_server, key))  # nobody waits on a phantom holder
    assert await Lease.acquire(store, key, 30, clock) is not None


async def _exists(redis_server: RedisServer, key: str) -> bool:
    return not await _gone(redis_server, key)
