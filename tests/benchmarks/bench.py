"""bol-proxy benchmark harness: one command, every measurement, one report.

    .venv/bin/python -m tests.benchmarks.bench [--quick] [--rounds N] [--only NAME ...]
                                               [--json PATH] [--profile PATH]

Run from the checkout. It starts a fast imitation of bol (``upstream.py``) in its own
process and bol-proxy as the real command in front of it (generated YAML configuration,
default log level, stderr to a file), then measures, all on 127.0.0.1:

throughput  ``wrk -t1 -c32`` on GET /retailer/orders, directly at the upstream (the bare
            aiohttp server) and through the proxy, alternating rounds; requests/s,
            p50/p90/p99, ratio proxied/direct
            (needs wrk: ``apt-get update && apt-get install -y wrk``; skipped without it)
latency     200 requests/s open loop over 10 connections, timed from each request's
            scheduled start, alternating short rounds: direct, through the minimal
            aiohttp hop (``hop.py``: the framework's floor), through the proxy;
            percentiles, the added latency of each, and the added p50 of every round
streaming   1 GiB down and 1 GiB up, direct vs proxied, alternating rounds; MB/s, ratio,
            growth of the proxy's resident memory
scale       10,000 on-demand sets: start to /_proxy/health, idle RSS, idle token
            requests, then 1,000 sets active at once and the token requests they cost
tokens      sustained load with 10 s tokens and a 3 s refresh margin; token requests
            per set against duration / (expires_in - refresh_margin) + 1

and the proxy's CPU time and memory in each phase. Progress goes to stderr, the report
to stdout; ``--json`` also writes the numbers; ``--profile`` samples the proxy with py-spy
during one more proxied wrk round and prints where its time goes. A default run takes
about 4 minutes, ``--quick`` under 2. Nothing is asserted: the summary compares with the
targets in ``_summary``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from . import load, spy, wrk
from .procs import (
    ROOT,
    BenchError,
    Meter,
    Others,
    Processes,
    ProxyProcess,
    UpstreamProcess,
    Usage,
    busy_cores,
    free_port,
    listen_overflows,
    log_summary,
    memory,
    proxy_command,
    proxy_config,
    reset_peak,
    start_hop,
    start_proxy,
    start_upstream,
    with_settings,
)
from .report import MB, mb, median, ms, percentile, ratio, share, table
from .upstream import ORDERS_BODY

PHASES = ("throughput", "latency", "streaming", "scale", "tokens")
ORDERS = "/retailer/orders"
SCALE_CLIENTS = "bench-scale-"
ECONOMY_CLIENTS = "bench-econ-"
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How long and how big each measurement is."""

    name: str = "full"
    rounds: int = 3  # alternating wrk rounds, and streaming rounds
    wrk_seconds: float = 10.0
    wrk_warmup: float = 2.0
    wrk_connections: int = 32
    latency_rounds: int = 6  # alternating open-loop segments per target
    latency_seconds: float = 5.0
    rate: float = 200.0
    rate_connections: int = 10
    stream_bytes: int = 1 << 30
    scale_sets: int = 10_000
    scale_active: int = 1_000
    idle_seconds: float = 5.0
    economy_seconds: float = 60.0
    economy_ttl: int = 10
    economy_margin: float = 3.0
    economy_sets: int = 4  # half prefetch, half on demand
    economy_connections: int = 64


QUICK = Plan(name="quick", rounds=1, wrk_seconds=3.0, wrk_warmup=1.0, latency_rounds=2,
             latency_seconds=3.0, stream_bytes=128 << 20, idle_seconds=3.0,
             economy_seconds=20.0)


def note(message: str) -> None:
    """Progress, on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Skipped(Exception):
    """A phase that cannot run here (wrk missing); the reason goes in the report."""


# ------------------------------------------------------------------------ the run


@dataclass
class PhaseUsage:
    process: str
    phase: str
    usage: Usage


class Run:
    """What the phases share: the plan, the processes, the main upstream and proxy."""

    def __init__(self, plan: Plan, procs: Processes, workdir: Path,
                 profile: Path | None = None, settings: list[str] | None = None) -> None:
        self.plan = plan
        self.settings = settings or []  # --set, for the main proxy
        self.procs = procs
        self.workdir = workdir
        self.profile = profile  # where py-spy writes, if asked for
        self.usage: list[PhaseUsage] = []
        self.peaks: dict[str, int] = {}  # process label -> highest VmHWM seen
        self._upstream: UpstreamProcess | None = None
        self._proxy: ProxyProcess | None = None

    def upstream(self) -> UpstreamProcess:
        """The imitation of bol with long tokens, shared by the phases."""
        if self._upstream is None:
            note("starting the upstream imitation")
            self._upstream = start_upstream(self.procs, self.workdir)
        return self._upstream

    def proxy(self) -> ProxyProcess:
        """bol-proxy in front of :meth:`upstream`, one prefetch set, bodies up to 4 GiB."""
        if self._proxy is None:
            port = free_port()
            config = with_settings(proxy_config(
                self.upstream(), port, limits={"max_body_size": 4 << 30},
                upstream={"timeout": 900}), self.settings)
            note("starting bol-proxy")
            self._proxy = start_proxy(self.procs, self.workdir, "proxy", config, port)
        return self._proxy

    def record(self, process: str, phase: str, usage: Usage | None) -> None:
        """Add ``usage`` to the phase's total (several rounds make one line)."""
        if usage is None:
            return
        self.peaks[process] = max(self.peaks.get(process, 0), usage.hwm)
        for entry in self.usage:
            if entry.process == process and entry.phase == phase:
                old = entry.usage
                entry.usage = Usage(old.wall + usage.wall, old.cpu + usage.cpu,
                                    old.rss_before, usage.rss_after, max(old.hwm, usage.hwm))
                return
        self.usage.append(PhaseUsage(process, phase, usage))

    def remember_peak(self, process: str, pid: int) -> None:
        """Keep the current VmHWM before resetting it."""
        self.peaks[process] = max(self.peaks.get(process, 0), memory(pid)[1])

    def stop_proxy(self) -> tuple[int, tuple[int, int]] | None:
        """Stop the main proxy, if it ran: its exit status and (lines, problems) logged."""
        if self._proxy is None:
            return None
        self.remember_peak("proxy", self._proxy.pid)
        status = self.procs.stop(self._proxy.proc)
        return status, log_summary(self._proxy.log)


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ------------------------------------------------------------------------ throughput


@dataclass
class ThroughputRound:
    direct: wrk.WrkResult
    proxied: wrk.WrkResult
    proxy_cpu: float  # CPU share of the proxy during the proxied run
    upstream_cpu_direct: float
    upstream_cpu_proxied: float


@dataclass
class Throughput:
    seconds: float
    connections: int
    rounds: list[ThroughputRound] = field(default_factory=list)
    profile: spy.Profile | None = None
    profile_note: str | None = None  # why there is no profile, when one was asked for

    @property
    def direct_rps(self) -> float:
        return median([r.direct.requests_per_second for r in self.rounds])

    @property
    def proxied_rps(self) -> float:
        return median([r.proxied.requests_per_second for r in self.rounds])

    @property
    def ratio(self) -> float:
        return self.proxied_rps / self.direct_rps if self.direct_rps else math.nan

    @property
    def errors(self) -> int:
        return sum(r.direct.errors + r.proxied.errors for r in self.rounds)


def run_throughput(run: Run) -> Throughput:
    if wrk.available() is None:
        raise Skipped(f"wrk is not installed; install it with: {wrk.INSTALL}")
    plan = run.plan
    up, px = run.upstream(), run.proxy()
    targets = (up.url + ORDERS, px.url + ORDERS)
    note(f"throughput: warming up ({plan.wrk_warmup:g} s each)")
    for url in targets:
        wrk.run(run.procs, url, plan.wrk_warmup, connections=plan.wrk_connections)
    result = Throughput(plan.wrk_seconds, plan.wrk_connections)
    for i in range(plan.rounds):
        with Meter(up.pid) as up_direct:
            direct = wrk.run(run.procs, targets[0], plan.wrk_seconds,
                             connections=plan.wrk_connections)
        with Meter(px.pid) as proxy_use, Meter(up.pid) as up_proxied:
            proxied = wrk.run(run.procs, targets[1], plan.wrk_seconds,
                              connections=plan.wrk_connections)
        assert proxy_use.usage and up_direct.usage and up_proxied.usage
        run.record("proxy", "throughput (wrk, proxied)", proxy_use.usage)
        result.rounds.append(ThroughputRound(direct, proxied, proxy_use.usage.cpu_share,
                                             up_direct.usage.cpu_share,
                                             up_proxied.usage.cpu_share))
        note(f"throughput round {i + 1}/{plan.rounds}: direct "
             f"{direct.requests_per_second:,.0f}/s, proxied {proxied.requests_per_second:,.0f}/s")
    if run.profile is not None:
        try:
            result.profile = _profile(run, px, targets[1])
        except BenchError as exc:
            result.profile_note = str(exc)
    return result


def _profile(run: Run, px: ProxyProcess, url: str) -> spy.Profile:
    """One more proxied wrk round, sampled by py-spy (not counted in the rounds)."""
    assert run.profile is not None
    seconds = run.plan.wrk_seconds
    note(f"throughput: profiling the proxy with py-spy for {seconds:g} s")
    sampler = spy.record(run.procs, px.pid, seconds, run.profile)
    try:
        wrk.run(run.procs, url, seconds, connections=run.plan.wrk_connections)
    finally:
        spy.finish(run.procs, sampler, seconds)
    return spy.summarise(run.profile)


# --------------------------------------------------------------------------- latency


@dataclass
class LatencyStats:
    requests: int
    errors: int
    p50: float
    p90: float
    p99: float
    max: float
    lag_p99: float  # how late requests left their schedule (generator, or no free conn)

    @classmethod
    def of(cls, r: load.RateResult) -> LatencyStats:
        return cls(len(r.latencies), r.errors, percentile(r.latencies, 50),
                   percentile(r.latencies, 90), percentile(r.latencies, 99),
                   max(r.latencies, default=math.nan), percentile(r.lag, 99))


@dataclass
class Latency:
    rate: float
    connections: int
    rounds: int
    seconds: float
    direct: LatencyStats
    hop: LatencyStats  # the minimal aiohttp hop (hop.py): the framework's floor
    proxied: LatencyStats
    proxied_p50_by_round: list[float] = field(default_factory=list)  # added, per round

    def added(self, name: str, over: str = "direct") -> float:
        value: float = getattr(self.proxied, name) - getattr(getattr(self, over), name)
        return value

    def hop_added(self, name: str) -> float:
        value: float = getattr(self.hop, name) - getattr(self.direct, name)
        return value


def run_latency(run: Run) -> Latency:
    plan = run.plan
    up, px = run.upstream(), run.proxy()
    hop = start_hop(run.procs, up)
    direct, floor, proxied = load.RateResult(), load.RateResult(), load.RateResult()
    by_round: list[float] = []

    def segment(port: int) -> load.RateResult:
        return arun(load.constant_rate(port, ORDERS, rate=plan.rate,
                                       connections=plan.rate_connections,
                                       seconds=plan.latency_seconds))

    try:
        for i in range(plan.latency_rounds):
            note(f"latency round {i + 1}/{plan.latency_rounds}: {plan.rate:g} req/s for "
                 f"{plan.latency_seconds:g} s direct, through the minimal aiohttp hop, "
                 f"then through bol-proxy")
            d = segment(up.port)
            floor.extend(segment(hop.port))
            with Meter(px.pid) as use:
                p = segment(px.port)
            run.record("proxy", f"latency ({plan.rate:g} req/s, proxied)", use.usage)
            by_round.append(percentile(p.latencies, 50) - percentile(d.latencies, 50))
            direct.extend(d)
            proxied.extend(p)
    finally:
        run.procs.stop(hop.proc)
    return Latency(plan.rate, plan.rate_connections, plan.latency_rounds,
                   plan.latency_seconds, LatencyStats.of(direct), LatencyStats.of(floor),
                   LatencyStats.of(proxied), by_round)


# ------------------------------------------------------------------------- streaming


@dataclass
class Transfer:
    """One direction, several alternating rounds of direct and proxied transfers."""

    direction: str  # down | up
    size: int
    direct_seconds: list[float] = field(default_factory=list)
    proxied_seconds: list[float] = field(default_factory=list)
    rss_before: int = 0  # proxy RSS before its first transfer
    rss_peak: int = 0  # highest proxy RSS during any of them
    rss_after: int = 0  # after the last
    growth: int = 0  # the largest rise of one transfer: its peak minus the RSS before it
    proxy_cpu: float = 0.0  # CPU share of the proxy over its transfers

    @property
    def direct_mbps(self) -> float:
        return self.size / MB / median(self.direct_seconds)

    @property
    def proxied_mbps(self) -> float:
        return self.size / MB / median(self.proxied_seconds)

    @property
    def ratio(self) -> float:
        return self.proxied_mbps / self.direct_mbps


async def _sampling_rss(pid: int, work: Awaitable[T], interval: float = 0.05) -> tuple[T, int]:
    """Run ``work`` while sampling the RSS of ``pid``; returns its result and the peak."""
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, memory(pid)[0])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), interval)

    async with asyncio.TaskGroup() as group:
        group.create_task(sample())
        try:
            outcome = await work
        finally:
            done.set()
    return outcome, peak


def run_streaming(run: Run) -> list[Transfer]:
    plan = run.plan
    size = plan.stream_bytes
    up, px = run.upstream(), run.proxy()
    moves: dict[str, Callable[[str, int], Coroutine[Any, Any, float]]] = {
        "down": load.download, "up": load.upload}
    transfers = []
    for direction, move in moves.items():
        result = Transfer(direction, size)
        cpu = wall = 0.0
        for i in range(plan.rounds):
            note(f"streaming {direction} round {i + 1}/{plan.rounds}: {size / 2**20:,.0f} MiB "
                 "direct, then proxied")
            result.direct_seconds.append(arun(move(up.url, size)))
            run.remember_peak("proxy", px.pid)
            precise = reset_peak(px.pid)  # VmHWM from here on is this transfer's peak
            with Meter(px.pid) as use:
                seconds, sampled = arun(_sampling_rss(px.pid, move(px.url, size)))
            assert use.usage is not None
            result.proxied_seconds.append(seconds)
            run.record("proxy", f"streaming {direction} (proxied)", use.usage)
            peak = max(sampled, use.usage.rss_after, use.usage.hwm if precise else 0)
            result.rss_before = result.rss_before or use.usage.rss_before
            result.rss_peak = max(result.rss_peak, peak)
            result.rss_after = use.usage.rss_after
            result.growth = max(result.growth, peak - use.usage.rss_before)
            cpu, wall = cpu + use.usage.cpu, wall + use.usage.wall
        result.proxy_cpu = cpu / wall if wall else math.nan
        transfers.append(result)
    return transfers


# ----------------------------------------------------------------------------- scale


@dataclass
class Scale:
    sets: int
    one_set_start: float  # seconds from spawn to /_proxy/health, one set (reference)
    start: float  # the same with all the sets
    rss_idle: int
    idle_seconds: float
    idle_tokens: int
    active: int
    burst_seconds: float
    burst_ok: int
    burst_statuses: dict[int, int]
    burst_p50: float
    burst_p99: float
    burst_connect_p99: float  # of the p99, how long connecting took (accept queue)
    listen_overflows: int  # kernel: connections dropped for a full accept queue
    burst_tokens: int
    sets_with_one_token: int
    rss_after: int
    hwm: int
    exit_status: int


def scale_config(up: UpstreamProcess, port: int, sets: int) -> str:
    """The YAML text (written out: faster than dumping 10,000 mappings)."""
    lines = [
        f"listen: {{host: 127.0.0.1, port: {port}}}",
        f"upstream: {{api_url: '{up.url}', token_url: '{up.url}/token'}}",
        "shutdown_timeout: 2",
        "credentials:",
    ]
    for i in range(sets):
        lines += [f"  shop-{i:05d}:", f"    client_id: {SCALE_CLIENTS}{i:05d}",
                  f"    client_secret: not-a-secret-{i:05d}", "    prefetch: false"]
    return "\n".join(lines) + "\n"


def _tokens_of(up: UpstreamProcess, prefix: str) -> dict[str, int]:
    by_client: dict[str, int] = up.token_counts(prefix)["by_client"]
    return by_client


def run_scale(run: Run) -> Scale:
    plan = run.plan
    up = run.upstream()
    note("scale: reference start with one set")
    port = free_port()
    one = start_proxy(run.procs, run.workdir, "one-set", proxy_config(
        up, port, credentials={"solo": {"client_id": "bench-solo", "client_secret": "x",
                                        "prefetch": False}}), port, ready_path="/_proxy/health")
    one_start = one.ready - one.spawned
    run.procs.stop(one.proc)

    note(f"scale: starting with {plan.scale_sets:,} on-demand sets")
    before = sum(_tokens_of(up, SCALE_CLIENTS).values())
    port = free_port()
    px = start_proxy(run.procs, run.workdir, "scale", scale_config(up, port, plan.scale_sets),
                     port, ready_path="/_proxy/health")
    try:
        started = px.ready - px.spawned
        note(f"scale: answering after {started:.2f} s; idle for {plan.idle_seconds:g} s")
        time.sleep(plan.idle_seconds)
        idle_tokens = sum(_tokens_of(up, SCALE_CLIENTS).values()) - before
        rss_idle, _ = memory(px.pid)
        step = max(1, plan.scale_sets // plan.scale_active)
        chosen = list(range(0, plan.scale_sets, step))[: plan.scale_active]
        paths = [f"/shop-{i:05d}{ORDERS}" for i in chosen]
        note(f"scale: {len(paths):,} sets active at once")
        overflows = listen_overflows()
        with Meter(px.pid) as use:
            burst = arun(load.burst(px.port, paths))
        overflows = listen_overflows() - overflows
        assert use.usage is not None
        run.record("scale proxy", f"scale: {len(paths):,} sets at once", use.usage)
        tokens = _tokens_of(up, SCALE_CLIENTS)
        burst_tokens = sum(tokens.values()) - before - idle_tokens
        one_each = sum(1 for i in chosen if tokens.get(f"{SCALE_CLIENTS}{i:05d}") == 1)
        rss_after, hwm = memory(px.pid)
    finally:
        status = run.procs.stop(px.proc)
    return Scale(plan.scale_sets, one_start, started, rss_idle, plan.idle_seconds, idle_tokens,
                 len(paths), burst.seconds, burst.statuses.get(200, 0), dict(burst.statuses),
                 percentile(burst.latencies, 50), percentile(burst.latencies, 99),
                 percentile(burst.connects, 99), overflows, burst_tokens, one_each, rss_after,
                 hwm, status)


# ---------------------------------------------------------------------- token economy


@dataclass
class EconomySet:
    name: str
    prefetch: bool
    window: float  # seconds the set was in use (from ready, or from first use)
    tokens: int
    bound: float  # window / (expires_in - refresh_margin) + 1: the promised bound
    bound_jitter: float  # the same with the documented jitter: margin x 1.25

    @property
    def within(self) -> bool:
        return self.tokens <= self.bound


@dataclass
class Economy:
    seconds: float
    expires_in: int
    refresh_margin: float
    connections: int
    requests: int
    statuses: dict[int, int]
    api_rejected: int  # API requests the upstream refused (expired or unknown token)
    sets: list[EconomySet]

    @property
    def non_200(self) -> int:
        return self.requests - self.statuses.get(200, 0)


def run_tokens(run: Run) -> Economy:
    plan = run.plan
    ttl, margin = plan.economy_ttl, plan.economy_margin
    note(f"tokens: upstream with {ttl} s tokens, refresh_margin {margin:g} s")
    up = start_upstream(run.procs, run.workdir, expires_in=ttl, verify_tokens=True)
    names = [f"econ-{chr(ord('a') + i)}" for i in range(plan.economy_sets)]
    prefetch = {name: i < len(names) // 2 for i, name in enumerate(names)}
    creds = {name: {"client_id": ECONOMY_CLIENTS + name, "client_secret": "not-a-secret",
                    "prefetch": prefetch[name]} for name in names}
    port = free_port()
    config = proxy_config(up, port, tokens={"refresh_margin": margin}, credentials=creds,
                          default_credentials=names[0])
    px = start_proxy(run.procs, run.workdir, "tokens", config, port)
    try:
        note(f"tokens: {plan.economy_connections} connections over {len(names)} sets for "
             f"{plan.economy_seconds:g} s")
        load_start = time.perf_counter()
        with Meter(px.pid) as use:
            result = arun(load.closed_loop(px.port, [f"/{n}{ORDERS}" for n in names],
                                           connections=plan.economy_connections,
                                           seconds=plan.economy_seconds))
        end = time.perf_counter()
        counts = up.token_counts(ECONOMY_CLIENTS)
        run.record("tokens proxy", "token economy (closed loop)", use.usage)
    finally:
        run.procs.stop(px.proc)
        run.procs.stop(up.proc)
    sets = []
    for name in names:
        window = end - (px.ready if prefetch[name] else load_start)
        sets.append(EconomySet(name, prefetch[name], window,
                               counts["by_client"].get(ECONOMY_CLIENTS + name, 0),
                               window / (ttl - margin) + 1,
                               window / (ttl - 1.25 * margin) + 1))
    return Economy(plan.economy_seconds, ttl, margin, plan.economy_connections, result.requests,
                   dict(result.statuses), counts["api_rejected"], sets)


RUNNERS: dict[str, Callable[[Run], Any]] = {
    "throughput": run_throughput,
    "latency": run_latency,
    "streaming": run_streaming,
    "scale": run_scale,
    "tokens": run_tokens,
}


# ------------------------------------------------------------------------ environment


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def environment() -> dict[str, str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    commit = _git("describe", "--always", "--dirty") or "unknown"
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", "proxy").splitlines()]
    uncommitted = (", ".join(dirty) or "none") if commit != "unknown" else "unknown"
    return {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} CPUs ({cpu})",
        "system": f"Linux {platform.release()}",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wrk": wrk.version(),
        "proxy": " ".join(proxy_command()),
        "commit": commit,
        "uncommitted": uncommitted,
    }


# ---------------------------------------------------------------------------- report


@dataclass
class Results:
    plan: Plan
    env: dict[str, str]
    busy_before: float
    others_share: float = math.nan  # machine CPU used by other processes during the run
    others_by_phase: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    phases: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    usage: list[PhaseUsage] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)
    proxy_log: tuple[int, int] | None = None
    proxy_exit: int | None = None


def render(r: Results) -> str:
    out: list[str] = []
    e = r.env
    out += [
        "=" * 100,
        f"bol-proxy benchmark ({r.plan.name} run, {r.wall:.0f} s)   {e['when']}",
        f"  machine: {e['cpus']}, {e['system']}, Python {e['python']}, "
        f"aiohttp {e['aiohttp']}, wrk {e['wrk']}",
        f"  proxy:   {e['proxy']} at {e['commit']}, log level info, stderr to a file",
        f"  uncommitted changes measured with it: {e['uncommitted']}",
        f"  other processes: {r.busy_before:.2f} cores busy before the start; their share of "
        f"the machine's CPU during the run {_pct(r.others_share)}"
        + ("   << numbers disturbed" if r.busy_before > 0.3 or r.others_share > 0.1 else ""),
    ]
    if r.others_by_phase:
        out.append("    by phase: " + ", ".join(f"{name} {_pct(v)}"
                                                for name, v in r.others_by_phase.items()))
    out += ["  MB = 10^6 bytes; latencies in ms", "=" * 100]
    sections: list[tuple[str, Callable[[Any], list[str]]]] = [
        ("throughput", _throughput), ("latency", _latency), ("streaming", _streaming),
        ("scale", _scale), ("tokens", _economy)]
    for number, (name, show) in enumerate(sections, 1):
        if name in r.phases:
            title, *body = show(r.phases[name])
            out += ["", f"{number}. {title}", *body]
        elif name in r.problems:
            out += ["", f"{number}. {name}: {r.problems[name]}"]
    if r.usage:
        out += ["", "6. Proxy CPU and memory by phase (CPU: time used per wall second; 100 % "
                    "= one core)", *_resources(r)]
    out += ["", "Summary against the targets", table(
        ["target", "measured", "goal", "verdict"], _summary(r))]
    return "\n".join(out)


def _resources(r: Results) -> list[str]:
    rows = [[f"{u.phase}" + ("" if u.process == "proxy" else f" [{u.process}]"),
             f"{u.usage.wall:.1f}", f"{u.usage.cpu:.1f}", share(u.usage.cpu_share),
             mb(u.usage.rss_before), mb(u.usage.rss_after), mb(u.usage.hwm)] for u in r.usage]
    out = [table(["phase", "wall s", "CPU s", "CPU", "RSS before MB", "RSS after MB",
                  "VmHWM MB"], rows)]
    peaks = ", ".join(f"{name} {mb(v)} MB" for name, v in r.peaks.items())
    out.append(f"  peak memory (VmHWM) over the run: {peaks or '-'}")
    if r.proxy_log is not None:
        out.append(f"  main proxy log: {r.proxy_log[0]:,} lines, {r.proxy_log[1]} warnings or "
                   f"errors; exit status {r.proxy_exit}")
    return out


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 100:.0f} %"


def _throughput(t: Throughput) -> list[str]:
    rows: list[list[Any]] = [
        [str(i), f"{rd.direct.requests_per_second:,.0f}", f"{rd.proxied.requests_per_second:,.0f}",
         ratio(rd.proxied.requests_per_second / rd.direct.requests_per_second),
         share(rd.proxy_cpu), f"{share(rd.upstream_cpu_direct)} / {share(rd.upstream_cpu_proxied)}",
         rd.direct.errors + rd.proxied.errors]
        for i, rd in enumerate(t.rounds, 1)]
    rows.append(["median", f"{t.direct_rps:,.0f}", f"{t.proxied_rps:,.0f}", ratio(t.ratio),
                 share(median([rd.proxy_cpu for rd in t.rounds])), "", t.errors])
    lat = [[name, *(ms(median([getattr(getattr(rd, name), q) for rd in t.rounds]))
                    for q in ("p50", "p90", "p99"))]
           for name in ("direct", "proxied")]
    lines = [
        f"Throughput: wrk -t1 -c{t.connections} -d{t.seconds:g}s --latency, GET {ORDERS} "
        f"({len(ORDERS_BODY)}-byte JSON); rounds alternate direct, proxied",
        table(["round", "direct req/s", "proxied req/s", "ratio", "proxy CPU",
               "upstream CPU (direct / proxied)", "errors"], rows),
        "  wrk's latency (closed loop: under saturation, not the added latency), median of "
        "rounds:",
        table(["target", "p50", "p90", "p99"], lat),
    ]
    if t.profile_note is not None:
        lines.append(f"  no profile: {t.profile_note}")
    if t.profile is not None and t.profile.samples:
        prof = t.profile
        lines += [
            f"  profile of the proxy during one more proxied round (py-spy, {prof.samples:,} "
            f"samples, raw stacks in {prof.path}):",
            table(["own time (where the CPU is)", "share"],
                  [[name, f"{v * 100:.1f} %"] for name, v in prof.own]),
            table(["proxy/ functions, with what they call", "share"],
                  [[name, f"{v * 100:.1f} %"] for name, v in prof.inclusive]),
        ]
    return lines


def _latency(la: Latency) -> list[str]:
    def row(name: str, s: LatencyStats) -> list[Any]:
        return [name, s.requests, ms(s.p50), ms(s.p90), ms(s.p99), ms(s.max), s.errors,
                ms(s.lag_p99)]

    def added(name: str, of: Callable[[str], float]) -> list[Any]:
        return [name, "", *(ms(of(q), signed=True) for q in ("p50", "p90", "p99", "max")),
                "", ""]

    return [
        f"Added latency: {la.rate:g} req/s open loop over {la.connections} connections, "
        f"{la.rounds} x {la.seconds:g} s per target, alternating; timed from each "
        f"request's scheduled start",
        table(["target", "requests", "p50", "p90", "p99", "max", "errors", "late start p99"],
              [row("direct (bare aiohttp server)", la.direct),
               row("minimal aiohttp hop", la.hop),
               row("bol-proxy", la.proxied),
               added("added by bol-proxy", la.added),
               added("added by the minimal hop", la.hop_added),
               added("bol-proxy over the minimal hop", lambda q: la.added(q, over="hop"))]),
        "  added p50 by round (bol-proxy - direct): "
        + " ".join(ms(v, signed=True) for v in la.proxied_p50_by_round),
        "  minimal aiohttp hop (tests/benchmarks/hop.py): aiohttp's low-level server and "
        "bol-proxy's upstream client, no rules, tokens, logs or metrics",
    ]


def _streaming(ts: list[Transfer]) -> list[str]:
    size = ts[0].size if ts else 0
    rounds = len(ts[0].direct_seconds) if ts else 0
    rows = [[f"{t.direction} ({'GET' if t.direction == 'down' else 'POST, chunked'})",
             f"{t.direct_mbps:,.0f}", f"{t.proxied_mbps:,.0f}", ratio(t.ratio),
             mb(t.rss_before), mb(t.rss_peak), mb(t.rss_after), f"{t.growth / MB:+.1f}",
             share(t.proxy_cpu)] for t in ts]
    return [
        f"Streaming: {size / 2**20:,.0f} MiB ({size / MB:,.1f} MB) each way, {rounds} "
        "alternating round(s), median MB/s; proxy resident memory before the first, at the "
        "peak, after the last, and the largest rise during one transfer",
        table(["transfer", "direct MB/s", "proxied MB/s", "ratio", "RSS before", "peak",
               "after", "growth MB", "proxy CPU"], rows),
    ]


def _scale(s: Scale) -> list[str]:
    statuses = ", ".join(f"{k or 'failed'}: {v}" for k, v in sorted(s.burst_statuses.items()))
    rows = [
        ["start to /_proxy/health answering", f"{s.start:.2f} s",
         f"(one set: {s.one_set_start:.2f} s)"],
        ["idle resident memory", f"{mb(s.rss_idle)} MB", ""],
        [f"token requests while idle ({s.idle_seconds:g} s)", str(s.idle_tokens), "expect 0"],
        [f"{s.active:,} sets at once: answers", statuses, f"in {s.burst_seconds:.2f} s"],
        ["  completion p50 / p99", f"{ms(s.burst_p50)} / {ms(s.burst_p99)} ms",
         f"connected p99: {ms(s.burst_connect_p99)} ms"],
        ["  accept queue overflows (kernel)", str(s.listen_overflows), "SYNs retried after 1 s"],
        ["  token requests they cost", f"{s.burst_tokens:,}", f"expect {s.active:,}"],
        ["  sets with exactly one token", f"{s.sets_with_one_token:,}", ""],
        ["resident memory after / VmHWM", f"{mb(s.rss_after)} / {mb(s.hwm)} MB", ""],
        ["exit status after SIGTERM", str(s.exit_status), ""],
    ]
    return [f"Scale: {s.sets:,} on-demand credential sets (prefetch: false)",
            table(["measure", "value", "note"], rows)]


def _economy(ec: Economy) -> list[str]:
    rows = [[st.name, "yes" if st.prefetch else "no", f"{st.window:.1f}", st.tokens,
             f"{st.bound:.2f}", f"{st.bound_jitter:.2f}", "yes" if st.within else "NO"]
            for st in ec.sets]
    statuses = ", ".join(f"{k or 'failed'}: {v:,}" for k, v in sorted(ec.statuses.items()))
    return [
        f"Token economy: expires_in {ec.expires_in} s, refresh_margin {ec.refresh_margin:g} s, "
        f"{ec.connections} connections for {ec.seconds:g} s",
        f"  {ec.requests:,} requests ({ec.requests / ec.seconds:,.0f}/s): {statuses}; "
        f"API requests refused upstream for an expired/unknown token: {ec.api_rejected}",
        table(["set", "prefetch", "window s", "tokens", "bound", "bound w/ jitter",
               "within bound"], rows),
        "  bound = window / (expires_in - refresh_margin) + 1 (the promised bound); with "
        "jitter: a renewal lead of up to 1.25 x margin",
    ]


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def _summary(r: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    t = r.phases.get("throughput")
    if isinstance(t, Throughput):
        rows.append(["throughput proxied/direct (median)", ratio(t.ratio), ">= 0.40",
                     _verdict(t.ratio >= 0.4 and t.errors == 0)])
    la = r.phases.get("latency")
    if isinstance(la, Latency):
        ok = la.direct.errors == 0 and la.proxied.errors == 0
        rows.append([f"added p50 at {la.rate:g} req/s", ms(la.added("p50"), True) + " ms",
                     "<= 0.5 ms", _verdict(ok and la.added("p50") <= 0.0005)])
        rows.append([f"added p99 at {la.rate:g} req/s", ms(la.added("p99"), True) + " ms",
                     "<= 2 ms", _verdict(ok and la.added("p99") <= 0.002)])
    ts = r.phases.get("streaming")
    if isinstance(ts, list):
        for tr in ts:
            rows.append([f"streaming {tr.direction}: proxied/direct", ratio(tr.ratio),
                         ">= 0.50", _verdict(tr.ratio >= 0.5)])
            rows.append([f"streaming {tr.direction}: proxy RSS growth",
                         f"{tr.growth / MB:+.1f} MB", "<= 20 MB", _verdict(tr.growth <= 20 * MB)])
    s = r.phases.get("scale")
    if isinstance(s, Scale):
        rows += [
            [f"{s.sets:,} sets: start to listening", f"{s.start:.2f} s", "<= 2 s",
             _verdict(s.start <= 2.0)],
            [f"{s.sets:,} sets: idle RSS", f"{mb(s.rss_idle)} MB", "<= 150 MB",
             _verdict(s.rss_idle <= 150 * MB)],
            [f"{s.sets:,} sets: token requests while idle", str(s.idle_tokens), "0",
             _verdict(s.idle_tokens == 0)],
            [f"{s.active:,} sets at once: token requests", f"{s.burst_tokens:,}",
             f"{s.active:,}", _verdict(s.burst_tokens == s.active and s.burst_ok == s.active)],
        ]
    ec = r.phases.get("tokens")
    if isinstance(ec, Economy):
        worst = max(ec.sets, key=lambda x: x.tokens / x.bound)
        rows.append(["token requests per set (worst set)",
                     f"{worst.tokens} ({worst.name})", f"<= {worst.bound:.2f}",
                     _verdict(all(x.within for x in ec.sets) and ec.non_200 == 0)])
    for name, problem in r.problems.items():
        rows.append([name, "-", "", problem.partition(":")[0]])
    return rows


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        data = {k: _jsonable(v) for k, v in asdict(value).items()}
        for name in dir(type(value)):  # derived figures too (ratios, medians)
            if isinstance(getattr(type(value), name, None), property):
                data[name] = _jsonable(getattr(value, name))
        return data
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench",
        description="Measure bol-proxy against a local imitation of bol (see the README's "
                    "Performance section). Report on stdout, progress on stderr.")
    p.add_argument("--quick", action="store_true",
                   help="one short round of everything, 128 MiB transfers (under 2 minutes)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="alternating rounds of throughput, latency and streaming "
                        "(default 3, 6 and 3; --quick 1, 2 and 1)")
    p.add_argument("--only", nargs="+", choices=PHASES, metavar="NAME", action="extend",
                   help=f"run only these phases: {', '.join(PHASES)}")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting of the measured proxy (throughput, latency, streaming), "
                        "e.g. rate_limits.enabled=false to see what a feature costs")
    p.add_argument("--profile", metavar="PATH",
                   help="after the throughput rounds, sample the proxy with py-spy during one "
                        f"more proxied round and write the raw stacks to PATH ({spy.INSTALL})")
    args = p.parse_args(argv)
    if args.rounds is not None and not 1 <= args.rounds <= 20:
        p.error("--rounds must be between 1 and 20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.rounds is not None:
        plan = replace(plan, rounds=args.rounds, latency_rounds=args.rounds)
    selected = [name for name in PHASES if not args.only or name in args.only]
    if "throughput" in selected and wrk.available() is None:
        note(f"wrk is not installed: the throughput phase is skipped. Install it with: "
             f"{wrk.INSTALL}")
    note(f"bol-proxy benchmark ({plan.name}): {', '.join(selected)}")
    results = Results(plan, environment(), busy_cores())
    workdir = Path(tempfile.mkdtemp(prefix="bol-proxy-bench-"))
    started = time.perf_counter()
    procs = Processes()
    keep = True  # the logs stay for a look when something failed
    try:
        with procs, Others(procs) as whole:
            run = Run(plan, procs, workdir, Path(args.profile) if args.profile else None,
                      args.set)
            for name in selected:
                try:
                    with Others(procs) as others:
                        results.phases[name] = RUNNERS[name](run)
                    results.others_by_phase[name] = others.share
                except Skipped as exc:
                    results.problems[name] = f"skipped: {exc}"
                except (BenchError, RuntimeError, OSError, TimeoutError,
                        subprocess.SubprocessError, aiohttp.ClientError) as exc:
                    results.problems[name] = f"failed: {type(exc).__name__}: {exc}"
                    note(f"{name} failed: {exc}")
            stopped = run.stop_proxy()
            if stopped is not None:
                results.proxy_exit, results.proxy_log = stopped
            results.usage, results.peaks = run.usage, run.peaks
        keep = any(p.startswith("failed") for p in results.problems.values())
    finally:
        if keep:
            note(f"logs and configurations kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results.wall = time.perf_counter() - started
    results.others_share = whole.share
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(results), indent=2) + "\n")
        note(f"results written to {args.json}")
    return 1 if keep else 0


if __name__ == "__main__":
    sys.exit(main())
