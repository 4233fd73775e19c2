"""``bol-proxy demo``: an imitation of login.bol.com and api.bol.com, with the proxy in front.

:class:`FakeBol` behaves like bol where the proxy cares: Basic-authenticated form grants
(client credentials, refresh token with optional rotation, authorisation code),
short-lived tokens that the API checks (401 "Expired JWT" otherwise), per-client
rate-limit headers, bol-shaped JSON and problems. It records what it saw, so the test
suite uses it as its imitation of bol too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger("proxy")

V10 = "application/vnd.retailer.v10+json"
DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret-not-a-real-one"

ORDER = {
    "orderId": "1043946570",
    "orderPlacedDateTime": "2026-11-27T10:12:31+01:00",
    "orderItems": [{
        "orderItemId": "2012345678", "ean": "8712626055143", "fulfilmentMethod": "FBR",
        "fulfilmentStatus": "OPEN", "quantity": 1, "quantityShipped": 0, "quantityCancelled": 0,
    }],
}
OFFER = {
    "offerId": "13722de8-8182-d161-5422-4a0a1caab5c8", "ean": "8712626055143",
    "reference": "REF-12345", "onHoldByRetailer": False,
    "pricing": {"bundlePrices": [{"quantity": 1, "unitPrice": 9.99}]},
    "stock": {"amount": 6, "correctedStock": 5, "managedByRetailer": False},
    "fulfilment": {"method": "FBR", "deliveryCode": "24uurs-23"},
    "condition": {"name": "NEW"},
}


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
    _budget: dict[tuple[str, str], int] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app

    # -- login.bol.com

    async def token(self, request: web.Request) -> web.Response:
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
        path = request.path.split("/")
        if len(path) > 1 and path[1].endswith("-demo"):
            path[1] = path[1][: -len("-demo")]
        route = "/".join(path)
        headers = self._rate_limit(known[0], route)
        if route == "/retailer/orders":
            return self._json({"orders": [ORDER]}, headers)
        if route.startswith("/retailer/orders/"):
            return self._json({**ORDER, "orderId": path[-1]}, headers)
        if route.startswith("/retailer/offers/"):
            return self._json({**OFFER, "offerId": path[-1]}, headers)
        if route.startswith("/shared/process-status/"):
            return self._json({"processStatusId": path[-1], "eventType": "CREATE_OFFER",
                               "description": "Create offer.", "status": "SUCCESS",
                               "createTimestamp": "2026-11-27T10:12:31+01:00"}, headers)
        return self._problem(404, "Not Found", f"No endpoint {request.path}")

    def _rate_limit(self, client: str, route: str) -> dict[str, str]:
        left = self._budget.get((client, route), 25) - 1
        self._budget[(client, route)] = max(left, 0) if left >= 0 else 25
        return {"X-RateLimit-Limit": "25", "X-RateLimit-Remaining": str(max(left, 0)),
                "X-RateLimit-Reset": "60"}

    @staticmethod
    def _json(data: object, headers: dict[str, str]) -> web.Response:
        return web.Response(body=json.dumps(data).encode(), headers={**headers,
                            "Content-Type": V10})

    @staticmethod
    def _problem(status: int, title: str, detail: str) -> web.Response:
        body = {"type": "https://api.bol.com/problems", "title": title, "status": status,
                "detail": detail}
        return web.Response(status=status, body=json.dumps(body).encode(),
                            headers={"Content-Type": V10})


async def start_fake(fake: FakeBol, host: str = "127.0.0.1", port: int = 0) -> tuple[
        web.AppRunner, str]:
    """Serve ``fake`` and return its runner and base URL."""
    runner = web.AppRunner(fake.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"


def demo_config(base_url: str, port: int) -> dict[str, Any]:
    """The proxy configuration that points at the imitation."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"api_url": base_url, "token_url": base_url + "/token"},
        "credentials": {"demo": {"client_id": DEMO_CLIENT_ID,
                                 "client_secret": DEMO_CLIENT_SECRET}},
    }


def run_demo(port: int) -> int:
    """Run the imitation and the proxy until interrupted."""
    from .app import ProxyServer
    from .config import validate
    from .errors import StartupError

    async def main() -> int:
        fake = FakeBol(ttl=60)
        runner, base = await start_fake(fake)
        server = ProxyServer(validate(demo_config(base, port), source="demo"))
        try:
            await server.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(f"cannot listen on 127.0.0.1:{port}: "
                               f"{exc.strerror or exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, log.info,
                                "SIGHUP: the demo has no configuration file to reload")
        p = server.port()
        print(f"bol-proxy demo: imitation of bol.com at {base}, proxy at http://127.0.0.1:{p}")
        print("Try:\n")
        print(f"  curl -s -H 'Accept: {V10}' http://127.0.0.1:{p}/retailer/orders\n")
        print("Tokens live 60 s and renew in the background; Ctrl-C stops.", flush=True)
        await stop.wait()
        await server.stop()
        await runner.cleanup()
        return 0

    return asyncio.run(main())
