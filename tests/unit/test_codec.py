"""The HTTP/1.1 codec seam (core/http1.py) and the h11 codec (core/h11codec.py).

Synchronous, no event loop: bytes are fed in, events read out, exactly as the I/O edge drives them.
The smuggling defences follow the reference §2.11 table (Envoy 1.40 behaviour is the target; where
h11 is laxer the codec must close the gap).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.core.codecs import CodecFactory
from meshproxy.core.http1 import (
    MAX_CHUNK_SIZE,
    MAX_HEAD_BYTES,
    Body,
    ClientCodec,
    EndOfMessage,
    Informational,
    RequestEvent,
    RequestHead,
    ResponseEvent,
    ResponseHead,
    ServerCodec,
    Signal,
    check_head_size,
    check_request_head,
)
from meshproxy.errors import (
    BadRequest,
    HeadersTooLarge,
    NotImplementedEncoding,
    UpgradeRequired,
    UpstreamProtocolError,
)

# Every test taking `codecs` runs against both codecs (tests/conftest.py). llhttp rejects bare-LF
# line endings and obs-fold, which h11 (and Envoy) accept: those tests stay h11's, and
# tests/unit/test_codec_conformance.py pins the difference.
H11_ONLY = pytest.mark.parametrize("codecs", ["h11"], indirect=True)

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
POST_HEAD = b"POST /p HTTP/1.1\r\nHost: a\r\n"
OK_EMPTY = ResponseHead(status=200, headers=[(b"content-length", b"0")], reason=b"OK")


def drain(codec: ServerCodec) -> list[RequestEvent]:
    """Read events until the codec needs more input (or pauses, or the peer closed)."""
    events: list[RequestEvent] = []
    while True:
        event = codec.next_event()
        events.append(event)
        if isinstance(event, Signal):
            return events


def server(codecs: CodecFactory, *chunks: bytes) -> tuple[ServerCodec, list[RequestEvent]]:
    codec = codecs.server()
    events: list[RequestEvent] = []
    for chunk in chunks:
        codec.feed(chunk)
        events.extend(drain(codec))
    return codec, events


def body_of(events: list[RequestEvent]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, Body))


def head(
    headers: list[tuple[bytes, bytes]], version: bytes = b"1.1", method: bytes = b"POST"
) -> RequestHead:
    return RequestHead(method=method, target=b"/", headers=headers, http_version=version)


def respond(codec: ServerCodec, response: ResponseHead = OK_EMPTY) -> bytes:
    return codec.send_head(response) + codec.send_end()


# ---------------------------------------------------------------------------------------------
# check_request_head / check_head_size: the codec-independent checks


def test_plain_http11_head_passes() -> None:
    check_request_head(head([(b"host", b"a"), (b"content-length", b"4")]), None)
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4"
    check_request_head(head([(b"host", b"a"), (b"content-length", b"4")]), raw)


@pytest.mark.parametrize("version", [b"1.0", b"0.9", b"2.0"])
def test_version_other_than_11_is_426(version: bytes) -> None:
    with pytest.raises(UpgradeRequired) as info:
        check_request_head(head([(b"host", b"a")], version=version), None)
    assert info.value.status_hint == 426
    assert info.value.close


@pytest.mark.parametrize("te", [b"gzip", b"identity", b"xchunked", b"gzip, chunked", b"chunked, x"])
def test_transfer_encoding_other_than_chunked_is_501(te: bytes) -> None:
    with pytest.raises(NotImplementedEncoding) as info:
        check_request_head(head([(b"host", b"a"), (b"transfer-encoding", te)]), None)
    assert info.value.status_hint == 501


def test_transfer_encoding_chunked_any_case_passes() -> None:
    check_request_head(head([(b"host", b"a"), (b"transfer-encoding", b"Chunked")]), None)


def test_second_transfer_encoding_entry_is_not_hidden_by_a_chunked_one() -> None:
    # A codec that hands over repeated fields separately: `TE: gzip` + `TE: chunked` is the
    # coding list "gzip, chunked", which Envoy answers with 501 (reference §2.11).
    headers = [(b"host", b"a"), (b"transfer-encoding", b"gzip"), (b"transfer-encoding", b"chunked")]
    with pytest.raises(NotImplementedEncoding):
        check_request_head(head(headers), None)


def test_content_length_with_transfer_encoding_is_400() -> None:
    headers = [(b"host", b"a"), (b"content-length", b"3"), (b"transfer-encoding", b"chunked")]
    with pytest.raises(BadRequest) as info:
        check_request_head(head(headers), None)
    assert type(info.value) is BadRequest
    assert info.value.status_hint == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4",
        b"POST / HTTP/1.1\r\ncontent-length: 4\r\nHost: a\r\nCONTENT-LENGTH: 4",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4,4\r\nX-A: b",
        b"POST / HTTP/1.1\nHost: a\nContent-Length: 4\nContent-Length: 4",
    ],
)
def test_duplicate_content_length_in_raw_head_is_400(raw: bytes) -> None:
    # h11 merges these into one `content-length: 4`; only the raw bytes still show them.
    with pytest.raises(BadRequest) as info:
        check_request_head(head([(b"host", b"a"), (b"content-length", b"4")]), raw)
    assert type(info.value) is BadRequest


def test_header_named_like_content_length_is_not_a_duplicate() -> None:
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nX-Content-Length: 4\r\nContent-Length: 4"
    check_request_head(head([(b"host", b"a"), (b"content-length", b"4")]), raw)


def test_duplicate_content_length_entries_rejected_without_raw_head() -> None:
    # With no raw head the header list is all there is; two entries are still two fields.
    headers = [(b"host", b"a"), (b"content-length", b"4"), (b"content-length", b"4")]
    with pytest.raises(BadRequest):
        check_request_head(head(headers), None)


def test_head_size_limit_is_60_kib() -> None:
    assert MAX_HEAD_BYTES == 60 * 1024
    check_head_size(0)
    check_head_size(MAX_HEAD_BYTES)
    with pytest.raises(HeadersTooLarge) as info:
        check_head_size(MAX_HEAD_BYTES + 1)
    assert info.value.status_hint == 431
    assert isinstance(info.value, BadRequest)


# ---------------------------------------------------------------------------------------------
# H11ServerCodec: parsing


def test_get_yields_head_end_and_need_data(codecs: CodecFactory) -> None:
    _, events = server(codecs, b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nX-Mixed-Case: V\r\n\r\n")
    first, end, signal = events
    assert isinstance(first, RequestHead)
    assert first.method == b"GET"
    assert first.target == b"/x?y=1"
    assert first.http_version == b"1.1"
    assert list(first.headers) == [(b"host", b"a"), (b"x-mixed-case", b"V")]
    assert isinstance(end, EndOfMessage)
    assert end.trailers == ()
    assert signal is Signal.NEED_DATA


def test_feeding_no_bytes_is_not_end_of_input(codecs: CodecFactory) -> None:
    # The seam has feed_eof() for EOF; feed(b"") must not be read as one (h11's receive_data
    # treats b"" as EOF, after which any further bytes raise RuntimeError).
    codec, events = server(codecs, b"")
    assert events == [Signal.NEED_DATA]
    codec.feed(GET)
    assert isinstance(drain(codec)[0], RequestHead)


def test_head_fed_one_byte_at_a_time(codecs: CodecFactory) -> None:
    raw = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    _, events = server(codecs, *(raw[i : i + 1] for i in range(len(raw))))
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert len(heads) == 1
    assert body_of(events) == b"hello"
    assert any(isinstance(e, EndOfMessage) for e in events)


def test_content_length_body_in_pieces(codecs: CodecFactory) -> None:
    _, events = server(codecs, POST_HEAD + b"Content-Length: 6\r\n\r\nab", b"cd", b"ef")
    assert body_of(events) == b"abcdef"
    assert isinstance(events[-2], EndOfMessage)


def test_chunked_body_with_extension_and_trailers(codecs: CodecFactory) -> None:
    raw = POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n4;foo=bar\r\nabcd\r\n2\r\nef\r\n0\r\n"
    _, events = server(codecs, raw + b"X-T: 1\r\n\r\n")
    assert body_of(events) == b"abcdef"
    ends = [e for e in events if isinstance(e, EndOfMessage)]
    assert len(ends) == 1
    assert list(ends[0].trailers) == [(b"x-t", b"1")]


@H11_ONLY
def test_bare_lf_line_endings_accepted(codecs: CodecFactory) -> None:
    _, events = server(codecs, b"GET / HTTP/1.1\nHost: a\nX-A: b\n\n")
    first = events[0]
    assert isinstance(first, RequestHead)
    assert (b"x-a", b"b") in list(first.headers)
    assert isinstance(events[1], EndOfMessage)


@H11_ONLY
@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_obs_fold_is_unfolded(codecs: CodecFactory, eol: bytes) -> None:
    raw = eol.join([b"GET / HTTP/1.1", b"Host: a", b"X-A: b", b" c", b"", b""])
    first = server(codecs, raw)[1][0]
    assert isinstance(first, RequestHead)
    assert (b"x-a", b"b c") in list(first.headers)


@pytest.mark.parametrize(
    "raw",
    [
        POST_HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        POST_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        POST_HEAD + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        POST_HEAD + b"Content-Length: 4, 4\r\n\r\nabcd",
        POST_HEAD + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
        POST_HEAD + b"Content-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    ],
    ids=[
        "cl+te",
        "te+cl",
        "two-identical-cl-lines",
        "cl-list-4-4",
        "two-different-cl",
        "negative-cl",
        "space-before-colon",
        "nul-in-value",
        "missing-host",
    ],
)
def test_smuggling_vectors_are_400(codecs: CodecFactory, raw: bytes) -> None:
    codec = codecs.server()
    codec.feed(raw)
    with pytest.raises(BadRequest) as info:
        drain(codec)
    assert info.value.status_hint == 400
    assert info.value.flag == "DPE"
    assert info.value.close


def test_duplicate_content_length_when_head_arrives_in_pieces(codecs: CodecFactory) -> None:
    codec = codecs.server()
    raw = POST_HEAD + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"
    with pytest.raises(BadRequest):
        for i in range(0, len(raw), 7):
            codec.feed(raw[i : i + 7])
            drain(codec)


def test_chunk_size_over_64_bits_is_400(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nabc")
    with pytest.raises(BadRequest) as info:
        drain(codec)
    assert info.value.status_hint == 400


@pytest.mark.parametrize(
    "chunks",
    [
        (b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\n", b"abc"),
        (b"Transfer-Encoding: chunked\r\n\r\n", b"FFFFFFFFFFFFFFFFF1\r\n", b"abc"),
        (b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\nFFFFFFFFFFFFFFFFF1\r\n", b"abc"),
    ],
    ids=["size-line-then-data", "size-line-alone", "second-chunk"],
)
def test_chunk_size_over_64_bits_is_400_whatever_the_read_boundaries(
    codecs: CodecFactory,
    chunks: tuple[bytes, ...],
) -> None:
    # The cap must not depend on the chunk-size line and its first data byte sharing one read.
    codec = codecs.server()
    with pytest.raises(BadRequest):
        for i, chunk in enumerate(chunks):
            codec.feed(POST_HEAD + chunk if i == 0 else chunk)
            drain(codec)


def test_chunk_size_of_exactly_64_bits_is_accepted(codecs: CodecFactory) -> None:
    assert int(b"F" * 16, 16) == MAX_CHUNK_SIZE
    _, events = server(
        codecs, POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"F" * 16 + b"\r\nabc"
    )
    assert body_of(events) == b"abc"


@pytest.mark.parametrize("te", [b"gzip", b"identity", b"xchunked", b"gzip, chunked"])
def test_unsupported_transfer_encoding_is_501(codecs: CodecFactory, te: bytes) -> None:
    codec = codecs.server()
    codec.feed(POST_HEAD + b"Transfer-Encoding: " + te + b"\r\n\r\n")
    with pytest.raises(NotImplementedEncoding) as info:
        drain(codec)
    assert info.value.status_hint == 501


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    ],
)
def test_other_http_versions_are_426(codecs: CodecFactory, raw: bytes) -> None:
    codec = codecs.server()
    codec.feed(raw)
    with pytest.raises(UpgradeRequired) as info:
        drain(codec)
    assert info.value.status_hint == 426


def _big_head(size: int) -> bytes:
    lines = [b"GET / HTTP/1.1", b"Host: a"]
    i = 0
    while sum(len(line) + 2 for line in lines) < size:
        lines.append(b"X-%d: %s" % (i, b"v" * 100))
        i += 1
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_head_over_60_kib_in_one_read_is_431(codecs: CodecFactory) -> None:
    raw = _big_head(70 * 1024)
    codec = codecs.server()
    codec.feed(raw)
    with pytest.raises(HeadersTooLarge) as info:
        drain(codec)
    assert info.value.status_hint == 431


def test_head_over_60_kib_in_several_reads_is_431(codecs: CodecFactory) -> None:
    raw = _big_head(70 * 1024)
    codec = codecs.server()
    with pytest.raises(HeadersTooLarge):
        for i in range(0, len(raw), 8192):
            codec.feed(raw[i : i + 8192])
            drain(codec)


def test_head_over_60_kib_in_two_reads_before_parsing_is_431(codecs: CodecFactory) -> None:
    raw = _big_head(70 * 1024)
    codec = codecs.server()
    codec.feed(raw[:100])
    codec.feed(raw[100:])
    with pytest.raises(HeadersTooLarge):
        drain(codec)


def test_head_under_60_kib_is_accepted(codecs: CodecFactory) -> None:
    raw = _big_head(50 * 1024)
    first = server(codecs, raw)[1][0]
    assert isinstance(first, RequestHead)
    assert len(first.headers) > 400


@H11_ONLY
def test_bare_lf_head_is_not_confused_by_crlf_in_its_body(codecs: CodecFactory) -> None:
    # The head ends at the first blank line, whatever its line ending; the body is not head.
    body = b"ab\r\nContent-Length: 1\r\n\r\nz"
    raw = b"POST / HTTP/1.1\nHost: a\nContent-Length: %d\n\n" % len(body) + body
    _, events = server(codecs, raw)
    assert isinstance(events[0], RequestHead)
    assert body_of(events) == body


@H11_ONLY
def test_bare_lf_head_with_large_body_in_same_read_is_not_431(codecs: CodecFactory) -> None:
    body = b"x" * (70 * 1024) + b"\r\n\r\n"
    raw = b"POST / HTTP/1.1\nHost: a\nContent-Length: %d\n\n" % len(body) + body
    _, events = server(codecs, raw)
    assert isinstance(events[0], RequestHead)
    assert body_of(events) == body


# ---------------------------------------------------------------------------------------------
# Pipelining and keep-alive cycles


def test_pipelined_requests_are_served_in_order(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    events = drain(codec)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage, Signal]
    first = events[0]
    assert isinstance(first, RequestHead)
    assert first.target == b"/1"
    assert events[-1] is Signal.PAUSED
    assert codec.next_event() is Signal.PAUSED  # stays paused until the response is done
    assert not codec.start_next_cycle()  # response not sent yet
    respond(codec)
    assert codec.start_next_cycle()
    events = drain(codec)
    second = events[0]
    assert isinstance(second, RequestHead)
    assert second.target == b"/2"
    assert isinstance(events[1], EndOfMessage)
    assert events[2] is Signal.NEED_DATA


def test_start_next_cycle_needs_both_sides_done(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(POST_HEAD + b"Content-Length: 4\r\n\r\nab")
    drain(codec)
    respond(codec)
    assert not codec.start_next_cycle()  # request body still incomplete
    codec.feed(b"cd")
    drain(codec)
    assert codec.start_next_cycle()


@pytest.mark.parametrize(
    "second",
    [
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx",
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["two-cl-lines", "cl-list", "cl+te"],
)
@pytest.mark.parametrize("when", ["same-read", "before-next-cycle", "after-next-cycle"])
def test_smuggling_checks_hold_for_the_second_pipelined_request(
    codecs: CodecFactory, second: bytes, when: str
) -> None:
    first = b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"
    codec = codecs.server()
    codec.feed(first + second if when == "same-read" else first)
    events = drain(codec)
    assert isinstance(events[0], RequestHead)
    assert body_of(events) == b"ok"
    if when == "before-next-cycle":
        codec.feed(second)
        assert codec.next_event() is Signal.PAUSED
    respond(codec)
    assert codec.start_next_cycle()
    if when == "after-next-cycle":
        codec.feed(second[:10])
        assert drain(codec) == [Signal.NEED_DATA]
        codec.feed(second[10:])
    with pytest.raises(BadRequest):
        drain(codec)


def test_second_pipelined_head_over_60_kib_is_431(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(GET + _big_head(70 * 1024))
    drain(codec)
    respond(codec)
    assert codec.start_next_cycle()
    with pytest.raises(HeadersTooLarge):
        drain(codec)


def test_clean_close_between_requests(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(GET)
    drain(codec)
    respond(codec)
    assert codec.start_next_cycle()
    codec.feed_eof()
    assert codec.next_event() is Signal.CLOSED


def test_eof_mid_request_is_bad_request(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(POST_HEAD + b"Content-Length: 10\r\n\r\nabc")
    drain(codec)
    codec.feed_eof()
    with pytest.raises(BadRequest):
        drain(codec)


# ---------------------------------------------------------------------------------------------
# H11ServerCodec: framing our responses


def test_response_framing_with_content_length(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(GET)
    drain(codec)
    assert not codec.response_started
    assert codec.keep_alive
    response = ResponseHead(status=200, headers=[(b"content-length", b"2")], reason=b"OK")
    out = codec.send_head(response)
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    assert codec.response_started
    assert b"".join(codec.send_body(b"hi")) == b"hi"
    assert codec.send_end() == b""
    assert codec.keep_alive
    assert codec.start_next_cycle()
    assert not codec.response_started


def test_response_without_length_is_chunked_for_http11_client(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(GET)
    drain(codec)
    out = codec.send_head(ResponseHead(status=200, headers=[], reason=b"OK"))
    assert b"transfer-encoding: chunked" in out.lower()
    assert b"".join(codec.send_body(b"hello")) == b"5\r\nhello\r\n"
    assert codec.send_end([(b"x-t", b"1")]) == b"0\r\nx-t: 1\r\n\r\n"


def test_send_informational_100_continue(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(POST_HEAD + b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    drain(codec)
    out = codec.send_informational(ResponseHead(status=100, headers=[], reason=b"Continue"))
    assert out == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not codec.response_started


def test_client_connection_close_ends_keep_alive(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    drain(codec)
    assert not codec.keep_alive
    respond(codec)
    assert not codec.start_next_cycle()


def test_websocket_upgrade_switches_and_keeps_trailing_bytes(codecs: CodecFactory) -> None:
    codec = codecs.server()
    raw = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    codec.feed(raw + b"\x81\x00frame")
    events = drain(codec)
    assert isinstance(events[0], RequestHead)
    assert events[-1] is Signal.PAUSED
    assert not codec.switched
    switch = ResponseHead(
        status=101,
        headers=[(b"connection", b"upgrade"), (b"upgrade", b"websocket")],
        reason=b"Switching Protocols",
    )
    out = codec.send_informational(switch)
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert codec.switched
    assert codec.trailing_data() == b"\x81\x00frame"


def test_error_head_after_a_parse_error_is_framed_by_hand(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(b"GET / HTTP/1.1\r\nX-A : b\r\n\r\n")
    with pytest.raises(BadRequest):
        drain(codec)
    reply = ResponseHead(
        status=400, headers=[(b"content-length", b"11"), (b"connection", b"close")], reason=b"Bad"
    )
    out = codec.send_error_head(reply)
    assert out == b"HTTP/1.1 400 Bad\r\ncontent-length: 11\r\nconnection: close\r\n\r\n"


def test_error_head_after_our_own_check_is_framed_by_h11(codecs: CodecFactory) -> None:
    codec = codecs.server()
    codec.feed(POST_HEAD + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(BadRequest):
        drain(codec)
    reply = ResponseHead(status=400, headers=[(b"content-length", b"0")], reason=b"Bad Request")
    out = codec.send_error_head(reply)
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-length: 0\r\n" in out
    assert out.endswith(b"\r\n\r\n")


# ---------------------------------------------------------------------------------------------
# H11ClientCodec


def client_events(codec: ClientCodec) -> list[ResponseEvent]:
    events: list[ResponseEvent] = []
    while True:
        event = codec.next_event()
        events.append(event)
        if isinstance(event, Signal):
            return events


def test_client_frames_request_and_parses_response(codecs: CodecFactory) -> None:
    codec = codecs.client()
    request = RequestHead(
        method=b"POST", target=b"/x", headers=[(b"host", b"svc"), (b"content-length", b"2")]
    )
    assert codec.send_head(request) == b"POST /x HTTP/1.1\r\nhost: svc\r\ncontent-length: 2\r\n\r\n"
    assert b"".join(codec.send_body(b"hi")) == b"hi"
    assert codec.send_end() == b""
    assert not codec.reusable
    codec.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc")
    events = client_events(codec)
    response = events[0]
    assert isinstance(response, ResponseHead)
    assert response.status == 201
    assert response.reason == b"Created"
    assert list(response.headers) == [(b"content-length", b"3"), (b"x-a", b"b")]
    assert b"".join(bytes(e.data) for e in events if isinstance(e, Body)) == b"abc"
    assert isinstance(events[-2], EndOfMessage)
    assert events[-1] is Signal.NEED_DATA
    assert codec.reusable
    assert codec.start_next_cycle()
    assert not codec.reusable  # a fresh cycle has sent nothing yet


def test_client_chunked_request_framing(codecs: CodecFactory) -> None:
    codec = codecs.client()
    request = RequestHead(
        method=b"POST", target=b"/", headers=[(b"host", b"s"), (b"transfer-encoding", b"chunked")]
    )
    codec.send_head(request)
    assert b"".join(codec.send_body(b"abc")) == b"3\r\nabc\r\n"
    assert codec.send_end() == b"0\r\n\r\n"


def test_client_informational_response(codecs: CodecFactory) -> None:
    codec = codecs.client()
    codec.send_head(
        RequestHead(
            method=b"POST", target=b"/", headers=[(b"host", b"s"), (b"content-length", b"1")]
        )
    )
    codec.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    events = client_events(codec)
    info = events[0]
    assert isinstance(info, Informational)
    assert info.head.status == 100
    final = events[1]
    assert isinstance(final, ResponseHead)
    assert final.status == 200


def test_client_response_with_connection_close_is_not_reusable(codecs: CodecFactory) -> None:
    codec = codecs.client()
    codec.send_head(RequestHead(method=b"GET", target=b"/", headers=[(b"host", b"s")]))
    codec.send_end()
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    client_events(codec)
    assert not codec.reusable
    assert not codec.start_next_cycle()


def test_client_body_until_close(codecs: CodecFactory) -> None:
    codec = codecs.client()
    codec.send_head(RequestHead(method=b"GET", target=b"/", headers=[(b"host", b"s")]))
    codec.send_end()
    codec.feed(b"HTTP/1.1 200 OK\r\n\r\npart")
    events = client_events(codec)
    assert events[-1] is Signal.NEED_DATA
    codec.feed_eof()
    events += client_events(codec)
    assert b"".join(bytes(e.data) for e in events if isinstance(e, Body)) == b"part"
    assert any(isinstance(e, EndOfMessage) for e in events)
    assert events[-1] is Signal.CLOSED


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ],
)
def test_client_invalid_response_is_upstream_protocol_error(
    codecs: CodecFactory, raw: bytes
) -> None:
    codec = codecs.client()
    codec.send_head(RequestHead(method=b"GET", target=b"/", headers=[(b"host", b"s")]))
    codec.send_end()
    codec.feed(raw)
    with pytest.raises(UpstreamProtocolError) as info:
        client_events(codec)
    assert info.value.status_hint == 502
    assert info.value.flag == "UPE"


def test_client_trailing_data_after_response(codecs: CodecFactory) -> None:
    codec = codecs.client()
    codec.send_head(RequestHead(method=b"GET", target=b"/", headers=[(b"host", b"s")]))
    codec.send_end()
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client_events(codec)
    codec.feed(b"extra")
    assert codec.trailing_data() == b"extra"


def test_client_trailing_data_in_the_same_read_as_the_response(codecs: CodecFactory) -> None:
    # The pool drops a connection with bytes after a response; llhttp has parsed them already,
    # so the httptools codec says there are some without giving them back (see its docstring).
    codec = codecs.client()
    codec.send_head(RequestHead(method=b"GET", target=b"/", headers=[(b"host", b"s")]))
    codec.send_end()
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra")
    client_events(codec)
    assert codec.trailing_data()
    assert codec.start_next_cycle()
    assert codec.trailing_data()


# ---------------------------------------------------------------------------------------------
# Property: whatever the bytes, the server codec raises nothing but BadRequest subclasses


def _pump(codec: ServerCodec) -> None:
    """Drive the codec as the edge does: answer each request, then start the next cycle."""
    for _ in range(1000):
        event = codec.next_event()
        if isinstance(event, EndOfMessage):
            respond(codec)
            codec.start_next_cycle()
        elif event is Signal.PAUSED:
            if not codec.start_next_cycle():
                return
        elif isinstance(event, Signal):
            return


def _exercise(codecs: CodecFactory, chunks: list[bytes]) -> None:
    codec = codecs.server()
    try:
        for chunk in chunks:
            codec.feed(chunk)
            _pump(codec)
        codec.feed_eof()
        _pump(codec)
    except BadRequest:
        return


_TOKENS = [
    b"GET / HTTP/1.1\r\n",
    b"POST /x HTTP/1.1\r\n",
    b"GET / HTTP/1.0\r\n",
    b"Host: a\r\n",
    b"Content-Length: 4\r\n",
    b"Content-Length: 4, 4\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Connection: close\r\n",
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
    b"Expect: 100-continue\r\n",
    b" folded\r\n",
    b"\r\n",
    b"\n",
    b"abcd",
    b"4\r\nabcd\r\n",
    b"FFFFFFFFFFFFFFFFF1\r\n",
    b"0\r\n\r\n",
    b"X-T: 1\r\n",
]


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every CI run; fuzz deeper in benchmarks/
    # `codecs` is a stateless pair of constructors: sharing it between examples is safe.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
def test_server_codec_raises_only_bad_request_on_arbitrary_bytes(
    codecs: CodecFactory, chunks: list[bytes]
) -> None:
    _exercise(codecs, chunks)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every CI run; fuzz deeper in benchmarks/
    # `codecs` is a stateless pair of constructors: sharing it between examples is safe.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(st.sampled_from(_TOKENS) | st.binary(min_size=1, max_size=8), max_size=24),
    st.integers(min_value=1, max_value=64),
)
def test_server_codec_raises_only_bad_request_on_request_like_bytes(
    codecs: CodecFactory, tokens: list[bytes], size: int
) -> None:
    data = b"".join(tokens)
    _exercise(codecs, [data[i : i + size] for i in range(0, len(data), size)])
