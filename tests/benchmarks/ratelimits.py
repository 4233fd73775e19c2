"""Rate limits under load: tools sharing one set's budget, straight at bol or through the proxy.

    .venv/bin/python -m tests.benchmarks.ratelimits [--seconds S] [--tools N ...]
                                                    [--budget LIMIT/SECONDS] [--json PATH]

An imitation of bol (``upstream.py --metered``) enforces a budget of LIMIT requests per
SECONDS on one endpoint, per client, in fixed windows, as bol does: the state in
``X-RateLimit-*``, 429 with ``Retry-After`` once spent. N tools hammer that endpoint for
a fixed time, each sending its next request as soon as an answer comes (a 429 included,
as clients without a retry cap do): first straight at the imitation, then through a
fresh bol-proxy (default configuration: rate limits on, 20 s maximum wait). Reported for
each N and each way:

* requests the tools sent, and their answers by status;
* 429s bol had to send per 1,000 requests that reached it (the number bol watches);
* goodput: what bol served while the tools were sending, as a share of what its windows
  allowed in that time. bol opens a client's window at its first request, so a run of S
  seconds holds ceil(S / SECONDS) windows and a client that never waits too long gets
  LIMIT in each: straight at bol, a tool that retries at once scores 1.00 by
  construction. Requests still queued in the proxy at the end are served afterwards and
  shown, but not counted.

Nothing is asserted; the summary compares with the targets (at most 5 429s per 1,000
through the proxy, goodput at least 95 % of the budget). Defaults: 10 per 3 s, tools
1, 4 and 16, 30 s each way: about 4 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .load import _FAILURES, HttpConnection
from .procs import (
    HOST,
    Processes,
    UpstreamProcess,
    free_port,
    proxy_config,
    start_proxy,
    start_upstream,
)
from .report import ratio, table

PATH = "/retailer/metered"


@dataclass
class Way:
    """One way of reaching bol, with N tools, for a fixed time."""

    tools: int
    via: str  # "direct" or "proxy"
    seconds: float = 0.0  # the time the tools sent requests
    answers: Counter[int] = field(default_factory=Counter)  # by status; 0: no answer
    served: int = 0  # by bol, within budget, in all
    served_in_time: int = 0  # ... while the tools were sending
    refused: int = 0  # 429s bol sent

    def per_thousand(self) -> float:
        reached = self.served + self.refused
        return 1000 * self.refused / reached if reached else 0.0

    def goodput(self, limit: int, window: float) -> float:
        """Served while the tools were sending, as a share of what bol's windows allowed
        in that time (a window opens at the client's first request: 30 s hold 10 of 3 s)."""
        windows = math.ceil(self.seconds / window - 1e-9)
        return self.served_in_time / (limit * windows) if windows else 0.0

    def jsonable(self) -> dict[str, object]:
        return {**asdict(self), "answers": {str(k): v for k, v in self.answers.items()},
                "per_thousand": self.per_thousand()}


async def hammer(port: int, tools: int, seconds: float, authorization: str,
                 bol: UpstreamProcess) -> tuple[Counter[int], int]:
    """``tools`` connections, each sending its next request as soon as an answer comes;
    the answers by status and what bol had served when the tools stopped sending."""
    answers: Counter[int] = Counter()
    request = (f"GET {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
               f"Accept: application/vnd.retailer.v10+json\r\n"
               f"Authorization: {authorization}\r\n\r\n").encode()
    deadline = time.perf_counter() + seconds

    async def tool() -> None:
        conn = HttpConnection(port)
        try:
            while time.perf_counter() < deadline:
                try:
                    answers[await conn.request(request)] += 1
                except _FAILURES:
                    answers[0] += 1
                    conn.close()
        finally:
            conn.close()

    async def served_at_deadline() -> int:
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        return (await asyncio.to_thread(counted, bol))[0]

    # A request queued in the proxy may outlast the deadline by its wait.
    async with asyncio.timeout(seconds + 60), asyncio.TaskGroup() as group:
        for _ in range(tools):
            group.create_task(tool())
        snapshot = group.create_task(served_at_deadline())
    return answers, snapshot.result()


def counted(bol: UpstreamProcess) -> tuple[int, int]:
    counts = bol.token_counts()
    return counts["served"], counts["refused"]


def measure(procs: Processes, bol: UpstreamProcess, workdir: Path, tools: int,
            seconds: float, via: str, round_: int) -> Way:
    way = Way(tools, via, seconds)
    before = counted(bol)
    if via == "direct":
        # A client of its own per round: every round starts with a whole budget.
        port, authorization = bol.port, f"Bearer direct-{round_}"
        proxy = None
    else:
        port = free_port()
        raw = proxy_config(bol, port)
        raw["credentials"]["bench"]["client_id"] = f"bench-{round_}"
        proxy = start_proxy(procs, workdir, f"ratelimits-{round_}", raw, port)
        authorization = "Basic not-used"  # replaced by the set's token
    way.answers, served_then = asyncio.run(hammer(port, tools, seconds, authorization, bol))
    after = counted(bol)
    way.served, way.refused = after[0] - before[0], after[1] - before[1]
    way.served_in_time = served_then - before[0]
    if proxy is not None:
        procs.stop(proxy.proc)
    return way


def render(ways: list[Way], limit: int, window: float) -> str:
    rows = []
    for w in ways:
        rows.append([
            str(w.tools), w.via, f"{sum(w.answers.values()):,}",
            ", ".join(f"{s or 'failed'}: {n:,}" for s, n in sorted(w.answers.items())),
            f"{w.per_thousand():.1f}", f"{w.served_in_time} (+{w.served - w.served_in_time})",
            ratio(w.goodput(limit, window)),
        ])
    proxied = [w for w in ways if w.via == "proxy"]
    worst_429 = max((w.per_thousand() for w in proxied), default=0.0)
    worst_goodput = min((w.goodput(limit, window) for w in proxied), default=0.0)
    return "\n".join([
        f"budget: {limit} requests per {window:g} s per client ({limit / window:.2f}/s)",
        "",
        table(["tools", "way", "requests", "answers", "bol's 429s per 1,000",
               "served in time (+ after)", "goodput"], rows),
        "",
        f"through the proxy: at most {worst_429:.1f} 429s from bol per 1,000 (target <= 5), "
        f"goodput at least {ratio(worst_goodput)} of the budget (target >= 0.95)",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=30.0, help="time each way runs")
    p.add_argument("--tools", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--budget", default="10/3", metavar="LIMIT/SECONDS")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit_text, _, window_text = args.budget.partition("/")
    limit, window = int(limit_text), float(window_text)
    ways: list[Way] = []
    with tempfile.TemporaryDirectory(prefix="bol-proxy-ratelimits-") as tmp, \
            Processes() as procs:
        workdir = Path(tmp)
        bol = start_upstream(procs, workdir, metered=args.budget)
        for round_, tools in enumerate(args.tools):
            for via in ("direct", "proxy"):
                print(f"{tools} tools, {via}, {args.seconds:g} s ...", file=sys.stderr,
                      flush=True)
                ways.append(measure(procs, bol, workdir, tools, args.seconds, via, round_))
    print(render(ways, limit, window))
    if args.json:
        args.json.write_text(json.dumps({"limit": limit, "window": window,
                                         "ways": [w.jsonable() for w in ways]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
