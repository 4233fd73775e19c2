"""aiohttp's low-level server, with what the proxy needs of each client connection.

* Every connection remembers the port it came in on and the role that port had when it
  was accepted: the main listener (``""``) or a set's dedicated one (the set's name). A
  reload can give that port another role or none; the forwarder then refuses the
  connection's requests instead of letting another set stand in (SPEC §4).
* :meth:`Connection.close_if_idle` closes an idle connection at once (aiohttp's
  ``close()`` leaves it open but deaf, and stops reading a busy one's request body).
* When the C parser gives up in the middle of a request body (chunk framing broken
  after the body began to stream), aiohttp queues a 400 for after the current request
  but leaves that request's body unfinished, so the handler reading it would wait until
  its own timeout. Such a body now fails at once, and the client gets a 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from .errors import BadRequest

Roles = Mapping[int, str]  # bound port -> "" (main listener) or a set's name


class Connection(RequestHandler):
    """One client connection."""

    __slots__ = ("_roles", "port", "role")

    def __init__(self, manager: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._roles = manager.roles
        self.port: int | None = None
        self.role: str | None = None  # as the port's role was when the connection came

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

    def close_connections(self, roles: Roles) -> None:
        """Close the idle connections whose port has another role in ``roles``, or none;
        the forwarder closes the busy ones after their answers."""
        for conn in self.connections:
            if isinstance(conn, Connection) and (conn.port is None or conn.role is None
                                                 or roles.get(conn.port) != conn.role):
                conn.close_if_idle()
