"""The imitation of login.bol.com and api.bol.com in one aiohttp application.

:class:`FakeBol` behaves like bol where the proxy and the tools care: Basic-authenticated
form grants (client credentials, refresh token with optional rotation, authorisation
code), short-lived tokens that the API checks (401 "Expired JWT" otherwise), then the
Retailer API itself (see ``gateway``): bol's resources with their methods, budgets and
checks, on one run's shop. It records what it saw, so the test suite uses it as its
imitation of bol too.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from multidict import CIMultiDict

from .answers import Answer, Problem
from .gateway import Gateway, Incoming
from .limits import Endpoint, Limit

DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret-not-a-real-one"


@dataclass
class Seen:
    """One request as the imitation received it."""

    method: str
    target: str  # raw path and query
    headers: CIMultiDict[str]
    body: bytes
    client_id: str | None = None


@dataclass
class FakeBol:
    """login.bol.com and api.bol.com in one aiohttp app, for the demo and the tests."""

    clients: dict[str, str] = field(default_factory=lambda: {DEMO_CLIENT_ID: DEMO_CLIENT_SECRET})
    ttl: int = 299
    rotate_refresh_tokens: bool = False
    token_mode: str = "ok"  # ok | error500 | html | invalid_client | slow
    token_requests: list[Seen] = field(default_factory=list)
    api_requests: list[Seen] = field(default_factory=list)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (client, exp)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> client
    codes: dict[str, str] = field(default_factory=dict)  # authorisation code -> client
    expired_seen: int = 0
    extra: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=dict)
    clock: Callable[[], float] = time.time
    # Budgets per endpoint that replace bol's defaults, e.g. {("GET", "/retailer/orders"):
    # (10, 3.0)} for 10 order lists per 3 seconds; ("*", "*") is every other endpoint.
    limits: dict[Endpoint, Limit] = field(default_factory=dict)
    gateway: Gateway = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.gateway = Gateway(self.limits)

    def app(self) -> web.Application:
        """The application: ``POST /token`` as login.bol.com, everything else as the API."""
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app

    # -- login.bol.com

    async def token(self, request: web.Request) -> web.Response:
        """login.bol.com's token endpoint: client credentials, refresh token, code."""
        body = await request.read()
        client = self._client(request.headers.get("Authorization", ""))
        self.token_requests.append(Seen(request.method, request.raw_path,
                                        CIMultiDict(request.headers), body, client))
        if self.token_mode == "error500":
            return web.Response(status=500, text="upstream trouble")
        if self.token_mode == "html":
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        if self.token_mode == "slow":
            await asyncio.sleep(3600)
        if client is None or self.token_mode == "invalid_client":
            return web.json_response({"error": "invalid_client",
                                      "error_description": "Bad client credentials"}, status=401)
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        grant = form.get("grant_type")
        answer: dict[str, Any] = {}
        if grant == "client_credentials":
            answer["scope"] = "RETAILER"
        elif grant == "refresh_token":
            if self.refresh_tokens.get(form.get("refresh_token", "")) != client:
                return web.json_response({"error": "invalid_grant"}, status=400)
            if self.rotate_refresh_tokens:
                del self.refresh_tokens[form["refresh_token"]]
                answer["refresh_token"] = self.new_refresh_token(client)
            answer["scope"] = "offline_access"
        elif grant == "authorization_code":
            if self.codes.pop(form.get("code", ""), None) != client:
                return web.json_response({"error": "invalid_grant"}, status=400)
            answer["refresh_token"] = self.new_refresh_token(client)
            answer["scope"] = "offline_access"
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = "demo." + secrets.token_urlsafe(24)
        self.tokens[token] = (client, self.clock() + self.ttl + 1)  # exp - iat = ttl + 1
        answer.update(access_token=token, token_type="Bearer", expires_in=self.ttl)
        return web.json_response(answer)

    def _client(self, authorization: str) -> str | None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            client_id, _, secret = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        return client_id if self.clients.get(client_id) == secret else None

    def new_refresh_token(self, client: str) -> str:
        token = "rt." + secrets.token_urlsafe(24)
        self.refresh_tokens[token] = client
        return token

    def new_code(self, client: str) -> str:
        code = secrets.token_urlsafe(12)
        self.codes[code] = client
        return code

    def revoke_all(self) -> None:
        self.tokens.clear()

    # -- api.bol.com

    async def api(self, request: web.Request) -> web.StreamResponse:
        """api.bol.com: the token is checked, then the gateway answers (or ``extra``)."""
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        known = self.tokens.get(token)
        body = b"" if request.path in self.extra else await request.read()
        seen = Seen(request.method, request.raw_path, CIMultiDict(request.headers), body,
                    known[0] if known else None)
        self.api_requests.append(seen)
        if known is None or known[1] <= self.clock():
            self.expired_seen += known is not None
            return self._problem(401, "Expired JWT", "JWT expired. Allowed clock skew: "
                                 "1000 milliseconds.")
        handler = self.extra.get(request.path)
        if handler is not None:
            return await handler(request)
        return self._response(self.gateway.handle(Incoming(
            request.method, request.path, request.query, request.headers, body, known[0],
            self.clock(), f"{request.scheme}://{request.host}")))

    @staticmethod
    def _response(answer: Answer) -> web.Response:
        return web.Response(status=answer.status, body=answer.body,
                            headers={**answer.headers, "Content-Type": answer.content_type})

    def _problem(self, status: int, title: str, detail: str) -> web.Response:
        return self._response(Problem(status, title, detail).answer())
