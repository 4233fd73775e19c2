"""A real ``redis-server`` for the tests: own port, own folder, append-only file on.

Each test that needs Redis starts one on a free port of 127.0.0.1 with a temporary
directory and kills it afterwards; nothing is left running, and no system service is
used. It can be frozen (SIGSTOP), resumed (SIGCONT), killed and started again from its
append-only file.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
from pathlib import Path

import redis.asyncio as redis

from tests.conftest import free_port

START_WITHIN = 10.0  # seconds for redis-server to answer PING after it was started


class RedisServer:
    """One redis-server process and its data folder."""

    def __init__(self, folder: Path, *options: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain client for the test's own look at the data."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    async def start(self) -> None:
        """Start it and wait (bounded) until it answers PING."""
        self._spawn()
        client = self.client()
        try:
            async with asyncio.timeout(START_WITHIN):
                while True:
                    with contextlib.suppress(redis.ConnectionError, OSError):
                        if await client.ping():
                            return
                    await asyncio.sleep(0.02)  # startup has no event to wait on
        finally:
            await client.aclose()

    def _spawn(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.folder), "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.folder / "redis.log"), "--daemonize", "no",
            *self.options,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the append-only file holds survives."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)  # a frozen one must still die
            self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    async def restart(self) -> None:
        """Killed, then started again on the same port from the same folder."""
        self.kill()
        await self.start()
