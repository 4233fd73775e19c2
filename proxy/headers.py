"""Pure header rules for both directions of the hop (no I/O).

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields it knows of and every field named
in ``Connection``. On the way to bol the proxy also drops what it sets itself (Host,
Authorization) and its own selector header; on the way back it passes everything else,
repeated fields included, byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from itertools import chain

from multidict import CIMultiDictProxy, istr

from .errors import BadRequest, UpstreamUnreachable

CREDENTIALS_HEADER = istr("X-Bol-Credentials")
MAX_WAIT_HEADER = istr("X-Bol-Proxy-Max-Wait")  # the request's own rate-limit patience

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
# bearer token; Expect was answered by this hop already (the server sends 100 Continue);
# Content-Length is the forwarder's to set, from the body it actually sends; the proxy's
# own request headers are for the proxy.
_NOT_FORWARDED_UP = HOP_BY_HOP | {istr("Host"), istr("Authorization"), istr("Expect"),
                                  istr("Content-Length"), CREDENTIALS_HEADER,
                                  MAX_WAIT_HEADER}

# Names are compared lowercased: multidict's istr hashes by its original spelling, so
# "x-bol-credentials" is not found in a set holding istr("X-Bol-Credentials"), and aiohttp
# canonicalises only the header names it knows (Proxy-Connection is not among them).
_HOP_BY_HOP_LOWER = frozenset(name.lower() for name in HOP_BY_HOP)
_NOT_FORWARDED_UP_LOWER = frozenset(name.lower() for name in _NOT_FORWARDED_UP)

# Headers that make some server or framework behind a hop read another path or method
# than the request line says (IIS/Symfony's URL rewrites, method overrides). No tool needs
# them to talk to bol, and forwarding them would let a request mean two things at once.
_REINTERPRETING = frozenset({"x-original-url", "x-rewrite-url", "x-http-method-override",
                             "x-http-method", "x-method-override"})
# Names a server may fold "_" into "-" for (CGI-style environments do): a look-alike of a
# header the proxy treats specially would reach such a server as the real one.
_FOLDED_SPECIAL = _NOT_FORWARDED_UP_LOWER | {"content-length", "content-type"} | _REINTERPRETING


# What aiohttp cannot write back as it read it: bytes that are not UTF-8 arrive as lone
# surrogates, which its C header writer silently drops ("caf\xe9" would leave as "caf"), and
# control characters (RFC 9110 §5.5), which it refuses with a ValueError mid-response.
_UNWRITABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
_CONTROL_BYTES = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


def connection_listed(values: Iterable[str]) -> set[str]:
    """The field names, lowercased, that ``Connection`` header values declare hop-by-hop."""
    return {token.strip().lower() for value in values for token in value.split(",")
            if token.strip()}


def upstream_request_headers(incoming: CIMultiDictProxy[str], bearer: str
                             ) -> list[tuple[str, str]]:
    """What goes to bol: the client's end-to-end headers plus ``Authorization: Bearer``.

    Content-Length is not among them: the forwarder frames the body itself.
    """
    drop = _NOT_FORWARDED_UP_LOWER
    if "Connection" in incoming:
        drop = drop | connection_listed(incoming.getall("Connection"))
    out = []
    for name, value in incoming.items():
        lowered = name.lower()
        if lowered in drop:
            continue
        if lowered in _REINTERPRETING or ("_" in lowered and _folds_to_special(lowered)):
            raise BadRequest(f"the header {name[:64]} is not forwarded: a server behind "
                             "bol's edge could read it as another path, method or framing")
        out.append((name, value))
    # One scan of everything that goes out (a tab, allowed in values, separates them).
    if _UNWRITABLE.search("\t".join(chain.from_iterable(out))):
        raise BadRequest("a request header holds bytes that are not UTF-8 and cannot be "
                         "forwarded unchanged")
    out.append(("Authorization", "Bearer " + bearer))
    return out


def _folds_to_special(lowered: str) -> bool:
    """``Transfer_Encoding`` and the like: CGI-style servers fold "_" into "-"."""
    return lowered.replace("_", "-") in _FOLDED_SPECIAL


def client_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """What goes back to the tool: bol's headers, names spelled as bol spelled them
    (aiohttp's parsed view re-cases the names it knows), minus the hop-by-hop ones.

    A header that cannot be passed on unchanged makes the answer a protocol failure
    (:class:`UpstreamUnreachable`, 502) rather than a silently altered one.
    """
    fields = [_field(*pair) for pair in raw]
    drop = _HOP_BY_HOP_LOWER
    if any(lowered == "connection" for _, _, lowered in fields):
        drop = drop | connection_listed(value for _, value, lowered in fields
                                        if lowered == "connection")
    # A plain list: aiohttp copies the headers of a response into a multidict anyway.
    return [(name, value) for name, value, lowered in fields if lowered not in drop]


@lru_cache(maxsize=2048)
def _field(raw_name: bytes, raw_value: bytes) -> tuple[str, str, str]:
    """One header of bol's, checked and decoded: (name, value, lowercased name). An
    answer repeats most of its predecessor's headers, so they are remembered."""
    if _CONTROL_BYTES.search(raw_name) or _CONTROL_BYTES.search(raw_value):
        raise UpstreamUnreachable("the upstream sent a header with control bytes, which "
                                  "cannot be passed on unchanged")
    try:
        name, value = raw_name.decode(), raw_value.decode()  # strict UTF-8
    except UnicodeDecodeError:
        raise UpstreamUnreachable("the upstream sent a header that is not UTF-8, which "
                                  "cannot be passed on unchanged") from None
    return name, value, name.lower()
