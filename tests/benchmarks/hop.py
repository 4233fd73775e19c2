"""The minimal aiohttp hop: the floor under bol-proxy's own latency, run as its own process.

``python -m tests.benchmarks.hop UPSTREAM_URL [PORT]`` listens on 127.0.0.1 on PORT (by
default a free one) and prints that port on its first stdout line. It is built from the
same parts as bol-proxy, aiohttp's low-level server (on uvloop when installed) and
:mod:`proxy.upstream`'s client, but does nothing else: no routing rules, tokens, header
rules, logs or metrics, and only bodiless requests with small answers, which is all the
latency phase sends. Measured beside the proxy, it splits the added latency into what
any aiohttp hop costs on this machine and what bol-proxy adds to it.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from proxy.__main__ import loop_factory
from proxy.upstream import UpstreamPool, request_head

from .upstream import serve_until_signalled


async def serve(upstream: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(upstream, None, connect_timeout=10.0)

    async def relay(request: web.BaseRequest) -> web.Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
        head = request_head(request.method, request.raw_path, pool.host_header, headers, "")
        answer = await pool.request(head, None, head_only=False, chunked=False,
                                    idempotent=True, deadline=loop.time() + 30.0)
        body = await answer.read()
        answer.release()
        return web.Response(status=answer.status, reason=answer.reason, body=body,
                            headers=[(k.decode(), v.decode()) for k, v in answer.raw_headers
                                     if k.lower() != b"content-length"])

    try:
        await serve_until_signalled(
            web.ServerRunner(web.Server(relay, access_log=None, keepalive_timeout=75.0)), port)
    finally:
        await pool.close()


def main() -> int:
    if not 2 <= len(sys.argv) <= 3:
        print(__doc__, file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
