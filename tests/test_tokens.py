"""Token renewal, single flight and invalidation, without sockets.

The token sources run against a fake ``obtain`` coroutine and the :class:`FakeClock`: time
moves only when a test advances it, so every renewal, retry and expiry happens at a known
moment and no test waits for wall-clock time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.config import Config, CredentialSet, Secret, TokenPolicy, validate
from proxy.errors import TokenUnavailable
from proxy.oauth import Grant, TokenEndpointError
from proxy.tokens import (
    EXPIRY_SLACK,
    MAX_BACKOFF,
    REJECTED_BACKOFF,
    REPLACED_401_HOLD,
    Obtain,
    RenewalPolicy,
    Token,
    Tokens,
    TokenSource,
)
from tests.conftest import FakeClock, settle

LIFETIME = 100.0  # expires_in of the fake token endpoint, seconds
MARGIN = 20.0  # tokens.refresh_margin of the test configurations


def half() -> float:
    """The injected random source of most tests: jitter is an eighth of the margin."""
    return 0.5


# With half, a token is renewed this long after it was requested:
RENEW_EVERY = LIFETIME - MARGIN + 0.5 * MARGIN / 4
REJECTIONS = ["invalid_client", "unauthorized_client", "invalid_grant"]


class FakeObtain:
    """The token endpoint of one set: counts calls, can fail or hang until released."""

    def __init__(self, clock: FakeClock, name: str, expires_in: float | None = LIFETIME) -> None:
        self.clock = clock
        self.name = name
        self.expires_in = expires_in
        self.calls = 0
        self.times: list[float] = []  # clock time of every call
        self.failure: TokenEndpointError | None = None
        self.failures_left: int | None = None  # None: fail until told otherwise
        self.gate: asyncio.Event | None = None

    def fail(self, code: str, detail: str = "test failure", times: int | None = None) -> None:
        self.failure = TokenEndpointError(code, detail)
        self.failures_left = times

    def succeed(self) -> None:
        self.failure = None

    def hang(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()
        self.gate = None

    async def __call__(self) -> Grant:
        self.calls += 1
        self.times.append(self.clock.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            failure = self.failure
            if self.failures_left is not None:
                self.failures_left -= 1
                if self.failures_left <= 0:
                    self.failure = None
            raise failure
        return Grant(Secret(f"token-{self.name}-{self.calls}"), self.expires_in)


def make_config(*names: str, prefetch: bool = True, secrets: dict[str, str] | None = None,
                client_ids: dict[str, str] | None = None, **tokens: float) -> Config:
    """A validated configuration with one credential set per name."""
    secrets = secrets or {}
    client_ids = client_ids or {}
    raw: dict[str, Any] = {
        "credentials": {
            name: {"client_id": client_ids.get(name, f"id-{name}"),
                   "client_secret": secrets.get(name, f"secret-{name}"), "prefetch": prefetch}
            for name in names
        },
        "tokens": {"refresh_margin": MARGIN, "default_ttl": 50, "idle_after": 300, **tokens},
    }
    return validate(raw, source="test")


class Bench:
    """Tokens for a configuration, each set with its own :class:`FakeObtain`."""

    def __init__(self, config: Config, clock: FakeClock, rand: Callable[[], float]) -> None:
        self.clock = clock
        self.obtains: dict[CredentialSet, FakeObtain] = {}
        self.tokens = Tokens(config, self.obtain_for, clock, rand)

    def obtain_for(self, cred: CredentialSet) -> Obtain:
        return self.obtains.setdefault(cred, FakeObtain(self.clock, cred.name))

    def obtain(self, name: str) -> FakeObtain:
        """The endpoint of set ``name`` as currently configured (created if need be)."""
        cred = self.tokens.config.credentials[name]
        return self.obtains.setdefault(cred, FakeObtain(self.clock, name))

    def source(self, name: str = "seta") -> TokenSource:
        return self.tokens.source(name)


MakeBench = Callable[..., Bench]


@pytest.fixture
async def make_bench(clock: FakeClock) -> AsyncIterator[MakeBench]:
    benches: list[Bench] = []

    def make(config: Config | None = None, rand: Callable[[], float] = half) -> Bench:
        bench = Bench(config or make_config("seta"), clock, rand)
        benches.append(bench)
        return bench

    yield make
    for bench in benches:
        await bench.tokens.close()


async def advance_by_steps(clock: FakeClock, total: float, step: float) -> None:
    for _ in range(round(total / step)):
        await clock.advance(step)


def renewal_tasks() -> list[asyncio.Task[Any]]:
    """Token tasks still running (renewal loops and fetches)."""
    return [t for t in asyncio.all_tasks() if not t.done()
            and getattr(t.get_coro(), "__qualname__", "").startswith("TokenSource.")]


async def outcome(source: TokenSource) -> Token | TokenUnavailable:
    """``source.get()``, with TokenUnavailable as a value (for tasks in a TaskGroup)."""
    try:
        return await source.get()
    except TokenUnavailable as exc:
        return exc


async def many_gets(source: TokenSource, n: int) -> list[Token | TokenUnavailable]:
    return list(await asyncio.gather(*(outcome(source) for _ in range(n))))


# --------------------------------------------------------------------------- RenewalPolicy


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_renewal_is_the_margin_less_jitter_before_expiry(rand: float) -> None:
    policy = RenewalPolicy(TokenPolicy(refresh_margin=30, default_ttl=299), lambda: rand)
    token = policy.token(Grant(Secret("t"), 299), sent_at=1000.0)
    assert token.expires_at == 1299.0
    assert token.renew_at == pytest.approx(1299.0 - 30 + rand * 30 / 4)


def test_renewal_jitter_stays_within_a_quarter_of_the_margin_and_spreads_replicas() -> None:
    policy = RenewalPolicy(TokenPolicy(refresh_margin=40), random.Random(7).random)
    leads = [1299.0 - policy.token(Grant(Secret("t"), 299), 1000.0).renew_at
             for _ in range(200)]
    assert all(30 <= lead <= 40 for lead in leads)  # never earlier than the margin
    assert max(leads) - min(leads) > 5  # replicas do not renew in step


@pytest.mark.parametrize(("expires_in", "margin", "renew_after"), [
    (40, 30, 20),  # margin less jitter would renew after 13.75 s: half the lifetime instead
    (10, 30, 5),
    (60, 30, 33.75),  # margin less jitter (26.25 s) is less than half: it stands
])
def test_renewal_is_never_more_than_half_the_lifetime_ahead(
    expires_in: float, margin: float, renew_after: float
) -> None:
    policy = RenewalPolicy(TokenPolicy(refresh_margin=margin), half)
    token = policy.token(Grant(Secret("t"), expires_in), sent_at=0.0)
    assert token.renew_at == renew_after


def test_missing_expires_in_uses_default_ttl() -> None:
    policy = RenewalPolicy(TokenPolicy(refresh_margin=10, default_ttl=77), half)
    token = policy.token(Grant(Secret("t"), None), sent_at=500.0)
    assert token.expires_at == 577.0
    assert token.usable_until == 577.0 - EXPIRY_SLACK


def test_token_lifetime_counts_from_when_the_request_was_sent() -> None:
    policy = RenewalPolicy(TokenPolicy(), half)
    token = policy.token(Grant(Secret("t"), 299), sent_at=10.0)
    assert token.obtained_at == 10.0
    assert token.expires_at == 309.0


@pytest.mark.parametrize(("failures", "delay"), [
    (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 32.0), (7, 60.0), (8, 60.0),
    (50, 60.0),
])
def test_backoff_doubles_from_one_second_to_a_minute(failures: int, delay: float) -> None:
    policy = RenewalPolicy(TokenPolicy(), lambda: 1.0)  # the top of the jitter range
    assert policy.retry_delay(failures, rejected=False) == delay


@pytest.mark.parametrize("failures", [1, 2, 5, 10])
def test_backoff_jitter_never_goes_below_one_second(failures: int) -> None:
    policy = RenewalPolicy(TokenPolicy(), lambda: 0.0)
    assert policy.retry_delay(failures, rejected=False) == 1.0


def test_backoff_is_jittered_within_its_ceiling() -> None:
    policy = RenewalPolicy(TokenPolicy(), random.Random(3).random)
    for failures in range(1, 12):
        ceiling = min(MAX_BACKOFF, 2.0 ** (failures - 1))
        delays = {policy.retry_delay(failures, rejected=False) for _ in range(50)}
        assert all(1.0 <= d <= ceiling for d in delays)
        if ceiling > 1:
            assert len(delays) > 1  # jittered, not a fixed schedule


@pytest.mark.parametrize("rand", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("failures", [1, 3, 20])
def test_rejected_credentials_are_retried_no_faster_than_once_a_minute(
    rand: float, failures: int
) -> None:
    policy = RenewalPolicy(TokenPolicy(), lambda: rand)
    assert policy.retry_delay(failures, rejected=True) >= REJECTED_BACKOFF == 60.0


# --------------------------------------------------------------------------- fetch and cache


async def test_prefetch_set_is_fetched_at_start(make_bench: MakeBench) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    token = bench.source().current()
    assert bench.obtain("seta").calls == 1
    assert token is not None and token.value == Secret("token-seta-1")
    assert await bench.source().get() is token
    assert bench.obtain("seta").calls == 1


async def test_missing_expires_in_uses_default_ttl_in_the_source(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(make_config("seta", default_ttl=50))
    bench.obtain("seta").expires_in = None
    token = await bench.source().get()
    assert token.expires_at - token.obtained_at == 50
    assert token.obtained_at == clock.now


@pytest.mark.parametrize(("offset", "handed_out"), [
    (LIFETIME - EXPIRY_SLACK - 0.1, True),
    (LIFETIME - EXPIRY_SLACK, False),  # within one second of expiry
    (LIFETIME - 0.5, False),
    (LIFETIME, False),
    (LIFETIME + 50, False),
])
async def test_token_is_never_handed_out_within_a_second_of_expiry_or_after(
    make_bench: MakeBench, clock: FakeClock, offset: float, handed_out: bool
) -> None:
    bench = make_bench()
    first = await bench.source().get()
    bench.obtain("seta").fail("http_500")  # renewals fail: only the first token exists
    await clock.advance(offset)
    if handed_out:
        assert await bench.source().get() is first
        assert bench.source().current() is first
    else:
        assert bench.source().current() is None
        with pytest.raises(TokenUnavailable):
            await bench.source().get()


async def test_token_that_arrives_already_expired_is_not_handed_out(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    obtain = bench.obtain("seta")
    obtain.hang()
    async with asyncio.TaskGroup() as tg:
        waiter = tg.create_task(outcome(bench.source()))
        await settle()
        await clock.advance(LIFETIME)  # the answer comes after its own lifetime
        obtain.release()
    assert isinstance(waiter.result(), TokenUnavailable)
    assert bench.source().current() is None


async def test_grant_unusable_on_arrival_is_a_failed_attempt_and_backs_off(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    obtain = bench.obtain("seta")
    obtain.expires_in = 0.5  # shorter than the one-second slack: never usable
    bench.tokens.start()
    await settle()
    assert obtain.calls == 1  # not a tight loop of token requests
    assert bench.source().failures == 1
    await clock.advance(1.0)
    assert obtain.calls == 2


# --------------------------------------------------------------------------- single flight


async def test_concurrent_gets_share_one_fetch_and_one_token(make_bench: MakeBench) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    obtain = bench.obtain("seta")
    obtain.hang()
    async with asyncio.TaskGroup() as tg:
        all_of_them = tg.create_task(many_gets(bench.source(), 200))
        await settle()
        assert obtain.calls == 1
        obtain.release()
    tokens = all_of_them.result()
    assert obtain.calls == 1
    assert len(tokens) == 200
    assert all(t is bench.source().current() for t in tokens)


async def test_concurrent_gets_all_get_token_unavailable_when_the_shared_fetch_fails(
    make_bench: MakeBench
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    obtain = bench.obtain("seta")
    obtain.hang()
    async with asyncio.TaskGroup() as tg:
        all_of_them = tg.create_task(many_gets(bench.source(), 200))
        await settle()
        obtain.fail("http_503")
        obtain.release()
    outcomes = all_of_them.result()
    assert obtain.calls == 1
    assert len(outcomes) == 200
    assert all(isinstance(o, TokenUnavailable) for o in outcomes)


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(make_bench: MakeBench) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    obtain = bench.obtain("seta")
    obtain.hang()
    async with asyncio.TaskGroup() as tg:
        quitter = tg.create_task(bench.source().get())
        stayer = tg.create_task(bench.source().get())
        await settle()
        quitter.cancel()
        await settle()
        obtain.release()
    assert quitter.cancelled()
    assert stayer.result() is bench.source().current()
    assert obtain.calls == 1


async def test_fetch_completes_and_is_cached_when_its_only_waiter_is_cancelled(
    make_bench: MakeBench
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    obtain = bench.obtain("seta")
    obtain.hang()
    async with asyncio.TaskGroup() as tg:
        quitter = tg.create_task(bench.source().get())
        await settle()
        quitter.cancel()
        await settle()
        obtain.release()
        await settle()
    token = bench.source().current()
    assert token is not None and token.value == Secret("token-seta-1")
    assert await bench.source().get() is token
    assert obtain.calls == 1


# --------------------------------------------------------------------------- background renewal


async def test_prefetch_set_is_renewed_in_the_background_about_once_per_lifetime(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    obtain = bench.obtain("seta")
    bench.tokens.start()
    await settle()
    lifetimes = 20
    step = RENEW_EVERY / 10
    steps = 10 * round(lifetimes * LIFETIME / RENEW_EVERY)
    for _ in range(steps):
        await clock.advance(step)
        before = obtain.calls
        token = await bench.source().get()
        assert obtain.calls == before  # get() never fetched: the token was already there
        assert clock.now < token.usable_until
    # One fetch at start plus one every RENEW_EVERY seconds: lifetime / (lifetime - margin
    # + jitter) fetches per lifetime, here about 1.23, never more than lifetime / 80.
    assert obtain.calls == 1 + steps // 10
    gaps = {round(b - a, 6) for a, b in zip(obtain.times, obtain.times[1:], strict=False)}
    assert gaps == {RENEW_EVERY}


async def test_get_never_waits_for_a_background_renewal(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    obtain = bench.obtain("seta")
    bench.tokens.start()
    await settle()
    first = bench.source().current()
    obtain.hang()
    await clock.advance(RENEW_EVERY)
    assert obtain.calls == 2  # the renewal is under way and hangs
    async with asyncio.TaskGroup() as tg:
        request = tg.create_task(bench.source().get())
        await settle()
        assert request.done()
        assert request.result() is first
        obtain.release()
    await settle()
    second = bench.source().current()
    assert second is not None and second is not first


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(("code", "reason"), [
    ("http_500", "the last token request failed (http_500)"),
    ("malformed", "unusable answer"),
    ("timeout", "did not answer in time"),
    ("unreachable", "unreachable"),
    ("invalid_client", "refused the credentials (invalid_client)"),
], ids=["http_500", "malformed", "timeout", "unreachable", "invalid_client"])
async def test_failed_renewal_keeps_the_token_while_valid_then_token_unavailable_says_why(
    make_bench: MakeBench, clock: FakeClock, code: str, reason: str
) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    first = bench.source().current()
    bench.obtain("seta").fail(code)
    await clock.advance(RENEW_EVERY)
    assert bench.source().failures >= 1
    await clock.advance(LIFETIME - EXPIRY_SLACK - RENEW_EVERY - 0.5)
    assert await bench.source().get() is first  # still valid: still served
    await clock.advance(0.5)
    with pytest.raises(TokenUnavailable) as caught:
        await bench.source().get()
    assert caught.value.retry_after >= 1
    assert "seta" in caught.value.detail
    assert reason in caught.value.detail
    assert int(caught.value.headers()["Retry-After"]) >= 1


async def test_failed_fetch_retries_with_exponential_backoff_up_to_a_minute(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(rand=lambda: 1.0)  # the top of the jitter range: 1, 2, 4, ... 60
    obtain = bench.obtain("seta")
    obtain.fail("http_502")
    bench.tokens.start()
    await settle()
    await advance_by_steps(clock, 250, 1.0)
    gaps = [round(b - a, 6) for a, b in zip(obtain.times, obtain.times[1:], strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60, 60]


async def test_requests_while_backing_off_get_token_unavailable_without_a_token_request(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    obtain = bench.obtain("seta")
    obtain.fail("http_500")
    bench.tokens.start()
    await settle()
    await clock.advance(1.0)
    calls = obtain.calls
    for _ in range(20):
        with pytest.raises(TokenUnavailable) as caught:
            await bench.source().get()
        assert caught.value.retry_after >= 1
    assert obtain.calls == calls


@pytest.mark.parametrize("code", REJECTIONS)
async def test_rejected_credentials_are_retried_once_a_minute_and_logged_as_error_once(
    make_bench: MakeBench, clock: FakeClock, caplog: pytest.LogCaptureFixture, code: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.tokens")
    bench = make_bench()
    obtain = bench.obtain("seta")
    obtain.fail(code, "Bad client credentials")
    bench.tokens.start()
    await settle()
    for _ in range(60):
        await clock.advance(10)
        with pytest.raises(TokenUnavailable) as caught:
            await bench.source().get()  # requests do not speed the retries up
        assert f"refused the credentials ({code})" in caught.value.detail
    gaps = [round(b - a, 6) for a, b in zip(obtain.times, obtain.times[1:], strict=False)]
    assert gaps and min(gaps) >= 60
    assert obtain.calls == 11  # still retried: at 0, 60, ..., 600 s
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert code in errors[0].getMessage()


def moved_token_endpoint(config: Config, token_url: str) -> Config:
    return dataclasses.replace(
        config, upstream=dataclasses.replace(config.upstream, token_url=token_url))


@pytest.mark.parametrize(("token_url", "host"), [
    (None, "login.bol.com"),
    ("https://login.partner.example/oauth/token", "login.partner.example"),
    ("http://127.0.0.1:8765/token", "127.0.0.1:8765"),
], ids=["bol", "elsewhere", "with-port"])
async def test_refused_credentials_name_the_configured_token_host(
    make_bench: MakeBench, caplog: pytest.LogCaptureFixture, token_url: str | None, host: str
) -> None:
    caplog.set_level(logging.ERROR, logger="proxy.tokens")
    config = make_config("seta")
    bench = make_bench(moved_token_endpoint(config, token_url) if token_url else config)
    bench.obtain("seta").fail("invalid_client")
    bench.tokens.start()
    await settle()

    with pytest.raises(TokenUnavailable) as caught:
        await bench.source().get()

    said = [caught.value.detail, *(r.getMessage() for r in caplog.records)]
    assert len(said) == 2
    assert all(f"{host} refused the credentials (invalid_client)" in text for text in said)
    if host != "login.bol.com":
        assert all("login.bol.com" not in text for text in said)


async def test_a_reload_that_moves_the_token_endpoint_names_the_new_host(
    make_bench: MakeBench
) -> None:
    config = make_config("seta")
    bench = make_bench(config)
    bench.obtain("seta").fail("invalid_client")
    bench.tokens.start()
    await settle()
    source = bench.source()

    await bench.tokens.apply(moved_token_endpoint(config, "https://login.moved.example/t"))

    assert bench.source() is source  # the set is unchanged: it keeps its source
    with pytest.raises(TokenUnavailable) as caught:
        await source.get()
    assert "login.moved.example refused the credentials" in caught.value.detail


async def test_an_unreachable_token_endpoint_says_what_failed(make_bench: MakeBench) -> None:
    bench = make_bench()
    bench.obtain("seta").fail("unreachable", "cannot resolve login.bol.com (DNS)")
    bench.tokens.start()
    await settle()

    with pytest.raises(TokenUnavailable) as caught:
        await bench.source().get()

    assert ("the token endpoint is unreachable: cannot resolve login.bol.com (DNS)"
            in caught.value.detail)


async def test_malformed_answers_are_retried_and_never_stop_renewal(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    obtain = bench.obtain("seta")
    obtain.fail("malformed", "no access_token in the answer", times=12)
    bench.tokens.start()
    await settle()
    for _ in range(200):
        if bench.source().current() is not None:
            break
        await clock.advance(5.0)
    assert obtain.calls == 13  # twelve failed attempts, then the token
    assert bench.source().current() is not None
    assert bench.source().failures == 0
    gaps = [b - a for a, b in zip(obtain.times, obtain.times[1:], strict=False)]
    assert max(gaps) <= MAX_BACKOFF + 5  # capped backoff, never a permanent stop


async def test_renewal_recovers_after_the_endpoint_comes_back(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    obtain = bench.obtain("seta")
    obtain.fail("unreachable")
    await clock.advance(LIFETIME)
    assert bench.source().current() is None
    obtain.succeed()
    await advance_by_steps(clock, MAX_BACKOFF, 1.0)
    token = bench.source().current()
    assert token is not None
    assert bench.source().last_error is None
    assert await bench.source().get() is token


# --------------------------------------------------------------------------- on demand


async def test_on_demand_set_is_not_fetched_until_first_use(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    bench.tokens.start()
    await clock.advance(10 * LIFETIME)
    assert bench.obtain("seta").calls == 0
    await bench.source().get()
    assert bench.obtain("seta").calls == 1


async def test_on_demand_set_is_renewed_while_used_and_costs_nothing_once_idle(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    idle_after = 300.0
    bench = make_bench(make_config("seta", prefetch=False, idle_after=idle_after))
    obtain = bench.obtain("seta")
    step = RENEW_EVERY / 10
    await bench.source().get()
    for _ in range(60):  # in use for six renewal periods: get() never has to fetch
        await clock.advance(step)
        before = obtain.calls
        await bench.source().get()
        assert obtain.calls == before
    assert obtain.calls == 1 + 6
    used = obtain.calls
    await advance_by_steps(clock, idle_after + LIFETIME, step)
    idle_calls = obtain.calls
    # Renewals continue only until idle_after has passed since the last use.
    assert idle_calls - used <= math.ceil(idle_after / RENEW_EVERY)
    await advance_by_steps(clock, 100 * LIFETIME, 50)
    assert obtain.calls == idle_calls  # however far the clock moves
    assert renewal_tasks() == []
    await bench.source().get()  # used again: one fetch, renewed again
    assert obtain.calls == idle_calls + 1
    await clock.advance(RENEW_EVERY)
    assert obtain.calls == idle_calls + 2


# --------------------------------------------------------------------------- invalidate


async def test_invalidate_drops_the_current_token(make_bench: MakeBench) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    first = await bench.source().get()
    assert bench.source().invalidate(first) is True
    assert bench.source().current() is None
    second = await bench.source().get()
    assert second is not first
    assert second.value != first.value
    assert bench.obtain("seta").calls == 2


async def test_late_invalidate_of_an_old_token_after_renewal_changes_nothing(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    old = bench.source().current()
    assert old is not None
    await clock.advance(RENEW_EVERY)
    current = bench.source().current()
    assert current is not None and current is not old
    assert bench.source().invalidate(old) is False
    assert bench.source().current() is current
    assert bench.obtain("seta").calls == 2


async def test_invalidate_of_a_prefetch_sets_token_renews_it_in_the_background(
    make_bench: MakeBench
) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    old = bench.source().current()
    assert old is not None
    assert bench.source().invalidate(old) is True
    await settle()  # no request follows (a 401 for a body too large to replay)
    assert bench.obtain("seta").calls == 2
    fresh = bench.source().current()
    assert fresh is not None and fresh is not old


@pytest.mark.parametrize(("after", "invalidated"), [
    (0.0, False),
    (REPLACED_401_HOLD - 0.1, False),
    (REPLACED_401_HOLD, True),
    (REPLACED_401_HOLD + 30, True),
])
async def test_token_obtained_after_a_401_is_not_invalidated_again_within_the_hold(
    make_bench: MakeBench, clock: FakeClock, after: float, invalidated: bool
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    source = bench.source()
    first = await source.get()
    assert source.invalidate(first) is True
    replacement = await source.get()
    assert replacement.after_401
    await clock.advance(after)
    assert source.invalidate(replacement) is invalidated
    assert (source.current() is None) is invalidated


async def test_renewal_in_flight_when_a_401_arrives_brings_the_replacement_token(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    obtain = bench.obtain("seta")
    source = bench.source()
    old = source.current()
    assert old is not None
    obtain.hang()
    await clock.advance(RENEW_EVERY)  # the renewal is sent, then bol refuses the old token
    assert source.invalidate(old) is True
    async with asyncio.TaskGroup() as tg:
        request = tg.create_task(source.get())  # joins the renewal under way
        await settle()
        obtain.release()
    replacement = request.result()
    assert obtain.calls == 2
    assert replacement.after_401  # the token that replaced a refused one
    assert source.invalidate(replacement) is False
    await clock.advance(RENEW_EVERY)
    ordinary = source.current()
    assert ordinary is not None and ordinary is not replacement
    assert not ordinary.after_401  # the next ordinary renewal is not held


async def test_replacement_after_a_failed_fetch_is_still_held_after_a_401(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    source = bench.source()
    first = await source.get()
    assert source.invalidate(first) is True
    bench.obtain("seta").fail("http_503", times=1)
    with pytest.raises(TokenUnavailable):
        await source.get()
    await clock.advance(1.0)
    replacement = await source.get()
    assert replacement.after_401
    assert source.invalidate(replacement) is False


async def test_token_from_an_ordinary_renewal_can_be_invalidated_at_once(
    make_bench: MakeBench
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    token = await bench.source().get()
    assert not token.after_401
    assert bench.source().invalidate(token) is True


async def test_invalidate_of_a_token_that_was_never_current_returns_false(
    make_bench: MakeBench
) -> None:
    bench = make_bench(make_config("seta", prefetch=False))
    current = await bench.source().get()
    stranger = Token(Secret("other"), 0.0, 1e9, 1e9)
    assert bench.source().invalidate(stranger) is False
    assert bench.source().current() is current


# --------------------------------------------------------------------------- sets never share


async def test_two_sets_with_identical_credentials_never_share_a_token(
    make_bench: MakeBench
) -> None:
    config = make_config("seta", "setb", prefetch=False,
                         client_ids={"seta": "same-id", "setb": "same-id"},
                         secrets={"seta": "same-secret", "setb": "same-secret"})
    bench = make_bench(config)
    a = await bench.source("seta").get()
    b = await bench.source("setb").get()
    assert a is not b
    assert a.value == Secret("token-seta-1")
    assert b.value == Secret("token-setb-1")
    assert bench.obtain("seta").calls == 1
    assert bench.obtain("setb").calls == 1


async def test_set_without_a_token_never_gets_another_sets_token(
    make_bench: MakeBench
) -> None:
    bench = make_bench(make_config("seta", "setb", prefetch=False))
    bench.obtain("setb").fail("invalid_client")
    assert (await bench.source("seta").get()).value == Secret("token-seta-1")
    with pytest.raises(TokenUnavailable):
        await bench.source("setb").get()
    assert bench.source("setb").current() is None


def test_credential_sets_are_frozen_and_differ_by_every_field() -> None:
    cred = make_config("seta").credentials["seta"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cred.client_id = "other"  # type: ignore[misc]
    assert dataclasses.replace(cred) == cred
    assert hash(dataclasses.replace(cred)) == hash(cred)
    assert dataclasses.replace(cred, client_secret=Secret("changed")) != cred
    assert dataclasses.replace(cred, name="setb") != cred


# --------------------------------------------------------------------------- reload and close


async def test_apply_keeps_unchanged_sets_refetches_changed_ones_and_drops_removed_ones(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(make_config("seta", "setb", "setc"))
    bench.tokens.start()
    await settle()
    kept = bench.source("seta").current()
    old_b_cred = bench.tokens.config.credentials["setb"]
    old_b = bench.obtain("setb")
    removed = bench.obtain("setc")
    assert kept is not None and (old_b.calls, removed.calls) == (1, 1)

    await bench.tokens.apply(make_config("seta", "setb", secrets={"setb": "rotated"}))
    await settle()

    assert bench.source("seta").current() is kept  # same token object, no fetch
    assert bench.obtain("seta").calls == 1
    new_b = bench.obtain("setb")
    assert new_b is not old_b and new_b.calls == 1  # a different secret: a new fetch
    b_token = bench.source("setb").current()
    assert b_token is not None and b_token.value == Secret("token-setb-1")
    assert bench.source("setb").cred != old_b_cred
    assert "setc" not in {s.cred.name for s in bench.tokens.active()}

    await advance_by_steps(clock, 13 * RENEW_EVERY, RENEW_EVERY / 2)
    assert removed.calls == 1  # removed: no longer renewed
    assert old_b.calls == 1  # the old configuration of setb: no longer renewed
    assert bench.obtain("seta").calls == 1 + 13
    assert new_b.calls == 1 + 13


async def test_apply_with_a_new_policy_renews_by_it_from_the_next_renewal(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    await bench.tokens.apply(make_config("seta", refresh_margin=40))
    await clock.advance(RENEW_EVERY)  # this renewal was planned under the old margin
    renewed = bench.source().current()
    assert renewed is not None
    assert renewed.expires_at - renewed.renew_at == 40 - 0.5 * 40 / 4


async def test_close_cancels_every_background_task(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(make_config("seta", "setb"))
    bench.tokens.start()
    await settle()
    bench.obtain("seta").hang()
    await clock.advance(RENEW_EVERY)  # seta's renewal is under way and hangs
    assert len(renewal_tasks()) == 3
    await bench.tokens.close()
    assert renewal_tasks() == []


async def test_close_after_a_reload_stops_all_renewal(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench(make_config("seta", "setb"))
    bench.tokens.start()
    await settle()
    await bench.tokens.apply(make_config("seta", "setb"))
    await bench.tokens.close()
    calls = {name: bench.obtain(name).calls for name in ("seta", "setb")}
    await advance_by_steps(clock, 5 * LIFETIME, RENEW_EVERY / 2)
    assert {name: bench.obtain(name).calls for name in ("seta", "setb")} == calls
    assert renewal_tasks() == []


async def test_reload_does_not_add_a_second_renewer_per_set(
    make_bench: MakeBench, clock: FakeClock
) -> None:
    bench = make_bench()
    bench.tokens.start()
    await settle()
    for _ in range(3):
        await bench.tokens.apply(make_config("seta"))
    await settle()
    assert len(renewal_tasks()) == 1
    await advance_by_steps(clock, 6 * RENEW_EVERY, RENEW_EVERY / 2)
    assert bench.obtain("seta").calls == 1 + 6


async def test_a_source_closed_by_a_reload_fetches_nothing_for_requests_routed_before(
    make_bench: MakeBench,
) -> None:
    bench = make_bench(make_config("seta", "setc", prefetch=False))
    routed = bench.source("setc")  # a request resolved its set just before the reload
    await bench.tokens.apply(make_config("seta", prefetch=False))

    with pytest.raises(TokenUnavailable, match="reconfigured"):
        await routed.get()
    assert bench.obtain("seta").calls == 0
    assert routed.current() is None and renewal_tasks() == []
