"""Pure header rules for both directions of the hop (no I/O).

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields it knows of and every field named
in ``Connection``. On the way to bol the proxy also drops what it sets itself (Host,
Authorization) and its own selector header; on the way back it passes everything else,
repeated fields included, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy, istr

CREDENTIALS_HEADER = istr("X-Bol-Credentials")

# RFC 9110 §7.6.1 and RFC 9112 §7: meaningful for one connection only. Content-Length is
# not hop-by-hop, but it is re-derived by the framing of each side (see below).
HOP_BY_HOP: frozenset[istr] = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)

# Dropped on the way up: Host is the upstream's; Authorization is replaced by the set's
# bearer token; Expect was answered by this hop already (the server sends 100 Continue).
_NOT_FORWARDED_UP = HOP_BY_HOP | {istr("Host"), istr("Authorization"), istr("Expect"),
                                  CREDENTIALS_HEADER}

# Headers whose values are credentials: redacted wherever headers are printed
# (as httpx's SENSITIVE_HEADERS).
SENSITIVE = frozenset(istr(h) for h in ("Authorization", "Proxy-Authorization", "Cookie",
                                       "Set-Cookie"))


def connection_listed(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[istr]:
    """The field names a ``Connection`` header declares hop-by-hop."""
    names: set[istr] = set()
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        values: Iterable[str] = headers.getall("Connection", [])
    else:
        values = [headers["Connection"]] if "Connection" in headers else []
    for value in values:
        names.update(istr(token.strip()) for token in value.split(",") if token.strip())
    return names


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], bearer: str, *, keep_length: bool
) -> CIMultiDict[str]:
    """What goes to bol: the client's end-to-end headers plus ``Authorization: Bearer``.

    ``keep_length`` keeps the client's Content-Length when the body is streamed through
    as declared; a buffered body gets its length from the client library instead.
    """
    drop = _NOT_FORWARDED_UP
    if "Connection" in incoming:
        drop = drop | connection_listed(incoming)
    if not keep_length:
        drop = drop | {istr("Content-Length")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name not in drop:
            out.add(name, value)
    out["Authorization"] = "Bearer " + bearer
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """What goes back to the tool: bol's headers minus the hop-by-hop ones."""
    drop = HOP_BY_HOP
    if "Connection" in upstream:
        drop = drop | connection_listed(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name not in drop:
            out.add(name, value)
    return out


def redacted(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers fit for a log line: credential values replaced by ``[redacted]``."""
    return [(k, "[redacted]" if istr(k) in SENSITIVE else v) for k, v in headers]
