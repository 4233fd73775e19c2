"""The running proxy as a whole: start and stop in any order, its listeners, its aiohttp."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import socket

import aiohttp
import pytest
from aiohttp import web
from packaging.requirements import Requirement

from proxy.app import ProxyServer
from proxy.config import changes, validate
from proxy.demo import FakeBol
from proxy.errors import StartupError
from proxy.listeners import CannotListen
from proxy.server import AIOHTTP_INTERNALS, check_aiohttp
from tests.conftest import StartProxy, base_config, free_port


async def test_stop_before_start_is_harmless(bol: tuple[FakeBol, str]) -> None:
    _, url = bol
    server = ProxyServer(validate(base_config(url)))
    await server.stop()
    await server.stop()


async def test_stop_after_a_failed_start_closes_what_was_opened(
    bol: tuple[FakeBol, str],
) -> None:
    fake, url = bol
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = ProxyServer(validate(base_config(url, listen={"port":
                                                                taken.getsockname()[1]})))
        with pytest.raises(CannotListen):
            await server.start()
    await server.stop()
    assert fake.token_requests == []  # a proxy that cannot start spends no token


async def test_a_set_port_in_use_names_the_port_and_the_set(bol: tuple[FakeBol, str]) -> None:
    _, url = bol
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raw = base_config(url)
        raw["credentials"]["setb"]["port"] = port
        server = ProxyServer(validate(raw))
        with pytest.raises(CannotListen, match=rf"127\.0\.0\.1:{port} \(the dedicated port of "
                                            r"set 'setb'\): Address already in use"):
            await server.start()
    await server.stop()


async def test_every_listener_is_named_main_first(
    bol: tuple[FakeBol, str], start_proxy: StartProxy,
) -> None:
    _, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["port"] = free_port()
    server = await start_proxy(raw)
    assert server.listeners.addresses() == [
        f"http://127.0.0.1:{server.port()} (main)",
        f"http://127.0.0.1:{server.port('setb')} (set setb)",
    ]


async def test_a_reload_logs_what_changed(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = bol
    raw = base_config(url)
    server = await start_proxy(raw)
    raw["credentials"]["setc"] = dict(raw["credentials"].pop("setb"))
    raw["credentials"]["setc"]["port"] = port = free_port()
    raw["credentials"]["seta"]["prefetch"] = False
    caplog.set_level(logging.INFO, logger="proxy")
    await server.reload(validate(raw))
    line = next(r.getMessage() for r in caplog.records if "reloaded" in r.getMessage())
    assert "1 set added (setc); 1 set removed (setb); 1 set changed (seta)" in line
    assert f"1 listener opened (port {port})" in line
    assert f"(main), http://127.0.0.1:{port} (set setc)" in line


def test_changes_name_listeners_closed_and_other_settings() -> None:
    old = validate(base_config("http://127.0.0.1:1"))
    new = validate(base_config("http://127.0.0.1:2", shutdown_timeout=5))
    assert changes(old, new, closed=[8081, 8082]) == [
        "2 listeners closed (ports 8081, 8082)", "upstream settings changed",
        "shutdown_timeout changed"]
    assert changes(old, old) == ["nothing changed"]


async def test_a_reload_moves_new_requests_to_a_new_api_url_and_finishes_old_ones(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    first, url = bol
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        entered.set()
        await release.wait()
        return web.Response(text="from the first")

    first.extra["/retailer/slow"] = slow
    second = FakeBol(clients=first.clients, tokens=first.tokens)  # one login for both
    runner = web.AppRunner(second.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        raw = base_config(url)
        server = await start_proxy(raw)
        base = f"http://127.0.0.1:{server.port()}"
        pending = asyncio.get_running_loop().create_task(http.get(base + "/retailer/slow"))
        await asyncio.wait_for(entered.wait(), 5)
        raw["upstream"]["api_url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await server.reload(validate(raw))
        async with http.get(base + "/retailer/orders") as resp:
            assert resp.status == 200
        assert [seen.target for seen in second.api_requests] == ["/retailer/orders"]
        release.set()
        async with await asyncio.wait_for(pending, 5) as resp:
            assert await resp.text() == "from the first"  # finished where it started
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------ aiohttp


async def test_the_aiohttp_internals_the_proxy_relies_on_are_there() -> None:
    check_aiohttp()
    assert len(AIOHTTP_INTERNALS) >= 6


async def test_an_aiohttp_without_an_internal_the_proxy_needs_stops_it_at_start() -> None:
    gone = ((web.Server, "_no_such_attribute", "a changed release"),)
    with pytest.raises(StartupError, match=r"Server\._no_such_attribute"):
        check_aiohttp(gone)


def test_the_installed_aiohttp_is_within_the_tested_releases() -> None:
    # The upper bound names the newest minor release whose internals were checked; the
    # test above fails first when a newer one changes them.
    requirement = next(Requirement(r) for r in importlib.metadata.requires("bol-proxy") or []
                       if Requirement(r).name == "aiohttp")
    assert any(spec.operator == "<" for spec in requirement.specifier)
    assert requirement.specifier.contains(importlib.metadata.version("aiohttp"))


async def test_a_listen_host_that_does_not_resolve_is_named_as_such(
    bol: tuple[FakeBol, str],
) -> None:
    _, url = bol
    server = ProxyServer(validate(base_config(url, listen={"host": "no-such-host.invalid"})))
    with pytest.raises(CannotListen, match=r"\(listen\.host\): the host name does not "
                                           "resolve"):
        await server.start()
    await server.stop()
