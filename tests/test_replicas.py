"""Replicas sharing tokens and refresh-token rotations through a real redis-server.

Several :class:`ProxyServer` replicas run in the test process and at least one as a
subprocess (``python -m proxy``), all in front of :class:`RotatingBol`: an imitation of
bol whose token endpoint rotates the refresh token on every refresh and, as an OAuth
server should on reuse (RFC 9700 section 4.14.2), revokes the whole chain when a refresh
token is presented a second time, counting it. Tokens live a few seconds, so renewals,
expiries and rotations happen many times within a test; where real time is involved
(a subprocess, Redis's own TTLs) waits are bounded polls, never fixed sleeps.

Faults: Redis frozen (SIGSTOP) and resumed, Redis killed and started again from its
append-only file, a replica killed (SIGKILL) while bol holds its refresh request, and a
lock holder frozen past its lease. Where a test needs a lease to run out, it shortens
that lease in Redis (PEXPIRE) instead of waiting for its full length: the lease outlasts
a whole token request (25 s and more), the tokens here live 4 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from proxy.app import ProxyServer
from proxy.config import Secret, SharedState, validate
from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, FakeBol, Seen, start_fake
from proxy.shared import SharedStore
from proxy.shared_tokens import TokenGroup
from proxy.tokens import SHARED_CONFLICT
from tests.conftest import ROOMY_LIMITS, FakeClock, free_port, settle, wait_until
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis,
              pytest.mark.timeout(40 + 2 * float(os.environ.get("BOL_PROXY_REPLICA_SECONDS", 6)))]

TTL = 4  # expires_in of every access token of the imitation, seconds
MARGIN = 1.5  # tokens.refresh_margin: renewal comes 1.1 to 1.5 s before expiry
PARTNER_ID = "partner-client"
PARTNER_SECRET = "partner-secret-0123456789abcdef"
START = 15.0  # seconds for a subprocess replica to start on a busy machine


@dataclass
class RotatingBol(FakeBol):
    """bol whose refresh tokens work once: each refresh answers with the next one.

    A refresh token presented again revokes the whole chain and is counted in
    ``spent_twice``. ``hold`` keeps refresh requests waiting until the test lets them go.
    A request whose client vanishes while held is cancelled by the server and counts as
    not spent: this imitation models a refresh that bol commits only as it answers. (The
    other case, committed at bol but the answer lost with its client, is the residual
    risk no client can close; no test here claims to survive it.)"""

    spent: set[str] = field(default_factory=set)
    spent_twice: int = 0
    refreshes: int = 0
    hold: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def token(self, request: web.Request) -> web.Response:
        body = await request.read()
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "refresh_token":
            return await super().token(request)
        client = self._client(request.headers.get("Authorization", ""))
        self.token_requests.append(Seen(request.method, request.raw_path,
                                        CIMultiDict(request.headers), body, client))
        if self.hold is not None:
            self.arrived.set()
            await self.hold.wait()
        presented = form.get("refresh_token", "")
        if presented in self.spent:
            self.spent_twice += 1
            self.refresh_tokens.clear()  # the whole chain is revoked
            return web.json_response({"error": "invalid_grant"}, status=400)
        if client is None or self.refresh_tokens.get(presented) != client:
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.spent.add(presented)
        del self.refresh_tokens[presented]
        self.refreshes += 1
        token = "access." + secrets.token_urlsafe(24)
        self.tokens[token] = (client, self.clock() + self.ttl + 1)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.ttl, "scope": "offline_access",
                                  "refresh_token": self.new_refresh_token(client)})

    def cc_requests(self) -> int:
        return sum(1 for seen in self.token_requests if seen.client_id == DEMO_CLIENT_ID)

    def issued(self) -> set[str]:
        """Every token and refresh token it ever handed out."""
        return set(self.tokens) | self.spent | set(self.refresh_tokens)


@dataclass
class Cluster:
    """The imitation, Redis, and the replicas in front of them."""

    bol: RotatingBol
    url: str
    redis: RedisServer
    folder: Path
    first_refresh_token: str
    servers: list[ProxyServer] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def raw(self, name: str, port: int = 0) -> dict[str, Any]:
        """The configuration of replica ``name``: its own refresh-token file, a copy of
        the partner's one, as each pod would have."""
        token_file = self.folder / name / "seller.refresh"
        if not token_file.exists():
            token_file.parent.mkdir(parents=True)
            token_file.write_text(self.first_refresh_token + "\n")
        return {
            "listen": {"host": "127.0.0.1", "port": port},
            "upstream": {"api_url": self.url, "token_url": self.url + "/token", "timeout": 10,
                         "connect_timeout": 2},
            "tokens": {"refresh_margin": MARGIN, "default_ttl": TTL},
            "shared_state": {"redis_url": self.redis.url, "key_prefix": "test:"},
            "credentials": {
                "shop": {"client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET},
                "seller": {"grant": "refresh_token", "client_id": PARTNER_ID,
                           "client_secret": PARTNER_SECRET,
                           "refresh_token_file": str(token_file)},
            },
            "default_credentials": "shop",
        }

    async def replica(self, name: str, clock: Any = None,
                      before_spend: Callable[[str], Awaitable[None]] | None = None
                      ) -> ProxyServer:
        server = ProxyServer(validate(self.raw(name), source="test"), clock=clock,
                             rand=random.random, before_spend=before_spend)
        await server.start()
        self.servers.append(server)
        return server

    def spawn(self, name: str) -> tuple[subprocess.Popen[bytes], int]:
        """A replica as its own process; its log goes to a file (a pipe nobody reads
        would fill up and stall it)."""
        port = free_port()
        config = self.folder / f"{name}.yaml"
        config.write_text(yaml.safe_dump(self.raw(name, port)), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOL_")}
        with open(self.folder / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--config", str(config), "--log-level",
                 "info"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.processes.append(process)
        return process, port

    @contextlib.asynccontextmanager
    async def group(self, set_name: str = "seller") -> AsyncIterator[TokenGroup]:
        """The test's own view of a set's keys (it knows the secrets)."""
        store = SharedStore(SharedState(Secret(self.redis.url), "test:"))
        cred = validate(self.raw("observer"), source="test").credentials[set_name]
        try:
            yield TokenGroup(store, cred, FakeClock())
        finally:
            await store.close()

    async def newest_refresh_token(self) -> str | None:
        async with self.group() as group:
            token = (await group.read_refresh()).token
        return token.reveal() if token is not None else None

    async def files_are_current(self, names: list[str], within: float = TTL + 2) -> None:
        """Wait (bounded) until every named replica's file holds Redis's refresh token."""
        async with asyncio.timeout(within):
            while True:
                newest = await self.newest_refresh_token()
                copies = {(self.folder / n / "seller.refresh").read_text().strip()
                          for n in names}
                if copies == {newest}:
                    return
                await asyncio.sleep(0.05)  # files have no event to wait on


@pytest.fixture
async def cluster(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    bol = RotatingBol(clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET, PARTNER_ID: PARTNER_SECRET},
                      ttl=TTL, limits=dict(ROOMY_LIMITS))
    runner, url = await start_fake(bol)
    first = bol.new_refresh_token(PARTNER_ID)
    cluster = Cluster(bol, url, redis_server, tmp_path, first)
    try:
        yield cluster
    finally:
        for process in cluster.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=10)
        for server in cluster.servers:
            await server.stop()
        if bol.hold is not None:
            bol.hold.set()
        await runner.cleanup()


@dataclass
class Traffic:
    """Requests sent through replicas in a loop: what came back, and how long it took."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    slowest: float = 0.0
    sent: int = 0


async def fetch(http: aiohttp.ClientSession, port: int, set_name: str,
                traffic: Traffic) -> int:
    started = time.monotonic()
    async with asyncio.timeout(10), http.get(
            f"http://127.0.0.1:{port}/{set_name}/retailer/orders") as response:
        body = await response.read()
    traffic.slowest = max(traffic.slowest, time.monotonic() - started)
    traffic.sent += 1
    traffic.statuses[(set_name, response.status)] += 1
    if response.status != 200:
        traffic.details.append(json.loads(body).get("detail", "") if body else "")
    return response.status


async def drive(http: aiohttp.ClientSession, ports: list[int], traffic: Traffic,
                until: Callable[[], bool], within: float) -> None:
    """Send requests of both sets to every replica, in turn, until ``until()``."""
    async with asyncio.timeout(within):
        while not until():
            for port in ports:
                for set_name in ("shop", "seller"):
                    await fetch(http, port, set_name, traffic)
            await asyncio.sleep(0.02)  # a tool's pace, not a wait for a state


async def healthy(http: aiohttp.ClientSession, port: int) -> None:
    """Wait (bounded) until a subprocess replica is ready."""
    async with asyncio.timeout(START):
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with asyncio.timeout(1), http.get(
                        f"http://127.0.0.1:{port}/_proxy/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)  # a starting process has no event to wait on


async def redis_dump(server: RedisServer) -> list[bytes]:
    """Every key name and value in Redis, and the raw bytes of its files."""
    client = server.client()
    found: list[bytes] = []
    try:
        async for key in client.scan_iter(count=100):
            found.append(key)
            kind = await client.type(key)
            if kind == b"string":
                found.append(await client.get(key) or b"")
            elif kind == b"hash":
                for name, value in (await client.hgetall(key)).items():
                    found += [name, value]
            else:
                found.append(await client.dump(key) or b"")
    finally:
        await client.aclose()
    for path in server.folder.rglob("*"):
        if path.is_file() and path.name != "redis.log":
            found.append(path.read_bytes())
    return found


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ------------------------------------------------------------------- sharing at all


# Seconds of traffic in the sharing test below; more gives finer token counts per hour
# (BOL_PROXY_REPLICA_SECONDS=120 pytest tests/test_replicas.py -k sharing -s).
RUN = float(os.environ.get("BOL_PROXY_REPLICA_SECONDS", "6"))


@pytest.mark.parametrize("in_process", [1, 2], ids=["1-replica", "3-replicas"])
async def test_replicas_spend_no_refresh_token_twice_and_share_one_replicas_token_requests(
    cluster: Cluster, http: aiohttp.ClientSession, in_process: int,
    record_property: Callable[[str, object], None],
) -> None:
    ports = []
    if in_process > 1:  # and one more as a real process of its own
        _, port = cluster.spawn("subprocess")
        await healthy(http, port)
        ports.append(port)
    for i in range(in_process):
        ports.append((await cluster.replica(f"replica-{i}")).port())
    replicas = len(ports)
    bol = cluster.bol
    cc_before, refreshes_before = bol.cc_requests(), bol.refreshes
    traffic = Traffic()
    started = time.monotonic()
    await drive(http, ports, traffic, lambda: time.monotonic() - started >= RUN, RUN + 10)
    elapsed = time.monotonic() - started

    assert bol.spent_twice == 0
    assert bol.expired_seen == 0
    assert set(traffic.statuses) == {("shop", 200), ("seller", 200)}, traffic.details[:3]
    # One replica renews about once per (lifetime - margin); N replicas together must not
    # cost more than that, plus the one a renewal under way at the end may add.
    bound = elapsed / (TTL - MARGIN) + 1
    cc, refreshes = bol.cc_requests() - cc_before, bol.refreshes - refreshes_before
    assert cc <= bound + 1 and refreshes <= bound + 1, (cc, refreshes, bound)
    per_hour = {"replicas": replicas, "cc_tokens_per_hour": round(cc / elapsed * 3600),
                "refreshes_per_hour": round(refreshes / elapsed * 3600),
                "bound_per_hour": round(3600 / (TTL - MARGIN) + 1),
                "requests": traffic.sent, "seconds": round(elapsed, 1)}
    record_property("token_requests", per_hour)
    print("token requests:", per_hour)

    # A copy of Redis alone holds no usable token: nothing bol issued, no secret.
    dump = b"\n".join(await redis_dump(cluster.redis))
    assert len(dump) > 100
    for secret in bol.issued() | {DEMO_CLIENT_SECRET, PARTNER_SECRET}:
        assert secret.encode() not in dump

    # Every replica's file is a current copy of the newest refresh token.
    assert await cluster.newest_refresh_token() in bol.refresh_tokens
    await cluster.files_are_current(["subprocess"][:replicas - in_process]
                                    + [f"replica-{i}" for i in range(in_process)])


# --------------------------------------------------------------------- Redis faults


async def ready(http: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    async with http.get(f"http://127.0.0.1:{port}/_proxy/ready") as response:
        body: dict[str, Any] = await response.json()
        return body


async def test_a_frozen_redis_holds_up_no_request_and_everything_heals_after_it(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    servers = [await cluster.replica("replica-a"), await cluster.replica("replica-b")]
    ports = [server.port() for server in servers]
    for port in ports:
        await healthy(http, port)
    cc_before = cluster.bol.cc_requests()
    cluster.redis.freeze()
    traffic = Traffic()
    try:
        # Until the refresh-token set's access tokens have run out on both replicas.
        await drive(http, ports, traffic,
                    lambda: traffic.statuses[("seller", 503)] >= 4, TTL + 6)
        states = [await ready(http, port) for port in ports]
        metrics = await (await http.get(f"http://127.0.0.1:{ports[0]}/_proxy/metrics")).text()
    finally:
        cluster.redis.resume()
    resumed = time.monotonic()
    assert traffic.slowest < 1.0  # no request waited on Redis
    assert traffic.statuses[("shop", 503)] == 0  # client credentials: tokens of their own
    assert cluster.bol.cc_requests() > cc_before
    assert all("shared state (Redis) is unreachable" in d for d in traffic.details)
    for state in states:
        assert state["shared_state"]["configured"] is True
        assert state["shared_state"]["up"] is False
        assert state["shared_state"]["last_error"] == "timeout"
    assert "bol_proxy_shared_state_up 0.0" in metrics
    assert 'bol_proxy_shared_state_errors_total{reason="timeout"}' in metrics

    healed = Traffic()
    for port in ports:
        await drive(http, [port], healed, lambda: healed.statuses[("seller", 200)] >= 10, 8)
    # Within seconds: a probe a second, then the set's next attempt a second later.
    assert time.monotonic() - resumed < 4.0
    assert [(await ready(http, port))["shared_state"]["up"] for port in ports] == [True, True]
    print(f"Redis frozen: slowest request {traffic.slowest * 1000:.0f} ms, "
          f"{traffic.statuses}; healed {time.monotonic() - resumed:.1f} s after SIGCONT")
    assert cluster.bol.spent_twice == 0


async def test_redis_restarted_from_its_append_only_file_keeps_the_rotation_state(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    ports = [(await cluster.replica(name)).port() for name in ("replica-a", "replica-b")]
    traffic = Traffic()
    async with cluster.group() as group:
        await drive(http, ports, traffic, lambda: cluster.bol.refreshes >= 2, TTL * 2)
        before = await group.read_refresh()
    assert before.version >= 2
    await cluster.redis.restart()  # SIGKILL: only the append-only file survives
    async with cluster.group() as group:
        after = await group.read_refresh()
        assert (after.version, after.token) == (before.version, before.token)
        refreshes = cluster.bol.refreshes
        await drive(http, ports, traffic, lambda: cluster.bol.refreshes >= refreshes + 2,
                    TTL * 3)
        assert (await group.read_refresh()).version > after.version
    assert cluster.bol.spent_twice == 0
    # Tokens here live 4 s with a 1.5 s margin: a renewal due while Redis restarted may
    # come a second or two late, and only the refresh-token set waits for Redis.
    assert traffic.statuses[("shop", 503)] == 0
    assert all("shared state" in detail for detail in traffic.details), traffic.details[:3]


# ------------------------------------------------------------------- replica faults


async def test_a_replica_killed_while_bol_holds_its_refresh_costs_the_others_nothing(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    bol = cluster.bol
    bol.hold = asyncio.Event()
    process, port = cluster.spawn("doomed")
    async with asyncio.timeout(START):
        await bol.arrived.wait()  # it holds the lease, its refresh request is at bol
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    async with cluster.group() as group:
        owner = await group.store.run(lambda r: r.get(group.lock_key))
        assert owner is not None  # the dead replica's lease is still there
        bol.hold.set()
        bol.hold = None
        await group.store.run(lambda r: r.pexpire(group.lock_key, 1))  # its time runs out
    # The others carry on: one takes over and spends the token the dead one never spent.
    survivor = await cluster.replica("survivor")
    traffic = Traffic()
    await drive(http, [survivor.port()], traffic, lambda: bol.refreshes >= 2, TTL * 2)
    _, port = cluster.spawn("doomed")  # restarted with its old file
    await healthy(http, port)
    await drive(http, [survivor.port(), port], traffic, lambda: bol.refreshes >= 4, TTL * 3)
    assert bol.spent_twice == 0
    assert traffic.statuses[("seller", 503)] == 0
    await cluster.files_are_current(["survivor", "doomed"])


def conflicts(server: ProxyServer) -> float:
    """Refreshes ``server`` lost to another replica (its metric)."""
    value = server.metrics.registry.get_sample_value(
        "bol_proxy_shared_refresh_conflicts_total", {"set": "seller"})
    return value or 0.0


class Freezer:
    """A checkpoint that holds a replica right before it confirms its lease and spends."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.thaw = asyncio.Event()

    async def __call__(self, set_name: str) -> None:
        self.reached.set()
        await self.thaw.wait()


async def test_a_holder_frozen_past_its_lease_spends_nothing_and_adopts_the_new_state(
    cluster: Cluster,
) -> None:
    bol, freezer = cluster.bol, Freezer()
    # The frozen replica's time stands still (its lease is not renewed), Redis's does not.
    frozen = await cluster.replica("frozen", clock=FakeClock(), before_spend=freezer)
    async with asyncio.timeout(5):
        await freezer.reached.wait()
    async with cluster.group() as group:
        await group.store.run(lambda r: r.pexpire(group.lock_key, 1))  # its lease runs out
        other = await cluster.replica("other")
        await wait_until(lambda: other.tokens.source("seller").current() is not None)
        assert bol.refreshes == 1
        freezer.thaw.set()
        source = frozen.tokens.source("seller")
        await wait_until(lambda: source.current() is not None)
        token, theirs = source.current(), other.tokens.source("seller").current()
        assert token is not None and theirs is not None
        assert token.value == theirs.value  # adopted
        assert bol.refreshes == 1 and bol.spent_twice == 0  # it spent nothing
        version = (await group.read_refresh()).version
    assert version == 2
    assert (cluster.folder / "frozen" / "seller.refresh").read_text().strip() == \
        await cluster.newest_refresh_token()


async def test_an_authorisation_during_a_refresh_wins_and_the_late_rotation_is_discarded(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    bol, freezer, clock = cluster.bol, Freezer(), FakeClock()
    holder = await cluster.replica("holder", clock=clock, before_spend=freezer)
    async with asyncio.timeout(5):
        await freezer.reached.wait()
    new_chain = bol.new_refresh_token(PARTNER_ID)  # the seller authorised again meanwhile
    async with cluster.group() as group:
        assert await group.authorise(Secret(new_chain)) == 2
        freezer.thaw.set()  # its lease still holds: it spends its (old) token
        await wait_until(lambda: conflicts(holder) == 1)
        record = await group.read_refresh()
        assert (record.version, record.token) == (2, Secret(new_chain))  # authorize won
        source = holder.tokens.source("seller")
        await wait_until(lambda: source.last_error == SHARED_CONFLICT)
        await settle()  # its renewal loop now waits on its clock for the next attempt
        await clock.advance(1.0)  # which spends the new chain
        async with asyncio.timeout(5):
            while (await group.read_refresh()).version < 3:  # noqa: ASYNC110 - Redis, no event
                await asyncio.sleep(0.01)
    assert bol.spent_twice == 0 and new_chain in bol.spent
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "discarded" in errors[0]


# ---------------------------------------------------------------------------- 401s


async def test_a_token_bol_refuses_is_removed_from_redis_and_never_adopted_again(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    a, b = await cluster.replica("replica-a"), await cluster.replica("replica-b")
    for port in (a.port(), b.port()):
        await healthy(http, port)
    shared, other = a.tokens.source("shop").current(), b.tokens.source("shop").current()
    assert shared is not None and other is not None and shared.value == other.value
    cluster.bol.tokens.pop(shared.value.reveal())  # bol revokes it
    before = cluster.bol.cc_requests()
    traffic = Traffic()
    for port in (a.port(), b.port()):
        assert await fetch(http, port, "shop", traffic) == 200  # replayed with a new one
    assert cluster.bol.cc_requests() == before + 1  # one replica fetched, the other adopted
    async with cluster.group("shop") as group:
        stored = (await group.read()).token
    assert stored is not None and stored.value != shared.value


# ------------------------------------------------------------------------ authorize


async def authorize(cluster: Cluster, code: str, redis_url: str | None = None) -> \
        tuple[int, str]:
    raw = cluster.raw("authorizer")
    raw["credentials"]["seller"]["redirect_uri"] = "https://partner.example/callback"
    if redis_url is not None:
        raw["shared_state"]["redis_url"] = redis_url
    config = cluster.folder / "authorize.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "authorize", "seller", "--config", str(config),
        f"--code={code}", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), START)
    assert process.returncode is not None
    return process.returncode, (out + err).decode()


@pytest.mark.e2e
async def test_authorize_writes_redis_as_a_new_version_and_the_file(cluster: Cluster) -> None:
    async with cluster.group() as group:
        await group.authorise(Secret(cluster.first_refresh_token))
        status, output = await authorize(cluster, cluster.bol.new_code(PARTNER_ID))
        assert status == 0, output
        assert "shared state (version 2)" in output
        record = await group.read_refresh()
    assert record.version == 2 and record.token is not None
    assert record.token.reveal() in cluster.bol.refresh_tokens
    token_file = cluster.folder / "authorizer" / "seller.refresh"
    assert token_file.read_text().strip() == record.token.reveal()


@pytest.mark.e2e
async def test_authorize_with_redis_unreachable_fails_without_spending_the_code(
    cluster: Cluster,
) -> None:
    code = cluster.bol.new_code(PARTNER_ID)
    status, output = await authorize(cluster, code, f"redis://:pw@127.0.0.1:{free_port()}/0")
    assert status == 1
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Redis) is unreachable" in lines[0] and "pw" not in lines[0]
    assert code in cluster.bol.codes  # still usable once Redis answers
