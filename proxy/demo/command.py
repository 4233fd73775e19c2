"""``bol-proxy demo``: the imitation of bol on a port of its own, and the proxy in front.

The imitation listens on ``--bol-port`` (any free port by default), so that a
configuration file of one's own can point at a running demo; the proxy listens on
``--port``. What is printed is meant to be pasted: a ``curl`` line, a snippet for the
python-bol-api-latest client library (which logs in itself, at the proxy's stand-in token
endpoint), and the upstream settings of the imitation.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from proxy.app import ProxyServer
from proxy.config import validate
from proxy.errors import ConfigError, StartupError
from proxy.listeners import bind_failure

from .answers import V10
from .fake import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, FakeBol

log = logging.getLogger("proxy")
DEMO_SET = "demo"
TOKEN_LIFETIME = 60  # seconds: short, so that renewals show within a minute


async def start_fake(fake: FakeBol, host: str = "127.0.0.1", port: int = 0) -> tuple[
        web.AppRunner, str]:
    """Serve ``fake`` and return its runner and base URL."""
    runner = web.AppRunner(fake.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, f"http://{host}:{runner.addresses[0][1]}"


def demo_config(base_url: str, port: int) -> dict[str, Any]:
    """The proxy configuration that points at the imitation."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"api_url": base_url, "token_url": base_url + "/token"},
        "credentials": {DEMO_SET: {"client_id": DEMO_CLIENT_ID,
                                   "client_secret": DEMO_CLIENT_SECRET}},
    }


def instructions(proxy: str, bol: str) -> str:
    """What the demo prints once both listen: things to paste, each ending its line."""
    return f"""\
bol-proxy demo: imitation of bol.com at {bol}, proxy at {proxy}
Try:

  curl -s -w '\\n' -H 'Accept: {V10}' {proxy}/retailer/orders

With python-bol-api-latest (pip install python-bol-api-latest); it logs in at the proxy,
which answers for bol, so the credentials are made up:

  from bol.retailer.api import RetailerAPI
  api = RetailerAPI(api_url="{proxy}", login_url="{proxy}")
  api.login(client_id="{DEMO_SET}", client_secret="made-up")
  print([order.orderId for order in api.orders.list()])

A configuration of your own can use the imitation while the demo runs:

  upstream: {{api_url: "{bol}", token_url: "{bol}/token"}}
  credentials:
    demo: {{client_id: {DEMO_CLIENT_ID}, client_secret: {DEMO_CLIENT_SECRET}}}

Tokens live {TOKEN_LIFETIME} s and renew in the background; Ctrl-C stops.
"""


def run_demo(port: int, bol_port: int = 0) -> int:
    """Run the imitation and the proxy until interrupted."""
    for option, value in (("--port", port), ("--bol-port", bol_port)):
        if not 0 <= value <= 65535:
            raise ConfigError(f"{option}: must be between 0 and 65535, got {value}")

    async def main() -> int:
        fake = FakeBol(ttl=TOKEN_LIFETIME)
        try:
            runner, base = await start_fake(fake, port=bol_port)
        except OSError as exc:
            raise StartupError(f"--bol-port: cannot listen on 127.0.0.1:{bol_port}: "
                               f"{bind_failure(exc)}") from None
        server = ProxyServer(validate(demo_config(base, port), source="demo"))
        try:
            await server.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(f"--port: cannot listen on 127.0.0.1:{port}: "
                               f"{bind_failure(exc)}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, log.info,
                                "SIGHUP: the demo has no configuration file to reload")
        print(instructions(f"http://127.0.0.1:{server.port()}", base), end="", flush=True)
        await stop.wait()
        await server.stop()
        await runner.cleanup()
        return 0

    return asyncio.run(main())
