"""The stand-in token endpoint: tools log in at the proxy, and their token names the set."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.config import CredentialSet, Secret, validate
from proxy.demo import DEMO_CLIENT_ID, FakeBol
from proxy.errors import BadRequest
from proxy.standin import (
    LoginRefused,
    choose_set,
    is_login_path,
    issue,
    read_login,
    set_named,
)
from tests.conftest import StartProxy, base_config, free_port, problem, raw_request

TOOL_SECRET = "the-tools-own-secret-that-must-stay-put"
FORM = "application/x-www-form-urlencoded"


def basic(client_id: str, secret: str = TOOL_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def refused(*args: Any) -> LoginRefused:
    with pytest.raises(LoginRefused) as info:
        read_login(*args)
    return info.value


# ------------------------------------------------------------- reading a login (pure)


def test_basic_authentication_with_the_grant_in_the_form_is_read() -> None:
    login = read_login(basic("seta"), "", b"grant_type=client_credentials", FORM)
    assert (login.client_id, login.grant) == ("seta", "client_credentials")


def test_form_fields_and_basic_together_are_read_when_they_agree() -> None:
    # python-bol-api-latest sends both.
    body = f"client_id=seta&client_secret={TOOL_SECRET}&grant_type=client_credentials".encode()
    assert read_login(basic("seta"), "", body, FORM).client_id == "seta"


def test_form_client_authentication_without_basic_is_read() -> None:
    body = b"client_id=seta&client_secret=x&grant_type=client_credentials"
    assert read_login(None, "", body, FORM).client_id == "seta"


def test_the_grant_in_the_query_with_no_body_is_read() -> None:
    # python-bol-retailer-api: POST /token?grant_type=client_credentials, Basic, no body.
    login = read_login(basic("seta"), "grant_type=client_credentials", b"", None)
    assert login.grant == "client_credentials"


def test_a_refresh_grant_is_read_and_its_refresh_token_ignored() -> None:
    login = read_login(basic("seta"), "grant_type=refresh_token&refresh_token=rt.secret", b"",
                       None)
    assert login.grant == "refresh_token"
    assert "rt.secret" not in repr(login)


def test_two_different_client_ids_are_an_invalid_request() -> None:
    error = refused(basic("seta"), "", b"client_id=setb&grant_type=client_credentials", FORM)
    assert (error.status, error.error) == (400, "invalid_request")


def test_no_client_id_is_invalid_client() -> None:
    error = refused(None, "", b"grant_type=client_credentials", FORM)
    assert (error.status, error.error) == (401, "invalid_client")


@pytest.mark.parametrize(("query", "body", "error"), [
    ("", b"", "invalid_request"),
    ("", b"grant_type=authorization_code&code=abc", "unsupported_grant_type"),
    ("grant_type=password", b"", "unsupported_grant_type"),
    ("grant_type=refresh_token", b"grant_type=client_credentials", "invalid_request"),
], ids=["missing", "authorization_code", "password", "two-grants"])
def test_grants_other_than_the_two_are_refused(query: str, body: bytes, error: str) -> None:
    assert refused(basic("seta"), query, body, FORM).error == error


def test_a_body_that_is_not_a_form_is_an_invalid_request() -> None:
    error = refused(basic("seta"), "", b'{"grant_type": "client_credentials"}',
                    "application/json")
    assert error.error == "invalid_request"


def test_a_broken_basic_header_is_an_invalid_request() -> None:
    assert refused("Basic !!!", "grant_type=client_credentials", b"", None).status == 400


# ------------------------------------------------------------ choosing the set (pure)

SETS = {
    "shop-a": CredentialSet("shop-a", "bol-id-a", Secret("a")),
    "shop-b": CredentialSet("shop-b", "bol-id-b", Secret("b")),
    "seller-1": CredentialSet("seller-1", "partner-id", Secret("p"), grant="refresh_token"),
    "seller-2": CredentialSet("seller-2", "partner-id", Secret("p"), grant="refresh_token"),
}


@pytest.mark.parametrize(("client_id", "expected"), [
    ("shop-a", "shop-a"), ("bol-id-b", "shop-b"), ("seller-2", "seller-2")])
def test_the_client_id_names_a_set_by_name_or_by_bol_client_id(
        client_id: str, expected: str) -> None:
    assert choose_set(client_id, SETS, None) == expected


def test_an_unknown_client_id_is_invalid_client() -> None:
    with pytest.raises(LoginRefused) as info:
        choose_set("nobody", SETS, None)
    assert (info.value.status, info.value.error) == (401, "invalid_client")


def test_a_client_id_shared_by_several_sets_must_be_a_set_name() -> None:
    with pytest.raises(LoginRefused, match="seller-1, seller-2") as info:
        choose_set("partner-id", SETS, None)
    assert info.value.status == 400


def test_a_login_for_another_set_than_the_ports_is_invalid_client() -> None:
    assert choose_set("bol-id-a", SETS, "shop-a") == "shop-a"
    with pytest.raises(LoginRefused) as info:
        choose_set("shop-b", SETS, "shop-a")
    assert info.value.error == "invalid_client"


# ------------------------------------------------------------- the stand-in (pure)


def test_the_stand_in_answer_is_shaped_like_bols_and_names_its_set() -> None:
    answer = issue("shop-a", "client_credentials", now=1_800_000_000.5)
    assert answer.keys() == {"access_token", "token_type", "expires_in", "scope"}
    assert (answer["token_type"], answer["expires_in"], answer["scope"]) == (
        "Bearer", 299, "RETAILER")
    token = str(answer["access_token"])
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["exp"] - claims["iat"] == 299  # readable by libraries that decode JWTs
    assert set_named(["Bearer " + token]) == "shop-a"


def test_a_refresh_grant_gets_a_stand_in_refresh_token_too() -> None:
    answer = issue("seller-1", "refresh_token", now=0)
    assert (answer["expires_in"], answer["scope"]) == (599, "offline_access")
    assert str(answer["refresh_token"]).count(".") == 2


@pytest.mark.parametrize("authorization", [
    "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzaG9wLWEifQ.sig",  # a real-looking JWT
    "Basic abc", "Bearer", "Bearer " + "x" * 100,
])
def test_any_other_authorization_names_no_set(authorization: str) -> None:
    assert set_named([authorization]) is None


def test_a_stand_in_from_another_issuer_or_without_its_parts_is_a_bad_request() -> None:
    token = str(issue("shop-a", "client_credentials", 0)["access_token"])
    header, payload, _ = token.split(".")
    forged = base64.urlsafe_b64encode(b'{"iss":"x","sub":"shop-a"}').decode().rstrip("=")
    for broken in (f"Bearer {header}.{forged}.", f"Bearer {header}.{payload}"):
        with pytest.raises(BadRequest):
            set_named([broken])


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_of_a_stand_in_is_read_in_any_letter_case(scheme: str) -> None:
    token = str(issue("shop-b", "client_credentials", 0)["access_token"])
    assert set_named([f"{scheme}  {token} "]) == "shop-b"


def test_a_stand_in_in_any_of_several_authorization_headers_names_its_set() -> None:
    token = str(issue("shop-b", "client_credentials", 0)["access_token"])
    assert set_named(["Basic abc", f"Bearer {token}"]) == "shop-b"


def test_two_stand_ins_naming_different_sets_are_a_bad_request() -> None:
    a, b = (str(issue(name, "client_credentials", 0)["access_token"])
            for name in ("shop-a", "shop-b"))
    with pytest.raises(BadRequest, match="different credential sets"):
        set_named([f"Bearer {a}", f"Bearer {b}"])
    assert set_named([f"Bearer {a}", f"bearer {a}"]) == "shop-a"


def test_a_stand_in_nested_too_deep_or_too_long_is_a_bad_request_not_a_crash() -> None:
    header = str(issue("shop-a", "client_credentials", 0)["access_token"]).split(".")[0]
    deep = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    for payload in (deep[:1500], deep):
        with pytest.raises(BadRequest):
            set_named([f"Bearer {header}.{payload}."])


def test_on_its_port_or_prefix_a_login_with_a_shared_client_id_is_that_sets() -> None:
    assert choose_set("partner-id", SETS, "seller-2") == "seller-2"


@pytest.mark.parametrize(("target", "expected"), [
    ("/token", True), ("/token?grant_type=client_credentials", True), ("/seta/token", True),
    ("/setx/token", False), ("/retailer/token", False), ("/tokens", False),
    ("/retailer/orders", False), ("/seta/retailer/token", False)])
def test_login_paths(target: str, expected: bool) -> None:
    assert is_login_path(target, {"seta", "setb"}) is expected


# ---------------------------------------------------------------- through the proxy


async def login(http: aiohttp.ClientSession, url: str, client_id: str,
                **kwargs: Any) -> dict[str, Any]:
    async with http.post(url, headers={"Authorization": basic(client_id)},
                         data={"grant_type": "client_credentials"}, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        answer: dict[str, Any] = await resp.json()
    return answer


async def test_a_login_is_answered_without_a_call_to_bol_and_its_token_selects_the_set(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["prefetch"] = False
    server = await start_proxy(raw)
    base = f"http://127.0.0.1:{server.port()}"
    await server.tokens.source("seta").get()  # the prefetch is done
    before = len(fake.token_requests)
    answer = await login(http, base + "/token", "client-b")  # setb's bol client id
    assert len(fake.token_requests) == before  # the login itself called nobody
    headers = {"Authorization": "Bearer " + answer["access_token"]}
    async with http.get(base + "/retailer/orders", headers=headers) as resp:
        assert resp.status == 200
    seen = fake.api_requests[-1]
    assert seen.client_id == "client-b"  # setb's real token, not the default's
    assert answer["access_token"] not in seen.headers["Authorization"]  # never forwarded


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
async def test_a_stand_in_with_any_case_scheme_or_in_a_second_header_selects_its_set(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    scheme: str,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))  # seta is the default
    base = f"http://127.0.0.1:{server.port()}"
    token = (await login(http, base + "/token", "setb"))["access_token"]
    for authorizations in ([f"{scheme} {token}"], ["Basic junk", f"{scheme} {token}"]):
        headers = CIMultiDict(("Authorization", value) for value in authorizations)
        async with http.get(base + "/retailer/orders", headers=headers) as resp:
            assert resp.status == 200
        assert fake.api_requests[-1].client_id == "client-b"  # never the default's


async def test_a_stand_in_that_conflicts_with_another_choice_is_a_bad_request(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake, url = bol
    server = await start_proxy(base_config(url))
    base = f"http://127.0.0.1:{server.port()}"
    token = (await login(http, base + "/token", "setb"))["access_token"]
    for path, extra in (("/retailer/orders", {"X-Bol-Credentials": "seta"}),
                        ("/seta/retailer/orders", {})):
        async with http.get(base + path, headers={"Authorization": f"Bearer {token}",
                                                  **extra}) as resp:
            assert resp.status == 400
            assert "stand-in token 'setb'" in (await problem(resp))["detail"]
    assert fake.api_requests == []


async def test_a_stand_in_of_a_set_a_reload_removed_is_unknown_credentials(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    raw = base_config(url)
    server = await start_proxy(raw)
    base = f"http://127.0.0.1:{server.port()}"
    token = (await login(http, base + "/token", "setb"))["access_token"]
    del raw["credentials"]["setb"]
    await server.reload(validate(raw))
    async with http.get(base + "/retailer/orders",
                        headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 400
        assert (await problem(resp))["type"] == "urn:bol-proxy:unknown-credentials"


async def test_an_unknown_client_gets_401_invalid_client_like_bols(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    async with http.post(f"http://127.0.0.1:{server.port()}/token",
                         headers={"Authorization": basic("nobody")},
                         data={"grant_type": "client_credentials"}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="bol-proxy"'
        assert (await resp.json())["error"] == "invalid_client"


async def test_a_login_on_a_sets_own_port_or_prefix_may_only_name_that_set(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["port"] = free_port()
    server = await start_proxy(raw)
    own = f"http://127.0.0.1:{server.port('setb')}/token"
    prefixed = f"http://127.0.0.1:{server.port()}/setb/token"
    for where in (own, prefixed):
        token = (await login(http, where, "client-b"))["access_token"]
        assert set_named(["Bearer " + token]) == "setb"
        async with http.post(where, headers={"Authorization": basic("seta")},
                             data={"grant_type": "client_credentials"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_client"


async def test_the_token_endpoint_takes_post_only(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    async with http.get(f"http://127.0.0.1:{server.port()}/token") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"


async def test_an_oversized_login_body_is_413_and_closed(
    bol: tuple[FakeBol, str], start_proxy: StartProxy,
) -> None:
    _, url = bol
    server = await start_proxy(base_config(url))
    answer = await raw_request(server.port(), b"POST /token HTTP/1.1\r\nHost: p\r\n"
                               b"Content-Length: 100000\r\n\r\n" + b"a" * 100_000)
    assert answer.startswith(b"HTTP/1.1 413")


async def test_tools_secrets_and_refresh_tokens_never_reach_logs_or_metrics(
    bol: tuple[FakeBol, str], start_proxy: StartProxy, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = bol
    caplog.set_level(logging.DEBUG)
    server = await start_proxy(base_config(url))
    base = f"http://127.0.0.1:{server.port()}"
    body = {"client_id": "seta", "client_secret": TOOL_SECRET, "grant_type": "refresh_token",
            "refresh_token": "rt-of-the-tool-" + TOOL_SECRET}
    async with http.post(base + "/token", data=body) as resp:
        assert resp.status == 200
        answer = await resp.text()
    async with http.post(base + f"/token?refresh_token={TOOL_SECRET}&grant_type=refresh_token",
                         headers={"Authorization": basic("seta")}) as resp:
        assert resp.status == 200
    async with http.get(base + "/_proxy/metrics") as resp:
        metrics = await resp.text()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "POST /token 200" in logged  # the login has its access line...
    assert f"bytes={len(answer)} " in logged  # ...with the size of its answer
    for text in (logged, metrics, answer):
        assert TOOL_SECRET not in text
    assert DEMO_CLIENT_ID not in answer
