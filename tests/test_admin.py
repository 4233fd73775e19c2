"""The proxy's own endpoints: health, readiness, Prometheus metrics."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import ProxyServer
from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, ORDER, FakeBol
from proxy.metrics import Metrics
from tests.conftest import StartProxy, base_config, problem, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def prefetched(server: ProxyServer, *names: str) -> None:
    """Wait for the start-up fetch of ``names`` (single flight: joins the one under way)."""
    for name in names:
        await server.forwarder.tokens.source(name).get()


async def test_ready_is_503_until_every_prefetch_set_holds_a_token(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    fake.token_mode = "invalid_client"
    server = await start_proxy(base_config(url))
    sources = [server.forwarder.tokens.source(name) for name in ("seta", "setb")]
    await wait_until(lambda: all(s.last_error == "invalid_client" for s in sources))
    async with http.get(f"http://127.0.0.1:{server.port()}/_proxy/ready") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["sets"]["seta"]["last_error"] == "invalid_client"
    assert DEMO_CLIENT_SECRET not in json.dumps(body)


async def test_health_and_ready_answer_200_with_valid_tokens(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    await prefetched(server, "seta", "setb")
    base = f"http://127.0.0.1:{server.port()}/_proxy"
    async with http.get(base + "/health") as resp:
        assert resp.status == 200
    async with http.head(base + "/health") as resp:
        assert resp.status == 200
    async with http.get(base + "/ready") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["ready"] is True
    assert {name: s["state"] for name, s in body["sets"].items()} == {
        "seta": "valid", "setb": "valid"}
    assert body["sets"]["seta"]["valid_until"] and body["sets"]["seta"]["last_error"] is None


async def test_ready_is_503_while_shutting_down(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    server.admin.shutting_down = True  # as stop() does first
    async with http.get(f"http://127.0.0.1:{server.port()}/_proxy/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["shutting_down"] is True


async def test_on_demand_sets_do_not_hold_readiness_back(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["prefetch"] = False
    server = await start_proxy(raw)
    await prefetched(server, "seta")
    async with http.get(f"http://127.0.0.1:{server.port()}/_proxy/ready") as resp:
        assert resp.status == 200
        assert set((await resp.json())["sets"]) == {"seta"}  # setb was never used


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/_proxy/nothing", 404),
    ("POST", "/_proxy/health", 405),
])
async def test_unknown_proxy_endpoints_are_problems_and_never_forwarded(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    method: str, path: str, status: int,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    async with http.request(method, f"http://127.0.0.1:{server.port()}{path}") as resp:
        assert resp.status == status
        assert (await problem(resp))["status"] == status
    assert fake.api_requests == []


async def test_metrics_after_five_requests_count_them_by_set_and_class(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    base = f"http://127.0.0.1:{server.port()}"
    for path in ("/retailer/orders", f"/retailer/orders/{ORDER['orderId']}",
                 "/setb/retailer/orders", "/retailer/nothing-here", "/elsewhere"):
        async with http.get(base + path) as resp:
            await resp.read()
    async with http.get(base + "/_proxy/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    got = samples(text)

    def value(name: str, **labels: str) -> float | None:
        return got.get((name, tuple(sorted(labels.items()))))

    assert value("bol_proxy_requests_total", set="seta", method="GET", status_class="2xx") == 2
    assert value("bol_proxy_requests_total", set="seta", method="GET", status_class="4xx") == 1
    assert value("bol_proxy_requests_total", set="setb", method="GET", status_class="2xx") == 1
    assert value("bol_proxy_requests_total", set="-", method="GET", status_class="4xx") == 1
    assert value("bol_proxy_token_fetches_total", set="seta", outcome="ok") == 1
    assert value("bol_proxy_request_duration_seconds_count", set="seta") == 3
    assert value("bol_proxy_upstream_duration_seconds_count", set="seta") == 3
    expiry = value("bol_proxy_token_expiry_seconds", set="seta")
    assert expiry is not None and 250 < expiry <= 299
    assert value("bol_proxy_in_flight_requests") == 0
    # Paths are never labels: endpoints are, with their identifiers collapsed.
    assert ORDER["orderId"] not in text and "/setb" not in text
    assert value("bol_proxy_rate_limit_limit", set="seta",
                 bucket="GET /retailer/orders/*") is not None
    for secret in (DEMO_CLIENT_SECRET, *fake.tokens):
        assert secret not in text


async def test_unusual_methods_share_one_label(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    async with http.request("PROPFIND", f"http://127.0.0.1:{server.port()}/retailer/x") as r:
        await r.read()
    registry = server.forwarder.metrics.registry
    assert registry.get_sample_value(
        "bol_proxy_requests_total", {"set": "seta", "method": "OTHER", "status_class": "4xx"}
    ) == 1


async def test_metrics_show_when_a_partners_authorisation_ends(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, url = bol
    token_file = tmp_path / "partner.refresh"
    token_file.write_text(fake.new_refresh_token(DEMO_CLIENT_ID) + "\n")
    raw = base_config(url)
    raw["credentials"]["partner"] = {
        "grant": "refresh_token", "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET, "refresh_token_file": str(token_file),
    }
    server = await start_proxy(raw)
    async with http.get(f"http://127.0.0.1:{server.port()}/partner/retailer/orders") as resp:
        assert resp.status == 200
    async with http.get(f"http://127.0.0.1:{server.port()}/_proxy/metrics") as resp:
        text = await resp.text()
    ends = samples(text)[("bol_proxy_authorization_expiry_timestamp_seconds",
                          (("set", "partner"),))]
    assert ends > 1.7e9  # first use (now) plus a year, as Unix time
    assert fake.refresh_tokens and not any(t in text for t in fake.refresh_tokens)


def test_request_durations_are_a_histogram_whose_bounds_count_as_inside() -> None:
    metrics = Metrics()
    for seconds in (0.0005, 0.001, 0.0011, 75.0):
        metrics.observe("seta", "GET", 200, seconds, None)
    metrics.observe("seta", "BREW", 418, 0.001, 0.0004)  # a made-up method is OTHER
    got = samples(metrics.exposition().decode())

    def value(name: str, **labels: str) -> float | None:
        return got.get((name, tuple(sorted(labels.items()))))

    bucket = "bol_proxy_request_duration_seconds_bucket"
    assert value(bucket, set="seta", le="0.001") == 3  # 0.0005, and 0.001 itself (twice)
    assert value(bucket, set="seta", le="0.0025") == 4
    assert value(bucket, set="seta", le="60.0") == 4
    assert value(bucket, set="seta", le="+Inf") == 5
    assert value("bol_proxy_request_duration_seconds_count", set="seta") == 5
    assert value("bol_proxy_request_duration_seconds_sum", set="seta") == pytest.approx(
        0.0005 + 0.001 + 0.0011 + 75.0 + 0.001)
    assert value("bol_proxy_upstream_duration_seconds_count", set="seta") == 1
    assert value("bol_proxy_requests_total", set="seta", method="OTHER",
                 status_class="4xx") == 1
