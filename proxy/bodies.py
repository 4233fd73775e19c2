"""Request bodies on their way to bol: sized up, buffered when small, streamed when not.

A body of at most ``limits.replay_buffer`` bytes is read whole first, so that it can be
sent again after a 401 with a renewed token; a larger one streams through with a
running count against ``limits.max_body_size`` (a chunked body declares no size, so the
cap holds while it streams). The framing on the way to bol is always the proxy's own
(:meth:`RequestBody.framing`): the client's Content-Length never goes along.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import istr

from .errors import BadRequest, BodyTooLarge, RequestTimeout

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TRANSFER_ENCODING = istr("Transfer-Encoding")
_EXPECT = istr("Expect")


class RequestBody:
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
        if self._rest is None:
            return
        sent = len(self._prefix)
        if self._prefix:
            yield self._prefix
        while chunk := await self._rest.readany():
            sent += len(chunk)
            if sent > self._limit:
                self.too_large = True
                raise BodyTooLarge(f"the request body exceeds {self._limit} bytes")
            yield chunk


NO_BODY = RequestBody(None)


async def request_body(request: web.BaseRequest, max_size: int, replay_size: int,
                       within: float) -> RequestBody:
    """The body of ``request``, sized up; the part that is buffered must arrive within
    ``within`` seconds (a client trickling its body must not hold the handler for ever)."""
    if not request.body_exists and _TRANSFER_ENCODING not in request.headers:
        return NO_BODY
    try:
        async with asyncio.timeout(within):
            return await _size_up(request, max_size, replay_size)
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive within upstream.timeout "
                             f"({within:g} s)") from None


async def _size_up(request: web.BaseRequest, max_size: int, replay_size: int) -> RequestBody:
    """Size up the request body without reading more than ``replay_size`` of it."""
    te = request.headers.get(_TRANSFER_ENCODING)
    if te is not None and te.strip().lower() != "chunked":
        # The body is re-framed for the upstream, so any other coding would be corrupted.
        raise BadRequest("only Transfer-Encoding: chunked is accepted")
    if not request.body_exists:
        return NO_BODY
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
            return RequestBody(None, request.content, limit=max_size, length=length)
        try:
            return RequestBody(await request.content.readexactly(length))
        except asyncio.IncompleteReadError:
            raise BadRequest("the request body ended before its Content-Length") from None
    # Chunked: read up to the replay buffer; a body that ends within it is replayable.
    parts: list[bytes] = []
    size = 0
    while size <= replay_size:
        chunk = await request.content.readany()
        if not chunk:
            return RequestBody(b"".join(parts))
        parts.append(chunk)
        size += len(chunk)
        if size > max_size:
            raise BodyTooLarge(too_large)
    return RequestBody(None, request.content, prefix=b"".join(parts), limit=max_size)
