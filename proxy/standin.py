"""The stand-in token endpoint: tools that insist on logging in, log in at the proxy.

Most bol client libraries fetch a token from ``login.bol.com/token`` before their first
API call, and many cannot be told not to. So ``POST /token`` on every listener answers
that call itself, shaped like bol's token endpoint: a tool changes its login URL and its
API URL to the proxy, and nothing else.

* Client authentication as bol accepts it: HTTP Basic, or the form fields
  ``client_id``/``client_secret``; the grant (``client_credentials`` or
  ``refresh_token``) in the form body or, as older libraries send it, in the query
  string. The client id names the credential set: a set's name, or the bol client id a
  set is configured with. On a set's dedicated port (or under its path prefix,
  ``/acme/token``) it may only name that set.
* The secret the tool sends is not checked, and never logged, kept or forwarded: the
  proxy authenticates nobody (whoever reaches it can spend its credentials anyway).
* The answer carries a *stand-in* token: an unsigned JWT (``alg: none``) whose subject is
  the set's name, so that libraries which read a token's ``exp`` can. It is no bol token
  and works nowhere but here: a request that carries it as ``Authorization: Bearer``
  uses its set, and the proxy replaces it with the set's real token, as it replaces any
  other ``Authorization``. Its expiry means nothing to the proxy.
* A login never causes a call to bol: the set's cached token does the work.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs

from aiohttp import web
from multidict import istr

from .access import AccessRecord
from .bodies import request_body
from .config import Config, CredentialSet
from .errors import BadRequest, MethodNotAllowed, ProxyError, problem_response
from .metrics import Metrics
from .server import Connection

ISSUER = "bol-proxy"
MAX_STANDIN = 2048  # characters; a real one has a few hundred
MAX_LOGIN_BODY = 16 * 1024  # a token request is a short form; anything larger is not one
# bol's own lifetimes and scopes, so that tools see the answer they know.
_LIFETIMES = {"client_credentials": (299, "RETAILER"), "refresh_token": (599, "offline_access")}
_AUTHORIZATION = istr("Authorization")


def _b64(data: dict[str, object]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# Every stand-in starts with this header: telling one apart is a prefix check.
_HEADER = _b64({"alg": "none", "typ": "JWT"}) + "."


class LoginRefused(Exception):
    """A login the stand-in refuses, as an OAuth error answer (RFC 6749 §5.2)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description

    def response(self) -> web.Response:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="bol-proxy"'
        return web.json_response({"error": self.error, "error_description": self.description},
                                 status=self.status, headers=headers)


def _invalid(description: str) -> LoginRefused:
    return LoginRefused(400, "invalid_request", description)


@dataclass(frozen=True, slots=True)
class Login:
    """What a tool's token request asked for; its secret is not kept."""

    client_id: str
    grant: str


def read_login(authorization: str | None, query: str, body: bytes,
               content_type: str | None) -> Login:
    """The client id and grant of one token request (pure), or :class:`LoginRefused`."""
    if body and content_type is not None and not content_type.lower().startswith(
            "application/x-www-form-urlencoded"):
        raise _invalid("the token request's body must be a form "
                       "(application/x-www-form-urlencoded)")
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True) if body else {}
        params = parse_qs(query, keep_blank_values=True)
    except UnicodeDecodeError:
        raise _invalid("the token request's body is not UTF-8") from None
    ids = set(form.get("client_id", []))
    basic = _basic_client_id(authorization)
    if basic is not None:
        ids.add(basic)
    if len(ids) > 1:
        raise _invalid("the request names two different client ids")
    if not ids or not next(iter(ids)):
        raise LoginRefused(401, "invalid_client", "no client id: send it with HTTP Basic "
                           "or as the form field client_id")
    grants = set(form.get("grant_type", []) + params.get("grant_type", []))
    if len(grants) > 1:
        raise _invalid("the request names two different grant types")
    if not grants:
        raise _invalid("grant_type is missing")
    grant = grants.pop()
    if grant == "authorization_code":
        raise LoginRefused(400, "unsupported_grant_type", "the proxy does not connect "
                           "sellers by itself: run bol-proxy authorize SET")
    if grant not in _LIFETIMES:
        raise LoginRefused(400, "unsupported_grant_type",
                           f"grant_type {grant[:40]!r} is not supported")
    return Login(ids.pop(), grant)


def _basic_client_id(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _invalid("the Basic authorization is not base64 of client_id:secret") from None
    client_id, _, _secret = decoded.partition(":")  # the secret goes no further
    return client_id


def choose_set(client_id: str, sets: Mapping[str, CredentialSet], only: str | None) -> str:
    """The set a client id names: a set's name, else the one set with that bol client
    id. ``only`` is the set the listener or path prefix already stands for."""
    if client_id in sets:
        name = client_id
    else:
        named = [cred.name for cred in sets.values() if cred.client_id == client_id]
        if not named:
            raise LoginRefused(401, "invalid_client", "no credential set has this client id: "
                               "log in with a set's name or its bol client id")
        if only is not None and only in named:
            named = [only]  # the port or the prefix already says which of them
        if len(named) > 1:
            raise _invalid(f"this client id belongs to {len(named)} sets "
                           f"({', '.join(sorted(named)[:5])}): log in with the set's name")
        name = named[0]
    if only is not None and name != only:
        raise LoginRefused(401, "invalid_client", f"this login is for set '{only}' only")
    return name


def issue(set_name: str, grant: str, now: float) -> dict[str, object]:
    """The token answer for ``set_name``, shaped like bol's."""
    lifetime, scope = _LIFETIMES[grant]
    claims = {"iss": ISSUER, "sub": set_name, "iat": math.floor(now),
              "exp": math.floor(now) + lifetime, "jti": secrets.token_urlsafe(9)}
    answer: dict[str, object] = {
        "access_token": _HEADER + _b64(claims) + ".",
        "token_type": "Bearer", "expires_in": lifetime, "scope": scope,
    }
    if grant == "refresh_token":
        # Libraries of partners keep whatever refresh token comes back and send it next
        # time; a stand-in of its own keeps the tool's real one out of the exchange.
        answer["refresh_token"] = _HEADER + _b64({**claims, "typ": "refresh"}) + "."
    return answer


def set_named(authorizations: Sequence[str]) -> str | None:
    """The set the stand-in tokens among a request's ``Authorization`` values name, or
    None when there is none. The scheme is case-insensitive (RFC 9110 §11.1) and every
    value counts: a stand-in must never be missed and the request sent with the default
    set's token instead. Two stand-ins naming different sets, or a value shaped like a
    stand-in that does not read as one, are :class:`BadRequest`."""
    named = None
    for value in authorizations:
        scheme, _, credentials = value.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials.startswith(_HEADER):
            continue  # any other Authorization: replaced, as always
        subject = (_subject(credentials[len(_HEADER):])
                   if len(credentials) <= MAX_STANDIN else None)
        if subject is None:
            raise BadRequest("the Authorization holds a stand-in token of the proxy that "
                             "does not read as one: log in again")
        if named is not None and subject != named:
            raise BadRequest("two stand-in tokens name different credential sets")
        named = subject
    return named


@functools.lru_cache(maxsize=1024)
def _subject(rest: str) -> str | None:
    payload, dot, _ = rest.partition(".")
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    if not dot or not isinstance(claims, dict) or claims.get("iss") != ISSUER:
        return None
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else None


def is_login_path(raw_target: str, sets: Collection[str]) -> bool:
    """``/token``, or ``/<set>/token`` under a set's path prefix (query aside)."""
    if "/token" not in raw_target:
        return False
    path = raw_target.partition("?")[0]
    if path == "/token":
        return True
    first, _, rest = path[1:].partition("/")
    return rest == "token" and first in sets


class StandIn:
    """Answers tools' logins for the configuration in force."""

    def __init__(self, config: Config, metrics: Metrics, admits: Callable[[object], bool],
                 roles: Callable[[], Mapping[int, str]], wall: Callable[[], float]) -> None:
        self.config = config
        self._metrics = metrics
        self._admits = admits
        self._roles = roles
        self._wall = wall

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        record = AccessRecord(request)
        response: web.StreamResponse | None = None
        try:
            response = await self._answer(request, record)
            return response
        finally:
            record.settle(response)
            if isinstance(response, web.Response):
                record.bytes = response.content_length or 0
            record.write(self._metrics)

    async def _answer(self, request: web.BaseRequest, record: AccessRecord
                      ) -> web.StreamResponse:
        conn = request.protocol
        try:
            if not self._admits(conn):
                raise LoginRefused(503, "temporarily_unavailable", "this connection's "
                                   "listener was closed or changed by a reload; reconnect")
            if request.method != "POST":
                response = problem_response(MethodNotAllowed("the token endpoint takes POST"))
                response.headers["Allow"] = "POST"
                return response
            config = self.config
            body = await request_body(request, MAX_LOGIN_BODY, MAX_LOGIN_BODY,
                                      config.upstream.timeout)
            login = read_login(request.headers.get(_AUTHORIZATION), request.query_string,
                               body.data or b"", request.headers.get("Content-Type"))
            port = conn.port if isinstance(conn, Connection) else None
            only = self._roles().get(port) if port is not None else None
            prefix = request.raw_path.partition("?")[0][1:-len("/token")] or None
            if only and prefix and prefix != only:
                raise _invalid(f"this port is set '{only}''s, the path names '{prefix}'")
            name = choose_set(login.client_id, config.credentials, only or prefix)
        except LoginRefused as refused:
            record.error = refused.error
            if refused.status == 503:
                response = refused.response()
                response.force_close()
                return response
            return refused.response()
        except ProxyError as exc:
            record.error = exc.code
            response = problem_response(exc)
            response.force_close()  # the rest of a refused body is not wanted
            return response
        record.set_name = name
        return web.json_response(issue(name, login.grant, self._wall()),
                                 headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
