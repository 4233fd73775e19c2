"""Header rules in both directions of the hop (RFC 9110 §7.6.1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import BadRequest, UpstreamUnreachable
from proxy.headers import (
    client_response_headers,
    connection_listed,
    upstream_request_headers,
)

HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("Proxy-Authenticate", "Basic realm=x"),
    ("Proxy-Authorization", "Basic abc"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "websocket"),
]


def headers(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


def up(*items: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(upstream_request_headers(headers(*items), "the-token"))


def raw(*items: tuple[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    """Headers as aiohttp's client keeps them unparsed (``ClientResponse.raw_headers``)."""
    return tuple((n.encode(), v.encode("utf-8", "surrogateescape")) for n, v in items)


def down(*items: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(client_response_headers(raw(*items)))


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP)
def test_hop_by_hop_header_is_not_sent_upstream(name: str, value: str) -> None:
    out = up((name, value), ("Accept", "application/vnd.retailer.v10+json"))
    assert name not in out
    assert out["Accept"] == "application/vnd.retailer.v10+json"


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP)
def test_hop_by_hop_header_is_not_sent_back(name: str, value: str) -> None:
    out = down((name, value), ("X-RateLimit-Remaining", "24"))
    assert name not in out
    assert out["X-RateLimit-Remaining"] == "24"


def test_hop_by_hop_headers_in_any_case_are_removed_both_ways() -> None:
    # Field names are case-insensitive (RFC 9110 §5.1), and aiohttp keeps the case a peer
    # sent for names it does not know (proxy-connection, x-bol-credentials, X-anything).
    items = [(name.lower(), value) for name, value in HOP_BY_HOP] + [("X-Kept", "1")]
    assert list(up(*items).keys()) == ["X-Kept", "Authorization"]
    assert list(down(*items).keys()) == ["X-Kept"]


@pytest.mark.parametrize(
    "connection",
    [
        ["X-One, X-Two"],
        ["X-One", "X-Two"],
        ["  X-One ,, X-Two  ,", "close"],
        ["keep-alive,X-One,X-Two"],
    ],
)
def test_headers_named_by_connection_are_removed_both_ways(connection: list[str]) -> None:
    items = [("Connection", c) for c in connection]
    items += [("X-One", "1"), ("X-Two", "2"), ("X-Two", "again"), ("X-Three", "3")]
    assert connection_listed(connection) >= {"x-one", "x-two"}
    for out in (up(*items), down(*items)):
        assert "X-One" not in out
        assert "X-Two" not in out
        assert out.getall("X-Three") == ["3"]


@pytest.mark.parametrize(
    ("connection", "listed"),
    [("x-one, X-TWO", ("X-One", "x-two")), ("X-One, X-Two", ("x-one", "X-TWO"))],
)
def test_headers_named_by_connection_are_removed_whatever_their_case(
    connection: str, listed: tuple[str, str]
) -> None:
    items = [("Connection", connection), *((name, "1") for name in listed), ("X-Three", "3")]
    for out in (up(*items), down(*items)):
        assert [name for name in listed if name in out] == []
        assert out.getall("X-Three") == ["3"]


def test_authorization_is_replaced_by_the_bearer_token() -> None:
    out = up(("Authorization", "Basic junk"), ("authorization", "Bearer old"))
    assert out.getall("Authorization") == ["Bearer the-token"]


def test_bearer_token_is_added_when_the_client_sent_no_authorization() -> None:
    assert up(("Accept", "*/*")).getall("Authorization") == ["Bearer the-token"]


@pytest.mark.parametrize(
    "name", ["Host", "Expect", "X-Bol-Credentials", "host", "x-bol-credentials"]
)
def test_headers_the_proxy_answers_itself_are_not_sent_upstream(name: str) -> None:
    out = up((name, "value"), ("X-Custom", "kept"))
    assert name not in out
    assert out["X-Custom"] == "kept"


@pytest.mark.parametrize(
    "name",
    ["X-Original-URL", "x-rewrite-url", "X-HTTP-Method-Override", "X-HTTP-Method",
     "X-Method-Override"],
)
def test_headers_that_rewrite_the_path_or_method_behind_a_hop_are_bad_requests(
        name: str) -> None:
    with pytest.raises(BadRequest, match=name):
        up((name, "/retailer/../admin"))


@pytest.mark.parametrize(
    "name",
    ["Transfer_Encoding", "Content_Length", "content_type", "X_Bol_Credentials",
     "Proxy_Connection", "X_Original_URL", "Keep_Alive"],
)
def test_underscore_look_alikes_of_special_headers_are_bad_requests(name: str) -> None:
    with pytest.raises(BadRequest, match="not forwarded"):
        up((name, "chunked"))


def test_other_headers_with_underscores_go_up_unchanged() -> None:
    assert up(("X_Request_Id", "a_b"))["X_Request_Id"] == "a_b"


def test_end_to_end_request_headers_go_up_unchanged_and_in_order() -> None:
    items = [
        ("Accept", "application/vnd.retailer.v10+json"),
        ("Content-Type", "application/vnd.retailer.v10+json"),
        ("Accept-Language", "nl"),
        ("X-Fulfilment-Party", "FBR"),
        ("X-Multi", "first"),
        ("Cookie", "a=1"),
        ("x-multi", "second"),
    ]
    out = up(*items)
    assert list(out.items())[:-1] == items  # then the bearer token
    assert out.getall("X-Multi") == ["first", "second"]


@pytest.mark.parametrize("connection", [None, "keep-alive, Content-Length"])
def test_the_clients_content_length_never_goes_up(connection: str | None) -> None:
    # The forwarder frames the body itself: a length listed in Connection (and so
    # dropped) must not leave the body unframed on the way to bol.
    items = [("Content-Length", "12"), ("Content-Type", "application/json")]
    if connection:
        items.append(("Connection", connection))
    out = up(*items)
    assert "Content-Length" not in out
    assert out["Content-Type"] == "application/json"


def test_repeated_response_headers_come_back_in_order() -> None:
    items = [
        ("Content-Type", "application/vnd.retailer.v10+json"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Link", "<https://api.bol.com/x?page=2>; rel=next"),
        ("X-RateLimit-Limit", "25"),
        ("set-cookie", "b=2; Path=/"),
        ("Link", "<https://api.bol.com/x?page=9>; rel=last"),
        ("Retry-After", "4"),
        ("Content-Encoding", "gzip"),
        ("Content-Length", "120"),
    ]
    out = down(*items)
    assert list(out.items()) == items
    assert out.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert out.getall("Link")[1].endswith("rel=last")


def test_incoming_headers_are_not_modified() -> None:
    incoming = headers(("Host", "localhost"), ("Connection", "X-One"), ("X-One", "1"))
    upstream_request_headers(incoming, "tok")
    assert list(incoming.items()) == [("Host", "localhost"), ("Connection", "X-One"),
                                      ("X-One", "1")]


def test_response_header_names_keep_the_spelling_bol_sent() -> None:
    out = down(("x-ratelimit-remaining", "24"), ("CONTENT-TYPE", "application/json"))
    assert list(out.keys()) == ["x-ratelimit-remaining", "CONTENT-TYPE"]


@pytest.mark.parametrize("value", [b"caf\xe9", b"\xff\xfe", b"a\x00b", b"a\rb", b"a\nb",
                                   b"\x7f", b"\xed\xa0\x80"],
                         ids=["latin1", "binary", "nul", "cr", "lf", "del", "utf8-surrogate"])
def test_response_header_that_cannot_pass_unchanged_is_a_502(value: bytes) -> None:
    with pytest.raises(UpstreamUnreachable):
        client_response_headers([(b"Content-Type", b"application/json"), (b"X-Note", value)])


@pytest.mark.parametrize("name", [b"X-Caf\xe9", b"X-A\nB", b"X-A\x00"], ids=["latin1", "lf", "nul"])
def test_response_header_name_that_cannot_pass_unchanged_is_a_502_every_time(name: bytes) -> None:
    for _ in range(2):  # decoded headers are remembered; refusals are not
        with pytest.raises(UpstreamUnreachable):
            client_response_headers([(b"Content-Type", b"application/json"), (name, b"1")])


def test_response_header_bytes_in_utf8_and_tabs_pass_unchanged() -> None:
    value = "caf\u00e9 \u20ac\tend"
    out = client_response_headers([(b"X-Note", value.encode()), (b"X-Empty", b"")])
    assert out == [("X-Note", value), ("X-Empty", "")]


def test_no_response_headers_is_no_headers() -> None:
    assert client_response_headers([]) == []


# ---------------------------------------------------------------------- properties

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
               min_size=1, max_size=12)
HOP = st.sampled_from([name for name, _ in HOP_BY_HOP] + ["Host", "Authorization",
                                                          "X-Bol-Credentials", "Expect",
                                                          "Content-Length"])
CASED = st.tuples(HOP, st.sampled_from([str.lower, str.upper, str.title])).map(
    lambda pair: pair[1](pair[0]))
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20)


@given(end_to_end=st.lists(st.tuples(NAME, VALUE), max_size=8),
       hop=st.lists(st.tuples(CASED, VALUE), max_size=6))
@settings(max_examples=300, deadline=None, database=None)
def test_what_goes_up_is_the_end_to_end_headers_in_order_plus_one_bearer(
    end_to_end: list[tuple[str, str]], hop: list[tuple[str, str]]
) -> None:
    dropped = {name.lower() for name, _ in HOP_BY_HOP} | {
        "host", "authorization", "x-bol-credentials", "expect", "connection", "content-length"}
    kept = [(n, v) for n, v in end_to_end if n.lower() not in dropped]
    # Connection may name any of the end-to-end headers: those go too.
    listed = {v.strip().lower() for n, v in hop if n.lower() == "connection"
              for v in v.split(",")}
    expected = [(n, v) for n, v in kept if n.lower() not in listed]
    out = upstream_request_headers(headers(*end_to_end, *hop), "tok")
    assert out == [*expected, ("Authorization", "Bearer tok")]


@given(end_to_end=st.lists(st.tuples(NAME, VALUE), max_size=8),
       hop=st.lists(st.tuples(CASED, VALUE), max_size=6))
@settings(max_examples=300, deadline=None, database=None)
def test_what_comes_back_never_holds_a_hop_by_hop_header(
    end_to_end: list[tuple[str, str]], hop: list[tuple[str, str]]
) -> None:
    out = down(*end_to_end, *hop)
    hop_names = {name.lower() for name, _ in HOP_BY_HOP}
    assert not {name.lower() for name in out} & hop_names
    for name, value in end_to_end:
        if name.lower() not in hop_names and name.lower() not in {
                v.strip().lower() for n, vs in hop if n.lower() == "connection"
                for v in vs.split(",")}:
            assert value in out.getall(name)
