"""Which targets are forwarded, where, and with which credential set."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import DEFAULT_ALLOWED_PATHS
from proxy.errors import BadRequest, MethodNotAllowed, NotFound, ProxyError, UnknownCredentials
from proxy.routing import Route, Router, check_target

SETS = ("seta", "setb")
PORTS = {8081: "seta", 8082: "setb"}
MAIN_PORT = 8080


def router(default: str | None = "seta") -> Router:
    return Router(SETS, default, DEFAULT_ALLOWED_PATHS, PORTS)


def resolve(target: str, header: str | None = None, port: int | None = MAIN_PORT,
            method: str = "GET", default: str | None = "seta") -> Route:
    return router(default).resolve(method, target, [] if header is None else [header], port)


# ----------------------------------------------------------------- refused targets


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
def test_connect_and_trace_are_not_allowed(method: str) -> None:
    with pytest.raises(MethodNotAllowed):
        resolve("/retailer/orders", method=method)


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_ordinary_methods_are_routed(method: str) -> None:
    assert resolve("/retailer/orders", method=method) == Route("seta", "/retailer/orders")


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/x",
        "https://api.bol.com/retailer/orders",
        "*",
        "api.bol.com:443",
        "",
        "retailer/orders",
    ],
)
def test_targets_not_in_origin_form_are_bad_requests(target: str) -> None:
    with pytest.raises(BadRequest):
        resolve(target)


@pytest.mark.parametrize(
    "target",
    [
        "/retailer/../shared/x",
        "/retailer/./orders",
        "/retailer/orders/..",
        "/retailer/orders/.",
        "/retailer/%2e%2e/x",
        "/retailer/%2E%2e/x",
        "/retailer/.%2E/x",
        "/retailer/%2e/x",
        "/retailer/orders%2F..%2Fx",
        "/retailer/orders%2f..%2fx",
        "/retailer/..%2fx",
        "/retailer/a%5Cb",
        "/retailer/a%5cb",
        "/retailer/a\\b",
        "/retailer/a%00b",
        "/retailer/a%0Ab",
        "/retailer/a%7Fb",
        "/retailer/a\x00b",
        "/retailer/a\tb",
        "/retailer/a\x7fb",
        "/retailer/a b",
        "/retailer/caf\u00e9",
        "/retailer/\u2025",
        "//evil.example/x",
        "/retailer//orders",
        "/retailer/%zz",
        "/retailer/%4",
        "/retailer/%",
        "/retailer/orders#frag",
        "/retailer/orders?q=%00",
        "/retailer/orders?q=%g1",
    ],
)
def test_ambiguous_or_malformed_targets_are_bad_requests(target: str) -> None:
    with pytest.raises(BadRequest):
        resolve(target)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/retailer/%c0%ae%c0%ae/x", "not UTF-8"),  # overlong "..": some decoders accept it
        ("/retailer/%C0%AE/x", "not UTF-8"),
        ("/retailer/%e0%80%ae/x", "not UTF-8"),  # overlong in three bytes
        ("/retailer/caf%e9", "not UTF-8"),  # Latin-1, not UTF-8
        ("/retailer/%252e%252e/x", "encoded separator"),  # double encoding of ".."
        ("/retailer/%25", "encoded separator"),
        ("/retailer/..%20/x", "whitespace"),  # some servers trim trailing spaces
        ("/retailer/.%20/x", "whitespace"),
        ("/retailer/products/%20x", "whitespace"),
        ("/retailer/%C2%A0/x", "whitespace"),  # no-break space
        ("/retailer/%ef%bc%8e%ef%bc%8e/x", "normalisation"),  # full-width ".."
        ("/retailer/a%EF%BC%8Fb", "normalisation"),  # full-width "/"
        ("/retailer/%E2%80%A5/x", "normalisation"),  # two-dot leader
    ],
)
def test_path_escapes_another_hop_could_decode_differently_are_bad_requests(
        target: str, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        resolve(target)


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/orders",
        "/retailerX/orders",
        "/retailer-x/orders",
        "/retail",
        "/_proxy/health",
        "/seta",
        "/seta/",
        "/seta/other/orders",
    ],
)
def test_paths_outside_allowed_paths_are_not_found(target: str) -> None:
    with pytest.raises(NotFound):
        resolve(target)


@pytest.mark.parametrize(
    "target",
    [
        "/retailer",
        "/retailer/",
        "/retailer/orders",
        "/retailer-demo/orders/123",
        "/shared/process-status/1",
        "/advertiser/campaigns",
        "/retailer/products/caf%C3%A9",
        "/retailer/a%2Bb/...x/.x./..x",
        "/retailer/orders?status=OPEN&x=%2F&y=&z=a+b&w=%2e%2e&v=caf%C3%A9&u=a/../b",
        "/retailer/orders?",
    ],
)
def test_legitimate_targets_are_forwarded_byte_for_byte(target: str) -> None:
    assert resolve(target) == Route("seta", target)


def test_check_target_splits_path_from_query() -> None:
    assert check_target("/retailer/orders?a=1&b") == ("/retailer/orders", "?a=1&b")
    assert check_target("/retailer/orders") == ("/retailer/orders", "")


# --------------------------------------------------------------- choosing the set


def test_dedicated_port_chooses_its_set() -> None:
    assert resolve("/retailer/orders", port=8082) == Route("setb", "/retailer/orders")


def test_path_prefix_chooses_its_set_and_is_stripped() -> None:
    assert resolve("/setb/retailer/orders?page=2") == Route("setb", "/retailer/orders?page=2")


def test_header_chooses_its_set() -> None:
    assert resolve("/retailer/orders", header="setb") == Route("setb", "/retailer/orders")


def test_header_value_is_trimmed() -> None:
    assert resolve("/retailer/orders", header=" setb ").set_name == "setb"


def test_default_is_used_when_nothing_names_a_set() -> None:
    assert resolve("/retailer/orders", port=None) == Route("seta", "/retailer/orders")


@pytest.mark.parametrize(
    ("target", "header", "port"),
    [
        ("/setb/retailer/orders", "setb", 8082),  # all three agree
        ("/setb/retailer/orders", None, 8082),  # port and path
        ("/retailer/orders", "setb", 8082),  # port and header
        ("/setb/retailer/orders", "setb", MAIN_PORT),  # path and header
    ],
)
def test_agreeing_choices_win_over_the_default(
    target: str, header: str | None, port: int
) -> None:
    assert resolve(target, header=header, port=port) == Route("setb", "/retailer/orders")


@pytest.mark.parametrize(
    ("target", "header", "port"),
    [
        ("/setb/retailer/orders", None, 8081),  # port seta, path setb
        ("/retailer/orders", "setb", 8081),  # port seta, header setb
        ("/seta/retailer/orders", "setb", MAIN_PORT),  # path seta, header setb
        ("/seta/retailer/orders", "seta", 8082),  # port setb, path and header seta
    ],
)
def test_conflicting_choices_are_bad_requests(
    target: str, header: str | None, port: int
) -> None:
    with pytest.raises(BadRequest):
        resolve(target, header=header, port=port)


@pytest.mark.parametrize("header", ["setc", "", "SETA", "seta,setb"])
def test_unknown_set_named_by_header_is_unknown_credentials(header: str) -> None:
    with pytest.raises(UnknownCredentials):
        resolve("/retailer/orders", header=header)


def test_unknown_set_named_by_path_is_unknown_credentials() -> None:
    with pytest.raises(UnknownCredentials, match="typo"):
        resolve("/typo/retailer/orders")


def test_no_set_and_no_default_is_unknown_credentials_saying_how_to_name_one() -> None:
    with pytest.raises(UnknownCredentials) as info:
        resolve("/retailer/orders", default=None)
    assert "X-Bol-Credentials" in info.value.detail
    assert "default_credentials" in info.value.detail


def test_a_port_without_a_set_is_the_main_listener() -> None:
    assert resolve("/retailer/orders", port=9999, default=None, header="setb").set_name == "setb"


def test_unknown_header_is_not_echoed_at_length() -> None:
    with pytest.raises(UnknownCredentials) as info:
        resolve("/retailer/orders", header="x" * 5000)
    assert len(info.value.detail) < 200


# ------------------------------------------------------------------ properties

SEGMENT = (
    st.lists(st.sampled_from([*"abcXYZ019-_~.!$&'()*+,=:@", "%C3%A9", "%2B", "%41"]),
             min_size=1, max_size=8)
    .map("".join)
    .filter(lambda s: s not in (".", ".."))
)
QUERY = st.lists(st.sampled_from([*"abc=&+/?.:@", "%20", "%2F", "%2e"]), max_size=10).map(
    "".join
)
DOT = st.sampled_from([".", "..", "%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e", "%2E.", "%2E%2E"])
PROPERTY = settings(max_examples=300, deadline=None, database=None)


@PROPERTY
@given(root=st.sampled_from(DEFAULT_ALLOWED_PATHS), segments=st.lists(SEGMENT, max_size=6),
       query=st.none() | QUERY)
def test_any_safe_path_under_an_allowed_root_is_forwarded_unchanged(
    root: str, segments: list[str], query: str | None
) -> None:
    target = "/".join([root, *segments]) + ("" if query is None else "?" + query)
    assert resolve(target) == Route("seta", target)
    assert resolve("/setb" + target) == Route("setb", target)


@PROPERTY
@given(root=st.sampled_from(DEFAULT_ALLOWED_PATHS), before=st.lists(SEGMENT, max_size=4),
       dot=DOT, after=st.lists(SEGMENT, max_size=4), prefix=st.sampled_from(["", "/seta"]))
def test_any_dot_segment_is_a_bad_request(
    root: str, before: list[str], dot: str, after: list[str], prefix: str
) -> None:
    target = prefix + "/".join([root, *before, dot, *after])
    with pytest.raises(BadRequest):
        resolve(target)


TOKENS = st.sampled_from([
    "/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%00", "%", "%2", "%20",
    "\\", "?", "#", "retailer", "seta", "orders", "x", "-", "http:", "\u00e9", " ",
])
# Mostly harmless pieces, so that a good share of the generated targets resolve.
PIECES = st.one_of(st.sampled_from(["/", "/orders", "x", "-", "%20", "?a=1"]), TOKENS)
START = st.sampled_from(["", "/seta", "/setb", "/typo", "/", "//"]).flatmap(
    lambda prefix: st.sampled_from([prefix + root for root in (*DEFAULT_ALLOWED_PATHS, "/x")])
)


@PROPERTY
@given(start=START, parts=st.lists(PIECES, max_size=8), header=st.none() | st.sampled_from(SETS),
       port=st.sampled_from([None, MAIN_PORT, 8081, 8082]))
def test_a_resolved_target_is_always_a_clean_path_under_an_allowed_root(
    start: str, parts: list[str], header: str | None, port: int | None
) -> None:
    target = start + "".join(parts)
    try:
        route = resolve(target, header=header, port=port)
    except ProxyError:
        return
    path = route.target.partition("?")[0]
    assert not route.target.startswith("//")
    assert any(path == p or path.startswith(p + "/") for p in DEFAULT_ALLOWED_PATHS)
    decoded = unquote(path)
    assert "\\" not in decoded and "\x00" not in decoded
    segments = decoded.split("/")[1:]
    assert not {".", ".."} & set(segments)
    assert "" not in segments[:-1]
    assert route.set_name in SETS
    assert target.endswith(route.target)  # only ever a set prefix is removed


def test_two_credential_headers_are_refused_not_resolved_by_order() -> None:
    with pytest.raises(BadRequest, match="more than one X-Bol-Credentials"):
        router().resolve("GET", "/retailer/orders", ["seta", "setb"], MAIN_PORT)


@pytest.mark.parametrize("path", ["/retailer/..;/admin", "/retailer/orders;jsessionid=1",
                                  "/retailer/%3b/x", "/retailer/..%3B/x"])
def test_path_parameters_are_refused(path: str) -> None:
    with pytest.raises(BadRequest):
        resolve(path)


def test_a_path_starting_with_two_slashes_points_at_a_base_url_ending_in_one() -> None:
    with pytest.raises(BadRequest, match=r"base URL that ends in '/'"):
        resolve("//retailer/orders")
