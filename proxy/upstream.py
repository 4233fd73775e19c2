"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, llhttp.

aiohttp's ``ClientSession`` is built for every use a client can have (cookies, redirects,
auth, proxies, tracing, decompression, URL joining) and the proxy needs none of it: its
profile showed the client half costing more than the rest of the hop together. This
module does only what forwarding to ``upstream.api_url`` needs, with httptools (the
llhttp bindings uvicorn uses) as the answer parser, and holds a misbehaving upstream to
fixed bounds of memory, CPU and time, as h11 and httpcore do.

Each connection carries one exchange at a time and is always in exactly one state::

    IDLE ── request written ──▶ AWAITING_HEAD ── final head ──▶ RECEIVING_BODY
     ▲                            │  (1xx heads skipped)             │ end of body
     │                            └── head of a bodiless answer ──▶ DONE ◀┘
     └──────────── released, read to its end, reusable ────────────┘
    any state ──▶ CLOSED: either side closed it, a refused answer, the deadline, stray bytes

Whether a connection carries another exchange is decided in one place
(``_Connection.finished``): the answer is DONE and was read to its end, it allows
keep-alive (HTTP/1.1, no ``Connection: close``, not delimited by the close), the whole
request went out (an answer that comes while an upload is still going cuts the upload),
and nothing arrived after the answer. How an answer's body is framed is decided by one
pure function, :func:`answer_framing`. Idle connections are reused last-in-first-out and
closed after ``IDLE_TIMEOUT`` seconds on the loop's clock (before bol's side would close
them); one that bol closes leaves the pool at once. A request on a reused connection
that bol closed meanwhile (the keep-alive race) is sent once more on a fresh connection
when it is idempotent, its body can be sent again, and nothing of an answer came back.

Limits:

* ``MAX_HEAD_BYTES`` (64 KiB): an answer's head (status line and fields, interim 1xx
  heads included); also the bytes that may arrive in a row without one byte of body (a
  head still arriving, chunk framing, trailers), since llhttp and httptools hold a field
  that is still arriving in memory.
* ``MAX_FIELDS`` (100): fields in one head.
* ``HIGH_WATER`` (256 KiB): reading from bol pauses while more than this many bytes of
  body wait for the client, and resumes when the client has taken them (a read takes
  all that has arrived); a streamed upload waits while the socket's send buffer is full.
* The exchange's ``deadline`` (loop time) bounds waiting for a free connection, the
  connect (also bounded by ``connect_timeout``), the head and the body; nothing is
  written to bol once it has passed.

Refused, with the connection closed: whatever llhttp rejects (malformed lines, bare LF,
obs-fold, duplicate or non-numeric Content-Length, Content-Length beside
Transfer-Encoding), a Transfer-Encoding other than exactly ``chunked`` in any letter
case (a body whose coding was dropped would reach the client as other bytes than bol
meant), HTTP versions other than 1.0 and 1.1, status codes below 100, ``101 Switching
Protocols`` (never asked for) and heads over the limits. Trailer fields are read and
dropped: they never join the head (RFC 9110 §6.5).

Errors are :class:`UpstreamError` (cannot connect, connection lost, refused answer) or
``TimeoutError`` (the deadline passed); the forwarder turns them into 502 and 504::

    UpstreamError
    ├── ConnectFailed               no connection could be opened
    ├── ConnectionLost              closed or broken before the answer was complete
    └── AnswerRefused               the answer cannot be passed on as bol meant it
        ├── MalformedAnswer         not HTTP/1.1 that llhttp and this client accept
        ├── HeadTooLarge            over MAX_HEAD_BYTES or MAX_FIELDS
        └── UnsupportedTransferCoding   a Transfer-Encoding other than chunked
"""

from __future__ import annotations

import asyncio
import collections
import enum
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

IDLE_TIMEOUT = 15.0  # seconds a pooled connection may idle before it is closed
HIGH_WATER = 256 * 1024  # pause reading from bol while this much waits for the client
MAX_HEAD_BYTES = 64 * 1024  # an answer's head; also bytes in a row without a body byte
MAX_FIELDS = 100  # fields in one head

# The idle sweep also closes connections due within this many seconds: the loop may run
# a timer a clock tick early, and a sweep that found nothing due would only run again.
_SWEEP_SLACK = 0.001


class UpstreamError(Exception):
    """The exchange with the upstream failed; the message names no request data."""


class ConnectFailed(UpstreamError):
    """No connection could be opened."""


class ConnectionLost(UpstreamError):
    """The connection closed or broke before the answer was complete.

    ``unanswered``: not one byte of an answer had arrived, so bol may never have seen
    the request (the keep-alive race)."""

    def __init__(self, message: str, *, unanswered: bool = False) -> None:
        super().__init__(message)
        self.unanswered = unanswered


class AnswerRefused(UpstreamError):
    """The answer cannot be passed on as bol meant it."""


class MalformedAnswer(AnswerRefused):
    """The answer is not HTTP/1.1 that llhttp and this client accept."""


class HeadTooLarge(AnswerRefused):
    """The answer's head, or the bytes between two body bytes, exceed the limits."""


class UnsupportedTransferCoding(AnswerRefused):
    """A Transfer-Encoding other than ``chunked``: the client cannot undo other codings,
    and dropping them would hand the client other bytes than bol meant."""


class _Stray(Exception):
    """Bytes after a complete answer: the answer stands, the connection does not."""


Payload = bytes | AsyncIterator[bytes] | None
Opener = Callable[[Callable[[], asyncio.Protocol]],
                  Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]]]


# ------------------------------------------------------------------ framing (pure)


class Framing(enum.Enum):
    """How an answer's body ends (RFC 9112 §6.3)."""

    NO_BODY = "no body"
    LENGTH = "content-length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until close"


def answer_framing(head_only: bool, status: int, content_length: bytes | None,
                   transfer_encoding: bytes | None) -> tuple[Framing, int | None]:
    """The framing of a final (status >= 200) answer, and its length if it has one.

    ``content_length`` and ``transfer_encoding`` are the fields' values, repeated fields
    joined with commas (RFC 9110 §5.3), so a repeated field is never exactly one valid
    value. Raises :class:`AnswerRefused` for a framing this client will not read."""
    if transfer_encoding is not None:
        # Only chunked is undone here; llhttp would pass any other coding on as body
        # bytes with nothing left to say so, or read "gzip" until the close. Whitespace
        # as llhttp tolerates it: before the value, and spaces after it ("chunked\t"
        # is read until the close, chunk framing and all: refused, not misread).
        if transfer_encoding.lstrip(b" \t").rstrip(b" ").lower() != b"chunked":
            raise UnsupportedTransferCoding("the upstream's answer has a Transfer-Encoding "
                                            "other than chunked")
        if content_length is not None:
            # RFC 9112 §6.3: such a message ought to be handled as an error (smuggling).
            raise MalformedAnswer("the upstream's answer has both Content-Length and "
                                  "Transfer-Encoding")
    # RFC 9110 §6.4.1: whatever the head announces, these answers have no body.
    if head_only or status == 204 or status == 304:
        return Framing.NO_BODY, 0
    if transfer_encoding is not None:
        return Framing.CHUNKED, None
    if content_length is not None:
        digits = content_length.strip()
        if not digits.isdigit():
            raise MalformedAnswer("the upstream's answer has an invalid Content-Length")
        return Framing.LENGTH, int(digits)
    return Framing.UNTIL_CLOSE, None


def keeps_alive(version: str, framing: Framing, connection: bytes | None) -> bool:
    """Whether an answer leaves its connection open for another exchange.

    ``connection``: the ``Connection`` field values joined with commas (and those of
    ``Proxy-Connection``, which llhttp reads alike, so this client does). HTTP/1.1 persists
    unless the ``close`` option is listed (RFC 9112 §9.3, option names case-insensitive);
    HTTP/1.0 is never reused, even with ``keep-alive`` (as h11 does); a body delimited by
    the close ends the connection. Other versions are refused."""
    if version != "1.1" and version != "1.0":
        raise MalformedAnswer("the upstream's answer is not HTTP/1.0 or HTTP/1.1")
    return (version == "1.1" and framing is not Framing.UNTIL_CLOSE
            and (connection is None or all(token.strip() != b"close"
                                           for token in connection.lower().split(b","))))


def _head_size(status: list[bytes], fields: list[tuple[bytes, bytes]]) -> int:
    """About the bytes a head took on the wire: status line, fields and line ends."""
    return (17 + sum(map(len, status))
            + sum(len(name) + len(value) + 4 for name, value in fields))


# ------------------------------------------------------------------ flow control


class FlowControl:
    """Back-pressure on one connection, both ways (as uvicorn's ``FlowControl``).

    The answer pauses reading while more than ``HIGH_WATER`` of its bytes wait to be
    read and resumes it once they are read; a writer awaits :meth:`drain` while the
    transport's send buffer is over its limit (``pause_writing``)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._writable.clear()

    def resume_writing(self) -> None:
        """Also called when the connection is lost: a waiting writer must wake up."""
        self.write_paused = False
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()


# ------------------------------------------------------------------ the answer


class Response:
    """One answer: status, raw headers, and a body read as it arrives."""

    def __init__(self, conn: _Connection, status: int, reason: str,
                 raw_headers: list[tuple[bytes, bytes]], framing: Framing,
                 content_length: int | None) -> None:
        self._conn = conn
        self._flow = conn.flow
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers
        self.framing = framing
        self.content_length = content_length  # the body's length, when framed by one
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0  # bytes received and not yet read
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._handed_back = False

    def __repr__(self) -> str:
        # Status and framing only: header values and the reason phrase are bol's data.
        return (f"<Response {self.status} {self.framing.value}, "
                f"{'complete' if self._done else 'incomplete'}>")

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
        self._buffered = 0
        if self._flow.read_paused:
            self._flow.resume_reading()
        return chunk

    async def read(self) -> bytes:
        """The whole body."""
        if self._done:
            return await self.readany()  # all of it has arrived: one piece, no waiting
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
            self._flow.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        # The first error says what happened: the close that follows a refusal does not.
        if not self._done and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


# ------------------------------------------------------------------ one connection


class State(enum.Enum):
    """Where a connection is in its one exchange at a time (as h11's states)."""

    IDLE = "idle"
    AWAITING_HEAD = "awaiting head"  # the request is written or being written
    RECEIVING_BODY = "receiving body"
    DONE = "done"  # the answer is complete; it may still wait to be read and released
    CLOSED = "closed"


# Module-level names for the hot path: one global lookup each.
_IDLE = State.IDLE
_AWAITING_HEAD = State.AWAITING_HEAD
_RECEIVING_BODY = State.RECEIVING_BODY
_DONE = State.DONE
_CLOSED = State.CLOSED


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the one exchange it carries at a time."""

    flow: FlowControl
    transport: asyncio.Transport

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.state = _IDLE
        self.exchanges = 0
        self.idle_since = 0.0
        self._head_only = False
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._framing = Framing.NO_BODY
        self._keep_alive = False  # what the answer's head allows
        self._status: list[bytes] = []
        self._raw: list[tuple[bytes, bytes]] = []
        self._interim_bytes = 0
        self._run = 0  # bytes received since the last body byte (or the request)
        self._sender: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        # Never a header value: bol's answers and the request's token stay out of logs.
        return (f"<upstream connection {self.state.value}, "
                f"reused {max(self.exchanges - 1, 0)} times>")

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is not _AWAITING_HEAD and state is not _RECEIVING_BODY:
            # Bytes nobody asked for (while idle, or after a complete answer): the stream
            # is out of step with the requests and cannot be trusted with another one.
            self.close()
            return
        self._run += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # One of the callbacks below stopped the parser; httptools keeps its reason.
            self._stop(exc.__context__)
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._stop(exc)  # llhttp's reason goes along as the cause
            return
        if self._run > MAX_HEAD_BYTES:
            self._stop(HeadTooLarge(f"the upstream sent over {MAX_HEAD_BYTES} bytes of head, "
                                    "chunk framing or trailers in a row"))

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self.state = _CLOSED
        self.flow.resume_writing()  # a streaming writer wakes up and sees CLOSED
        self._pool.forget(self)
        if state is _RECEIVING_BODY and self._framing is Framing.UNTIL_CLOSE and exc is None:
            # A body delimited by the end of the connection (RFC 9112 §6.3, item 8).
            assert self._response is not None
            self._response._finish()
            return
        self._lost(ConnectionLost("the upstream closed the connection",
                                  unanswered=state is _AWAITING_HEAD and not self._run))

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # -- httptools callbacks (an exception raised here stops the parser; see _stop)

    def on_message_begin(self) -> None:
        if self.state is not _AWAITING_HEAD:
            raise _Stray  # a second answer to one request
        self._status = []
        self._raw = []

    def on_status(self, status: bytes) -> None:
        self._status.append(status)  # pieces, as they arrive: no quadratic joining

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, these are trailer fields: collected, never read (bounded by
        # MAX_HEAD_BYTES in a row without body), and dropped at the next answer.
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        raw = self._raw
        if len(raw) > MAX_FIELDS or (self._run > MAX_HEAD_BYTES and self._interim_bytes
                                     + _head_size(self._status, raw) > MAX_HEAD_BYTES):
            raise HeadTooLarge(f"the upstream's answer head exceeds {MAX_HEAD_BYTES} bytes "
                               f"or {MAX_FIELDS} fields")
        if status < 200:
            if status < 100 or status == 101:
                # 101 answers an Upgrade that is never sent; below 100 is no status class.
                raise MalformedAnswer(f"the upstream answered with status {status}")
            # Interim (103 Early Hints): the real answer follows.
            self._interim_bytes += _head_size(self._status, raw)
            return
        # As it came, control bytes included (llhttp lets them through): it carries no
        # meaning (RFC 9112 §4), and the forwarder replaces a phrase it cannot pass on.
        reason = self._status[0] if len(self._status) == 1 else b"".join(self._status)
        length = coding = connection = None
        for name, value in raw:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value if length is None else length + b"," + value
            elif lowered == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
            elif lowered == b"connection" or lowered == b"proxy-connection":
                # llhttp reads Proxy-Connection as Connection: so does this client.
                connection = value if connection is None else connection + b"," + value
        framing, size = answer_framing(self._head_only, status, length, coding)
        self._framing = framing
        if connection is None and parser.should_keep_alive():
            # llhttp accepts HTTP/0.9, 1.0, 1.1 and 2.0, and keeps only 1.1 alive without
            # a "keep-alive" option: this is HTTP/1.1 with a body that does not end with
            # the close. The common case, without formatting the version into a string.
            self._keep_alive = True
        else:
            self._keep_alive = keeps_alive(parser.get_http_version(), framing, connection)
        if self._head_only and coding is not None:
            # After a HEAD answer announcing chunked, llhttp would take a stray last chunk
            # ("0" CR LF CR LF) for the end of that body without a callback: bytes after
            # the answer that nothing would see. Not worth the risk for a rare request.
            self._keep_alive = False
        # A fresh list takes any trailer fields: they must not join the head.
        self._raw = []
        response = self._response = Response(self, status, reason.decode("latin-1"), raw,
                                             framing, size)
        if framing is Framing.NO_BODY:
            self.state = _DONE
            response._finish()
            if self._head_only:
                # llhttp cannot be told that a HEAD answer has no body, and would wait
                # for the one its head announces: the next answer gets a fresh parser.
                self._parser = httptools.HttpResponseParser(self)
        else:
            self.state = _RECEIVING_BODY
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        self._run = 0
        if self.state is not _RECEIVING_BODY:
            raise _Stray  # the body a HEAD answer announces, sent all the same
        assert self._response is not None
        self._response._feed(body)

    def on_message_complete(self) -> None:
        # AWAITING_HEAD: an interim answer ended. DONE: a bodiless answer, finished.
        if self.state is _RECEIVING_BODY:
            self.state = _DONE
            assert self._response is not None
            self._response._finish()

    # -- the exchange

    async def exchange(self, head: bytes, body: Payload, head_only: bool, chunked: bool,
                       deadline: float) -> Response:
        """Send one request and return its answer once the head has arrived.

        At ``deadline`` (loop time) the exchange fails with ``TimeoutError``, whether it
        waits for the head or for the body: one timer per exchange, cheaper than a
        timeout context around every wait. The caller checked that it has not passed."""
        self._deadline = self._loop.call_at(deadline, self._expire)
        self.state = _AWAITING_HEAD
        self.exchanges += 1
        self._head_only = head_only
        self._run = self._interim_bytes = 0
        self._sender = None
        head_future: asyncio.Future[Response] = self._loop.create_future()
        self._head = head_future
        self.transport.write(head)
        if body is None:
            return await head_future
        if isinstance(body, bytes):
            self.transport.write(body)
            return await head_future
        # A streamed body goes out while the answer may already be coming: bol can
        # refuse early (401, 413) without reading it all.
        sender = self._sender = self._loop.create_task(self._send_stream(body, chunked,
                                                                          deadline))
        try:
            response = await head_future
        except BaseException:
            sender.cancel()
            raise
        if not sender.done():
            sender.cancel()  # the rest is not wanted; the connection is spent (see finished)
        return response

    async def _send_stream(self, body: AsyncIterator[bytes], chunked: bool,
                           deadline: float) -> None:
        transport, flow, loop = self.transport, self.flow, self._loop
        try:
            async for chunk in body:
                if chunk:
                    if loop.time() >= deadline:
                        # A piece that comes as the deadline passes, before its timer
                        # has run: it must not leave either.
                        raise TimeoutError
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked
                                    else chunk)
                    if flow.write_paused:
                        await flow.drain()
                        if self.state is _CLOSED:
                            raise ConnectionLost("the upstream closed the connection")
            if chunked:
                transport.write(b"0\r\n\r\n")
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

    def _stop(self, cause: BaseException | None) -> None:
        """The parser stopped: the answer is refused, or stray bytes followed it."""
        if isinstance(cause, _Stray):
            self.close()  # the answer stands; the connection is out of step
            return
        if isinstance(cause, UpstreamError):
            error = cause
        else:  # llhttp's own verdict (or a callback's failure: kept as the cause)
            error = MalformedAnswer("the upstream's answer is not valid HTTP/1.1")
            error.__cause__ = cause
        self._lost(error)
        self.close()

    def _lost(self, exc: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        if self._response is not None:
            self._response._fail(exc)

    def finished(self, response: Response) -> None:
        """The exchange is over: the one place that decides whether this connection
        carries another one, or is closed."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        sender = self._sender
        if (self.state is _DONE and self._keep_alive
                and response._done and not response._chunks  # read to its end
                # The whole request went out: an upload cut short leaves bol reading it.
                and (sender is None or (sender.done() and not sender.cancelled()))
                and not self._pool.retired):
            self.state = _IDLE
            self._response = None
            self._pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._sender is not None:
            self._sender.cancel()  # owned here: it ends with its connection
        if self.state is not _CLOSED:
            self.state = _CLOSED
            self.transport.close()
        self._pool.forget(self)


# ------------------------------------------------------------------ the pool


class UpstreamPool:
    """Keep-alive connections to one origin, and the requests sent over them.

    ``open_connection`` opens a connection for a protocol factory; by default a TCP (and
    for https, TLS) connection to the origin. Tests pass a scripted one."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None,
                 connect_timeout: float, limit: int = 256, *,
                 open_connection: Opener | None = None) -> None:
        parts = urlsplit(base_url)
        self._host = parts.hostname or ""
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._ssl = ssl_context if self._tls else None
        default = (self._port == 443) if self._tls else (self._port == 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if default else f"{host}:{self._port}"
        self.connect_timeout = connect_timeout
        self._open = open_connection or self._open_socket
        # Last-in-first-out from the right; the longest idle sit on the left.
        self._idle: collections.deque[_Connection] = collections.deque()
        self._busy: set[_Connection] = set()
        # Slots: connections in use or being opened, at most ``limit``. A request that
        # finds none free waits in line; a slot given back goes to the first in line, never
        # to a newcomer (as aiohttp's connector hands connections to its waiters).
        self._limit = limit
        self._held = 0
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it runs on, once known
        self.retired = False

    @property
    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return len(self._busy)

    async def request(self, head: bytes, body: Payload, *, head_only: bool, chunked: bool,
                      idempotent: bool, deadline: float) -> Response:
        """Send a request (``head`` ends with the blank line) and return its answer.

        The connection is held until the answer is released or closed. Only an
        idempotent request is sent again after the keep-alive race: bol may have acted
        on a POST whose connection broke before the answer. Waiting for a free
        connection and connecting end at ``deadline`` (loop time), and nothing is
        written once it has passed: ``TimeoutError`` instead."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        resendable = idempotent and (body is None or isinstance(body, bytes))
        for attempt in (0, 1):
            if self._held < self._limit and not self._line:
                self._held += 1
            else:
                await self._wait_for_slot(deadline)
            now = loop.time()
            conn = None
            while self._idle:
                idle = self._idle.pop()  # the most recently used: the least likely closed
                if idle.state is _IDLE and now - idle.idle_since < IDLE_TIMEOUT:
                    conn = idle
                    break
                idle.close()  # its sweep is late (a busy loop): too old to trust
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._connect(loop, deadline)
                except BaseException:
                    self._free_slot()
                    raise
                now = loop.time()
            self._busy.add(conn)
            if now >= deadline:
                # Nothing leaves after the deadline. The connection carried nothing: it
                # stays usable (unless the pool was retired meanwhile).
                if self.retired:
                    conn.close()
                else:
                    self.give_back(conn)
                raise TimeoutError
            try:
                return await conn.exchange(head, body, head_only, chunked, deadline)
            except ConnectionLost as exc:
                conn.close()
                # The keep-alive race: bol closed the idle connection as we sent.
                if attempt or not reused or not exc.unanswered or not resendable:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _wait_for_slot(self, deadline: float) -> None:
        """Wait in line for a slot, until ``deadline`` at most."""
        waiter = asyncio.get_running_loop().create_future()
        self._line.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._free_slot()  # handed a slot while leaving: it goes to the next
            elif waiter in self._line:
                self._line.remove(waiter)
            raise

    def _free_slot(self) -> None:
        line = self._line
        while line:
            waiter = line.popleft()
            if not waiter.done():  # not given up (cancelled) meanwhile
                waiter.set_result(None)  # the slot passes on: still held
                return
        self._held -= 1

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        try:
            async with asyncio.timeout_at(min(loop.time() + self.connect_timeout, deadline)):
                _, protocol = await self._open(lambda: _Connection(self))
        except (OSError, ssl.SSLError) as exc:  # TimeoutError is not caught: 504
            if isinstance(exc, TimeoutError):
                raise
            raise ConnectFailed(f"cannot connect to the upstream ({type(exc).__name__})") \
                from None
        conn = cast(_Connection, protocol)
        conn.idle_since = loop.time()
        return conn

    async def _open_socket(self, factory: Callable[[], asyncio.Protocol]
                           ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        return await asyncio.get_running_loop().create_connection(
            factory, self._host, self._port, ssl=self._ssl,
            server_hostname=self._host if self._tls else None)

    def give_back(self, conn: _Connection) -> None:
        """A connection that may carry another exchange: idle from now."""
        self._busy.discard(conn)
        if self._line:
            self._free_slot()
        else:
            self._held -= 1
        loop = conn._loop
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_at(conn.idle_since + IDLE_TIMEOUT, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections idle for IDLE_TIMEOUT; run again when the next is due
        (as aiohttp's connector closes its keep-alive connections)."""
        self._sweeper = None
        due = loop.time() - IDLE_TIMEOUT + _SWEEP_SLACK
        idle = self._idle
        while idle and idle[0].idle_since <= due:
            idle[0].close()  # leaves the deque through forget()
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + IDLE_TIMEOUT, self._sweep, loop)

    def forget(self, conn: _Connection) -> None:
        """A connection is closed: it leaves the pool (and gives back its slot)."""
        if conn in self._busy:
            self._busy.remove(conn)
            self._free_slot()
        elif conn in self._idle:
            self._idle.remove(conn)

    def retire(self) -> None:
        """Close idle connections now and the others when their answers are done."""
        self.retired = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._idle):
            conn.close()

    async def close(self) -> None:
        self.retire()
        for conn in list(self._busy):
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
