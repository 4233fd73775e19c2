"""The proxy's listening ports, and what each of them means.

A port is the main listener (role ``""``) or a credential set's dedicated one (role: the
set's name). :class:`Listeners` is the one owner of that mapping: it opens and closes the
ports a configuration wants, publishes their roles, and answers the one question the
forwarder asks of every request: does this client connection still mean what it meant
when it was accepted? A reload can close a port or give it another role; a connection
that came in under the old meaning must then not be served with another set's token,
so it is refused (``503 listener-closed``) and closed.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable

from aiohttp import web

from .config import Config
from .server import Connection, Server, bound_port

log = logging.getLogger("proxy")

Address = tuple[str, int]  # (host, configured port); port 0 asks for any free port


class CannotListen(OSError):
    """A configured address could not be listened on; says which one and whose it is."""

    def __init__(self, host: str, port: int, owner: str, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} ({owner}): {reason}")
        self.port = port
        self.owner = owner
        self.reason = reason


def bind_failure(exc: OSError) -> str:
    """Why an address could not be listened on, in the system's words (asyncio words
    its own, and a name lookup's code is not an errno)."""
    if isinstance(exc, CannotListen):
        return exc.reason
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror})"
    return os.strerror(exc.errno) if exc.errno else str(exc)


class Listeners:
    """The listening sockets of one running proxy and the role of each bound port."""

    def __init__(self, runner: web.BaseRunner, server: Server) -> None:
        self._runner = runner
        self._server = server
        self._sites: dict[Address, web.TCPSite] = {}
        self.roles: dict[int, str] = {}  # bound port -> "" (main listener) or a set's name

    def port(self, config: Config, name: str | None = None) -> int:
        """The bound port of the main listener, or of set ``name``'s dedicated one."""
        wanted = config.listen.port if name is None else config.credentials[name].port
        return bound_port(self._sites[(config.listen.host, wanted or 0)])

    def addresses(self) -> list[str]:
        """``http://host:port (role)`` of every listener, the main one first, for the log."""
        listed = sorted((self.roles.get(bound_port(site), "~"), host, bound_port(site))
                        for (host, _), site in self._sites.items())
        return [f"http://{host}:{port} ({_describe(role)})" for role, host, port in listed]

    async def open(self, config: Config, *, publish: bool = False) -> tuple[list[int],
                                                                            list[int]]:
        """Listen where ``config`` wants and stop listening elsewhere; returns the ports
        opened and closed. With ``publish`` (at start) each new port gets its role as
        soon as it listens; a reload publishes all roles at once with :meth:`publish`,
        when its other settings apply. Raises :class:`CannotListen` and closes what it
        opened if any port cannot be opened."""
        host = config.listen.host
        dedicated = config.dedicated_ports()
        wanted = {(host, config.listen.port)} | {(host, p) for p in dedicated}
        opened: list[Address] = []
        try:
            for address in sorted(wanted - self._sites.keys()):
                site = web.TCPSite(self._runner, address[0], address[1], reuse_address=True)
                try:
                    await site.start()
                except OSError as exc:
                    owner = (f"the dedicated port of set '{dedicated[address[1]]}'"
                             if address[1] in dedicated else "listen.port")
                    if isinstance(exc, socket.gaierror):
                        owner = "listen.host"  # a name that does not resolve
                    raise CannotListen(host, address[1], owner, bind_failure(exc)) from None
                self._sites[address] = site
                opened.append(address)
                if publish:
                    self.roles[bound_port(site)] = dedicated.get(address[1], "")
        except OSError:
            for address in opened:
                await self._sites.pop(address).stop()
            raise
        closed = []
        for address in sorted(self._sites.keys() - wanted):
            closed.append(address[1])
            await self._sites.pop(address).stop()  # open connections finish their requests
        return [bound_port(self._sites[a]) for a in opened], closed

    def publish(self, config: Config) -> None:
        """Give every open port its role under ``config``, and close the connections
        that no longer mean what they meant (idle ones now, busy ones after their
        answer: see :meth:`admits`)."""
        dedicated = config.dedicated_ports()
        self.roles.clear()
        self.roles.update({bound_port(site): dedicated.get(port, "")
                           for (_, port), site in self._sites.items()})
        self._retire(self._server.connections)

    def admits(self, conn: object) -> bool:
        """Whether a client connection still means what it meant when it came in."""
        if not isinstance(conn, Connection) or conn.port is None:
            return False
        if conn.role is None:
            # Accepted in the moment between a port opening and its role being published
            # (start, reload): it takes the role its port has now.
            conn.role = self.roles.get(conn.port)
        return conn.role is not None and self.roles.get(conn.port) == conn.role

    async def close(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their answer, and
        a request that still arrives on one is refused (its port has no role left)."""
        for site in self._sites.values():
            await site.stop()
        self._sites.clear()
        self.roles.clear()
        self._retire(self._server.connections)

    def forget(self) -> None:
        """The runner was cleaned up, which stopped every site."""
        self._sites.clear()

    def _retire(self, connections: Iterable[object]) -> None:
        for conn in connections:
            if isinstance(conn, Connection) and not self.admits(conn):
                conn.close_if_idle()


def _describe(role: str) -> str:
    if role == "~":  # (sorts last) opened by a reload whose roles are not published yet
        return "opening"
    return "main" if role == "" else f"set {role}"
