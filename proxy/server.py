"""aiohttp's low-level server, with what the proxy needs of each client connection.

* Every connection remembers the port it came in on and the role that port had when it
  was accepted: the main listener (``""``) or a set's dedicated one (the set's name).
  :class:`~proxy.listeners.Listeners` decides whether that still holds.
* :meth:`Connection.close_if_idle` closes an idle connection at once (aiohttp's
  ``close()`` leaves it open but deaf, and stops reading a busy one's request body).
* When the C parser gives up in the middle of a request body (chunk framing broken
  after the body began to stream), aiohttp queues a 400 for after the current request
  but leaves that request's body unfinished, so the handler reading it would wait until
  its own timeout. Such a body now fails at once, and the client gets a 400.

This needs a few of aiohttp's private attributes. They are all listed in
:data:`AIOHTTP_INTERNALS` and checked when the proxy starts (:func:`check_aiohttp`), so
an aiohttp release that changes them stops the proxy at start instead of letting it
serve wrongly; the dependency's upper bound names the newest minor release tested.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import http_parser, web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from .errors import BadRequest, StartupError

Roles = Mapping[int, str]  # bound port -> "" (main listener) or a set's name

# Every private aiohttp attribute this module reads: (owner, attribute, what for).
AIOHTTP_INTERNALS: tuple[tuple[type, str, str], ...] = (
    (RequestHandler, "_messages", "requests and bodies the parser queued"),
    (RequestHandler, "_current_request", "the request being handled"),
    (RequestHandler, "_waiter", "set while a keep-alive connection waits, idle"),
    (web.TCPSite, "_server", "the listening socket, for its bound port"),
    (web.Server, "_loop", "the loop given to each connection (set in __init__)"),
    (web.Server, "_kwargs", "the connection settings (set in __init__)"),
)


def check_aiohttp(internals: Iterable[tuple[type, str, str]] = AIOHTTP_INTERNALS) -> None:
    """Refuse to serve on an aiohttp this module cannot rely on.

    The C parser (llhttp) refuses Content-Length with Transfer-Encoding, duplicate
    Content-Length, obs-fold and NUL in targets; the pure-Python fallback has had request
    smuggling flaws. It is missing when aiohttp was built without its extensions or
    AIOHTTP_NO_EXTENSIONS is set. Private attributes are checked on the classes, or on
    a server instance for those set in ``__init__``.
    """
    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        raise StartupError("aiohttp runs without its C HTTP parser (AIOHTTP_NO_EXTENSIONS set, "
                           "or an install without wheels); refusing to serve")
    probe = web.Server(_never_called, loop=asyncio.get_running_loop())
    missing = [f"{owner.__name__}.{name}" for owner, name, _ in internals
               if not hasattr(probe if owner is web.Server else owner, name)]
    if missing:
        raise StartupError(f"this aiohttp release lacks what the proxy relies on "
                           f"({', '.join(missing)}); install a tested aiohttp release")


async def _never_called(request: web.BaseRequest) -> web.StreamResponse:
    raise NotImplementedError  # pragma: no cover - the probe server never serves


def bound_port(site: web.TCPSite) -> int:
    """The port a listener is bound to (the configured one, or the one port 0 gave)."""
    server = site._server
    if server is None or not hasattr(server, "sockets"):
        raise RuntimeError("the listener is not started")
    port: int = server.sockets[0].getsockname()[1]
    return port


class Connection(RequestHandler):
    """One client connection."""

    __slots__ = ("_roles", "port", "role")

    def __init__(self, manager: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.port: int | None = None
        # As the port's role was when the connection came; None if it had none yet.
        self.role: str | None = None
        self._roles = manager.roles

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            self.port = sockname[1]
            self.role = self._roles().get(self.port)

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) == queued or isinstance(self._messages[-1][0],
                                                       RawRequestMessage):
            return  # nothing new, or a request: the parser is fine
        # The parser gave up: no body it was still reading can ever end.
        request = self._current_request
        bodies = [payload for _, payload in self._messages]
        if request is not None:
            bodies.append(request.content)
        for body in bodies:
            if not body.is_eof():
                body.set_exception(BadRequest("the request body's framing is broken"))
                body.feed_eof()  # ended: aiohttp must not linger reading it after the 400

    def close_if_idle(self) -> None:
        """Close now if idle between requests (as aiohttp's own keep-alive check tells
        idleness). A busy connection is left alone: aiohttp's ``close()`` would stop
        reading a request body still on its way; the forwarder closes it after its
        answer instead."""
        if self._waiter is not None and not self._waiter.done():
            self.force_close()


class Server(web.Server):
    """``web.Server`` making :class:`Connection` connections; ``roles`` tells the role of
    each listener's port now."""

    def __init__(self, handler: Any, *, roles: Callable[[], Roles], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.roles = roles

    def __call__(self) -> RequestHandler:
        return Connection(self, loop=self._loop, **self._kwargs)
