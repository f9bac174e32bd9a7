"""The h11 codec: meshproxy's codec of record, on both the client and the server side.

Owns the translation between h11's events and ``core/http1.py``'s, the mapping of h11 errors into
``meshproxy.errors``, and reuse of one ``h11.Connection`` across keep-alive cycles. It also keeps the
raw bytes of each request head so ``check_request_head`` can see what h11 normalises away
(duplicate Content-Length) and so the 60 KiB head limit holds even when a head arrives in one read.

Rules: sans-I/O; h11's private state is touched in one place only (the chunk-size cap) and pinned by
the h11 version range in pyproject.toml and by the conformance tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import h11

from meshproxy.core.http1 import (
    MAX_CHUNK_SIZE,
    MAX_HEAD_BYTES,
    Body,
    EndOfMessage,
    HeaderList,
    Informational,
    RequestEvent,
    RequestHead,
    ResponseEvent,
    ResponseHead,
    Signal,
    check_head_size,
    check_request_head,
)
from meshproxy.errors import (
    BadRequest,
    HeadersTooLarge,
    NotImplementedEncoding,
    UpstreamProtocolError,
)

_HEAD_END = re.compile(rb"\n\r?\n")
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
# h11 events are immutable: one shared end-of-message saves a header normalisation per message.
_H11_EOM = h11.EndOfMessage()


def _trusted(headers: HeaderList) -> list[tuple[bytes, bytes]]:
    """Headers about to be framed by h11 with ``_parsed=True``.

    Every head we send is built from headers h11 already validated when it parsed them, plus values
    we generate ourselves, so h11's per-header regex validation would only repeat work on the hot
    path. ``_parsed`` is h11's own flag for exactly this case (its readers use it); it still applies
    the framing rules (Content-Length, Transfer-Encoding). Pinned by ``h11<0.17`` in pyproject.toml.
    """
    return headers if isinstance(headers, list) else list(headers)


def _bad_request(exc: h11.RemoteProtocolError) -> BadRequest:
    hint = exc.error_status_hint
    if hint == 431:
        return HeadersTooLarge(str(exc))
    if hint == 501:
        return NotImplementedEncoding(str(exc))
    return BadRequest(str(exc))


class H11ServerCodec:
    """Server side: parses requests from a downstream client, frames our responses to it."""

    __slots__ = ("_conn", "_raw", "_want_head")

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._raw = bytearray()
        self._want_head = True

    def feed(self, data: bytes) -> None:
        if not data:
            return  # end of input is feed_eof(), never an empty read
        if self._want_head and len(self._raw) <= MAX_HEAD_BYTES:
            self._raw += data
        self._conn.receive_data(data)

    def feed_eof(self) -> None:
        self._conn.receive_data(b"")

    def next_event(self) -> RequestEvent:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _bad_request(exc) from exc
        if type(event) is h11.Data:
            # A size line can arrive in one read and its data in a later one (chunk_start is
            # then False): check what is left of the chunk on every piece of it.
            self._check_chunk(len(event.data))
            return Body(event.data)
        if type(event) is h11.Request:
            return self._on_request(event)
        if type(event) is h11.EndOfMessage:
            return EndOfMessage(event.headers) if event.headers else _EOM
        if event is _NEED_DATA:
            self._check_chunk(0)  # a size line alone is enough to reject
            return Signal.NEED_DATA
        if event is _PAUSED:
            return Signal.PAUSED
        return Signal.CLOSED  # h11.ConnectionClosed

    def _on_request(self, event: h11.Request) -> RequestHead:
        raw = self._raw
        # The head ends at the first empty line, CRLF or bare LF (which h11 also accepts).
        found = _HEAD_END.search(raw)
        end = found.start() if found is not None else -1
        raw_head = bytes(raw[:end]) if end >= 0 else None
        check_head_size(end if end >= 0 else len(raw))
        self._want_head = False
        self._raw = bytearray()
        head = RequestHead(
            method=event.method,
            target=event.target,
            headers=event.headers,
            http_version=event.http_version,
        )
        check_request_head(head, raw_head)
        return head

    def _check_chunk(self, received: int) -> None:
        # h11 accepts chunk sizes of up to 20 hex digits; Envoy rejects what overflows 64 bits.
        reader = getattr(self._conn, "_reader", None)
        remaining = getattr(reader, "_bytes_in_chunk", 0)
        if isinstance(remaining, int) and remaining + received > MAX_CHUNK_SIZE:
            raise BadRequest("chunk size over 64 bits")

    def send_informational(self, head: ResponseHead) -> bytes:
        data = self._conn.send(
            h11.InformationalResponse(
                status_code=head.status, headers=list(head.headers), reason=head.reason
            )
        )
        return data or b""

    def send_head(self, head: ResponseHead) -> bytes:
        try:
            event = h11.Response(
                status_code=head.status,
                headers=_trusted(head.headers),
                reason=head.reason,
                _parsed=True,
            )
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            raise UpstreamProtocolError(f"response cannot be forwarded: {exc}") from exc
        return data or b""

    def send_body(self, data: bytes) -> Sequence[bytes]:
        try:
            return self._conn.send_with_data_passthrough(h11.Data(data=data)) or ()
        except h11.LocalProtocolError as exc:  # more than the Content-Length it declared
            raise UpstreamProtocolError(f"response cannot be forwarded: {exc}") from exc

    def send_end(self, trailers: HeaderList = ()) -> bytes:
        event = h11.EndOfMessage(headers=list(trailers)) if trailers else _H11_EOM
        try:
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            raise UpstreamProtocolError(f"response cannot be forwarded: {exc}") from exc
        return data or b""

    def start_next_cycle(self) -> bool:
        conn = self._conn
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        # Pipelined bytes already inside h11 belong to the next head.
        self._raw = bytearray(conn.trailing_data[0])
        self._want_head = True
        return True

    @property
    def keep_alive(self) -> bool:
        return self._conn.our_state is not h11.MUST_CLOSE and self._conn.their_state not in (
            h11.MUST_CLOSE,
            h11.CLOSED,
        )

    @property
    def response_started(self) -> bool:
        return self._conn.our_state in (h11.SEND_BODY, h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def switched(self) -> bool:
        return self._conn.our_state is h11.SWITCHED_PROTOCOL

    def trailing_data(self) -> bytes:
        return self._conn.trailing_data[0]

    def send_error_head(self, head: ResponseHead) -> bytes:
        """Frame a local reply even when h11 has given up on the stream (malformed request)."""
        conn = self._conn
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                return self.send_head(head)
            except h11.LocalProtocolError:
                pass
        # h11 will not frame a response in ERROR state: write it ourselves.
        lines = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)]
        lines.extend(b"%s: %s\r\n" % (n, v) for n, v in head.headers)
        lines.append(b"\r\n")
        return b"".join(lines)


_EOM = EndOfMessage()


class H11ClientCodec:
    """Client side: frames requests to an upstream, parses its responses."""

    __slots__ = ("_conn",)

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)

    def send_head(self, head: RequestHead) -> bytes:
        try:
            event = h11.Request(
                method=head.method,
                target=head.target,
                headers=_trusted(head.headers),
                _parsed=True,
            )
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            raise BadRequest(f"request cannot be forwarded: {exc}") from exc
        return data or b""

    def send_body(self, data: bytes) -> Sequence[bytes]:
        try:
            return self._conn.send_with_data_passthrough(h11.Data(data=data)) or ()
        except h11.LocalProtocolError as exc:  # more than the Content-Length it declared
            raise BadRequest(f"request cannot be forwarded: {exc}") from exc

    def send_end(self, trailers: HeaderList = ()) -> bytes:
        event = h11.EndOfMessage(headers=list(trailers)) if trailers else _H11_EOM
        try:
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            raise BadRequest(f"request cannot be forwarded: {exc}") from exc
        return data or b""

    def feed(self, data: bytes) -> None:
        self._conn.receive_data(data)

    def feed_eof(self) -> None:
        self._conn.receive_data(b"")

    def next_event(self) -> ResponseEvent:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamProtocolError(str(exc)) from exc
        if type(event) is h11.Data:
            return Body(event.data)
        if type(event) is h11.Response:
            return ResponseHead(
                status=event.status_code,
                headers=event.headers,
                reason=event.reason,
                http_version=event.http_version,
            )
        if type(event) is h11.EndOfMessage:
            return EndOfMessage(event.headers) if event.headers else _EOM
        if type(event) is h11.InformationalResponse:
            return Informational(
                ResponseHead(status=event.status_code, headers=event.headers, reason=event.reason)
            )
        if event is _NEED_DATA:
            return Signal.NEED_DATA
        if event is _PAUSED:
            return Signal.PAUSED
        return Signal.CLOSED

    def start_next_cycle(self) -> bool:
        conn = self._conn
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True

    @property
    def reusable(self) -> bool:
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def trailing_data(self) -> bytes:
        return self._conn.trailing_data[0]
