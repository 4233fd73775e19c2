"""Which request targets are forwarded, where, and with which credential set (no I/O).

A proxy that holds credentials must forward exactly what it is meant to. The rules:

* Only origin-form targets (``/path?query``): absolute-form (``http://evil/``), asterisk
  form and authority form are refused, so the upstream host never comes from a request.
* The raw path is validated as sent and forwarded as sent. Anything that a later hop
  could normalise into a different path is refused instead of being normalised here:
  dot segments (also ``%2e``-encoded), encoded ``/`` or ``\\``, backslashes, ``;`` path
  parameters (``..;``), empty segments (``//host``), control bytes, non-ASCII and broken
  ``%`` escapes. Percent escapes in the path must decode to UTF-8 that no hop reads
  differently: no overlong or broken sequences (``%c0%ae``), no encoded ``%`` (double
  encoding, ``%252e``), no whitespace (``..%20``, which some servers trim), and nothing
  Unicode compatibility normalisation changes (full-width dots, ``%ef%bc%8e``).
* The path must lie under one of ``upstream.allowed_paths``, matched on whole segments.
* The credential set comes from the listener's dedicated port, a first path segment
  naming a set, the ``X-Bol-Credentials`` header, a stand-in token from the proxy's own
  token endpoint in ``Authorization``, then ``default_credentials``.
  Two of these naming different sets is refused rather than silently resolved, since a
  wrong guess would spend one account's token on another account's request.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .errors import BadRequest, MethodNotAllowed, NotFound, UnknownCredentials

REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
_HEX = frozenset("0123456789abcdefABCDEF")
_NOT_VISIBLE = re.compile("[^!-~]")  # anything but visible ASCII
# Escapes that decode to a separator, a NUL/control byte or a dot (checked separately).
# An encoded "%" is double encoding: the next hop that decodes once more sees another path.
_BAD_ESCAPES = frozenset({"2f", "5c", "3b", "25"} | {f"{i:02x}" for i in range(0x20)} | {"7f"})


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the set whose token it carries and the raw target."""

    set_name: str
    target: str  # raw path and query, exactly as forwarded


def check_target(target: str) -> tuple[str, str]:
    """Validate a raw request target; return (path, rest) where rest is ``?query`` or ''."""
    if target.startswith("//"):
        # Mostly a tool's base URL that ends in "/": http://127.0.0.1:8080/ + /retailer.
        raise BadRequest("the path starts with // (a base URL that ends in '/'?): only "
                         "origin-form targets (/path?query) are accepted")
    if not target.startswith("/"):
        raise BadRequest("only origin-form request targets (/path?query) are accepted")
    if _NOT_VISIBLE.search(target):
        raise BadRequest("the request target holds a space, control or non-ASCII byte")
    if "#" in target:
        raise BadRequest("the request target holds a fragment")
    path, sep, query = target.partition("?")
    if "\\" in path:
        raise BadRequest("the path holds a backslash")
    if ";" in path:
        # Path parameters: servlet containers read "..;" as "..". bol's paths have none.
        raise BadRequest("the path holds a ';'")
    _check_escapes(path, "path")
    _check_escapes(query, "query")
    if "//" in path:
        raise BadRequest("the path holds an empty segment (//)")
    if "." in path or "%2" in path:  # else no segment can be a dot segment
        for segment in path.split("/"):
            if segment.replace("%2e", ".").replace("%2E", ".") in (".", ".."):
                raise BadRequest("the path holds a dot segment")
    if "%" in path:
        _check_decoded(path)
    return path, sep + query


def _check_decoded(path: str) -> None:
    """Refuse escapes whose meaning depends on how a later hop decodes them."""
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")  # strict: overlong forms fail
    except UnicodeDecodeError:
        raise BadRequest("the path holds percent escapes that are not UTF-8") from None
    if any(char.isspace() for char in decoded):
        raise BadRequest("the path holds encoded whitespace")
    if unicodedata.normalize("NFKC", decoded) != decoded:
        # Full-width dots and slashes become "." and "/" for a hop that normalises.
        raise BadRequest("the path holds characters that Unicode normalisation changes")


def _check_escapes(text: str, where: str) -> None:
    start = text.find("%")
    while start != -1:
        code = text[start + 1 : start + 3]
        if len(code) != 2 or not set(code) <= _HEX:
            raise BadRequest(f"the {where} holds a malformed percent escape")
        if where == "path" and code.lower() in _BAD_ESCAPES:
            raise BadRequest("the path holds an encoded separator, percent sign or control byte")
        if where == "query" and code.lower() == "00":
            raise BadRequest("the query holds an encoded NUL byte")
        start = text.find("%", start + 3)


class Router:
    """Resolves requests to routes for one configuration; built once per (re)load."""

    def __init__(
        self,
        sets: Collection[str],
        default: str | None,
        allowed_paths: Collection[str],
        dedicated_ports: Mapping[int, str],
    ) -> None:
        self._sets = frozenset(sets)
        self._default = default
        self._allowed = frozenset(allowed_paths)
        self._allowed_slashed = tuple(p + "/" for p in allowed_paths)
        self._ports = dict(dedicated_ports)

    def _covers(self, path: str) -> bool:
        """``under(path, allowed_paths)``, with the prefixes prepared once."""
        return path in self._allowed or path.startswith(self._allowed_slashed)

    def resolve(
        self, method: str, target: str, header_sets: list[str], local_port: int | None,
        bearer_set: str | None = None,
    ) -> Route:
        """The route for one request, or the :class:`ProxyError` that answers it.

        ``bearer_set`` is the set a stand-in token in ``Authorization`` names
        (:mod:`proxy.standin`): after the header, before the default."""
        if method in REFUSED_METHODS:
            raise MethodNotAllowed(f"{method} is not forwarded")
        path, query = check_target(target)
        chosen: list[tuple[str, str]] = []  # (how, set name), in order of precedence
        if local_port is not None and local_port in self._ports:
            chosen.append(("port", self._ports[local_port]))
        first, slash, rest = path[1:].partition("/")
        if first in self._sets:
            chosen.append(("path", first))
            path = "/" + rest
        elif slash and not self._covers(path) and self._covers("/" + rest):
            raise UnknownCredentials(f"no credential set named '{first}'")
        if len(header_sets) > 1:
            raise BadRequest("the request has more than one X-Bol-Credentials header")
        if header_sets:
            name = header_sets[0].strip()
            if name not in self._sets:
                raise UnknownCredentials(
                    f"no credential set named '{name[:64]}' (X-Bol-Credentials)")
            chosen.append(("header", name))
        if bearer_set is not None:
            if bearer_set not in self._sets:
                raise UnknownCredentials(f"the stand-in token names set '{bearer_set[:64]}', "
                                         "which is not configured (any more): log in again")
            chosen.append(("stand-in token", bearer_set))
        if not self._covers(path):
            raise NotFound("the path is not under any of upstream.allowed_paths")
        if not chosen:
            if self._default is None:
                raise UnknownCredentials(
                    "no credential set chosen: prefix the path with /<set>, send "
                    "X-Bol-Credentials: <set>, or configure default_credentials"
                )
            return Route(self._default, path + query)
        names = {name for _, name in chosen}
        if len(names) > 1:
            said = ", ".join(f"{how} '{name}'" for how, name in chosen)
            raise BadRequest(f"the request names different credential sets ({said})")
        return Route(chosen[0][1], path + query)
