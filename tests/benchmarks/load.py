"""Load generators written for the harness: open-loop, closed-loop, burst, bulk transfers.

The small-request generators speak HTTP/1.1 themselves over asyncio streams (keep-alive,
``Content-Length`` or chunked answers): far less client overhead and jitter than a
general-purpose client, and the same for the direct and the proxied target.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

HOST = "127.0.0.1"
ACCEPT = "application/vnd.retailer.v10+json"
TRANSFER_CHUNK = b"\xa5" * (64 * 1024)


def request_bytes(port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: {ACCEPT}\r\n\r\n").encode()


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that sends prebuilt requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(HOST, self.port)

    async def request(self, data: bytes) -> int:
        """Send ``data`` (a whole request), read the whole answer, return its status."""
        if self._reader is None or self._writer is None:
            await self.connect()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(data)
        head = await reader.readuntil(b"\r\n\r\n")
        status, length, chunked, close = _parse_head(head)
        if length is not None:
            await reader.readexactly(length)
        elif chunked:
            await _read_chunked(reader)
        else:
            close = True  # close-delimited: read to the end
            await reader.read()
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return
        await reader.readexactly(size + 2)


_FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


# ------------------------------------------------------------------------ open loop


@dataclass
class RateResult:
    """Latencies timed from each request's scheduled start (no coordinated omission)."""

    latencies: list[float] = field(default_factory=list)  # seconds
    lag: list[float] = field(default_factory=list)  # scheduled start -> request written
    errors: int = 0
    scheduled: int = 0

    def extend(self, other: RateResult) -> None:
        self.latencies += other.latencies
        self.lag += other.lag
        self.errors += other.errors
        self.scheduled += other.scheduled


async def constant_rate(port: int, path: str, *, rate: float, connections: int,
                        seconds: float, warmup: int = 20) -> RateResult:
    """Send ``rate`` requests/s for ``seconds`` over ``connections`` keep-alive connections.

    Arrivals are on a fixed schedule whatever the answers do; a request waits for a free
    connection if all are busy, and that wait counts in its latency. The schedule is kept
    by a thread (``Event.wait`` wakes within about 0.1 ms, where the event loop's own
    timers round up to whole milliseconds); ``lag`` records how late each request left.
    """
    result = RateResult(scheduled=int(rate * seconds))
    request = request_bytes(port, path)
    conns = [HttpConnection(port) for _ in range(connections)]
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def schedule(start: float) -> None:
        try:
            for i in range(result.scheduled):
                scheduled = start + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0 and stop.wait(delay):
                    return
                loop.call_soon_threadsafe(queue.put_nowait, scheduled)
        finally:
            for _ in conns:
                loop.call_soon_threadsafe(queue.put_nowait, None)

    async def warm(conn: HttpConnection) -> None:
        for _ in range(warmup):
            await conn.request(request)

    async def worker(conn: HttpConnection) -> None:
        while (scheduled := await queue.get()) is not None:
            result.lag.append(time.perf_counter() - scheduled)
            try:
                status = await conn.request(request)
            except _FAILURES:
                result.errors += 1
                conn.close()
                continue
            result.latencies.append(time.perf_counter() - scheduled)
            if status != 200:
                result.errors += 1

    try:
        async with asyncio.timeout(seconds * 2 + 30):
            async with asyncio.TaskGroup() as group:
                for conn in conns:
                    group.create_task(warm(conn))
            async with asyncio.TaskGroup() as group:
                for conn in conns:
                    group.create_task(worker(conn))
                group.create_task(asyncio.to_thread(schedule, time.perf_counter() + 0.01))
    finally:
        stop.set()  # a timeout or an error ends the schedule thread too
        for conn in conns:
            conn.close()
    return result


# ---------------------------------------------------------------------- closed loop


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)  # 0: connection failures
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return self.statuses.total()


async def closed_loop(port: int, paths: list[str], *, connections: int, seconds: float,
                      max_requests: int = 50_000_000) -> LoadResult:
    """As fast as answers come, on ``connections`` connections, cycling through ``paths``."""
    result = LoadResult()
    requests = [request_bytes(port, p) for p in paths]
    deadline = time.perf_counter() + seconds
    budget = max_requests

    async def worker(offset: int) -> None:
        nonlocal budget
        conn = HttpConnection(port)
        i = offset
        try:
            while time.perf_counter() < deadline and budget > 0:
                budget -= 1
                try:
                    result.statuses[await conn.request(requests[i % len(requests)])] += 1
                except _FAILURES:
                    result.statuses[0] += 1
                    conn.close()
                    await asyncio.sleep(0.01)
                i += 1
        finally:
            conn.close()

    started = time.perf_counter()
    async with asyncio.timeout(seconds + 30), asyncio.TaskGroup() as group:
        for offset in range(connections):
            group.create_task(worker(offset))
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------- burst


@dataclass
class BurstResult:
    latencies: list[float] = field(default_factory=list)  # from the common start
    connects: list[float] = field(default_factory=list)  # of that, opening the connection
    statuses: Counter[int] = field(default_factory=Counter)  # 0: connection failures
    seconds: float = 0.0


async def burst(port: int, paths: list[str], limit: float = 60.0) -> BurstResult:
    """One request per path, all at once, each on a connection of its own."""
    result = BurstResult()
    started = time.perf_counter()

    async def one(path: str) -> None:
        conn = HttpConnection(port)
        try:
            await conn.connect()
            result.connects.append(time.perf_counter() - started)
            result.statuses[await conn.request(request_bytes(port, path))] += 1
            result.latencies.append(time.perf_counter() - started)
        except _FAILURES:
            result.statuses[0] += 1
        finally:
            conn.close()

    async with asyncio.timeout(limit), asyncio.TaskGroup() as group:
        for path in paths:
            group.create_task(one(path))
    result.seconds = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------ transfers


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=900))


async def download(base: str, size: int) -> float:
    """GET ``size`` bytes from /retailer/stream; returns the seconds it took."""
    received = 0
    async with _session() as session:
        started = time.perf_counter()
        async with session.get(f"{base}/retailer/stream?size={size}") as response:
            if response.status != 200:
                raise RuntimeError(f"download answered {response.status}")
            while chunk := await response.content.readany():
                received += len(chunk)
        seconds = time.perf_counter() - started
    if received != size:
        raise RuntimeError(f"download delivered {received} of {size} bytes")
    return seconds


async def _chunks(size: int) -> AsyncIterator[bytes]:
    whole, rest = divmod(size, len(TRANSFER_CHUNK))
    for _ in range(whole):
        yield TRANSFER_CHUNK
    if rest:
        yield TRANSFER_CHUNK[:rest]


async def upload(base: str, size: int) -> float:
    """POST ``size`` bytes (chunked, from a generator) to /retailer/upload; seconds taken."""
    async with _session() as session:
        started = time.perf_counter()
        async with session.post(f"{base}/retailer/upload", data=_chunks(size),
                                headers={"Content-Type": "application/octet-stream"}
                                ) as response:
            answer = await response.read()
            if response.status != 200:
                raise RuntimeError(f"upload answered {response.status}: {answer[:200]!r}")
        seconds = time.perf_counter() - started
    received = json.loads(answer)["bytes"]
    if received != size:
        raise RuntimeError(f"upload delivered {received} of {size} bytes")
    return seconds
