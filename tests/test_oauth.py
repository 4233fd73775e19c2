"""Token requests and how their answers are read, without sockets; and, at the end, how
a failed connection to the token endpoint reads, against servers on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.config import CredentialSet, Secret
from proxy.oauth import (
    TokenClient,
    TokenEndpointError,
    authorize_url,
    basic_auth,
    client_credentials_form,
    code_form,
    parse_token_response,
    refresh_form,
)
from tests.conftest import free_port, serve

ACCESS = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.access-token-signature"
REFRESH = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjJ9.refresh-token-signature"
CRED = CredentialSet(name="partner", client_id="client-id", client_secret=Secret("s3cr3t"),
                     grant="refresh_token", redirect_uri="https://partner.example/cb?x=1")


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def failure(status: int, raw: bytes) -> TokenEndpointError:
    with pytest.raises(TokenEndpointError) as info:
        parse_token_response(status, raw)
    return info.value


# ------------------------------------------------------------------------ answers


def test_good_answer_gives_token_and_lifetime() -> None:
    grant = parse_token_response(200, body(access_token=ACCESS, token_type="Bearer",
                                           expires_in=299, scope="RETAILER"))
    assert grant.access_token.reveal() == ACCESS
    assert grant.expires_in == 299
    assert grant.refresh_token is None


def test_answer_with_a_refresh_token_carries_it() -> None:
    grant = parse_token_response(200, body(access_token=ACCESS, token_type="Bearer",
                                           expires_in=599, refresh_token=REFRESH))
    assert grant.refresh_token is not None
    assert grant.refresh_token.reveal() == REFRESH


def test_grant_repr_never_shows_the_tokens() -> None:
    grant = parse_token_response(200, body(access_token=ACCESS, refresh_token=REFRESH))
    assert ACCESS not in repr(grant) and REFRESH not in repr(grant)


def test_missing_expires_in_is_none() -> None:
    assert parse_token_response(200, body(access_token=ACCESS)).expires_in is None


@pytest.mark.parametrize(("value", "expected"), [("299", 299.0), (599.5, 599.5), ("1e3", 1000)])
def test_expires_in_as_text_or_fraction_is_read_as_a_number(value: Any, expected: float) -> None:
    grant = parse_token_response(200, body(access_token=ACCESS, expires_in=value))
    assert grant.expires_in == expected


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER"])
def test_token_type_bearer_is_accepted_in_any_case(token_type: str) -> None:
    grant = parse_token_response(200, body(access_token=ACCESS, token_type=token_type))
    assert grant.access_token.reveal() == ACCESS


@pytest.mark.parametrize(
    "raw",
    [
        body(access_token=ACCESS, token_type="mac"),
        body(access_token=ACCESS, token_type=None),
        body(access_token=ACCESS, expires_in="soon"),
        body(access_token=ACCESS, expires_in=True),
        body(access_token=ACCESS, expires_in=0),
        body(access_token=ACCESS, expires_in=-5),
        body(access_token=ACCESS, expires_in=10**9),
        body(access_token=ACCESS, expires_in="nan"),
        body(access_token=ACCESS, expires_in=[299]),
        body(token_type="Bearer", expires_in=299),
        body(access_token="", expires_in=299),
        body(access_token=12345),
        b"<html><body>Service " + ACCESS.encode() + b" unavailable</body></html>",
        b"",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"\xff\xfe",
    ],
)
def test_unusable_good_status_answer_is_malformed_and_hides_the_token(raw: bytes) -> None:
    error = failure(200, raw)
    assert error.code == "malformed"
    assert not error.rejected
    assert ACCESS not in str(error) and ACCESS not in error.detail


@pytest.mark.parametrize(
    ("status", "raw", "code", "rejected"),
    [
        (401, body(error="invalid_client", error_description="Bad client credentials"),
         "invalid_client", True),
        (400, body(error="invalid_grant", error_description="Token revoked"),
         "invalid_grant", True),
        (400, body(error="unauthorized_client"), "unauthorized_client", True),
        (400, body(error="invalid_request"), "invalid_request", False),
        (200, body(error="invalid_client", access_token=ACCESS), "invalid_client", True),
        (500, b"<html>Internal Server Error</html>", "http_500", False),
        (500, body(message="oops"), "http_500", False),
        (503, b"", "http_503", False),
        (404, b"Not Found", "http_404", False),
        (401, body(error={"nested": "x"}), "http_401", False),
        (401, body(error="x" * 200), "http_401", False),
        (401, body(error="ungültig"), "http_401", False),
        (403, body(access_token=ACCESS), "http_403", False),
    ],
)
def test_error_answer_gives_its_code_and_whether_credentials_were_rejected(
    status: int, raw: bytes, code: str, rejected: bool
) -> None:
    error = failure(status, raw)
    assert error.code == code
    assert error.rejected is rejected


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (401, body(error="invalid_client", error_description="Bad client credentials")),
        (500, b"<html>stack trace: password=hunter2</html>"),
        (200, body(access_token=ACCESS, token_type="mac", refresh_token=REFRESH)),
        (200, body(access_token=ACCESS, expires_in="soon", refresh_token=REFRESH)),
        (400, body(error="invalid_grant", access_token=ACCESS, refresh_token=REFRESH)),
    ],
)
def test_error_messages_never_hold_tokens_or_body_text(status: int, raw: bytes) -> None:
    error = failure(status, raw)
    for shown in (str(error), error.detail, repr(error)):
        for secret in (ACCESS, REFRESH, "Bad client credentials", "hunter2", "stack trace"):
            assert secret not in shown


# ------------------------------------------------------------------------ requests


def test_basic_auth_is_base64_of_id_colon_secret() -> None:
    value = basic_auth(CRED)
    scheme, _, encoded = value.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded) == b"client-id:s3cr3t"


def test_form_builders_give_the_grant_bodies() -> None:
    assert client_credentials_form() == {"grant_type": "client_credentials"}
    assert refresh_form(Secret(REFRESH)) == {"grant_type": "refresh_token",
                                             "refresh_token": REFRESH}
    assert code_form("the-code", "https://partner.example/cb") == {
        "grant_type": "authorization_code", "code": "the-code",
        "redirect_uri": "https://partner.example/cb"}


def test_authorize_url_carries_the_code_flow_parameters() -> None:
    url, state = authorize_url("https://login.bol.com/authorize", CRED)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://login.bol.com/authorize"
    assert parse_qs(parts.query, strict_parsing=True) == {
        "response_type": ["code"],
        "client_id": ["client-id"],
        "scope": ["offline_access"],
        "redirect_uri": ["https://partner.example/cb?x=1"],
        "state": [state],
    }
    assert "s3cr3t" not in url


def test_authorize_url_has_a_fresh_unguessable_state_each_call() -> None:
    states = {authorize_url("https://login.bol.com/authorize", CRED)[1] for _ in range(20)}
    assert len(states) == 20
    assert all(len(state) >= 22 for state in states)  # at least 128 bits


def test_authorize_url_uses_a_given_state() -> None:
    url, state = authorize_url("https://login.bol.com/authorize", CRED, state="chosen")
    assert state == "chosen"
    assert parse_qs(urlsplit(url).query)["state"] == ["chosen"]


# ------------------------------------------------------------- failed connections


class UnknownNames(AbstractResolver):
    """A resolver that knows no name, as a DNS server answers for a mistyped host."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


async def failed_request(url: str, resolver: AbstractResolver | None = None,
                         ssl_context: ssl.SSLContext | None = None) -> TokenEndpointError:
    """The error of one client-credentials request to ``url``; it must fail."""
    connector = aiohttp.TCPConnector(resolver=resolver, ssl=ssl_context or True)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(TokenEndpointError) as info:
            await TokenClient(session, url, connect_timeout=5).request(
                CRED, client_credentials_form())
    error = info.value
    for shown in (str(error), repr(error), error.detail):
        assert "s3cr3t" not in shown and basic_auth(CRED).split()[1] not in shown
    return error


@asynccontextmanager
async def tls_server(ca: trustme.CA) -> AsyncIterator[int]:
    """An HTTPS server on 127.0.0.1 whose certificate ``ca`` issued; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_an_unresolvable_token_host_reads_as_a_dns_failure() -> None:
    resolver = UnknownNames()

    error = await failed_request("https://login.bol.example/token", resolver)

    assert resolver.asked == ["login.bol.example"]
    assert (error.code, error.detail) == ("unreachable", "cannot resolve login.bol.example (DNS)")


async def test_a_refused_connection_names_the_host_and_port() -> None:
    port = free_port()

    error = await failed_request(f"http://127.0.0.1:{port}/token")

    assert (error.code, error.detail) == ("unreachable", f"connection refused by 127.0.0.1:{port}")


async def test_a_certificate_not_trusted_reads_as_a_tls_failure() -> None:
    async with tls_server(trustme.CA()) as port:  # a CA the client does not trust
        error = await failed_request(f"https://127.0.0.1:{port}/token")

    assert (error.code, error.detail) == (
        "unreachable",
        "TLS handshake with 127.0.0.1 failed (certificate: unable to get local issuer certificate)")


async def test_a_trusted_certificate_reaches_the_token_endpoint() -> None:
    # The counterpart of the test above: the same server, its CA trusted, answers (404).
    ca = trustme.CA()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with tls_server(ca) as port:
        error = await failed_request(f"https://127.0.0.1:{port}/token", ssl_context=trusting)

    assert error.code == "http_404"


async def test_tls_to_a_port_that_speaks_plain_http_reads_as_a_tls_failure() -> None:
    runner, url = await serve(web.Application())
    try:
        error = await failed_request(url.replace("http://", "https://") + "/token")
    finally:
        await runner.cleanup()

    assert error.code == "unreachable"
    assert error.detail.startswith("TLS handshake with 127.0.0.1 failed")
