"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, llhttp.

aiohttp's ``ClientSession`` is built for every use a client can have (cookies, redirects,
auth, proxies, tracing, decompression, URL joining) and the proxy needs none of it: its
profile showed the client half costing more than the rest of the hop together. This
module does only what forwarding to ``upstream.api_url`` needs, with httptools (the
llhttp bindings uvicorn uses) as the response parser:

* one origin; connections kept alive and reused last-in-first-out, closed after
  ``IDLE_TIMEOUT`` idle seconds (before bol's side would close them) and whenever a
  response says ``Connection: close`` or was not read to its end;
* the request head written as given (the caller has validated every byte), the body as
  bytes with its Content-Length, or streamed with the client's Content-Length or chunked;
* the response head as raw name/value bytes (spelling kept), the body streamed with flow
  control: reading pauses while more than ``HIGH_WATER`` bytes wait for the client;
* a request on a reused connection that bol closed meanwhile (the keep-alive race) is
  sent once more on a fresh connection when its body can be sent again;
* HEAD answers end with their head; llhttp would wait for the body their
  Content-Length announces, so such a connection is not reused.

Errors are :class:`UpstreamError` (cannot connect, connection lost, malformed answer)
or ``TimeoutError`` (the exchange's deadline passed, waiting for the head or the body);
the forwarder turns them into 502 and 504.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

IDLE_TIMEOUT = 15.0  # seconds a pooled connection may idle before it is closed
HIGH_WATER = 256 * 1024  # pause reading from bol while this much waits for the client
LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """The exchange with the upstream failed; the message names no request data."""


class ConnectFailed(UpstreamError):
    """No connection could be opened."""


class ConnectionLost(UpstreamError):
    """The connection closed or broke before the answer was complete."""


Body = bytes | AsyncIterator[bytes] | None


class Response:
    """One answer: status, raw headers, and a body read as it arrives."""

    def __init__(self, conn: _Connection, status: int, reason: str,
                 raw_headers: list[tuple[bytes, bytes]], content_length: int | None) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers
        self.content_length = content_length
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._handed_back = False

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still wait to be read)."""
        return self._done

    def at_eof(self) -> bool:
        return self._done and not self._chunks

    async def readany(self) -> bytes:
        """All of the body that has arrived and not been read, or ``b""`` at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        # Everything that has arrived, in one piece: fewer, larger writes to the client.
        chunk = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered -= len(chunk)
        if self._buffered < LOW_WATER:
            self._conn.resume_reading()
        return chunk

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool if it can."""
        if not self._handed_back:
            self._handed_back = True
            self._conn.finished(self)

    def close(self) -> None:
        """Done with this answer before its end: its connection is closed. Harmless
        after release(), when the connection may already carry another request."""
        if not self._handed_back:
            self._handed_back = True
            self._conn.close()

    # -- fed by the connection

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the one exchange it carries at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._head_only = False
        self._raw: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._until_close = False
        self._reusable = False
        self._body_cut = False
        self._received = False
        self._expecting = False  # a request was sent and its answer is not complete
        self._stray = False
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._holds_slot = False
        self._sender: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received = True
        if not self._expecting:
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # An upgrade (101) is never asked for: as malformed as any other surprise.
            self._lost(ConnectionLost("malformed answer from the upstream"))
            self.close()
            return
        if self._stray:
            # More came after the complete answer, in the same read: the stream is out
            # of step with the requests. The answer stands; the connection does not.
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        response = self._response
        if response is not None and self._until_close and exc is None:
            response._finish()  # a body delimited by the end of the connection
            self._response = None
        self._lost(ConnectionLost("the upstream closed the connection"))
        if self._drain is not None and not self._drain.done():
            # A result, not an exception: a bytes body's writer never awaits it. The
            # streaming writer checks ``closed`` after each wait.
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if not self._expecting:
            self._stray = True  # a second answer to one request
        self._raw = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 or self._stray:
            return  # informational (103 Early Hints): the real answer follows
        length: int | None = None
        chunked = False
        for name, value in self._raw:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = True
        response = Response(self, status, self._reason.decode("latin-1"), self._raw, length)
        # Trailer fields arrive through on_header too: they must not join the head
        # (RFC 9110 §6.5), so they go to a list nobody reads.
        self._raw = []
        self._until_close = (not chunked and length is None and status not in (204, 304)
                             and not self._head_only)
        self._response = response
        if self._head_only or status in (204, 304):
            response._finish()
        if self._head is not None and not self._head.done():
            self._head.set_result(response)
        self._head = None

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._head_only and not self._stray:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200 or self._stray:
            return
        self._expecting = False
        response, self._response = self._response, None
        self._reusable = self._parser.should_keep_alive() and not self._head_only
        if response is not None:
            response._finish()

    # -- the exchange

    async def exchange(self, head: bytes, body: Body, head_only: bool, chunked: bool,
                       deadline: float) -> Response:
        """Send one request and return its answer once the head has arrived.

        At ``deadline`` (loop time) the exchange fails with ``TimeoutError``, whether it
        waits for the head or for the body: one timer per exchange, cheaper than a
        timeout context around every wait."""
        assert self.transport is not None
        self._deadline = self._loop.call_at(deadline, self._expire)
        self._head = self._loop.create_future()
        self._head_only = head_only
        self._reusable = self._body_cut = self._received = False
        self._expecting = True
        self.transport.write(head)
        if isinstance(body, bytes):
            self.transport.write(body)
            return await self._head
        if body is None:
            return await self._head
        # A streamed body goes out while the answer may already be coming: bol can
        # refuse early (401, 413) without reading it all.
        self._sender = self._loop.create_task(self._send_stream(body, chunked))
        try:
            response = await self._head
        except BaseException:
            self._sender.cancel()
            raise
        if not self._sender.done():
            self._body_cut = True  # the rest is not wanted; the connection is spent
            self._sender.cancel()
        return response

    async def _send_stream(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        assert self.transport is not None
        try:
            async for chunk in body:
                if chunk:
                    if chunked:
                        self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    else:
                        self.transport.write(chunk)
                    if self._drain is not None:
                        await self._drain
                        if self.closed:
                            raise ConnectionLost("the upstream closed the connection")
            if chunked:
                self.transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise  # the answer came first (see exchange); the reader still needs it
        except BaseException as exc:
            # The body failed (too large, client gone): the request is unusable.
            if self._head is not None and not self._head.done():
                self._head.set_exception(exc)
            self.close()

    def _expire(self) -> None:
        self._deadline = None
        self._lost(TimeoutError())
        self.close()

    def _lost(self, exc: BaseException) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        if self._response is not None:
            self._response._fail(exc)

    @property
    def fresh_failure(self) -> bool:
        """The exchange failed before any byte came back: safe to send it again."""
        return not self._received

    def finished(self, response: Response) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if (response.at_eof() and self._reusable and not self._body_cut
                and not self.closed and not self._pool.retired):
            self._pool.give_back(self)
        else:
            self.close()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self._reusable = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._sender is not None:
            self._sender.cancel()  # owned here: it ends with its connection
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self._pool.forget(self)


class UpstreamPool:
    """Keep-alive connections to one origin, and the requests sent over them."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None,
                 connect_timeout: float, limit: int = 256) -> None:
        parts = urlsplit(base_url)
        self._host = parts.hostname or ""
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._ssl = ssl_context if self._tls else None
        default = (self._port == 443) if self._tls else (self._port == 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if default else f"{host}:{self._port}"
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        # Connections in use at most; a further request waits for one to come back.
        self._slots = asyncio.Semaphore(limit)
        self.retired = False

    @property
    def open_connections(self) -> int:
        return len(self._all)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return len(self._all) - len(self._idle)

    async def request(self, head: bytes, body: Body, *, head_only: bool, chunked: bool,
                      idempotent: bool, deadline: float) -> Response:
        """Send a request (``head`` ends with the blank line) and return its answer.

        The connection is held until the answer is released or closed. Only an
        idempotent request is sent again after the keep-alive race: bol may have acted
        on a POST whose connection broke before the answer."""
        resendable = idempotent and (body is None or isinstance(body, bytes))
        for attempt in (0, 1):
            conn, reused = await self._acquire()
            try:
                return await conn.exchange(head, body, head_only, chunked, deadline)
            except ConnectionLost:
                conn.close()
                # The keep-alive race: bol closed the idle connection as we sent.
                if attempt or not reused or not conn.fresh_failure or not resendable:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self) -> tuple[_Connection, bool]:
        await self._slots.acquire()
        try:
            conn, reused = await self._connection()
        except BaseException:
            self._slots.release()
            raise
        conn._holds_slot = True
        return conn, reused

    async def _connection(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_TIMEOUT:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._tls else None)
        except (OSError, ssl.SSLError) as exc:  # TimeoutError is not caught: 504
            if isinstance(exc, TimeoutError):
                raise
            raise ConnectFailed(f"cannot connect to the upstream ({type(exc).__name__})") \
                from None
        self._all.add(conn)
        return conn, False

    def _free_slot(self, conn: _Connection) -> None:
        if conn._holds_slot:
            conn._holds_slot = False
            self._slots.release()

    def give_back(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._free_slot(conn)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._free_slot(conn)

    def retire(self) -> None:
        """Close idle connections now and the others when their answers are done."""
        self.retired = True
        for conn in list(self._idle):
            conn.close()

    async def close(self) -> None:
        self.retire()
        for conn in list(self._all):
            conn.close()


def request_head(method: str, target: str, host: str, headers: Iterable[tuple[str, str]],
                 framing: str) -> bytes:
    """The request line and headers; ``framing`` is a Content-Length or
    Transfer-Encoding line (or nothing). Every part was validated by the caller: the
    target is printable ASCII, names and values hold no CR, LF or other control bytes."""
    parts = [method, " ", target, " HTTP/1.1\r\nHost: ", host, "\r\n"]
    for name, value in headers:
        parts += (name, ": ", value, "\r\n")
    parts += (framing, "\r\n")
    return "".join(parts).encode("utf-8")
