"""The catch-all handler: route, attach the token, stream to bol and back, replay on 401.

One request, step by step:

1. :class:`~proxy.routing.Router` picks the credential set and validates the raw target;
   nothing that fails here contacts the upstream.
2. The request body is sized up (:mod:`proxy.bodies`): declared lengths over
   ``max_body_size`` are refused at once; a body of at most ``replay_buffer`` bytes is
   read whole (it can be replayed), anything larger streams through with a running count.
3. The set's token is attached and the request goes over :mod:`proxy.upstream` to
   ``upstream.api_url`` with the raw target as the client sent it: nothing re-encodes or
   re-normalises the path or the query.
4. A 401 for the token just used invalidates it (if still current), and a buffered
   request is replayed once with the new token.
5. The answer goes back unchanged: small bodies in one piece, others streamed. If bol's
   side breaks mid-body, the client's connection is aborted, so a short body can never
   pass for a complete one.

Upstream failures are translated into :mod:`proxy.errors` in :func:`translate` only.
What is recorded of each request (:mod:`proxy.access`) never includes a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from aiohttp import HttpVersion11, web
from multidict import istr

from . import standin
from .access import CLIENT_GONE, UPSTREAM_BROKE_OFF, AccessRecord
from .bodies import RequestBody, request_body
from .budgets import Key
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
from .headers import (
    CREDENTIALS_HEADER,
    MAX_WAIT_HEADER,
    client_response_headers,
    upstream_request_headers,
)
from .metrics import Metrics
from .ratelimit import RateLimiter, max_wait_of
from .routing import Router
from .server import Connection
from .tokens import Token, Tokens, TokenSource
from .upstream import Response, UpstreamError, UpstreamPool, request_head

log = logging.getLogger("proxy")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})  # safe to send twice (RFC 9110 §9.2)
# A 429 from bol is waited out and asked again only for reads: bol may queue writes.
_RETRIED_AFTER_429 = frozenset({"GET", "HEAD"})
SMALL_RESPONSE = 64 * 1024  # answered in one piece: measurably faster than streaming
_NO_BODY_STATUSES = frozenset({204, 304})
_AUTHORIZATION = istr("Authorization")


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


def translate(exc: BaseException, body: RequestBody | None = None) -> ProxyError:
    """The one boundary where upstream failures become proxy errors."""
    if isinstance(exc, BodyTooLarge) or (body is not None and body.too_large):
        return BodyTooLarge("the request body exceeds limits.max_body_size")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the upstream did not answer within the configured timeouts")
    return UpstreamUnreachable(str(exc) if isinstance(exc, UpstreamError)
                               else f"the upstream exchange failed ({type(exc).__name__})")


class Call:
    """One tool request on its way to bol: what every attempt of it (the first, a 401
    replay, a read asked again after bol's 429) needs."""

    __slots__ = ("body", "bucket", "record", "request", "source", "target", "timeout",
                 "wait_until")

    def __init__(self, request: web.BaseRequest, target: str, body: RequestBody,
                 source: TokenSource, record: AccessRecord, timeout: float) -> None:
        self.request = request
        self.target = target  # raw path and query as forwarded, under api_url's path
        self.body = body
        self.source = source
        self.record = record
        self.timeout = timeout  # upstream.timeout: one ceiling for all attempts together
        self.bucket: Key | None = None  # its rate budget, when rate limits are on
        self.wait_until = 0.0  # the limiter's clock: no waiting for budget after this


class Forwarder:
    """Forwards requests for the current settings; swapped settings apply to new requests."""

    def __init__(self, settings: Settings, tokens: Tokens, pool: UpstreamPool,
                 metrics: Metrics, admits: Callable[[object], bool],
                 limiter: RateLimiter | None = None) -> None:
        self.settings = settings
        self.limiter = limiter  # None: rate limits are off
        self.tokens = tokens
        self.pool = pool
        self.metrics = metrics
        # Whether a client connection still means what it meant when it came in
        # (proxy.listeners): a reload may have closed its port or given it another set.
        self._admits = admits
        self._loop = asyncio.get_running_loop()  # created by ProxyServer.start, on it
        self.drained = asyncio.Event()  # set while no request is in flight
        self.drained.set()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp handler for every path that is not the proxy's own."""
        record = AccessRecord(request)
        response: web.StreamResponse | None = None
        self.metrics.in_flight += 1
        self.drained.clear()
        try:
            response = await self._answer(request, record)
            if not self._admits(request.protocol):
                response.force_close()  # a reload or shutdown retired this connection
            try:
                # Sent here, not by aiohttp once this returns: the client has its answer
                # before the metrics and the access line are written, not after.
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                record.error = record.error or CLIENT_GONE  # a reset of ours stays ours
            return response
        except asyncio.CancelledError:
            # handler_cancellation: the client closed its connection (or shutdown).
            log.debug("client went away: %s %s", request.method, record.path)
            record.error = CLIENT_GONE
            raise
        finally:
            self.metrics.in_flight -= 1
            if not self.metrics.in_flight:
                self.drained.set()
            record.settle(response)
            record.write(self.metrics)

    async def _answer(self, request: web.BaseRequest, record: AccessRecord
                      ) -> web.StreamResponse:
        """bol's answer, or the problem response that stands in for it."""
        try:
            return await self._forward(request, self.settings, record)
        except ProxyError as exc:
            response = problem_response(exc)
            record.error = exc.code
            record.bytes = response.content_length or 0
            if isinstance(exc, RequestTimeout | BodyTooLarge | BadRequest | ListenerClosed):
                # The rest of the body, if any, is not wanted: don't wait to drain it. A
                # closed listener's connection must not carry another request either.
                response.force_close()
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must cost one request, not the process or a bare aiohttp 500.
            log.exception("unexpected error forwarding %s %s", request.method, record.path)
            record.error = ProxyError.code
            return problem_response(ProxyError("the proxy failed unexpectedly; its log has "
                                               "the details"))

    async def _forward(self, request: web.BaseRequest, settings: Settings,
                       record: AccessRecord) -> web.StreamResponse:
        conn = request.protocol
        if not self._admits(conn):
            # A keep-alive connection from before a reload or shutdown that closed its
            # listener or gave its port another set: no other set may stand in.
            raise ListenerClosed("this connection's listener was closed or changed by a "
                                 "reload or shutdown; reconnect")
        authorizations = request.headers.getall(_AUTHORIZATION, ())
        route = settings.router.resolve(request.method, request.raw_path,
                                        request.headers.getall(CREDENTIALS_HEADER, []),
                                        cast(Connection, conn).port,
                                        standin.set_named(authorizations)
                                        if authorizations else None)
        record.set_name = route.set_name
        limits = settings.config.limits
        body = await request_body(request, limits.max_body_size, limits.replay_buffer,
                                  settings.timeout)
        call = Call(request, settings.path_prefix + route.target, body,
                    self.tokens.source(route.set_name), record, settings.timeout)
        limiter = self.limiter
        if limiter is not None:
            call.bucket = limiter.bucket(route.set_name, request.method,
                                         route.target.partition("?")[0])
            call.wait_until = limiter.now() + max_wait_of(
                request.headers.get(MAX_WAIT_HEADER), settings.config.rate_limits.max_wait)
        upstream, token = await self._attempt(call, None)
        try:
            if upstream.status == 401:
                record.upstream_status = 401
                upstream = await self._after_401(call, token, upstream)
            if (upstream.status == 429 and limiter is not None and call.bucket is not None
                    and request.method in _RETRIED_AFTER_429 and body.replayable
                    and limiter.could_wait(call.bucket, call.wait_until)):
                # bol's budget ran out under us (a reset that refilled less than it
                # said, another client on the same credentials): a read can wait for it.
                record.upstream_status = 429
                upstream.close()
                upstream, _ = await self._attempt(call, None)
            record.upstream_status = upstream.status
            return await self._relay(request, upstream, record)
        except BaseException:
            # Whatever ended this exchange (a client gone, a failed renewal), the
            # answer's connection must not stay held (no-op once released).
            upstream.close()
            raise

    async def _attempt(self, call: Call, token: Token | None) -> tuple[Response, Token]:
        """One request to bol within the set's budget: wait for budget, attach the token
        (the set's current one unless given), send, and tell the budget what came back."""
        record, bucket, limiter = call.record, call.bucket, self.limiter
        if bucket is not None and limiter is not None and not limiter.try_take(bucket):
            record.waited += await limiter.acquire(bucket, call.wait_until)
        try:
            if token is None:
                token = await call.source.get()
            if not record.deadline:
                # One ceiling for the whole exchange with bol, replays included.
                record.deadline = self._loop.time() + call.timeout
            upstream = await self._send(call, token)
        except BaseException:
            if bucket is not None and limiter is not None:
                shared = limiter.release(bucket)
                if shared is not None:
                    await shared
            raise
        if bucket is not None and limiter is not None:
            shared = limiter.answered(bucket, upstream.status, upstream.raw_headers)
            if shared is not None:
                try:
                    await shared
                except BaseException:
                    upstream.close()
                    raise
        return upstream, token

    async def _send(self, call: Call, token: Token) -> Response:
        request, body, record = call.request, call.body, call.record
        headers = upstream_request_headers(request.headers, token.value.reveal())
        pool = self.pool
        head = request_head(request.method, call.target, pool.host_header, headers,
                            body.framing(request.method))
        started = time.perf_counter()
        try:
            return await pool.request(head, body.payload(), chunked=body.chunked,
                                      head_only=request.method == "HEAD",
                                      idempotent=request.method in _IDEMPOTENT,
                                      deadline=record.deadline)
        except (UpstreamError, TimeoutError, BodyTooLarge) as exc:
            raise translate(exc, body) from exc
        finally:
            record.upstream_seconds += time.perf_counter() - started

    async def _after_401(self, call: Call, token: Token, upstream: Response) -> Response:
        """Invalidate the token if it is still current, renew once, and replay once if
        the body was kept; the replay costs budget like any request."""
        source = call.source
        source.invalidate(token)
        if not call.body.replayable:
            return upstream  # the body is gone: the 401 goes back as it came
        try:
            fresh = await source.get()  # joins or starts the one renewal
        except ProxyError:
            upstream.close()
            raise
        if fresh is token:
            return upstream  # bol refused a token that is still current: do not loop
        upstream.close()  # drop the 401; the replay takes a connection of its own
        call.record.replayed = True
        self.metrics.replays.labels(source.cred.name).inc()
        # With the set's token as it is once budget allows: the one just fetched, unless
        # a long wait for budget saw it renewed (sent as it was, it could have expired).
        replay, _ = await self._attempt(call, None)
        return replay

    async def _relay(self, request: web.BaseRequest, upstream: Response,
                     record: AccessRecord) -> web.StreamResponse:
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
            record.bytes = len(data)
            return web.Response(status=status, reason=_reason(upstream.reason), headers=headers,
                                body=data)
        return await self._stream(request, upstream, headers, record)

    async def _stream(self, request: web.BaseRequest, upstream: Response,
                      headers: list[tuple[str, str]], record: AccessRecord) -> web.StreamResponse:
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
                    # Never present a truncated body as complete. An aborted
                    # connection leaves the client a short Content-Length body or a
                    # chunked body without its last chunk, which every client reports.
                    log.warning("upstream failed mid-response (%s): resetting the client "
                                "connection", type(exc).__name__)
                    record.error = UPSTREAM_BROKE_OFF
                    if request.transport is not None:
                        reset(request.transport)
                    return response
                if not chunk:
                    break
                await response.write(chunk)
                record.bytes += len(chunk)
            await response.write_eof()
        except ConnectionError:
            log.debug("client went away during the response: %s %s", request.method,
                      request.path)
            record.error = CLIENT_GONE
        finally:
            if upstream.at_eof():
                upstream.release()  # back to the pool
            else:
                upstream.close()  # half-read: the connection cannot be reused
        return response
