"""Runs wrk (closed-loop throughput) and reads its ``--latency`` report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from .procs import BenchError, Processes

INSTALL = "apt-get update && apt-get install -y wrk"

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


@dataclass
class WrkResult:
    requests_per_second: float
    requests: int
    p50: float  # seconds
    p90: float
    p99: float
    errors: int  # non-2xx/3xx answers plus socket errors

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.requests > 0


def available() -> str | None:
    """wrk's path, or None when it is not installed."""
    return shutil.which("wrk")


def version() -> str:
    path = available()
    if path is None:
        return "not installed"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    match = re.search(r"wrk\s+(\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def run(procs: Processes, url: str, seconds: float, *, threads: int = 1,
        connections: int = 32) -> WrkResult:
    """``wrk -t1 -c32 -d<secs>s --latency URL``, bounded by a timeout."""
    path = available()
    if path is None:
        raise BenchError(f"wrk is not installed: {INSTALL}")
    argv = [path, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "5s", "--latency", url]
    proc = procs.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        procs.stop(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {text.strip()[-500:]}")
    return parse(text)


def parse(text: str) -> WrkResult:
    """Read requests/s, the request count, p50/p90/p99 and errors from wrk's output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise BenchError(f"cannot read wrk's output: {text.strip()[-500:]}")
    latency = {int(m.group(1)): float(m.group(2)) * _UNITS[m.group(3)]
               for m in re.finditer(rf"^\s+(\d+)%\s+{_DURATION}\s*$", text, re.M)}
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", text))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    if socket is not None:
        errors += sum(int(n) for n in socket.groups())
    return WrkResult(float(rps.group(1)), int(total.group(1)), latency.get(50, float("nan")),
                     latency.get(90, float("nan")), latency.get(99, float("nan")), errors)
