"""A scripted network for :mod:`proxy.upstream`: no sockets, and a clock the test drives.

* :class:`VirtualTimeLoop` is an event loop whose clock stands still while anything is
  ready to run and, when nothing is, jumps straight to the next timer (as trio's
  ``MockClock`` with autojump, or the loop CPython's own asyncio tests use). A test that
  waits for a deadline, a connect timeout or the idle sweep gets there at once and to
  the exact loop time; one that waits for something nothing will ever do fails at once
  with :class:`Deadlock` instead of hanging.
* :class:`ScriptedTransport` records what the client writes and how it steers the
  connection (pause and resume reading, close), and plays the server's side: bytes cut
  at the test's chosen boundaries, held back while reading is paused, then a clean
  close or a reset.
* :class:`ScriptedNetwork` is the pool's ``open_connection``: it hands out scripted
  transports, or refuses, or never connects; :class:`Client` is a pool on one, and the
  requests a test sends over it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from proxy.upstream import Payload, Response, UpstreamPool, request_head

T = TypeVar("T")
TOKEN = "Bearer secret-token-that-must-not-leak"  # in every request head a Client sends


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is set: the test waits for what will never happen."""


class _ClockJump:
    """The loop's selector: there is no I/O, so waiting means the clock moves on."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise Deadlock("the test waits for an event that nothing scheduled will set")
        self._loop.now += timeout
        return []

    def close(self) -> None:
        pass


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """An event loop on a virtual clock, for code that does no real I/O."""

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__()
        self.now = start
        self._selector = _ClockJump(self)

    def time(self) -> float:
        return self.now

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # only other threads wake a loop up, and these tests have none


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a fresh virtual-time loop; cancel what it leaves running."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()


def virtual_time(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test on a virtual-time loop (pytest sees a plain test)."""

    @functools.wraps(test)
    def run_test(*args: Any, **kwargs: Any) -> None:
        run(test(*args, **kwargs))

    return run_test


async def settle(rounds: int = 20) -> None:
    """Let every ready callback run; the clock does not move."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def advance(seconds: float) -> None:
    """Move the clock ``seconds`` on, running every timer due on the way, in order."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    until = loop.now + seconds
    ticked = asyncio.Event()
    loop.call_at(until, ticked.set)  # the loop jumps timer by timer to this one
    await ticked.wait()
    await settle()


# ------------------------------------------------------------------ transports


class ScriptedTransport(asyncio.Transport):
    """One connection: the client's side recorded, the server's side scripted."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.written_after_close = bytearray()
        self.events: list[str] = []  # "pause_reading", "resume_reading", "close"
        self.reading_paused = False
        self.lost = asyncio.Event()  # connection_lost was delivered
        self._closing = False
        self._held: collections.deque[bytes | None] = collections.deque()  # None: EOF
        self._gone = False

    # -- what the client does

    def write(self, data: bytes | bytearray | memoryview) -> None:
        (self.written_after_close if self._closing else self.written).extend(data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.events.append("close")
            asyncio.get_running_loop().call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading_paused = True
        self.events.append("pause_reading")

    def resume_reading(self) -> None:
        self.reading_paused = False
        self.events.append("resume_reading")
        while self._held and not self.reading_paused and not self._closing:
            self._deliver(self._held.popleft())

    def is_reading(self) -> bool:
        return not self.reading_paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    # -- what the server does

    def send(self, *pieces: bytes) -> None:
        """The server's bytes, each piece one read of the client's."""
        for piece in pieces:
            self._deliver_or_hold(piece)

    def send_eof(self) -> None:
        """The server closes its side cleanly (after whatever is still held back)."""
        self._deliver_or_hold(None)

    def reset(self) -> None:
        """The connection breaks: a TCP reset."""
        self._connection_lost(ConnectionResetError("connection reset by peer"))

    def block_writes(self) -> None:
        self.protocol.pause_writing()

    def unblock_writes(self) -> None:
        self.protocol.resume_writing()

    @property
    def request(self) -> bytes:
        return bytes(self.written)

    def _deliver_or_hold(self, piece: bytes | None) -> None:
        if self._closing or self._gone:
            return  # the client closed: the kernel drops what comes
        if self.reading_paused or self._held:
            self._held.append(piece)
        else:
            self._deliver(piece)

    def _deliver(self, piece: bytes | None) -> None:
        if piece is None:
            if not self.protocol.eof_received():
                self.close()
        else:
            self.protocol.data_received(piece)

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._gone:
            self._gone = True
            self._closing = True
            self.protocol.connection_lost(exc)
            self.lost.set()


class ScriptedNetwork:
    """The pool's ``open_connection``: scripted transports, refusals or no answer."""

    def __init__(self) -> None:
        self.transports: list[ScriptedTransport] = []
        self.refuse: BaseException | None = None  # raised by the next connects
        self.hang = False  # the next connects never complete

    async def __call__(self, factory: Callable[[], asyncio.Protocol]
                       ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        if self.hang:
            await asyncio.get_running_loop().create_future()  # until cancelled
        if self.refuse is not None:
            raise self.refuse
        protocol = factory()
        transport = ScriptedTransport(protocol)
        protocol.connection_made(transport)
        self.transports.append(transport)
        return transport, protocol

    @property
    def last(self) -> ScriptedTransport:
        return self.transports[-1]


class Client:
    """A pool on a scripted network, and the requests a test sends over it."""

    def __init__(self, *, limit: int = 256, connect_timeout: float = 10.0) -> None:
        self.net = ScriptedNetwork()
        self.pool = UpstreamPool("http://bol.test", None, connect_timeout, limit,
                                 open_connection=self.net)

    async def send(self, method: str = "GET", body: Payload = None, *, within: float = 300.0,
                   length: int | None = None, idempotent: bool | None = None,
                   ) -> tuple[asyncio.Task[Response], ScriptedTransport | None]:
        """Start a request; return it and the transport it was written to (if any)."""
        loop = asyncio.get_running_loop()
        before = {id(t): len(t.written) for t in self.net.transports}
        chunked = body is not None and not isinstance(body, bytes) and length is None
        if isinstance(body, bytes):
            length = len(body)
        framing = ("Transfer-Encoding: chunked\r\n" if chunked
                   else f"Content-Length: {length}\r\n" if length is not None else "")
        head = request_head(method, "/retailer/orders", self.pool.host_header,
                            [("Authorization", TOKEN)], framing)
        task = loop.create_task(self.pool.request(
            head, body, head_only=method == "HEAD", chunked=chunked,
            idempotent=method in ("GET", "HEAD") if idempotent is None else idempotent,
            deadline=loop.time() + within))
        await settle()
        used = [t for t in self.net.transports if len(t.written) > before.get(id(t), 0)]
        return task, (used[-1] if used else None)

    async def answer(self, *pieces: bytes, method: str = "GET") -> tuple[Response,
                                                                          ScriptedTransport]:
        """A request answered with ``pieces`` (each one read of the client's)."""
        task, transport = await self.send(method)
        assert transport is not None
        transport.send(*pieces)
        return await task, transport
