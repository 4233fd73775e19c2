"""Token requests over the network: an endpoint that is unreachable, silent, or behind TLS.

The imitation of bol serves on 127.0.0.1:0; TLS uses a throwaway certificate authority
(trustme), as a corporate TLS interception would, trusted through ``upstream.ca_file``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.app import client_session
from proxy.config import CredentialSet, Secret, validate
from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, FakeBol
from proxy.oauth import TokenClient, TokenEndpointError, client_credentials_form
from tests.conftest import SECRET_B, StartProxy, base_config, free_port, problem, serve

CRED = CredentialSet(name="seta", client_id=DEMO_CLIENT_ID,
                     client_secret=Secret(DEMO_CLIENT_SECRET))


@pytest.fixture
async def silent() -> AsyncIterator[str]:
    """A token endpoint that accepts the request and never answers."""
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")  # pragma: no cover

    app = web.Application()
    app.router.add_post("/token", hang)
    runner, url = await serve(app)
    yield url + "/token"
    never.set()
    await runner.cleanup()


async def request_token(url: str, answer_timeout: float = 20.0) -> TokenEndpointError:
    config = validate(base_config("http://127.0.0.1:1", upstream={"token_url": url}))
    async with client_session(config) as session:
        client = TokenClient(session, url, connect_timeout=2, answer_timeout=answer_timeout)
        with pytest.raises(TokenEndpointError) as info:
            await client.request(CRED, client_credentials_form())
    return info.value


async def test_a_token_endpoint_nobody_listens_on_is_unreachable() -> None:
    error = await request_token(f"http://127.0.0.1:{free_port()}/token")
    assert error.code == "unreachable"


async def test_a_token_endpoint_that_never_answers_times_out(silent: str) -> None:
    error = await request_token(silent, answer_timeout=0.2)
    assert error.code == "timeout"


async def test_requests_get_503_while_the_token_endpoint_is_unreachable(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(
        url, upstream={"token_url": f"http://127.0.0.1:{free_port()}/token"}))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        detail = (await problem(resp))["detail"]
    assert "unreachable" in detail
    assert fake.api_requests == []  # never forwarded without a token


# ------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def bol_over_tls(authority: trustme.CA) -> AsyncIterator[tuple[FakeBol, str]]:
    """The imitation of bol over HTTPS, with a certificate for 127.0.0.1."""
    fake = FakeBol(clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET, "client-b": SECRET_B})
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    yield fake, f"https://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def trusting(authority: trustme.CA, folder: Path) -> str:
    path = folder / "corporate-ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return str(path)


async def test_bol_behind_tls_interception_is_reached_with_the_ca_file(
    bol_over_tls: tuple[FakeBol, str], authority: trustme.CA, tmp_path: Path,
    start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol_over_tls
    server = await start_proxy(base_config(
        url, upstream={"ca_file": trusting(authority, tmp_path)}))
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        assert resp.status == 200
        assert "orders" in json.loads(await resp.read())
    assert {seen.client_id for seen in fake.token_requests} == {DEMO_CLIENT_ID, "client-b"}
    assert len(fake.api_requests) == 1


async def test_a_token_endpoint_with_an_untrusted_certificate_is_unreachable(
    bol_over_tls: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol_over_tls
    server = await start_proxy(base_config(url))  # no ca_file: the system's trust only
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        assert resp.status == 503
        assert "unreachable" in (await problem(resp))["detail"]
    assert fake.token_requests == []  # the handshake failed before any request


async def test_an_api_with_an_untrusted_certificate_is_502_and_gets_no_token(
    bol: tuple[FakeBol, str], bol_over_tls: tuple[FakeBol, str],
    start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, plain_url = bol
    tls, tls_url = bol_over_tls
    server = await start_proxy(base_config(
        plain_url, upstream={"api_url": tls_url}))  # tokens in plain, the API over TLS
    async with http.get(f"http://127.0.0.1:{server.port()}/retailer/orders") as resp:
        assert resp.status == 502
        assert (await problem(resp))["type"] == "urn:bol-proxy:upstream-unreachable"
    assert tls.api_requests == []  # the handshake failed: no bearer token left
