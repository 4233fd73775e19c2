"""A fast imitation of login.bol.com and api.bol.com, run as its own process.

``python -m tests.benchmarks.upstream [--expires-in N] [--verify-tokens]`` listens on
127.0.0.1 on a free port and prints that port on its first stdout line. Endpoints:

* ``POST /token``: any Basic-authenticated client gets
  ``{"access_token", "token_type": "Bearer", "expires_in": N}``; requests are counted per
  client id.
* ``GET /_count[?prefix=P]``: ``{"total", "clients", "by_client", "api_rejected"}``, the
  token requests so far (``by_client`` only for client ids starting with ``P``, and only
  when ``prefix`` is given).
* ``GET /retailer/orders``: a prebuilt ~90-byte JSON body with ``X-RateLimit-*`` headers
  of a budget too large to matter. Nothing else happens per request, so measured
  directly this endpoint is the bare aiohttp server: the framework's own per-hop cost.
* ``GET /retailer/metered``: with ``--metered LIMIT/SECONDS``, bol's enforcement of a
  budget: LIMIT requests per client id in fixed windows of SECONDS, the state in
  ``X-RateLimit-*``, 429 with ``Retry-After`` once spent; ``/_count`` then also gives
  ``served`` and ``refused``.
* ``GET /retailer/stream?size=BYTES``: that many bytes, in 64 KiB chunks.
* ``POST /retailer/upload``: reads and discards the body, answers ``{"bytes": n}``.

With ``--verify-tokens`` every API request must carry a token issued here that has not
expired (else 401, counted as ``api_rejected``); the throughput baseline runs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import math
import signal
import sys
import time
from collections import Counter
from itertools import count

from aiohttp import web
from aiohttp.typedefs import Handler

ORDERS_BODY = json.dumps(
    {"orders": [{"orderId": "1043946570", "orderPlacedDateTime": "2026-11-27T10:12:31+01:00"}]},
    separators=(",", ":"),
).encode()
ORDERS_HEADERS = {  # a budget the measurements never spend: the proxy's count stays out
    "Content-Type": "application/vnd.retailer.v10+json",
    "X-RateLimit-Limit": "1000000",
    "X-RateLimit-Remaining": "999999",
    "X-RateLimit-Reset": "1",
}
CHUNK = b"\x5a" * (64 * 1024)
MAX_STREAM = 64 * 1024**3  # a bound on ?size=, so a typo cannot stream forever


class Upstream:
    """The imitation's state: issued tokens and how many each client asked for."""

    def __init__(self, expires_in: int, verify_tokens: bool,
                 metered: tuple[int, float] = (0, 1.0)) -> None:
        self.expires_in = expires_in
        self.verify_tokens = verify_tokens
        self.limit, self.window = metered
        self.windows: dict[str, tuple[float, int]] = {}  # client -> (window end, used)
        self.served = self.refused = 0
        self.token_requests: Counter[str] = Counter()
        self.issued: dict[str, float] = {}  # token -> monotonic expiry (verify mode only)
        self.api_rejected = 0
        self._serial = count(1)

    def app(self) -> web.Application:
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_post("/token", self.token)
        app.router.add_get("/_count", self.counts)
        orders = self.verified(self.orders) if self.verify_tokens else self.orders
        app.router.add_get("/retailer/orders", orders)
        app.router.add_get("/retailer/metered", self.metered)
        app.router.add_get("/retailer/stream", self.stream)
        app.router.add_post("/retailer/upload", self.upload)
        return app

    async def token(self, request: web.Request) -> web.Response:
        await request.read()
        self.token_requests[_client_id(request.headers.get("Authorization", ""))] += 1
        token = f"bench.{next(self._serial)}"
        if self.verify_tokens:
            self.issued[token] = time.monotonic() + self.expires_in
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.expires_in})

    async def counts(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix")
        by_client = ({c: n for c, n in self.token_requests.items() if c.startswith(prefix)}
                     if prefix is not None else {})
        return web.json_response({
            "total": self.token_requests.total(),
            "clients": len(self.token_requests),
            "by_client": by_client,
            "api_rejected": self.api_rejected,
            "served": self.served,
            "refused": self.refused,
        })

    async def metered(self, request: web.Request) -> web.Response:
        client = request.headers.get("Authorization", "")
        now = time.monotonic()
        end, used = self.windows.get(client, (0.0, 0))
        if now >= end:
            end, used = now + self.window, 0
        left = max(1, math.ceil(end - now))
        if used >= self.limit:
            self.refused += 1
            return web.Response(status=429, body=b'{"title":"Too Many Requests","status":429}',
                                headers={"Content-Type": "application/vnd.retailer.v10+json",
                                         "Retry-After": str(left),
                                         "X-RateLimit-Limit": str(self.limit),
                                         "X-RateLimit-Remaining": "0",
                                         "X-RateLimit-Reset": str(left)})
        self.windows[client] = (end, used + 1)
        self.served += 1
        return web.Response(body=ORDERS_BODY, headers={
            "Content-Type": "application/vnd.retailer.v10+json",
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.limit - used - 1),
            "X-RateLimit-Reset": str(left)})

    @staticmethod
    async def orders(request: web.Request) -> web.Response:
        return web.Response(body=ORDERS_BODY, headers=ORDERS_HEADERS)

    def verified(self, handler: Handler) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            auth = request.headers.get("Authorization", "")
            expiry = self.issued.get(auth[7:]) if auth.startswith("Bearer ") else None
            if expiry is None or expiry <= time.monotonic():
                self.api_rejected += 1
                return web.json_response({"title": "Expired JWT", "status": 401}, status=401)
            return await handler(request)

        return check

    @staticmethod
    async def stream(request: web.Request) -> web.StreamResponse:
        try:
            size = int(request.query.get("size", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="size must be a whole number") from None
        if not 0 <= size <= MAX_STREAM:
            raise web.HTTPBadRequest(text=f"size must be between 0 and {MAX_STREAM}")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        whole, rest = divmod(size, len(CHUNK))
        for _ in range(whole):
            await response.write(CHUNK)
        if rest:
            await response.write(CHUNK[:rest])
        await response.write_eof()
        return response

    @staticmethod
    async def upload(request: web.Request) -> web.Response:
        received = 0
        while chunk := await request.content.readany():
            received += len(chunk)
        return web.json_response({"bytes": received})


def _client_id(authorization: str) -> str:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return "-"
    try:
        return base64.b64decode(value).decode().partition(":")[0] or "-"
    except (binascii.Error, UnicodeDecodeError):
        return "-"


async def serve(expires_in: int, verify_tokens: bool, metered: tuple[int, float]) -> None:
    await serve_until_signalled(web.AppRunner(
        Upstream(expires_in, verify_tokens, metered).app(), access_log=None,
        handler_cancellation=True, keepalive_timeout=75.0))


async def serve_until_signalled(runner: web.BaseRunner, port: int = 0) -> None:
    """Serve ``runner`` on 127.0.0.1, print the bound port on stdout (the harness reads
    it), and run until SIGTERM or SIGINT."""
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    server = site._server
    assert server is not None and hasattr(server, "sockets")
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--expires-in", type=int, default=3600,
                        help="lifetime of the tokens handed out, seconds (default 3600)")
    parser.add_argument("--verify-tokens", action="store_true",
                        help="answer 401 to API requests without a valid token of ours")
    parser.add_argument("--metered", default="0/1", metavar="LIMIT/SECONDS",
                        help="budget of /retailer/metered per client id (default 0/1)")
    args = parser.parse_args()
    limit, _, seconds = args.metered.partition("/")
    asyncio.run(serve(args.expires_in, args.verify_tokens, (int(limit), float(seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
