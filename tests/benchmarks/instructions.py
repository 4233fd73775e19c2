"""Instructions per proxied request, counted by valgrind's callgrind.

    .venv/bin/python -m tests.benchmarks.instructions [--requests N] [--set KEY=VALUE ...]

Timings on a shared 2-core machine move by tens of percent from run to run; instruction
counts do not, so this is the figure to compare two versions of the hot path with. It
needs valgrind (``apt-get install -y valgrind``) and takes about a minute.

It starts the imitation of bol (not counted), then bol-proxy (default log level) and the
minimal aiohttp hop (``hop.py``), one after the other, under callgrind with counting
off. After 100 warm-up requests it counts the instructions of N sequential GETs of
``/retailer/orders`` on one keep-alive connection, and prints instructions
per request and the ratio of bol-proxy to the hop measured in the same run. Only user
space is counted: system calls are the kernel's work and waiting is none. ``--set
rate_limits.enabled=false`` (any ``section.key=value``, the value read as YAML) measures
bol-proxy with that setting, to see what a feature costs.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from . import load
from .procs import (
    BenchError,
    Processes,
    UpstreamProcess,
    free_port,
    proxy_config,
    start_upstream,
    wait_for,
    with_settings,
)

ORDERS = "/retailer/orders"
WARM_UP = 100


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}"]


async def requests(port: int, count: int, connections: int = 1) -> None:
    """``count`` GETs in all, sequential on each of ``connections`` connections."""
    data = load.request_bytes(port, ORDERS)

    async def one_connection(share: int) -> None:
        conn = load.HttpConnection(port)
        try:
            for _ in range(share):
                if await conn.request(data) != 200:
                    raise BenchError(f"port {port} answered an error")
        finally:
            conn.close()

    async with asyncio.TaskGroup() as group:
        for i in range(connections):
            group.create_task(one_connection(count // connections
                                             + (i < count % connections)))


def count(procs: Processes, argv: list[str], port: int, out: Path, n: int,
          connections: int = 1) -> float:
    """Instructions per request of the server started by ``argv`` on ``port``."""
    log = out.with_suffix(".log")
    with log.open("ab") as err:
        proc = procs.spawn([*callgrind(out), *argv], stderr=err)
    wait_for(port, ORDERS, proc, time.perf_counter() + 180, log, interval=0.2)
    asyncio.run(requests(port, WARM_UP))
    subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True,
                   capture_output=True)
    asyncio.run(requests(port, n, connections))
    subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], check=True,
                   capture_output=True)
    procs.stop(proc, grace=60)
    totals = [int(line.split()[1]) for line in out.read_text().splitlines()
              if line.startswith(("totals:", "summary:"))]
    if not totals:
        raise BenchError(f"callgrind wrote no totals to {out}")
    return max(totals) / n


def hop_argv(bol: UpstreamProcess, port: int) -> list[str]:
    return [sys.executable, "-m", "tests.benchmarks.hop", bol.url, str(port)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.instructions",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=500, metavar="N",
                   help="requests counted per server (default 500)")
    p.add_argument("--connections", type=int, default=1, metavar="N",
                   help="connections the requests are spread over, at once (default 1: "
                        "sequential; 32 is the throughput measurement's concurrency)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting of bol-proxy's configuration for this count")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get update && apt-get install -y valgrind",
              file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bol-proxy-instructions-"))
    with Processes() as procs:
        bol = start_upstream(procs, workdir)
        port = free_port()
        config = workdir / "proxy.yaml"
        config.write_text(yaml.safe_dump(with_settings(proxy_config(bol, port), args.set)))
        proxy = count(procs, [sys.executable, "-m", "proxy", "--config", str(config)], port,
                      workdir / "proxy.out", args.requests, args.connections)
        port = free_port()
        hop = count(procs, hop_argv(bol, port), port, workdir / "hop.out", args.requests,
                    args.connections)
    print(f"instructions per request ({args.requests} GETs, {args.connections} at a time, "
          "user space):")
    print(f"  bol-proxy             {proxy / 1000:8,.0f}k")
    print(f"  minimal aiohttp hop   {hop / 1000:8,.0f}k")
    print(f"  ratio                 {proxy / hop:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
