"""The catch-all handler: route, attach the token, stream to bol and back, replay on 401.

One request, step by step:

1. :class:`~proxy.routing.Router` picks the credential set and validates the raw target;
   nothing that fails here contacts the upstream.
2. The request body is sized up: declared lengths over ``max_body_size`` are refused at
   once; a body of at most ``replay_buffer`` bytes is read whole (it can be replayed),
   anything larger streams through with a running count.
3. The set's token is attached and the request goes over :mod:`proxy.upstream` to
   ``upstream.api_url`` with the raw target as the client sent it: nothing re-encodes or
   re-normalises the path or the query.
4. A 401 for the token just used invalidates it (if still current), and a buffered
   request is replayed once with the new token.
5. The answer goes back unchanged: small bodies in one piece, others streamed. If bol's
   side breaks mid-body, the client's connection is aborted, so a short body can never
   pass for a complete one.

Upstream failures are translated into :mod:`proxy.errors` in :func:`translate` only.
Headers are never logged: the access line has the path without its query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import istr

from .config import Config
from .errors import (
    BadRequest,
    BodyTooLarge,
    ListenerClosed,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
    problem_response,
)
from .headers import CREDENTIALS_HEADER, client_response_headers, upstream_request_headers
from .logs import access_log
from .metrics import Metrics
from .routing import Router
from .server import Connection
from .tokens import Token, Tokens, TokenSource
from .upstream import Response, UpstreamError, UpstreamPool, request_head

log = logging.getLogger("proxy")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})  # safe to send twice (RFC 9110 §9.2)
SMALL_RESPONSE = 64 * 1024  # answered in one piece: measurably faster than streaming
_NO_BODY_STATUSES = frozenset({204, 304})
_TRANSFER_ENCODING = istr("Transfer-Encoding")
_EXPECT = istr("Expect")


@dataclass(frozen=True)
class Settings:
    """Everything the hot path needs from one configuration, computed once per load."""

    config: Config
    router: Router
    path_prefix: str  # the path of upstream.api_url, if it has one
    timeout: float

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        up = config.upstream
        return cls(
            config=config,
            router=Router(config.credentials, config.default_credentials, up.allowed_paths,
                          config.dedicated_ports()),
            path_prefix=urlsplit(up.api_url).path.rstrip("/"),
            timeout=up.timeout,
        )


class Body:
    """A request body: whole (replayable) or streamed through with a size cap."""

    def __init__(self, data: bytes | None, rest: aiohttp.StreamReader | None = None,
                 prefix: bytes = b"", limit: int = 0, length: int | None = None) -> None:
        self.data = data
        self._rest = rest
        self._prefix = prefix
        self._limit = limit
        self.length = length  # declared by the client, for a body streamed through
        self.too_large = False

    @property
    def replayable(self) -> bool:
        return self._rest is None

    @property
    def chunked(self) -> bool:
        """Streamed without a declared length."""
        return self._rest is not None and self.length is None

    def framing(self, method: str) -> str:
        """The framing header line this body needs on the way to bol.

        Always the proxy's own: the client's Content-Length never goes along (a client
        could name it in ``Connection`` and so leave the body unframed: smuggling)."""
        if self.data is not None:
            return f"Content-Length: {len(self.data)}\r\n"
        if self.length is not None:
            return f"Content-Length: {self.length}\r\n"
        if self._rest is not None:
            return "Transfer-Encoding: chunked\r\n"
        if method in _BODY_METHODS:
            return "Content-Length: 0\r\n"  # bol answers 400 to a POST without one
        return ""

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        return self.data if self._rest is None else self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        assert self._rest is not None
        sent = len(self._prefix)
        if self._prefix:
            yield self._prefix
        while chunk := await self._rest.readany():
            sent += len(chunk)
            if sent > self._limit:
                # Chunked bodies have no declared size: the cap holds while streaming.
                self.too_large = True
                raise BodyTooLarge(f"the request body exceeds {self._limit} bytes")
            yield chunk


_NO_BODY = Body(None)


async def read_body(request: web.BaseRequest, max_size: int, replay_size: int) -> Body:
    """Size up the request body without reading more than ``replay_size`` of it."""
    te = request.headers.get(_TRANSFER_ENCODING)
    if te is not None and te.strip().lower() != "chunked":
        # The body is re-framed for the upstream, so any other coding would be corrupted.
        raise BadRequest("only Transfer-Encoding: chunked is accepted")
    if not request.body_exists:
        return Body(None)
    too_large = f"the request body exceeds limits.max_body_size ({max_size} bytes)"
    length = request.content_length
    if length is not None and length > max_size:
        raise BodyTooLarge(too_large)  # refused before any upstream contact (or 100)
    if (request.version >= HttpVersion11
            and request.headers.get(_EXPECT, "").lower() == "100-continue"):
        # The client waits for this before it sends the body (aiohttp's low-level server
        # leaves it to the handler; bol never sees the Expect).
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # not part of the answer (as aiohttp's router does)
    if length is not None:
        if length > replay_size:
            return Body(None, request.content, limit=max_size, length=length)
        try:
            return Body(await request.content.readexactly(length))
        except asyncio.IncompleteReadError:
            raise BadRequest("the request body ended before its Content-Length") from None
    # Chunked: read up to the replay buffer; a body that ends within it is replayable.
    parts: list[bytes] = []
    size = 0
    while size <= replay_size:
        chunk = await request.content.readany()
        if not chunk:
            return Body(b"".join(parts))
        parts.append(chunk)
        size += len(chunk)
        if size > max_size:
            raise BodyTooLarge(too_large)
    return Body(None, request.content, prefix=b"".join(parts), limit=max_size)


_REASON = re.compile("[\t\x20-\x7e]*")  # what aiohttp can write back as it came


def _reason(phrase: str) -> str | None:
    """bol's reason phrase, if it is printable ASCII; else the standard phrase of the
    status (clients ignore it: RFC 9112 §4)."""
    return phrase if _REASON.fullmatch(phrase) else None


def reset(transport: asyncio.BaseTransport) -> None:
    """Close a client's connection with a TCP reset, not a FIN: an HTTP/1.0 client reads
    a body without Content-Length up to the close, and a plain close would make a cut
    body look complete."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cast(asyncio.Transport, transport).abort()


def translate(exc: BaseException, body: Body | None = None) -> ProxyError:
    """The one boundary where upstream failures become proxy errors."""
    if isinstance(exc, BodyTooLarge) or (body is not None and body.too_large):
        return BodyTooLarge("the request body exceeds limits.max_body_size")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the upstream did not answer within the configured timeouts")
    return UpstreamUnreachable(str(exc) if isinstance(exc, UpstreamError)
                               else f"the upstream exchange failed ({type(exc).__name__})")


class Forwarder:
    """Forwards requests for the current settings; swapped settings apply to new requests."""

    def __init__(self, settings: Settings, tokens: Tokens, pool: UpstreamPool,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.tokens = tokens
        self.pool = pool
        self.metrics = metrics
        self.drained = asyncio.Event()  # set while no request is in flight
        self.drained.set()
        # What each listening port means now (see proxy.server); kept by ProxyServer.
        self.roles: dict[int, str] = {}

    def current(self, conn: object) -> bool:
        """Whether a client connection still means what it meant when it came in."""
        if not isinstance(conn, Connection) or conn.port is None:
            return False
        if conn.role is None:
            # Accepted in the moment between a listener opening and its meaning being
            # published (start, reload): it takes the meaning its port has now.
            conn.role = self.roles.get(conn.port)
        return conn.role is not None and self.roles.get(conn.port) == conn.role

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp handler for every path that is not the proxy's own."""
        started = time.perf_counter()
        exchange = Exchange(request)
        response: web.StreamResponse | None = None
        self.metrics.in_flight += 1
        self.drained.clear()
        try:
            response = await self._answer(request, exchange)
            if not self.current(request.protocol):
                response.force_close()  # a reload or shutdown retired this connection
            try:
                # Sent here, not by aiohttp once this returns: the client has its answer
                # before the metrics and the access line are written, not after.
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                exchange.error = exchange.error or "client-gone"  # a reset of ours stays ours
            return response
        except asyncio.CancelledError:
            # handler_cancellation: the client closed its connection (or shutdown).
            log.debug("client went away: %s %s", request.method, exchange.path)
            exchange.error = "client-gone"
            raise
        finally:
            self.metrics.in_flight -= 1
            if not self.metrics.in_flight:
                self.drained.set()
            # 499 is nginx's "client closed request"; 502 an answer bol broke off.
            if response is None or exchange.error == "client-gone":
                exchange.status = 499
            elif exchange.error == "upstream-failed-mid-body":
                exchange.status = 502
            else:
                exchange.status = response.status
            self._record(exchange, started)

    async def _answer(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        """bol's answer, or the problem response that stands in for it."""
        try:
            return await self._forward(request, self.settings, exchange)
        except ProxyError as exc:
            response = problem_response(exc)
            exchange.error = exc.code
            exchange.bytes = response.content_length or 0
            if isinstance(exc, RequestTimeout | BodyTooLarge | BadRequest | ListenerClosed):
                # The rest of the body, if any, is not wanted: don't wait to drain it. A
                # closed listener's connection must not carry another request either.
                response.force_close()
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must cost one request, not the process or a bare aiohttp 500.
            log.exception("unexpected error forwarding %s %s", request.method, exchange.path)
            exchange.error = ProxyError.code
            return problem_response(ProxyError("the proxy failed unexpectedly; its log has "
                                               "the details"))

    async def _forward(self, request: web.BaseRequest, settings: Settings,
                       exchange: Exchange) -> web.StreamResponse:
        conn = request.protocol
        if not self.current(conn):
            # A keep-alive connection from before a reload or shutdown that closed its
            # listener or gave its port another set: no other set may stand in.
            raise ListenerClosed("this connection's listener was closed or changed by a "
                                 "reload or shutdown; reconnect")
        route = settings.router.resolve(request.method, request.raw_path,
                                        request.headers.getall(CREDENTIALS_HEADER, []),
                                        cast(Connection, conn).port)
        exchange.set_name = route.set_name
        source = self.tokens.source(route.set_name)
        body = await self._body(request, settings)
        token = await source.get()
        # One ceiling for the whole exchange with bol, replay and body included.
        exchange.deadline = asyncio.get_running_loop().time() + settings.timeout
        target = settings.path_prefix + route.target
        upstream = await self._send(request, target, token, body, exchange)
        try:
            if upstream.status == 401:
                exchange.upstream_status = 401
                upstream = await self._after_401(request, target, source, token, body,
                                                 upstream, exchange)
            exchange.upstream_status = upstream.status
            return await self._relay(request, upstream, exchange)
        except BaseException:
            # Whatever ended this exchange (a client gone, a failed renewal), the
            # answer's connection must not stay held (no-op once released).
            upstream.close()
            raise

    @staticmethod
    async def _body(request: web.BaseRequest, settings: Settings) -> Body:
        if not request.body_exists and _TRANSFER_ENCODING not in request.headers:
            return _NO_BODY
        limits, timeout = settings.config.limits, settings.config.upstream.timeout
        try:
            # A client trickling its body must not hold the handler for ever: the
            # buffered part gets the same ceiling as the whole upstream exchange.
            async with asyncio.timeout(timeout):
                return await read_body(request, limits.max_body_size, limits.replay_buffer)
        except TimeoutError:
            raise RequestTimeout("the request body did not arrive within upstream.timeout "
                                 f"({timeout:g} s)") from None

    async def _send(self, request: web.BaseRequest, target: str, token: Token, body: Body,
                    exchange: Exchange) -> Response:
        headers = upstream_request_headers(request.headers, token.value.reveal())
        pool = self.pool
        head = request_head(request.method, target, pool.host_header, headers,
                            body.framing(request.method))
        started = time.perf_counter()
        try:
            return await pool.request(head, body.payload(), chunked=body.chunked,
                                      head_only=request.method == "HEAD",
                                      idempotent=request.method in _IDEMPOTENT,
                                      deadline=exchange.deadline)
        except (UpstreamError, TimeoutError, BodyTooLarge) as exc:
            raise translate(exc, body) from exc
        finally:
            exchange.upstream_seconds += time.perf_counter() - started

    async def _after_401(self, request: web.BaseRequest, target: str, source: TokenSource,
                         token: Token, body: Body, upstream: Response,
                         exchange: Exchange) -> Response:
        """SPEC §6.2: invalidate if current, renew once, replay once if the body allows."""
        source.invalidate(token)
        if not body.replayable:
            return upstream  # the body is gone: the 401 goes back as it came
        try:
            fresh = await source.get()  # joins or starts the one renewal
        except ProxyError:
            upstream.close()
            raise
        if fresh is token:
            return upstream  # bol refused a token that is still current: do not loop
        upstream.close()  # drop the 401; the replay takes a connection of its own
        exchange.replayed = True
        self.metrics.replays.labels(source.cred.name).inc()
        return await self._send(request, target, fresh, body, exchange)

    async def _relay(self, request: web.BaseRequest, upstream: Response,
                     exchange: Exchange) -> web.StreamResponse:
        try:
            headers = client_response_headers(upstream.raw_headers)
        except ProxyError:
            upstream.close()  # unread: the connection cannot be reused
            raise
        status = upstream.status
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            upstream.release()
            # Content-Length is copied as bol sent it: a HEAD answer announces the size
            # of the body it does not carry (RFC 9110 §9.3.2).
            return web.StreamResponse(status=status, reason=_reason(upstream.reason),
                                      headers=headers)
        length = upstream.content_length
        if length is not None and length <= SMALL_RESPONSE:
            try:
                data = await upstream.read()  # bounded by the exchange's deadline
            except (UpstreamError, TimeoutError) as exc:
                upstream.close()
                raise translate(exc) from exc  # nothing sent yet: a clean 502 or 504
            upstream.release()
            exchange.bytes = len(data)
            return web.Response(status=status, reason=_reason(upstream.reason), headers=headers,
                                body=data)
        return await self._stream(request, upstream, headers, exchange)

    async def _stream(self, request: web.BaseRequest, upstream: Response,
                      headers: list[tuple[str, str]], exchange: Exchange) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=_reason(upstream.reason),
                                      headers=headers)
        if upstream.content_length is None and request.version < HttpVersion11:
            # An HTTP/1.0 client reads such a body up to the close, so the close must
            # come, keep-alive or not (aiohttp decides so but still keeps the connection).
            response.force_close()
        try:
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.readany()  # bounded by the deadline
                except (UpstreamError, TimeoutError) as exc:
                    # SPEC §5: never present a truncated body as complete. An aborted
                    # connection leaves the client a short Content-Length body or a
                    # chunked body without its last chunk, which every client reports.
                    log.warning("upstream failed mid-response (%s): resetting the client "
                                "connection", type(exc).__name__)
                    exchange.error = "upstream-failed-mid-body"
                    if request.transport is not None:
                        reset(request.transport)
                    return response
                if not chunk:
                    break
                await response.write(chunk)
                exchange.bytes += len(chunk)
            await response.write_eof()
        except ConnectionError:
            log.debug("client went away during the response: %s %s", request.method,
                      request.path)
            exchange.error = "client-gone"
        finally:
            if upstream.at_eof():
                upstream.release()  # back to the pool
            else:
                upstream.close()  # half-read: the connection cannot be reused
        return response

    def _record(self, exchange: Exchange, started: float) -> None:
        duration = time.perf_counter() - started
        self.metrics.observe(exchange.set_name, exchange.method, exchange.status, duration,
                             exchange.upstream_seconds if exchange.upstream_status else None)
        if access_log.enabled():
            access_log.write(
                f"{exchange.set_name} {exchange.method} {exchange.path} {exchange.status} "
                f"{duration * 1000:.1f}ms upstream={exchange.upstream_status or '-'} "
                f"bytes={exchange.bytes} replayed={'yes' if exchange.replayed else 'no'}"
                + (f" error={exchange.error}" if exchange.error else ""),
                exchange.fields(duration) if access_log.structured else None,
            )


class Exchange:
    """What the access log and the metrics learn about one request."""

    __slots__ = ("bytes", "deadline", "error", "method", "path", "replayed", "set_name",
                 "status", "upstream_seconds", "upstream_status")

    def __init__(self, request: web.BaseRequest) -> None:
        self.method = request.method
        # The path only: queries may carry order ids and customer data.
        self.path = request.raw_path.partition("?")[0][:200]
        self.set_name = "-"
        self.status = 0
        self.upstream_status: int | None = None
        self.upstream_seconds = 0.0
        self.replayed = False
        self.error: str | None = None
        self.deadline = 0.0
        self.bytes = 0  # body bytes passed to the client

    def fields(self, duration: float) -> dict[str, Any]:
        """The access line's fields, for JSON logs."""
        return {"set": self.set_name, "method": self.method, "path": self.path,
                "status": self.status, "duration_ms": round(duration * 1000, 2),
                "upstream_status": self.upstream_status, "bytes": self.bytes,
                "replayed": self.replayed, "error": self.error}
