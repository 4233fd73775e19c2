"""Differential fuzzing of the upstream client against h11.

Hypothesis writes answers, valid and broken (Content-Length right, wrong, repeated or
conflicting; chunked bodies whole or broken; other transfer codings; bodies delimited by
the close; odd fields and reason phrases; interim answers before, bytes after; and the
same with one byte replaced, inserted or removed), cuts them at random byte boundaries
and feeds the same reads to the client, over the scripted transport, and to an
``h11.Connection`` that sent the same request. Their verdicts (error or not; status,
reason and fields; body; reusable or not) must agree. Where they differ, the difference
must be one this file names and justifies:

* the client refuses (or refuses sooner) for a reason in ``REFUSALS``: llhttp's reason,
  or the client's own, each one a rule of RFC 9110 or 9112 that lets a recipient refuse;
* the client does not reuse a connection h11 would, for a reason in ``NOT_REUSED``;
* two leniencies, each checked by reading the answer with h11 once more without what
  it objects to: ``EMPTY_LINES``, CR and LF bytes before a status line, which llhttp
  skips where h11 refuses them (or, after an answer, gives up the connection); and
  ``REASON_BYTES``, control bytes in a reason phrase, which llhttp passes on and h11
  refuses.

The runs are derandomized: the same examples every time, in CI and on a laptop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.upstream import MAX_HEAD_BYTES, UpstreamError
from tests.scripted import Client, run, settle

EXAMPLES = 2000  # per test: about 6 s each on the 2-core CI machine

# Reasons to refuse what h11 reads (or still waits for the end of): the client's own, or
# llhttp's exactly as it words them, and the rule that makes refusing right.
REFUSALS = {
    "the upstream's answer is not HTTP/1.0 or HTTP/1.1":
        "HTTP/0.9 or 2.0 status lines on an HTTP/1.1 connection (h11 takes any d.d)",
    "the upstream's answer has a Transfer-Encoding other than chunked":
        "'chunked' and a tab, which llhttp would read until the close (h11 strips the "
        "tab); other codings both refuse",
    "Duplicate Content-Length":
        "RFC 9110 §8.6 lets a recipient reject repeated values (h11 keeps one of equal ones)",
    "Invalid character in Content-Length":
        "not one number, a list of equal ones included (RFC 9110 §8.6)",
    "Content-Length can't be present with Transfer-Encoding":
        "RFC 9112 §6.3: ought to be handled as an error (smuggling)",
    "Invalid HTTP version": "HTTP/1.2 and the like: not a version llhttp reads",
    "Invalid response status": "a code that is not three digits, or a bare LF after it",
    "Missing expected CR after response line":
        "a bare LF ending a line: RFC 9112 §2.2 allows, never requires, reading it as CRLF",
    "Missing expected CR after header value": "the same",
    "Missing expected LF after header value": "a bare CR: invalid (RFC 9112 §2.2)",
    "Expected LF after headers": "the same",
    "Expected LF after CR": "the same",
    "Unexpected whitespace after header value":
        "obs-fold: RFC 9112 §5.2 lets a proxy answer 502 instead of unfolding",
    "Invalid header value char":
        "a control byte in a field value is not field-vchar (RFC 9110 §5.5; h11 passes DEL)",
    "Invalid header field char": "a byte that is not tchar in a field name (RFC 9110 §5.1)",
    "Invalid header token": "the same, or whitespace before the colon (RFC 9112 §5.1)",
    "Invalid character in chunk size":
        "chunk sizes are hex digits (RFC 9112 §7.1): llhttp judges each byte as it comes, "
        "h11 waits for the line's end and tolerates whitespace after the size",
    "Invalid character in chunk extensions":
        "extensions are tokens (RFC 9112 §7.1.1); h11 takes anything after ';'",
    "Invalid character in chunk extensions name": "the same",
    "Invalid character in chunk extensions value": "the same",
    "Invalid character in chunk extensions quoted value": "the same",
    "Expected LF after chunk size": "a bare CR in a chunk line (RFC 9112 §2.2)",
    "Expected LF after chunk data": "the same after a chunk's data",
    "Data after `Connection: close`":
        "bytes after an answer that ends its connection: here an HTTP/1.0 interim answer "
        "(HTTP/1.0 has no 1xx, RFC 9110 §15.2) and then the real one",
}


def justified(why: str) -> bool:
    """Whether a refusal's reason is one of ``REFUSALS`` (llhttp's in parentheses)."""
    return any(why == reason or why.endswith(f"({reason})") for reason in REFUSALS)


# Reasons not to reuse a connection that h11 would reuse, read from the answer itself.
NOT_REUSED = {
    "proxy-connection": "Proxy-Connection: close, read like Connection: close (as llhttp "
                        "reads it)",
    "head-chunked": "a HEAD answer announcing chunked: llhttp would take a stray last "
                    "chunk after it for the announced body, unseen",
}

EMPTY_LINES = ("CR and LF bytes before a status line (before the first, between answers, "
               "or right after an answer in the same read): llhttp skips them, as RFC 9112 "
               "§2.2 lets a recipient skip empty lines before a start line; they cannot "
               "become part of an answer, and any other byte retires the connection")
_EMPTY_LINES = re.compile(rb"(\A|\r\n\r\n)[\r\n]+(?=HTTP/)")

REASON_BYTES = ("control bytes in a reason phrase: llhttp passes them on, h11 refuses the "
                "answer. The phrase carries no meaning (RFC 9112 §4: a client SHOULD "
                "ignore it) and the forwarder replaces one it cannot pass on with the "
                "standard phrase: the tool gets bol's status and body, not a 502")
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # CR, LF: see EMPTY_LINES
_STATUS_LINE = re.compile(rb"(HTTP/\d\.\d \d{3})([^\r\n]*)")


def without_control_bytes(reason: bytes) -> bytes:
    return _CONTROL.sub(b"", reason)


@dataclass(frozen=True)
class Script:
    """One answer as bol's side sends it: the client's reads, then maybe a clean close."""

    method: str
    pieces: tuple[bytes, ...]
    eof: bool


@dataclass(frozen=True)
class Verdict:
    """What a client made of an answer; ``why`` and ``unread`` say more, uncompared."""

    error: bool
    status: int | None = None
    reason: bytes | None = None
    fields: tuple[tuple[bytes, bytes], ...] | None = None
    body: bytes | None = None  # when complete
    reusable: bool = False
    why: str = field(default="", compare=False)  # the refusal's reason
    unread: bytes = field(default=b"", compare=False)  # bytes after the answer (h11)


# ------------------------------------------------------------------ the answers


PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09, 0xE9}  # with a tab and obs-text
NAMES = ["Content-Type", "X-RateLimit-Limit", "x-ratelimit-reset", "Set-Cookie", "ETag",
         "Vary", "X-Empty"]


@st.composite
def field_lines(draw: st.DrawFn) -> list[bytes]:
    """Ordinary fields, some of them odd: empty values, inner and trailing whitespace."""
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(NAMES)).encode()
        value = bytes(b for b in draw(st.binary(max_size=24)) if b in PRINTABLE).strip(b" \t")
        before = draw(st.sampled_from([b" ", b"", b"\t "]))
        after = draw(st.sampled_from([b"", b"", b" ", b"  "]))
        lines.append(name + b":" + before + value + after)
    return lines


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` in chunked coding, sometimes with extensions, trailers or one flaw."""
    sizes, at = [], 0
    while at < len(body):
        sizes.append(draw(st.integers(1, len(body) - at)))
        at += sizes[-1]
    flaw = draw(st.sampled_from(["none"] * 6 + ["bad-size", "no-crlf", "no-last", "space"]))
    out, at = [], 0
    for i, size in enumerate(sizes):
        line = b"zz" if flaw == "bad-size" and i == 0 else b"%x" % size
        if flaw == "space" and i == 0:
            line += b" "
        ext = draw(st.sampled_from([b"", b"", b";name=value", b";x"]))
        end = b"" if flaw == "no-crlf" and i == 0 else b"\r\n"
        out.append(line + ext + b"\r\n" + body[at:at + size] + end)
        at += size
    if flaw != "no-last":
        trailers = draw(st.sampled_from([b"", b"", b"X-Checksum: abc\r\n", b"A: 1\r\nB: 2\r\n"]))
        out.append(b"0\r\n" + trailers + b"\r\n")
    return b"".join(out)


FRAMINGS = ["length"] * 3 + [
    "length-short", "length-long", "length-twice", "length-list", "length-conflict",
    "length-invalid", "chunked", "chunked", "chunked-other", "chunked-twice", "chunked-tab",
    "length-and-chunked", "none"]


@st.composite
def framed(draw: st.DrawFn, body: bytes) -> tuple[list[bytes], bytes]:
    """Framing fields for ``body`` and the payload they frame, right or wrong."""
    framing = draw(st.sampled_from(FRAMINGS))
    length = b"Content-Length: %d"
    if framing == "none":
        return [], body
    if not framing.startswith("chunked") and framing != "length-and-chunked":
        lines = {
            "length": [length % len(body)],
            "length-short": [length % max(0, len(body) - 3)],
            "length-long": [length % (len(body) + 3)],
            "length-twice": [length % len(body)] * 2,
            "length-list": [b"Content-Length: %d, %d" % (len(body), len(body))],
            "length-conflict": [length % len(body), length % (len(body) + 1)],
            "length-invalid": [b"Content-Length: " + draw(st.sampled_from(
                [b"abc", b"-1", b"+1", b"1 2"]))],
        }[framing]
        return lines, body
    payload = draw(chunked_body(body))
    coding = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED", b"chunked "]))
    if framing == "chunked-other":
        coding = draw(st.sampled_from([b"gzip, chunked", b"gzip", b"identity", b"chunked, gzip"]))
    elif framing == "chunked-tab":
        coding = b"chunked\t"
    lines = [b"Transfer-Encoding: " + coding]
    if framing == "chunked-twice":
        lines.append(b"Transfer-Encoding: chunked")
    if framing == "length-and-chunked":
        lines.append(length % len(payload))
    return lines, payload


def cut(data: bytes, draw: st.DrawFn) -> tuple[bytes, ...]:
    """``data`` cut into the reads of the client, at random boundaries."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    return tuple(p for p in (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)],
                                                         strict=True)) if p)


@st.composite
def answers(draw: st.DrawFn) -> Script:
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD"]))
    interim = b"".join(draw(st.lists(st.sampled_from([
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
    ]), max_size=2)))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9"]))
    status = draw(st.sampled_from([200, 200, 201, 204, 206, 301, 304, 400, 401, 404, 429,
                                   500, 503, 101, 99]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Not Found", b" \xe9t\xe9",
                                   b" Odd\treason"]))
    lines = draw(field_lines())
    framing, payload = draw(framed(draw(st.binary(max_size=40))))
    lines += framing
    connection = draw(st.sampled_from([None, None, None, b"Connection: close",
                                       b"Connection: keep-alive", b"Connection: x, Close",
                                       b"Proxy-Connection: close"]))
    if connection is not None:
        lines.insert(draw(st.integers(0, len(lines))), connection)
    head = version + b" %03d" % status + reason + b"\r\n" + b"".join(
        line + b"\r\n" for line in lines) + b"\r\n"
    after = draw(st.sampled_from([b""] * 6 + [b"junk", b"\r\n",
                                              b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]))
    return Script(method, cut(interim + head + payload + after, draw), draw(st.booleans()))


@st.composite
def mutated(draw: st.DrawFn) -> Script:
    """A generated answer with one byte replaced, inserted or removed."""
    script = draw(answers())
    data = b"".join(script.pieces)
    at = draw(st.integers(0, len(data) - 1))
    byte = draw(st.sampled_from([b"\r", b"\n", b" ", b"\t", b":", b";", b",", b"\x00",
                                 b"\x7f", b"\xff", b"a", b"0", b"9", b"-"]))
    how = draw(st.sampled_from(["replace", "insert", "remove"]))
    data = data[:at] + (b"" if how == "remove" else byte) + data[at + (how != "insert"):]
    return replace(script, pieces=cut(data, draw))


# ------------------------------------------------------------------ the two readings


def normalised(fields: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """Fields as both readings can be compared. llhttp keeps a value's trailing
    whitespace, h11 drops it (it is not part of the value, RFC 9112 §5.1, and the tool's
    parser drops it too); h11 also writes Transfer-Encoding in lowercase."""
    return tuple((name, value.rstrip(b" \t").lower() if name.lower() == b"transfer-encoding"
                  else value.rstrip(b" \t")) for name, value in fields)


def refusal(exc: UpstreamError) -> str:
    """The client's reason, and llhttp's where it spoke."""
    return f"{exc} ({exc.__cause__})" if exc.__cause__ is not None else str(exc)


async def _our_reading(script: Script) -> Verdict:
    client = Client()
    task, transport = await client.send(script.method)
    assert transport is not None
    transport.send(*script.pieces)
    if script.eof:
        transport.send_eof()
    try:
        response = await task
    except TimeoutError:
        return Verdict(error=False)  # still waiting for the head when nothing more came
    except UpstreamError as exc:
        return Verdict(error=True, why=refusal(exc))
    head = {"status": response.status, "reason": response.reason.encode("latin-1"),
            "fields": normalised(response.raw_headers)}
    try:
        body = await response.read()
    except TimeoutError:
        return Verdict(error=False, **head)  # incomplete
    except UpstreamError as exc:
        return Verdict(error=True, why=refusal(exc), **head)
    response.release()
    await settle()
    return Verdict(error=False, body=body, reusable=client.pool.idle_connections == 1, **head)


def our_reading(script: Script) -> Verdict:
    return run(_our_reading(script))


def h11_reading(script: Script) -> Verdict:
    conn = h11.Connection(our_role=h11.CLIENT)
    conn.send(h11.Request(method=script.method, target="/retailer/orders",
                          headers=[("Host", "bol.test")]))
    conn.send(h11.EndOfMessage())
    for piece in script.pieces:
        conn.receive_data(piece)
    if script.eof:
        conn.receive_data(b"")
    head: dict[str, object] = {}
    body: list[bytes] = []
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                head = {"status": event.status_code, "reason": bytes(event.reason),
                        "fields": normalised(list(event.headers.raw_items()))}
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                unread, closed = conn.trailing_data
                reusable = (conn.their_state is h11.DONE and not unread and not closed)
                return Verdict(error=False, body=b"".join(body), reusable=reusable,
                               unread=unread, **head)  # type: ignore[arg-type]
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return Verdict(error=False, **head)  # type: ignore[arg-type]
    except h11.RemoteProtocolError as exc:
        return Verdict(error=True, why=str(exc), **head)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the comparison


def unexplained(script: Script, ours: Verdict, theirs: Verdict) -> str | None:
    """Why the two verdicts differ, if this file does not explain it; else None."""
    if ours == theirs:
        return None
    if theirs.error:
        # The two leniencies: read once more by h11 without what it objects to.
        data = b"".join(script.pieces)
        plainer = _STATUS_LINE.sub(lambda m: m[1] + without_control_bytes(m[2]),
                                   _EMPTY_LINES.sub(rb"\1", data))
        if plainer != data:
            theirs = h11_reading(Script(script.method, (plainer,), script.eof))
            if ours.reason is not None:
                ours = replace(ours, reason=without_control_bytes(ours.reason))
            if ours == theirs:
                return None
    if ours.error and (not theirs.error or (ours.status is None and theirs.status is not None)):
        # Refused where h11 reads on, waits for more, or fails only later.
        return None if justified(ours.why) else "refused"
    if replace(ours, reusable=theirs.reusable) == theirs:
        fields = [(name.lower(), value.lower()) for name, value in ours.fields or ()]
        if theirs.reusable:  # not reused here: Proxy-Connection, or HEAD and chunked
            proxy_close = any(name == b"proxy-connection" and b"close" in value
                              for name, value in fields)
            head_chunked = script.method == "HEAD" and any(
                name == b"transfer-encoding" for name, _ in fields)
            return None if proxy_close or head_chunked else "not reused"
        return None if theirs.unread and not theirs.unread.strip(b"\r\n") else "reused"
    return "disagreement"


def check(script: Script) -> None:
    ours, theirs = our_reading(script), h11_reading(script)
    difference = unexplained(script, ours, theirs)
    assert difference is None, f"{difference}: {script}\nours: {ours}\nh11:  {theirs}"


FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(answers())
def test_the_client_reads_answers_as_h11_does_or_refuses_them_for_a_listed_reason(
        script: Script) -> None:
    check(script)


@FUZZ
@given(mutated())
def test_the_client_reads_mutated_answers_as_h11_does_or_refuses_them_for_a_listed_reason(
        script: Script) -> None:
    check(script)


def test_the_generated_heads_fit_in_both_clients_limits() -> None:
    # Disagreements above are about framing and bytes, never about size.
    assert h11.Connection(h11.CLIENT)._max_incomplete_event_size <= MAX_HEAD_BYTES


def test_an_unexplained_difference_fails_the_check() -> None:
    # The comparison itself: a difference outside the lists is reported.
    script = Script("GET", (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",), eof=False)
    ours = our_reading(script)
    assert unexplained(script, ours, ours) is None
    assert unexplained(script, replace(ours, body=b"ko"), ours) == "disagreement"
    assert unexplained(script, Verdict(error=True, why="a new reason"), ours) == "refused"
    assert unexplained(script, replace(ours, reusable=False), ours) == "not reused"
    lenient = Script("GET", (b"\r\n" + script.pieces[0],), eof=False)
    assert unexplained(lenient, our_reading(lenient), h11_reading(lenient)) is None
