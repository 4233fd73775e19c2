"""The processes of a benchmark run: the upstream, bol-proxy, and what /proc says of them.

Every process started here is registered with a :class:`Processes`, which stops them all
(SIGTERM, then SIGKILL after a grace period) when its ``with`` block ends, however it ends.
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the checkout; ``tests`` is a package in it
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not run (a process did not start, a request failed)."""


class Processes:
    """Starts subprocesses and guarantees that they are stopped."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()

    def spawn(self, argv: Sequence[str], *, stdout: Any = subprocess.DEVNULL,
              stderr: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, env=_child_env())
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def cpu_seconds(self) -> float:
        """CPU time of this process, its threads and every child, running or waited for."""
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        for proc in self._procs:
            if proc.returncode is None:  # not waited for yet: /proc still has it
                with contextlib.suppress(OSError, ValueError):
                    total += cpu_seconds(proc.pid)
        return total

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc)
            except Exception:  # keep stopping the others
                if proc.poll() is None:
                    proc.kill()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name in [n for n in env if n.startswith("BOL_")]:
        del env[name]  # the generated configuration is the only one that counts
    return env


# ------------------------------------------------------------------------ /proc readers


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` 5); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat).

    Busy is time in processes (user, nice, system) plus time taken by the hypervisor
    (steal); interrupt time is left out, since most of it is our own loopback traffic
    and no process is charged for it.
    """
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = ticks
    return user + nice + system + steal, sum(ticks)


class Others:
    """The share of the machine's CPU that processes other than ours used over a span.

    Other work on a 2-core machine shifts every number here, so the report says how much
    there was: ``with Others(procs) as o: ...; o.share`` (0.25: half of one of 2 cores).
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.share = math.nan

    def __enter__(self) -> Others:
        self._busy, self._total = machine_jiffies()
        self._ours = self.procs.cpu_seconds()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        busy, total = machine_jiffies()
        ours = self.procs.cpu_seconds() - self._ours
        if total > self._total:
            others = (busy - self._busy) / CLOCK_TICKS - ours
            self.share = max(0.0, others) / ((total - self._total) / CLOCK_TICKS)


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores the machine keeps busy right now (sampled over ``seconds``)."""
    busy0, total0 = machine_jiffies()
    time.sleep(seconds)
    busy1, total1 = machine_jiffies()
    cores = os.cpu_count() or 1
    return (busy1 - busy0) / (total1 - total0) * cores if total1 > total0 else math.nan


def listen_overflows() -> int:
    """The kernel's count of connections dropped for a full accept queue (TcpExt)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            counters = dict(zip(head.split()[1:], values.split()[1:], strict=True))
            return int(counters.get("ListenOverflows", 0))
    return 0


@dataclass
class Usage:
    """CPU and memory of one process over one measured phase."""

    wall: float
    cpu: float
    rss_before: int
    rss_after: int
    hwm: int

    @property
    def cpu_share(self) -> float:
        """CPU time per wall-clock second: 1.0 is one core fully busy."""
        return self.cpu / self.wall if self.wall > 0 else 0.0


class Meter:
    """Measures a phase of one process: ``with Meter(pid) as m: ...; m.usage``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.usage: Usage | None = None

    def __enter__(self) -> Meter:
        self._rss, _ = memory(self.pid)
        self._cpu = cpu_seconds(self.pid)
        self._start = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            wall = time.perf_counter() - self._start
            rss, hwm = memory(self.pid)
            self.usage = Usage(wall, cpu_seconds(self.pid) - self._cpu, self._rss, rss, hwm)


# ------------------------------------------------------------------------ HTTP helpers


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A plain GET on 127.0.0.1 (for control requests, not for measuring)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for(port: int, path: str, proc: subprocess.Popen[bytes], deadline: float,
             log: Path | None = None, interval: float = 0.01) -> float:
    """Poll until ``path`` answers 200; returns the time it did (``perf_counter``)."""
    last = "no answer"
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with status {proc.returncode} before {path} "
                             f"answered{_tail(log)}")
        try:
            status, _ = http_get(port, path, timeout=1.0)
        except OSError as exc:
            last = type(exc).__name__
        else:
            if status == 200:
                return time.perf_counter()
            last = f"status {status}"
        time.sleep(interval)
    raise BenchError(f"{path} on port {port} did not answer 200 in time ({last}){_tail(log)}")


def _tail(log: Path | None, lines: int = 8) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n  log " + str(log) + ":\n    " + "\n    ".join(text)


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the proxy's ``listen.port``)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- upstream


@dataclass
class UpstreamProcess:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def token_counts(self, prefix: str | None = None) -> dict[str, Any]:
        path = "/_count" if prefix is None else f"/_count?prefix={prefix}"
        status, body = http_get(self.port, path, timeout=30.0)
        if status != 200:
            raise BenchError(f"upstream /_count answered {status}")
        counts: dict[str, Any] = json.loads(body)
        return counts


def start_upstream(procs: Processes, workdir: Path, *, expires_in: int = 3600,
                   verify_tokens: bool = False, metered: str | None = None,
                   timeout: float = 20.0) -> UpstreamProcess:
    """Start the imitation of bol in its own process and wait for its port."""
    log = workdir / f"upstream-{expires_in}.log"
    argv = [sys.executable, "-m", "tests.benchmarks.upstream", "--expires-in", str(expires_in)]
    if verify_tokens:
        argv.append("--verify-tokens")
    if metered:
        argv += ["--metered", metered]
    upstream = UpstreamProcess(*_spawn_announcing(procs, argv, log, timeout))
    wait_for(upstream.port, "/_count", upstream.proc, time.perf_counter() + timeout, log)
    return upstream


def start_hop(procs: Processes, bol: UpstreamProcess, timeout: float = 20.0) -> UpstreamProcess:
    """Start the minimal aiohttp hop (``hop.py``) in front of ``bol``."""
    argv = [sys.executable, "-m", "tests.benchmarks.hop", bol.url]
    return UpstreamProcess(*_spawn_announcing(procs, argv, None, timeout))


def _spawn_announcing(procs: Processes, argv: list[str], log: Path | None,
                      timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server that prints its port on its first stdout line; (process, port)."""
    with log.open("ab") if log else contextlib.nullcontext(subprocess.DEVNULL) as err:
        proc = procs.spawn(argv, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        raise BenchError(f"{argv[2]} did not start{_tail(log)}")
    return proc, int(line)


# ---------------------------------------------------------------------------- bol-proxy


def proxy_command() -> list[str]:
    """The real command: the venv's ``bol-proxy`` script, else ``python -m proxy``."""
    script = Path(sys.executable).parent / "bol-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


def proxy_config(bol: UpstreamProcess, port: int, **sections: Any) -> dict[str, Any]:
    """A configuration for the proxy in front of ``bol`` with one set ``bench``.

    ``sections`` are merged into the top-level sections (``limits={...}``, ...).
    """
    raw: dict[str, Any] = {
        "listen": {"host": HOST, "port": port},
        "upstream": {"api_url": bol.url, "token_url": bol.url + "/token"},
        "shutdown_timeout": 2,
        "credentials": {"bench": {"client_id": "bench-main", "client_secret": "not-a-secret"}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def with_settings(raw: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """``raw`` with ``section.key=value`` settings applied (values read as YAML): to
    measure what one feature costs, e.g. ``rate_limits.enabled=false``."""
    for setting in settings:
        name, _, value = setting.partition("=")
        section, _, key = name.partition(".")
        if not key or not value:
            raise BenchError(f"--set takes section.key=value, got {setting!r}")
        raw.setdefault(section, {})[key] = yaml.safe_load(value)
    return raw


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    spawned: float  # perf_counter just before the process was started
    ready: float  # perf_counter when the readiness path first answered 200

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_proxy(procs: Processes, workdir: Path, name: str, config: dict[str, Any] | str,
                port: int, *, ready_path: str = "/_proxy/ready",
                timeout: float = 60.0) -> ProxyProcess:
    """Write the configuration and run bol-proxy on it, as an operator would.

    Default log level (info), stderr to a file; returns once ``ready_path`` answers 200.
    """
    path = workdir / f"{name}.yaml"
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    path.write_text(text)
    log = workdir / f"{name}.log"
    with log.open("ab") as err:
        spawned = time.perf_counter()
        proc = procs.spawn([*proxy_command(), "--config", str(path)], stderr=err)
    ready = wait_for(port, ready_path, proc, spawned + timeout, log)
    return ProxyProcess(proc, port, log, spawned, ready)


def log_summary(log: Path) -> tuple[int, int]:
    """(lines, lines at WARNING or above) of a proxy log."""
    lines = problems = 0
    with log.open("rb") as f:
        for line in f:
            lines += 1
            if b" WARNING " in line or b" ERROR " in line or b"Traceback" in line:
                problems += 1
    return lines, problems
