"""The upstream client over a scripted network, on a virtual clock: no sockets, no waiting.

Each test plays bol's side byte by byte (tests/scripted.py) and checks what the client
made of it: the answer, the error, what it wrote, and whether the connection went back
to the pool. The last section drives the forwarder over real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.upstream import (
    HIGH_WATER,
    IDLE_TIMEOUT,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    ConnectFailed,
    ConnectionLost,
    FlowControl,
    Framing,
    HeadTooLarge,
    MalformedAnswer,
    Payload,
    State,
    UnsupportedTransferCoding,
    answer_framing,
    keeps_alive,
)
from tests.conftest import StartProxy, base_config, serve
from tests.scripted import (
    TOKEN,
    Client,
    Deadlock,
    ScriptedTransport,
    advance,
    run,
    settle,
    virtual_time,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def refused_after(transport: ScriptedTransport, piece: bytes, most: int) -> int:
    """Send ``piece`` over and over until the client closes; the bytes it took."""
    sent = 0
    while not transport.is_closing():
        assert sent <= most, f"still reading after {sent} bytes"
        transport.send(piece)
        sent += len(piece)
    return sent


async def chunks(*parts: bytes, gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """A streamed request body; waits for ``gate`` after its first part."""
    for i, part in enumerate(parts):
        yield part
        if i == 0 and gate is not None:
            await gate.wait()


# ------------------------------------------------------------------ the pure rules


@pytest.mark.parametrize(("head_only", "status", "length", "coding", "expected"), [
    (False, 200, b"5", None, (Framing.LENGTH, 5)),
    (False, 200, b"0", None, (Framing.LENGTH, 0)),
    (False, 200, b"5 ", None, (Framing.LENGTH, 5)),  # llhttp keeps trailing whitespace
    (False, 200, None, b"chunked", (Framing.CHUNKED, None)),
    (False, 200, None, b"\t Chunked  ", (Framing.CHUNKED, None)),
    (False, 200, None, None, (Framing.UNTIL_CLOSE, None)),
    (True, 200, b"5", None, (Framing.NO_BODY, 0)),  # HEAD: the length of a GET's body
    (True, 200, None, b"chunked", (Framing.NO_BODY, 0)),
    (True, 200, None, None, (Framing.NO_BODY, 0)),
    (False, 204, b"5", None, (Framing.NO_BODY, 0)),
    (False, 304, None, b"chunked", (Framing.NO_BODY, 0)),
])
def test_answer_framing_follows_rfc_9112(head_only: bool, status: int, length: bytes | None,
                                         coding: bytes | None,
                                         expected: tuple[Framing, int | None]) -> None:
    assert answer_framing(head_only, status, length, coding) == expected


@pytest.mark.parametrize(("length", "coding", "error"), [
    (None, b"gzip, chunked", UnsupportedTransferCoding),
    (None, b"gzip", UnsupportedTransferCoding),
    (None, b"chunked, gzip", UnsupportedTransferCoding),
    (None, b"chunked,chunked", UnsupportedTransferCoding),  # two fields, joined
    (None, b"identity", UnsupportedTransferCoding),
    (None, b"", UnsupportedTransferCoding),
    (None, b"chunked\t", UnsupportedTransferCoding),  # llhttp reads it until the close
    (None, b"chunked,", UnsupportedTransferCoding),
    (b"5", b"chunked", MalformedAnswer),
    (b"5,5", None, MalformedAnswer),
    (b"+5", None, MalformedAnswer),
    (b"", None, MalformedAnswer),
])
def test_answer_framing_refuses_what_it_cannot_read_as_sent(
        length: bytes | None, coding: bytes | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        answer_framing(False, 200, length, coding)
    if coding is not None:  # refused even where no body follows: never silently dropped
        with pytest.raises(error):
            answer_framing(True, 204, length, coding)


@pytest.mark.parametrize(("version", "framing", "connection", "expected"), [
    ("1.1", Framing.LENGTH, None, True),
    ("1.1", Framing.LENGTH, b"keep-alive", True),
    ("1.1", Framing.LENGTH, b"foo, CLOSE", False),
    ("1.1", Framing.LENGTH, b"closed", True),  # another option, not "close"
    ("1.1", Framing.UNTIL_CLOSE, None, False),
    ("1.1", Framing.NO_BODY, None, True),
    ("1.0", Framing.LENGTH, b"keep-alive", False),
])
def test_keep_alive_needs_http11_and_no_close(version: str, framing: Framing,
                                              connection: bytes | None, expected: bool) -> None:
    assert keeps_alive(version, framing, connection) is expected


@pytest.mark.parametrize("version", ["0.9", "2.0"])
def test_http_versions_other_than_10_and_11_are_refused_by_the_rules(version: str) -> None:
    with pytest.raises(MalformedAnswer):
        keeps_alive(version, Framing.LENGTH, None)


# ------------------------------------------------------------------ unbounded heads


@virtual_time
async def test_a_head_that_never_ends_is_refused_at_the_limit() -> None:
    client = Client()
    task, transport = await client.send()
    assert transport is not None
    transport.send(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Filler: " + b"a" * 500 + b"\r\n"
    sent = await refused_after(transport, line, most=MAX_HEAD_BYTES + len(line))
    assert sent <= MAX_HEAD_BYTES + len(line)
    with pytest.raises(HeadTooLarge):
        await task
    await transport.lost.wait()
    assert client.pool.open_connections == 0


@virtual_time
async def test_a_status_line_that_never_ends_is_refused_at_the_limit_in_linear_time(
) -> None:
    # Sent in small pieces: joining each piece to what came before would take time
    # quadratic in the length (minutes for a few megabytes), and never end.
    client = Client()
    task, transport = await client.send()
    assert transport is not None
    transport.send(b"HTTP/1.1 200 ")
    await refused_after(transport, b"x" * 64, most=MAX_HEAD_BYTES + 64)
    with pytest.raises(HeadTooLarge):
        await task


@virtual_time
async def test_a_huge_header_value_is_refused_not_forwarded() -> None:
    client = Client()
    task, transport = await client.send()
    assert transport is not None
    transport.send(b"HTTP/1.1 200 OK\r\nX-Huge: ")
    piece = b"v" * 65536
    sent = await refused_after(transport, piece, most=16 * 1024 * 1024)
    assert sent <= MAX_HEAD_BYTES + len(piece)  # not 16 MiB
    with pytest.raises(HeadTooLarge):
        await task


@virtual_time
async def test_a_head_over_the_limit_is_refused_even_in_one_read_with_its_body() -> None:
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))  # 70 KiB
    client = Client()
    with pytest.raises(HeadTooLarge):
        await client.answer(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")


@virtual_time
async def test_more_than_max_fields_header_fields_are_refused() -> None:
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(MAX_FIELDS + 1))
    client = Client()
    with pytest.raises(HeadTooLarge):
        await client.answer(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")


@virtual_time
async def test_a_head_within_the_limits_passes_whole() -> None:
    fields = [(b"X-F%d" % i, b"a" * 500) for i in range(MAX_FIELDS - 1)]  # about 51 KiB
    raw = b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    client = Client()
    response, _ = await client.answer(b"HTTP/1.1 200 OK\r\n" + raw[:30000], raw[30000:]
                                      + b"Content-Length: 2\r\n\r\nok")
    assert response.raw_headers == [*fields, (b"Content-Length", b"2")]
    assert await response.read() == b"ok"


@virtual_time
async def test_interim_answers_without_end_are_refused_at_the_limit() -> None:
    client = Client()
    task, transport = await client.send()
    assert transport is not None
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    await refused_after(transport, early, most=MAX_HEAD_BYTES + len(early))
    with pytest.raises(HeadTooLarge):
        await task


@virtual_time
async def test_trailers_without_end_are_refused_at_the_limit() -> None:
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
    line = b"X-Trailer: " + b"t" * 200 + b"\r\n"
    await refused_after(transport, line, most=MAX_HEAD_BYTES + len(line))
    assert await response.readany() == b"hello"
    with pytest.raises(HeadTooLarge):
        await response.readany()


@virtual_time
async def test_trailers_of_a_chunked_answer_never_join_its_head() -> None:
    client = Client()
    response, _ = await client.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nSet-Cookie: t=1\r\n\r\n")
    assert response.raw_headers == [(b"Transfer-Encoding", b"chunked")]
    assert await response.read() == b"hello"
    response.release()
    assert client.pool.idle_connections == 1  # and the connection is fine to reuse
    again, _ = await client.answer(OK)
    assert await again.read() == b"ok"
    assert len(client.net.transports) == 1


# ------------------------------------------------------------------ deadlines


@virtual_time
async def test_nothing_is_written_once_the_deadline_has_passed() -> None:
    client = Client()
    first, _ = await client.answer(OK)
    await first.read()
    first.release()
    task, transport = await client.send(within=0)
    assert transport is None  # the idle connection got no byte
    with pytest.raises(TimeoutError):
        await task
    assert client.net.last.request.count(b"GET ") == 1
    assert client.pool.idle_connections == 1  # it carried nothing: still usable


@virtual_time
async def test_waiting_for_a_free_connection_ends_at_the_deadline() -> None:
    client = Client(limit=1)
    holder, _ = await client.send(within=300)  # holds the one connection, unanswered
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiter, transport = await client.send(within=5)
    assert transport is None
    with pytest.raises(TimeoutError):
        await waiter
    assert loop.time() - started == pytest.approx(5)
    assert client.net.last.request.count(b"GET ") == 1  # the waiter never went out
    assert not holder.done()


@virtual_time
async def test_waiters_get_a_connection_given_back_first_come_first_served() -> None:
    client = Client(limit=1)
    holder, transport = await client.send()
    assert transport is not None
    first, _ = await client.send()
    second, _ = await client.send()
    transport.send(OK)
    answer = await holder
    assert await answer.read() == b"ok"
    answer.release()
    await settle()
    assert not second.done()
    transport.send(OK)
    assert (await first).status == 200
    assert not second.done()
    assert client.pool.in_use == 1


@virtual_time
async def test_a_waiter_handed_a_connection_as_it_gives_up_passes_it_on() -> None:
    client = Client(limit=1)
    holder, transport = await client.send()
    assert transport is not None
    leaving, _ = await client.send()
    staying, _ = await client.send()
    transport.send(OK)
    answer = await holder
    await answer.read()
    answer.release()  # hands the slot to `leaving`, which has not run yet...
    leaving.cancel()  # ...and is cancelled before it could
    await settle()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    transport.send(OK)
    assert (await staying).status == 200  # the slot went on, not lost


@pytest.mark.parametrize("moment", ["before", "as"])
@virtual_time
async def test_a_waiter_that_gives_up_leaves_the_line(moment: str) -> None:
    client = Client(limit=1)
    holder, transport = await client.send()
    assert transport is not None
    leaving, _ = await client.send()
    staying, _ = await client.send()
    transport.send(OK)
    answer = await holder
    await answer.read()
    leaving.cancel()
    if moment == "before":
        await settle()
    answer.release()  # "as": in the same moment, before the one leaving has run
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await settle()
    transport.send(OK)
    assert (await staying).status == 200  # not stuck behind the one that left


@virtual_time
async def test_connect_ends_at_the_deadline_when_that_comes_first() -> None:
    client = Client(connect_timeout=10)
    client.net.hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    task, _ = await client.send(within=3)
    with pytest.raises(TimeoutError):
        await task
    assert loop.time() - started == pytest.approx(3)
    assert client.pool.in_use == 0


@virtual_time
async def test_connect_timeout_bounds_a_connect_that_never_completes() -> None:
    client = Client(connect_timeout=2)
    client.net.hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    task, _ = await client.send(within=300)
    with pytest.raises(TimeoutError):
        await task
    assert loop.time() - started == pytest.approx(2)


@virtual_time
async def test_a_refused_connect_is_connect_failed() -> None:
    client = Client()
    client.net.refuse = ConnectionRefusedError("refused")
    task, _ = await client.send()
    with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
        await task
    assert client.pool.in_use == 0
    client.net.refuse = None
    response, _ = await client.answer(OK)  # the slot was given back
    assert response.status == 200


@virtual_time
async def test_the_deadline_fails_an_answer_whose_body_stalls() -> None:
    client = Client()
    loop = asyncio.get_running_loop()
    started = loop.time()
    task, transport = await client.send(within=30)
    assert transport is not None
    transport.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    response = await task
    assert await response.readany() == b"abc"
    with pytest.raises(TimeoutError):
        await response.readany()
    assert loop.time() - started == pytest.approx(30)
    assert transport.is_closing()


@virtual_time
async def test_the_deadline_fails_a_head_that_never_comes() -> None:
    client = Client()
    task, transport = await client.send(within=30)
    with pytest.raises(TimeoutError):
        await task
    assert transport is not None and transport.is_closing()


@virtual_time
async def test_no_piece_of_an_upload_leaves_after_the_deadline() -> None:
    client = Client()
    gate = asyncio.Event()
    task, transport = await client.send("POST", chunks(b"early", b"late", gate=gate),
                                        within=10)
    assert transport is not None
    loop: Any = asyncio.get_running_loop()
    loop.now += 11  # the loop was busy past the deadline; its timer has not run yet
    gate.set()  # the next piece is ready first
    with pytest.raises(TimeoutError):
        await task
    assert b"early" in transport.request and b"late" not in transport.request
    assert transport.is_closing()


@virtual_time
async def test_the_keep_alive_resend_never_leaves_after_the_deadline() -> None:
    client = Client(connect_timeout=60)
    first, _ = await client.answer(OK)
    await first.read()
    first.release()
    loop = asyncio.get_running_loop()
    started = loop.time()
    task, transport = await client.send(within=5)
    assert transport is not None
    client.net.hang = True  # the fresh connection for the resend takes for ever
    transport.send_eof()  # bol closed the idle connection as the request went out
    with pytest.raises(TimeoutError):
        await task
    assert loop.time() - started == pytest.approx(5)  # not connect_timeout's 60
    assert len(client.net.transports) == 1  # no second connection, no second request


# ------------------------------------------------------------------ transfer codings


@pytest.mark.parametrize("fields", [
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\t\r\n",
    b"Transfer-Encoding: chunked,\r\n",
], ids=["gzip-chunked", "gzip", "chunked-gzip", "identity", "twice", "two-fields",
        "trailing-tab", "trailing-comma"])
@virtual_time
async def test_transfer_codings_other_than_chunked_are_refused(fields: bytes) -> None:
    client = Client()
    body = b"5\r\nhello\r\n0\r\n\r\n"
    with pytest.raises(UnsupportedTransferCoding):
        await client.answer(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n" + body)
    await client.net.last.lost.wait()
    assert client.pool.open_connections == 0


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b"\tchunked  "])
@virtual_time
async def test_chunked_is_read_in_any_letter_case_and_with_surrounding_whitespace(
        value: bytes) -> None:
    client = Client()
    response, _ = await client.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value
                                      + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert await response.read() == b"hello"
    response.release()
    assert client.pool.idle_connections == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/0.9 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
], ids=["length-and-chunked", "length-twice", "length-list", "bare-lf", "obs-fold",
        "http2", "http09", "status-below-100", "switching-protocols", "not-http"])
@virtual_time
async def test_malformed_answers_are_refused_and_their_connection_closed(
        answer: bytes) -> None:
    client = Client()
    with pytest.raises(MalformedAnswer):
        await client.answer(answer)
    await client.net.last.lost.wait()
    assert client.pool.open_connections == 0


@pytest.mark.parametrize("reason", [b"Tout\tva bien, \xe9t\xe9", b"O\x00K \x01\x7f", b""],
                         ids=["tab-and-beyond-ascii", "control-bytes", "none"])
@virtual_time
async def test_the_reason_phrase_is_passed_on_as_it_came(reason: bytes) -> None:
    # It carries no meaning (RFC 9112 §4): the forwarder decides what the tool sees.
    client = Client()
    response, _ = await client.answer(b"HTTP/1.1 200 " + reason + b"\r\n"
                                      b"Content-Length: 2\r\n\r\nok")
    assert response.reason == reason.decode("latin-1")
    assert await response.read() == b"ok"


@virtual_time
async def test_a_refusal_mid_body_is_reported_as_such_not_as_the_close_after_it() -> None:
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4 \r\nabcd\r\n")
    await transport.lost.wait()  # the client closed the connection on refusing
    with pytest.raises(MalformedAnswer) as refused:
        await response.read()
    assert "Invalid character in chunk size" in str(refused.value.__cause__)


# ------------------------------------------------------------------ idle connections


@virtual_time
async def test_idle_connections_are_closed_after_the_idle_timeout() -> None:
    client = Client()
    response, transport = await client.answer(OK)
    await response.read()
    response.release()
    loop = asyncio.get_running_loop()
    idle_from = loop.time()
    await advance(IDLE_TIMEOUT - 0.1)
    assert client.pool.idle_connections == 1 and not transport.is_closing()
    await transport.lost.wait()
    assert loop.time() == pytest.approx(idle_from + IDLE_TIMEOUT)
    assert client.pool.open_connections == 0


@virtual_time
async def test_each_idle_connection_is_closed_at_its_own_time() -> None:
    client = Client()
    a, transport_a = await client.send()
    b, transport_b = await client.send()
    assert transport_a is not None and transport_b is not None and transport_a is not transport_b
    loop = asyncio.get_running_loop()
    for task, transport in ((a, transport_a), (b, transport_b)):
        transport.send(OK)
        response = await task
        await response.read()
        response.release()
        if task is a:
            released_a = loop.time()
            await advance(5)
    await transport_a.lost.wait()
    assert loop.time() == pytest.approx(released_a + IDLE_TIMEOUT)
    assert not transport_b.is_closing()
    await transport_b.lost.wait()
    assert loop.time() == pytest.approx(released_a + 5 + IDLE_TIMEOUT)


@virtual_time
async def test_a_connection_in_use_is_not_swept() -> None:
    client = Client()
    first, transport = await client.answer(OK)
    await first.read()
    first.release()
    await advance(IDLE_TIMEOUT - 1)
    task, again = await client.send(within=600)
    assert again is transport
    await advance(2 * IDLE_TIMEOUT)  # busy, unanswered: the sweep passes it by
    assert not transport.is_closing() and not task.done()


@virtual_time
async def test_a_connection_left_idle_too_long_is_not_reused_when_the_sweep_is_late(
) -> None:
    client = Client()
    first, transport = await client.answer(OK)
    await first.read()
    first.release()
    loop: Any = asyncio.get_running_loop()
    loop.now += IDLE_TIMEOUT + 5  # a loop too busy to sweep
    _, fresh = await client.send()
    assert fresh is not transport and transport.is_closing()


@virtual_time
async def test_an_idle_connection_closed_by_bol_leaves_the_pool_at_once() -> None:
    client = Client()
    response, transport = await client.answer(OK)
    await response.read()
    response.release()
    assert client.pool.idle_connections == 1
    transport.send_eof()
    await settle()
    assert client.pool.idle_connections == 0 and client.pool.open_connections == 0
    _, fresh = await client.send()
    assert fresh is not transport


@virtual_time
async def test_bytes_arriving_while_idle_close_the_connection() -> None:
    client = Client()
    response, transport = await client.answer(OK)
    await response.read()
    response.release()
    transport.send(b"HTTP/1.1 200 OK\r\n")  # an answer nobody asked for
    await transport.lost.wait()
    assert client.pool.open_connections == 0


# ------------------------------------------------------------------ reuse and framing


@virtual_time
async def test_a_second_answer_glued_to_the_first_retires_the_connection() -> None:
    client = Client()
    response, transport = await client.answer(OK + b"HTTP/1.1 200 OK\r\n")
    assert await response.read() == b"ok"  # the answer stands
    response.release()
    await transport.lost.wait()
    assert client.pool.open_connections == 0


@virtual_time
async def test_bytes_after_a_complete_answer_retire_it_before_release() -> None:
    client = Client()
    response, transport = await client.answer(OK)
    transport.send(b"junk")
    assert await response.read() == b"ok"
    response.release()
    assert client.pool.idle_connections == 0 and transport.is_closing()


@virtual_time
async def test_interim_answers_are_skipped() -> None:
    client = Client()
    response, _ = await client.answer(
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nLocation: /x\r\nContent-Length: 2\r\n\r\nok")
    assert (response.status, response.reason) == (201, "Created")
    assert response.raw_headers == [(b"Location", b"/x"), (b"Content-Length", b"2")]
    assert await response.read() == b"ok"
    response.release()
    assert client.pool.idle_connections == 1


@pytest.mark.parametrize("fields", [b"Content-Length: 1000\r\n", b"Content-Length: 0\r\n",
                                    b""], ids=["length", "zero", "none"])
@virtual_time
async def test_head_answers_end_with_their_head_and_the_connection_is_reused(
        fields: bytes) -> None:
    client = Client()
    response, transport = await client.answer(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n",
                                              method="HEAD")
    assert response.complete and response.content_length == 0
    assert await response.read() == b""
    response.release()
    assert client.pool.idle_connections == 1
    again, reused = await client.answer(OK)
    assert reused is transport
    assert await again.read() == b"ok"


@pytest.mark.parametrize("after", [b"", b"0\r\n\r\n"], ids=["alone", "stray-last-chunk"])
@virtual_time
async def test_a_head_answer_announcing_chunked_retires_the_connection(after: bytes) -> None:
    # A stray last chunk after it would pass for the end of the announced body, unseen.
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + after, method="HEAD")
    assert await response.read() == b""
    response.release()
    assert transport.is_closing() and client.pool.open_connections == 0


@virtual_time
async def test_a_head_answer_followed_by_the_body_it_announces_retires_the_connection(
) -> None:
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", method="HEAD")
    assert await response.read() == b""
    response.release()
    await transport.lost.wait()
    assert client.pool.open_connections == 0


@pytest.mark.parametrize("status", [204, 304])
@virtual_time
async def test_204_and_304_have_no_body_whatever_their_head_says(status: int) -> None:
    client = Client()
    response, _ = await client.answer(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert response.framing is Framing.NO_BODY
    assert await response.read() == b""
    response.release()
    assert client.pool.idle_connections == 1


@virtual_time
async def test_connection_close_retires_the_connection() -> None:
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert await response.read() == b"ok"
    response.release()
    assert client.pool.open_connections == 0 and transport.is_closing()


@pytest.mark.parametrize("fields", [b"", b"Connection: keep-alive\r\n"],
                         ids=["plain", "keep-alive"])
@virtual_time
async def test_http10_answers_are_read_and_their_connection_never_reused(
        fields: bytes) -> None:
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.0 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
    assert await response.read() == b"ok"
    response.release()
    assert client.pool.open_connections == 0 and transport.is_closing()


@virtual_time
async def test_an_http10_body_delimited_by_the_close_is_read_to_the_close() -> None:
    client = Client()
    response, transport = await client.answer(b"HTTP/1.0 200 OK\r\n\r\nall ", b"of it")
    assert response.framing is Framing.UNTIL_CLOSE and not response.complete
    transport.send_eof()
    assert await response.read() == b"all of it"


@virtual_time
async def test_a_body_delimited_by_the_close_fails_at_a_reset() -> None:
    client = Client()
    response, transport = await client.answer(b"HTTP/1.1 200 OK\r\n\r\npart")
    assert await response.readany() == b"part"
    transport.reset()
    with pytest.raises(ConnectionLost):
        await response.readany()


@pytest.mark.parametrize("cut", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
], ids=["content-length", "mid-chunk", "between-chunks"])
@virtual_time
async def test_a_body_cut_by_a_clean_close_is_never_complete(cut: bytes) -> None:
    client = Client()
    response, transport = await client.answer(cut)
    transport.send_eof()
    with pytest.raises(ConnectionLost):
        await response.read()


@virtual_time
async def test_an_answer_released_before_its_end_closes_the_connection() -> None:
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    response.release()
    assert transport.is_closing() and client.pool.open_connections == 0
    response.close()  # harmless afterwards


@virtual_time
async def test_an_answer_not_read_to_its_end_closes_the_connection() -> None:
    client = Client()
    response, transport = await client.answer(OK)
    response.release()  # complete, but its body never read
    assert transport.is_closing()


@virtual_time
async def test_an_answer_closed_by_its_reader_closes_the_connection() -> None:
    client = Client()
    response, transport = await client.answer(OK)
    response.close()
    response.release()  # harmless afterwards
    assert transport.is_closing() and client.pool.open_connections == 0


@virtual_time
async def test_an_answer_arriving_as_its_request_is_cancelled_is_dropped() -> None:
    client = Client()
    task, transport = await client.send()
    assert transport is not None
    task.cancel()  # the client went away...
    transport.send(OK)  # ...in the moment the answer came
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.is_closing() and client.pool.open_connections == 0


# ------------------------------------------------------------------ the keep-alive race


@pytest.mark.parametrize(("method", "body", "resent"), [
    ("GET", None, True),
    ("HEAD", None, True),
    ("GET", b"{}", True),  # a body kept whole can be sent again
    ("POST", b"{}", False),  # bol may have acted on it
    ("GET", "stream", False),  # a streamed body is gone
])
@virtual_time
async def test_the_keep_alive_race_resends_only_idempotent_replayable_requests(
        method: str, body: bytes | str | None, resent: bool) -> None:
    client = Client()
    first, transport = await client.answer(OK)
    await first.read()
    first.release()
    payload: Payload = chunks(b"{}") if body == "stream" else body  # type: ignore[assignment]
    task, reused = await client.send(method, payload, length=2 if body == "stream" else None)
    assert reused is transport
    transport.send_eof()  # closed before one byte of an answer
    await settle()
    if resent:
        client.net.last.send(OK)
        assert (await task).status == 200
        assert len(client.net.transports) == 2
        assert client.net.last.request.startswith(method.encode() + b" /retailer/orders")
    else:
        with pytest.raises(ConnectionLost):
            await task
        assert len(client.net.transports) == 1


@virtual_time
async def test_the_keep_alive_race_is_not_assumed_once_an_answer_began() -> None:
    client = Client()
    first, transport = await client.answer(OK)
    await first.read()
    first.release()
    task, _ = await client.send()
    transport.send(b"HTTP/1.1 200 OK\r\n")
    transport.send_eof()
    with pytest.raises(ConnectionLost):
        await task
    assert len(client.net.transports) == 1


@virtual_time
async def test_a_fresh_connection_closed_before_an_answer_is_not_resent() -> None:
    client = Client()
    task, transport = await client.send()
    assert transport is not None
    transport.send_eof()
    with pytest.raises(ConnectionLost):
        await task
    assert len(client.net.transports) == 1


# ------------------------------------------------------------------ flow control


@virtual_time
async def test_flow_control_pauses_and_resumes_a_transport_once() -> None:
    transport = ScriptedTransport(asyncio.Protocol())
    flow = FlowControl(transport)
    flow.pause_reading()
    flow.pause_reading()
    flow.resume_reading()
    flow.resume_reading()
    assert transport.events == ["pause_reading", "resume_reading"]
    flow.pause_reading()
    transport.abort()  # its connection_lost is due on the next loop round: none here
    flow.resume_reading()  # not on a closing transport
    assert transport.events[-2:] == ["pause_reading", "close"]


@virtual_time
async def test_one_read_of_many_chunks_pauses_reading_once() -> None:
    client = Client()
    big = b"c" * HIGH_WATER
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(big), big) for _ in range(3)) + b"0\r\n\r\n")
    assert transport.events == ["pause_reading"]
    assert len(await response.read()) == 3 * HIGH_WATER
    assert response.at_eof()


@virtual_time
async def test_reading_pauses_above_high_water_and_resumes_once_read() -> None:
    size = 4 * HIGH_WATER
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    piece = b"b" * (HIGH_WATER // 4)
    transport.send(*[piece] * 16)  # all of the body, in 16 reads
    assert transport.events == ["pause_reading"]  # after the 5th read: over HIGH_WATER
    received = await response.readany()  # all that arrived: then reading resumes, and
    assert len(received) == 5 * len(piece)  # five more reads arrive before the next pause
    assert transport.events == ["pause_reading", "resume_reading", "pause_reading"]
    total = len(received)
    while chunk := await response.readany():
        total += len(chunk)
    assert total == size
    assert transport.events.count("pause_reading") == transport.events.count("resume_reading")
    response.release()
    assert client.pool.idle_connections == 1


@virtual_time
async def test_a_streamed_upload_waits_while_the_transport_cannot_take_more() -> None:
    client = Client()
    gate = asyncio.Event()
    task, transport = await client.send("POST", chunks(b"first", b"second", gate=gate))
    assert transport is not None
    transport.block_writes()  # the send buffer is full
    gate.set()
    await settle()
    assert transport.request.endswith(b"5\r\nfirst\r\n6\r\nsecond\r\n")  # written, then waits
    transport.unblock_writes()
    await settle()
    assert transport.request.endswith(b"6\r\nsecond\r\n0\r\n\r\n")
    transport.send(OK)
    response = await task
    assert await response.read() == b"ok"
    response.release()
    assert client.pool.idle_connections == 1  # the whole request went out: reusable


@virtual_time
async def test_an_upload_waiting_to_write_fails_when_bol_closes() -> None:
    client = Client()
    gate = asyncio.Event()
    task, transport = await client.send("POST", chunks(b"first", b"second", gate=gate),
                                        length=11)
    assert transport is not None
    transport.block_writes()
    gate.set()
    await settle()  # "second" written: the upload now waits for the transport
    transport.reset()
    with pytest.raises(ConnectionLost):
        await task
    assert transport.request.endswith(b"firstsecond")


@virtual_time
async def test_an_answer_during_an_upload_cuts_the_upload_and_retires_the_connection(
) -> None:
    client = Client()
    gate = asyncio.Event()
    task, transport = await client.send("PUT", chunks(b"part one", b"never sent", gate=gate))
    assert transport is not None
    transport.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    response = await task
    assert response.status == 413
    gate.set()
    await settle()
    assert b"never sent" not in transport.request
    response.release()
    assert transport.is_closing() and client.pool.open_connections == 0


@virtual_time
async def test_empty_pieces_of_an_upload_are_not_sent_as_a_last_chunk() -> None:
    client = Client()
    task, transport = await client.send("POST", chunks(b"", b"data", b""))
    assert transport is not None
    assert transport.request.endswith(b"\r\n\r\n4\r\ndata\r\n0\r\n\r\n")
    transport.send(OK)
    assert (await task).status == 200


@virtual_time
async def test_a_failing_upload_fails_the_request_and_closes_the_connection() -> None:
    class ClientGone(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        raise ClientGone

    client = Client()
    task, transport = await client.send("POST", failing(), length=100)
    with pytest.raises(ClientGone):
        await task
    assert transport is not None and transport.is_closing()


# ------------------------------------------------------------------ the pool


@virtual_time
async def test_retire_closes_idle_connections_now_and_busy_ones_after_their_answer() -> None:
    client = Client()
    idle, idle_transport = await client.answer(OK)
    await idle.read()
    task, busy_transport = await client.send()
    idle.release()
    assert busy_transport is not idle_transport and busy_transport is not None
    client.pool.retire()
    assert idle_transport.is_closing() and not busy_transport.is_closing()
    busy_transport.send(OK)
    answer = await task
    assert await answer.read() == b"ok"
    answer.release()
    assert busy_transport.is_closing() and client.pool.open_connections == 0


@virtual_time
async def test_close_closes_every_connection() -> None:
    client = Client()
    idle, _ = await client.answer(OK)
    await idle.read()
    task, _ = await client.send()
    idle.release()
    await client.pool.close()
    assert all(t.is_closing() for t in client.net.transports)
    with pytest.raises(ConnectionLost):
        await task
    assert client.pool.open_connections == 0


@virtual_time
async def test_a_deadline_passed_after_retirement_closes_the_unused_connection() -> None:
    client = Client()
    first, _ = await client.answer(OK)
    await first.read()
    first.release()
    client.pool.retire()
    task, _ = await client.send(within=0)
    with pytest.raises(TimeoutError):
        await task
    assert client.pool.open_connections == 0


@virtual_time
async def test_repr_shows_state_and_reuse_but_never_a_header_value() -> None:
    client = Client()
    response, transport = await client.answer(
        b"HTTP/1.1 200 Secret-Reason\r\nSet-Cookie: session=top-secret\r\n"
        b"Content-Length: 2\r\n\r\nok")
    await response.read()
    response.release()
    again, _ = await client.answer(OK)
    conn: Any = transport.protocol
    text = repr(conn) + repr(response) + repr(again)
    assert "reused 1 times" in repr(conn) and "receiving body" not in repr(conn)
    assert conn.state is State.DONE
    assert repr(response) == "<Response 200 content-length, complete>"
    for secret in ("top-secret", "Secret-Reason", TOKEN.split()[1], "session"):
        assert secret not in text


def test_a_test_that_waits_for_nothing_fails_at_once() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(Deadlock):
        run(forever())


# ------------------------------------------------------------------ through the forwarder


async def test_a_401_replay_is_not_sent_once_the_deadline_has_passed(
        start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    # bol answers 401; the renewed token comes only after the exchange's deadline (1 s).
    # The replay would be a request bol gets after the proxy's client was told it timed
    # out: it must not leave.
    seen: list[bytes] = []
    gave_up = asyncio.Event()  # the proxy closed the 401's connection at the deadline

    async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                seen.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
                             if len(seen) == 1 else OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            gave_up.set()
        finally:
            writer.close()

    async def token(request: web.Request) -> web.Response:
        if seen:  # the renewal after the 401, not a fetch at start
            await asyncio.wait_for(gave_up.wait(), 5)
        return web.json_response({"access_token": f"token-{len(seen)}",
                                  "token_type": "Bearer", "expires_in": 299})

    server = await asyncio.start_server(api, "127.0.0.1", 0)
    app = web.Application()
    app.router.add_post("/token", token)
    runner, login = await serve(app)
    try:
        api_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proxy = await start_proxy(base_config(login, upstream={
            "api_url": api_url, "token_url": login + "/token", "timeout": 1}))
        async with http.get(f"http://127.0.0.1:{proxy.port()}/retailer/orders") as resp:
            assert resp.status == 504
        assert len(seen) == 1
    finally:
        server.close()
        await server.wait_closed()
        await runner.cleanup()
