"""The httptools codec: llhttp (the C parser uvicorn uses) behind the same seam as the h11 codec.

Owns the translation of llhttp's callbacks into ``core/http1.py`` events, and the framing of what we
send, written to produce the bytes h11 produces (h11 is the codec of record: same header order, the
same ``Transfer-Encoding: chunked`` / ``Connection: close`` rewrites, the same Content-Length
enforcement). Selected by ``spec.http1Codec`` (issue #7); ``pip install meshproxy[fast]``.

How it matches the h11 codec's semantics:

- llhttp parses every byte it is fed, pipelined requests included; the events of a request that
  follows the current one are queued behind a cycle boundary and handed out only after
  ``start_next_cycle()``, and ``next_event()`` says ``PAUSED`` meanwhile, as h11 does.
- What h11 rejects inside its parser and llhttp lets through is checked in ``on_headers_complete``
  in h11's order (Transfer-Encoding 501, Host missing or repeated 400), then the shared
  ``check_head_size`` / ``check_request_head`` run, as for h11. llhttp's framing leniencies that
  would hide those errors behind its own 400 are turned on, which is safe because a head that fails
  a check stops the parser before any body byte is read.
- Heads are measured for the 60 KiB limit as h11 measures them (request line to the end of the last
  header line), exactly for CRLF heads with single-space separators; an incomplete head is bounded by
  the bytes fed while it is incomplete.

Known differences (llhttp is stricter; pinned by ``tests/unit/test_codec_conformance.py``):
bare-LF line endings, obs-fold continuation lines, control characters (other than HTAB) in field
values, and methods outside llhttp's method table (lower-case or unknown ones) are 400 here where
h11 accepts them. A head with two defects (an unsupported coding and a Content-Length llhttp cannot
read) gets 400 here and 501 from h11. ``trailing_data()`` is exact after an upgrade (where its bytes
become the tunnel's) and when the bytes came in a later read; for bytes llhttp already parsed in the
same read it is non-empty but not those bytes (the pool only asks whether there are any).

Rules: sans-I/O, like ``h11codec``; httptools is an optional import, so this module is imported
only when the bootstrap selects it (``meshproxy.core.codecs``).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Sequence

import httptools

from meshproxy.core.http1 import (
    MAX_HEAD_BYTES,
    Body,
    EndOfMessage,
    Header,
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
    ProxyError,
    UpstreamProtocolError,
)

_HttpParserError = httptools.HttpParserError
_HttpParserUpgrade = httptools.HttpParserUpgrade
_EOM = EndOfMessage()
_CRLF = b"\r\n"
_LINE_ENDS = b"\r\n"
_COLON_SP = b": "
_FRAMING_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"connection"))
# Returned by trailing_data() for input llhttp has already parsed ahead (see the module docstring).
_PARSED_AHEAD = b"\r\n"
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0", "0.9": b"0.9", "2.0": b"2.0"}


class _Boundary(enum.Enum):
    """Marks the end of one request's events in the queue: the next wait for start_next_cycle()."""

    CYCLE = "cycle"


_CYCLE = _Boundary.CYCLE


class _Rejected:
    """Queued before the error of a head that our checks (not h11's parser) reject."""

    __slots__ = ("head",)

    def __init__(self, head: RequestHead) -> None:
        self.head = head


class _Stop(Exception):
    """Raised inside an llhttp callback to stop it (the raiser keeps the reason)."""


class _Framing(enum.IntEnum):
    LENGTH = 0
    CHUNKED = 1
    UNTIL_CLOSE = 2  # h11's "http/1.0" framing: the body ends when the connection does


class _LocalError(Exception):
    """A head or body we cannot frame (h11's LocalProtocolError); mapped by the caller."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _version(text: str) -> bytes:
    found = _VERSIONS.get(text)
    return found if found is not None else text.encode("latin-1")


def _comma_values(headers: HeaderList, name: bytes) -> list[bytes]:
    """h11's get_comma_header: lower-cased, comma-split, stripped, empty items dropped."""
    out: list[bytes] = []
    for found, value in headers:
        if found.lower() == name:
            for item in value.lower().split(b","):
                item = item.strip()
                if item:
                    out.append(item)
    return out


def _set_comma(headers: list[Header], name: bytes, values: Sequence[bytes]) -> list[Header]:
    """h11's set_comma_header: drop every ``name`` field, append the new ones title-cased."""
    out = [h for h in headers if h[0].lower() != name]
    title = name.title()
    out.extend((title, v) for v in values)
    return out


class _Scan:
    """One pass over a head's fields: what h11's normalize_and_validate, its keep-alive and Host
    checks, and its header writer each look at (a pass apiece there; one here, on the hot path)."""

    __slots__ = ("chunked", "close", "headers", "host_first", "hosts", "length", "upgrade")

    def __init__(self, headers: HeaderList) -> None:
        out: list[Header] = []
        length: bytes | None = None
        chunked = close = upgrade = False
        hosts = 0
        host_first = True  # every Host field already precedes every other field
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                lengths = {v.strip() for v in value.split(b",")}
                if len(lengths) != 1:
                    raise _LocalError("conflicting Content-Length headers")
                value = lengths.pop()
                if not value.isdigit() or len(value) > 20:
                    raise _LocalError("bad Content-Length")
                if length is None:
                    length = value
                elif length != value:
                    raise _LocalError("conflicting Content-Length headers")
                else:
                    continue  # h11 keeps one of identical fields
            elif lname == b"transfer-encoding":
                if chunked:
                    raise _LocalError("multiple Transfer-Encoding headers", 501)
                value = value.lower()
                if value != b"chunked":
                    raise _LocalError("Only Transfer-Encoding: chunked is supported", 501)
                chunked = True
            elif lname == b"host":
                hosts += 1
                if len(out) >= hosts:
                    host_first = False
            elif lname == b"connection":
                close = close or _has_close(value)
            elif lname == b"upgrade":
                upgrade = True
            out.append((name, value))
        self.headers = out
        self.length = int(length) if length is not None else None
        self.chunked = chunked
        self.hosts = hosts
        self.host_first = host_first
        self.close = close
        self.upgrade = upgrade


def _has_close(value: bytes) -> bool:
    """h11's `b"close" in get_comma_header(..., b"connection")` for one field value."""
    lowered = value.lower()
    return b"close" in lowered and any(item.strip() == b"close" for item in lowered.split(b","))


def _frame(first_line: bytes, scan: _Scan) -> bytes:
    """h11's write_headers (Host fields first) for a scanned head, joined once."""
    if not scan.host_first:
        parts = [first_line]
        _write_headers(parts, scan.headers)
        return b"".join(parts)
    headers = scan.headers
    if not headers:
        return first_line + _CRLF
    # name: value lines joined in C (map over bytes.join), no bytecode per field.
    return b"".join((first_line, b"\r\n".join(map(_COLON_SP.join, headers)), b"\r\n\r\n"))


def _write_headers(parts: list[bytes], headers: HeaderList) -> None:
    """h11's write_headers: Host first, then the rest in order, then the blank line."""
    rest: list[Header] = []
    for header in headers:
        if header[0].lower() == b"host":
            parts.append(b"%s: %s\r\n" % header)
        else:
            rest.append(header)
    for header in rest:
        parts.append(b"%s: %s\r\n" % header)
    parts.append(_CRLF)


def _wants_close(headers: HeaderList) -> bool:
    return any(name.lower() == b"connection" and _has_close(value) for name, value in headers)


class _BodyWriter:
    """h11's three body writers in one: Content-Length (enforced), chunked, until close."""

    __slots__ = ("framing", "left")

    def __init__(self) -> None:
        self.framing = _Framing.LENGTH
        self.left = 0

    def set(self, framing: _Framing, length: int) -> None:
        self.framing = framing
        self.left = length

    def body(self, data: bytes) -> Sequence[bytes]:
        framing = self.framing
        if framing is _Framing.LENGTH:
            self.left -= len(data)
            if self.left < 0:
                raise _LocalError("Too much data for declared Content-Length")
            return (data,)
        if framing is _Framing.CHUNKED:
            if not data:
                return ()
            return (b"%x\r\n" % len(data), data, _CRLF)
        return (data,)

    def end(self, trailers: HeaderList) -> bytes:
        framing = self.framing
        if framing is _Framing.LENGTH:
            if self.left != 0:
                raise _LocalError("Too little data for declared Content-Length")
            if trailers:
                raise _LocalError("Content-Length and trailers don't mix")
            return b""
        if framing is _Framing.CHUNKED:
            if not trailers:
                return b"0\r\n\r\n"
            parts = [b"0\r\n"]
            _write_headers(parts, trailers)
            return b"".join(parts)
        if trailers:
            raise _LocalError("can't send trailers to HTTP/1.0 client")
        return b""


def _strict_request_parser(protocol: object) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(protocol)
    # Safe leniencies: every head is checked in on_headers_complete before any body byte is read,
    # so these only let our checks answer (501 for a coding, 426 for a version) where llhttp would
    # answer 400 first. Never lenient_headers (it would let NUL and CR through in values).
    parser.set_dangerous_leniencies(
        lenient_chunked_length=True, lenient_transfer_encoding=True, lenient_version=True
    )
    return parser


def _response_parser(protocol: object) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(protocol)
    # h11 accepts a response with both Content-Length and chunked (chunked wins); so do we.
    parser.set_dangerous_leniencies(lenient_chunked_length=True, lenient_transfer_encoding=True)
    return parser


# ---------------------------------------------------------------------------------------------
# Server side


class HttptoolsServerCodec:
    """Server side: parses requests from a downstream client, frames our responses to it."""

    __slots__ = (
        "_began",
        "_close",
        "_closes",
        "_eof",
        "_error",
        "_events",
        "_head_fed",
        "_head_size",
        "_headers",
        "_in_body",
        "_keep_alive",
        "_method",
        "_parser",
        "_req_done",
        "_resp",
        "_stopped",
        "_switched",
        "_their_version",
        "_trailers",
        "_upgrade_tail",
        "_url",
        "_validated",
        "_writer",
    )

    def __init__(self) -> None:
        self._parser = _strict_request_parser(self)
        self._events: collections.deque[RequestEvent | _Boundary | _Rejected | BadRequest] = (
            collections.deque()
        )
        self._headers: list[Header] = []
        self._trailers: list[Header] = []
        self._url = b""
        self._began = False  # the current message has begun (llhttp saw its first byte)
        self._close = False  # the head being parsed says `Connection: close`
        self._closes: collections.deque[bool] = collections.deque()  # per queued head
        self._in_body = False  # headers done: further headers are trailers
        self._head_size = 0
        self._head_fed = 0  # bytes fed while a head is incomplete (the 60 KiB bound)
        self._error: BadRequest | None = None  # raised from inside a callback
        self._stopped = False  # llhttp failed: nothing more is parsed
        self._eof = False
        # The exchange in progress, as h11 tracks it.
        self._req_done = False  # the request's EndOfMessage was handed out
        self._resp = 0  # 0: no response head yet, 1: head sent, 2: response done
        self._keep_alive = True
        self._method = b""
        self._their_version = b"1.1"
        self._validated = False  # the head passed what h11's parser checks itself
        self._switched = False
        self._upgrade_tail: bytearray | None = None  # set: the request asked to switch protocols
        self._writer = _BodyWriter()

    # -- llhttp callbacks (names fixed by httptools) ------------------------------------------
    def on_message_begin(self) -> None:
        self._close = False
        self._began = True
        self._in_body = False
        self._headers = []
        self._url = b""
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # h11 strips trailing whitespace from values (llhttp keeps it) and lower-cases names.
        value = value.rstrip(b" \t")
        name = name.lower()
        if self._in_body:
            self._trailers.append((name, value))
            return
        self._head_size += len(name) + len(value) + 4
        if name == b"transfer-encoding":
            value = value.lower()  # as h11 hands it over
        elif name == b"connection" and _has_close(value):
            self._close = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_body = True
        self._trailers = []
        method: bytes = parser.get_method()
        version = _version(parser.get_http_version())
        headers = self._headers
        head = RequestHead(method=method, target=self._url, headers=headers, http_version=version)
        try:
            _check_like_h11(headers, version)
        except BadRequest as exc:
            self._error = exc
            raise _Stop from exc
        try:
            # h11 measures from the request line to the end of the last header line.
            size = len(method) + len(self._url) + len(version) + 9 + self._head_size
            check_head_size(size - 1)
            check_request_head(head, None)
        except BadRequest as exc:
            # h11 had accepted this head: its reply is framed as a response to it.
            self._events.append(_Rejected(head))
            self._closes.append(self._close)
            self._error = exc
            raise _Stop from exc
        self._head_fed = 0
        self._events.append(head)
        self._closes.append(self._close)

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        trailers = self._trailers
        self._events.append(EndOfMessage(trailers) if trailers else _EOM)
        self._events.append(_CYCLE)
        self._began = False
        self._in_body = False
        self._head_fed = 0

    # -- input ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if not data or self._stopped:
            return  # end of input is feed_eof(), never an empty read
        tail = self._upgrade_tail
        if tail is not None:
            tail += data  # after an upgrade request: raw bytes, whatever the answer will be
            return
        if not self._in_body:
            if not self._began and data[0] in _LINE_ENDS:
                # h11 wants a request line where a request starts, never an empty line.
                self._fail_with(BadRequest("no request line received"))
                return
            self._head_fed += len(data)
        try:
            self._parser.feed_data(data)
        except _HttpParserUpgrade as exc:
            self._upgrade_tail = bytearray(data[exc.args[0] :])
            return
        except _HttpParserError as exc:
            self._fail(exc)
            return
        if not self._in_body and self._began and self._head_fed > MAX_HEAD_BYTES:
            # A head still incomplete past the limit (h11's max_incomplete_event_size).
            self._fail_with(HeadersTooLarge("request head too large"))

    def _fail(self, exc: Exception) -> None:
        error = self._error
        _reraise_bug(exc)
        if error is None:
            error = BadRequest(str(exc) or type(exc).__name__)
        self._fail_with(error)

    def _fail_with(self, error: BadRequest) -> None:
        self._error = None
        self._stopped = True
        self._events.append(error)

    def feed_eof(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._stopped or self._upgrade_tail is not None:
            return
        if self._began:
            self._fail_with(BadRequest("peer closed connection without sending complete message"))

    def next_event(self) -> RequestEvent:
        events = self._events
        if not events:
            if self._req_done:
                return self._after_request()
            if self._eof and not self._stopped:
                return Signal.CLOSED
            return Signal.NEED_DATA
        event = events[0]
        if event is _CYCLE:
            return self._after_request()
        events.popleft()
        kind = type(event)
        if kind is Body:
            return event  # type: ignore[return-value]
        if kind is RequestHead:
            self._begin_exchange(event)  # type: ignore[arg-type]
            return event  # type: ignore[return-value]
        if kind is EndOfMessage:
            self._req_done = True
            return event  # type: ignore[return-value]
        if kind is _Rejected:
            self._begin_exchange(event.head)  # type: ignore[union-attr]
            return self.next_event()
        raise event  # type: ignore[misc]

    def _begin_exchange(self, head: RequestHead) -> None:
        """The request handed out now is the one our response answers (h11's per-cycle state)."""
        self._method = head.method
        self._their_version = version = head.http_version
        self._keep_alive = version >= b"1.1" and not self._closes.popleft()
        self._validated = True

    def _after_request(self) -> RequestEvent:
        """Between this request's end and start_next_cycle(), as h11 answers then."""
        events = self._events
        ahead = len(events) > 1 or (not events and self._stopped)
        if self._upgrade_tail is not None:
            return Signal.PAUSED  # h11: MIGHT_SWITCH_PROTOCOL
        if not self._keep_alive:
            if ahead:
                # h11 expects nothing after a request that closes the connection.
                events.clear()
                raise BadRequest("Got data when expecting EOF")
            return Signal.CLOSED if self._eof else Signal.NEED_DATA
        if ahead:
            return Signal.PAUSED
        return Signal.CLOSED if self._eof else Signal.NEED_DATA

    def start_next_cycle(self) -> bool:
        if not (self._req_done and self._resp == 2 and self._keep_alive) or self._switched:
            return False
        events = self._events
        if events and events[0] is _CYCLE:
            events.popleft()
        self._req_done = False
        self._resp = 0
        self._validated = False
        self._method = b""
        tail = self._upgrade_tail
        if tail is not None:
            # The upgrade was declined: what followed is the next request, for a fresh parser.
            self._upgrade_tail = None
            self._parser = _strict_request_parser(self)
            self.feed(bytes(tail))
        return True

    # -- output ---------------------------------------------------------------------------------
    def send_informational(self, head: ResponseHead) -> bytes:
        parts = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)]
        _write_headers(parts, head.headers)
        if head.status == 101 and self._upgrade_tail is not None:
            self._switched = True
        return b"".join(parts)

    def send_head(self, head: ResponseHead) -> bytes:
        try:
            return self._frame_response(head)
        except _LocalError as exc:
            raise UpstreamProtocolError(f"response cannot be forwarded: {exc}") from exc

    def _frame_response(self, head: ResponseHead) -> bytes:
        status = head.status
        if not 200 <= status < 1000:
            raise _LocalError("Response status_code should be in range [200, 1000)")
        scan = _Scan(head.headers)
        headers, length, chunked = scan.headers, scan.length, scan.chunked
        method = self._method
        # h11 chooses the headers as for GET when the request was HEAD, the writer as for HEAD.
        as_get = b"GET" if method == b"HEAD" else method
        if status in (204, 304) or (as_get == b"CONNECT" and 200 <= status < 300):
            header_framing = _Framing.LENGTH
        elif chunked:
            header_framing = _Framing.CHUNKED
        elif length is not None:
            header_framing = _Framing.LENGTH
        else:
            header_framing = _Framing.UNTIL_CLOSE
        need_close = rewritten = False
        if header_framing is not _Framing.LENGTH:
            rewritten = True
            headers = _set_comma(headers, b"content-length", ())
            if self._their_version < b"1.1":
                headers = _set_comma(headers, b"transfer-encoding", ())
                if method != b"HEAD":
                    need_close = True
                chunked = False
            else:
                headers = _set_comma(headers, b"transfer-encoding", (b"chunked",))
                chunked = True
        if not self._keep_alive or need_close:
            rewritten = True
            connection = set(_comma_values(headers, b"connection"))
            connection.discard(b"keep-alive")
            connection.add(b"close")
            headers = _set_comma(headers, b"connection", sorted(connection))
        if status in (204, 304) or method == b"HEAD" or (method == b"CONNECT" and status < 300):
            self._writer.set(_Framing.LENGTH, 0)
        elif chunked:
            self._writer.set(_Framing.CHUNKED, 0)
        elif header_framing is _Framing.LENGTH and length is not None:
            self._writer.set(_Framing.LENGTH, length)
        else:
            self._writer.set(_Framing.UNTIL_CLOSE, 0)
        first_line = b"HTTP/1.1 %d %s\r\n" % (status, head.reason)
        if rewritten:
            if _wants_close(headers):
                self._keep_alive = False
            parts = [first_line]
            _write_headers(parts, headers)
            out = b"".join(parts)
        else:
            if scan.close:
                self._keep_alive = False
            out = _frame(first_line, scan)
        self._resp = 1
        return out

    def send_body(self, data: bytes) -> Sequence[bytes]:
        try:
            return self._writer.body(data)
        except _LocalError as exc:
            raise UpstreamProtocolError(f"response cannot be forwarded: {exc}") from exc

    def send_end(self, trailers: HeaderList = ()) -> bytes:
        try:
            data = self._writer.end(trailers)
        except _LocalError as exc:
            raise UpstreamProtocolError(f"response cannot be forwarded: {exc}") from exc
        self._resp = 2
        return data

    @property
    def keep_alive(self) -> bool:
        if self._eof and not self._events and not self._began:
            return False  # h11: their side CLOSED
        return self._keep_alive or not (self._req_done or self._resp == 2)

    @property
    def response_started(self) -> bool:
        return self._resp != 0

    @property
    def switched(self) -> bool:
        return self._switched

    def trailing_data(self) -> bytes:
        tail = self._upgrade_tail
        if tail is not None:
            return bytes(tail)
        events = self._events
        if (events and events[0] is not _CYCLE) or len(events) > 1 or self._began:
            return _PARSED_AHEAD
        return b""

    def send_error_head(self, head: ResponseHead) -> bytes:
        """Frame a local reply; by hand when the request never became a head (as with h11)."""
        if self._validated and self._resp == 0:
            try:
                return self._frame_response(head)
            except _LocalError:
                pass
        parts = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)]
        parts.extend(b"%s: %s\r\n" % (n, v) for n, v in head.headers)
        parts.append(_CRLF)
        return b"".join(parts)


def _reraise_bug(exc: Exception) -> None:
    """An exception of ours inside a callback that is not a planned stop is a bug, not bad input."""
    cause = exc.__context__
    if cause is not None and not isinstance(cause, (_Stop, _HttpParserError)):
        raise cause


def _check_like_h11(headers: HeaderList, version: bytes) -> None:
    """What h11's parser rejects and llhttp lets through, in h11's order (reference §2.11)."""
    hosts = 0
    seen_te = False
    length: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            lengths = {v.strip() for v in value.split(b",")}
            if len(lengths) != 1:
                raise BadRequest("conflicting Content-Length headers")
            one = lengths.pop()
            if not one.isdigit() or len(one) > 20:
                raise BadRequest("bad Content-Length")
            if length is not None and length != one:
                raise BadRequest("conflicting Content-Length headers")
            length = one
        elif name == b"transfer-encoding":
            if seen_te:
                raise NotImplementedEncoding("multiple Transfer-Encoding headers")
            if value.lower() != b"chunked":
                raise NotImplementedEncoding("Only Transfer-Encoding: chunked is supported")
            seen_te = True
        elif name == b"host":
            hosts += 1
    if version == b"1.1" and hosts == 0:
        raise BadRequest("Missing mandatory Host: header")
    if hosts > 1:
        raise BadRequest("Found multiple Host: headers")


# ---------------------------------------------------------------------------------------------
# Client side


class HttptoolsClientCodec:
    """Client side: frames requests to an upstream, parses its responses."""

    __slots__ = (
        "_eof",
        "_events",
        "_extra",
        "_framing_fields",
        "_headers",
        "_in_body",
        "_keep_alive",
        "_length",
        "_method",
        "_parser",
        "_raw_head",
        "_reason",
        "_resp_done",
        "_sent",
        "_stopped",
        "_switched",
        "_tail",
        "_trailers",
        "_until_close",
        "_upgrade",
        "_writer",
    )

    def __init__(self) -> None:
        self._parser = _response_parser(self)
        self._upgrade = False  # our request proposed a protocol switch
        self._framing_fields = False  # the response head has a length, coding or connection field
        self._length: bytes | None = None  # a single all-digit Content-Length (no scan needed)
        self._events: collections.deque[ResponseEvent | ProxyError] = collections.deque()
        self._headers: list[Header] = []
        self._trailers: list[Header] = []
        self._reason = b""
        self._in_body = False
        self._method = b""
        self._sent = 0  # 0: nothing sent, 1: head sent, 2: request done
        self._resp_done = False
        self._keep_alive = True
        self._until_close = False  # the response's body ends with the connection
        self._stopped = False
        self._switched = False
        self._eof = False
        self._tail: bytearray | None = None  # bytes after the response (exact when in later reads)
        self._extra = False  # llhttp parsed on past the response's end within one read
        self._raw_head: bytearray | None = (
            None  # a HEAD response's raw bytes (see on_headers_complete)
        )
        self._writer = _BodyWriter()

    # -- output ---------------------------------------------------------------------------------
    def send_head(self, head: RequestHead) -> bytes:
        try:
            scan = _Scan(head.headers)
        except _LocalError as exc:
            raise BadRequest(f"request cannot be forwarded: {exc}") from exc
        hosts, length, chunked = scan.hosts, scan.length, scan.chunked
        if hosts == 0:
            raise BadRequest("request cannot be forwarded: Missing mandatory Host: header")
        if hosts > 1:
            raise BadRequest("request cannot be forwarded: Found multiple Host: headers")
        if chunked:
            self._writer.set(_Framing.CHUNKED, 0)
        else:
            self._writer.set(_Framing.LENGTH, length or 0)
        self._method = head.method
        self._upgrade = scan.upgrade
        if scan.close:
            self._keep_alive = False
        self._sent = 1
        if head.method == b"HEAD":
            self._raw_head = bytearray()
        return _frame(b"%s %s HTTP/1.1\r\n" % (head.method, head.target), scan)

    def send_body(self, data: bytes) -> Sequence[bytes]:
        try:
            return self._writer.body(data)
        except _LocalError as exc:
            raise BadRequest(f"request cannot be forwarded: {exc}") from exc

    def send_end(self, trailers: HeaderList = ()) -> bytes:
        try:
            data = self._writer.end(trailers)
        except _LocalError as exc:
            raise BadRequest(f"request cannot be forwarded: {exc}") from exc
        self._sent = 2
        return data

    # -- llhttp callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._resp_done:
            self._extra = True  # a second response in the read that finished the first
            raise _Stop
        self._headers = []
        self._reason = b""
        self._in_body = False
        self._length = None
        self._framing_fields = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        value = value.rstrip(b" \t")
        name = name.lower()
        if self._in_body:
            self._trailers.append((name, value))
            return
        self._headers.append((name, value))
        if name in _FRAMING_FIELDS:
            if name == b"content-length" and self._length is None and value.isdigit():
                self._length = value  # the usual case: one plain length, nothing to scan
            else:
                self._framing_fields = True

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        headers = self._headers
        head = ResponseHead(
            status=status,
            headers=headers,
            reason=self._reason,
            http_version=_version(parser.get_http_version()),
        )
        if status < 200:
            if status == 101 and not self._upgrade:
                # h11: a switch nobody asked for is a protocol error.
                self._events.append(UpstreamProtocolError("unexpected 101 Switching Protocols"))
                raise _Stop
            self._events.append(Informational(head))
            return
        plain = self._length
        self._length = None
        length: int | None = None if plain is None or len(plain) > 20 else int(plain)
        chunked = False
        if self._framing_fields or (plain is not None and length is None):
            self._framing_fields = False
            try:
                scan = _Scan(headers)
            except _LocalError as exc:
                self._events.append(UpstreamProtocolError(str(exc)))
                raise _Stop from exc
            length, chunked = scan.length, scan.chunked
            if scan.close:
                self._keep_alive = False
        self._in_body = True
        self._trailers = []
        if head.http_version < b"1.1":
            self._keep_alive = False  # h11's _keep_alive()
        self._events.append(head)
        if self._method == b"HEAD":
            # httptools cannot tell llhttp that a response has no body: stop it at the head.
            self._on_complete()
            raise _Stop
        self._until_close = not chunked and length is None and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        if self._in_body:
            self._on_complete()

    def _on_complete(self) -> None:
        trailers = self._trailers
        self._events.append(EndOfMessage(trailers) if trailers else _EOM)
        self._resp_done = True
        self._in_body = False
        self._trailers = []

    # -- input ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if not data:
            return
        tail = self._tail
        if tail is not None:
            tail += data
            return
        if self._resp_done:
            self._tail = bytearray(data)
            return
        if self._stopped:
            return
        raw = self._raw_head
        if raw is not None:
            raw += data
        try:
            self._parser.feed_data(data)
        except _HttpParserUpgrade as exc:
            self._switched = True
            self._tail = bytearray(data[exc.args[0] :])
        except _HttpParserError as exc:
            _reraise_bug(exc)
            if self._resp_done:
                self._after_response(raw)
                return
            self._stopped = True
            if not self._events or not isinstance(self._events[-1], ProxyError):
                self._events.append(UpstreamProtocolError(str(exc) or type(exc).__name__))

    def _after_response(self, raw: bytearray | None) -> None:
        """llhttp stopped at the end of a response: keep what followed it."""
        self._raw_head = None
        if raw is not None:
            # A HEAD response: its head ends at the first empty line; the rest trails it.
            found = raw.find(b"\n\r\n")
            skip = 3
            if found < 0:
                found, skip = raw.find(b"\n\n"), 2
            rest = raw[found + skip :] if found >= 0 else b""
            if rest:
                self._tail = bytearray(rest)
        else:
            self._extra = True
            self._tail = bytearray(_PARSED_AHEAD)

    def feed_eof(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._stopped or self._resp_done or self._switched:
            return
        if self._in_body and self._until_close:
            self._on_complete()
            return
        if self._in_body or self._headers or self._reason:
            self._events.append(
                UpstreamProtocolError("peer closed connection without sending complete message")
            )
            self._stopped = True

    def next_event(self) -> ResponseEvent:
        events = self._events
        if events:
            event = events.popleft()
            if isinstance(event, ProxyError):
                events.clear()
                raise event
            return event
        if self._switched:
            return Signal.PAUSED
        if self._resp_done and self._tail:
            return Signal.PAUSED
        if self._eof:
            return Signal.CLOSED
        return Signal.NEED_DATA

    def start_next_cycle(self) -> bool:
        if not self.reusable:
            return False
        self._sent = 0
        self._resp_done = False
        self._until_close = False
        self._raw_head = None
        if self._tail is not None or self._extra:
            # Bytes followed the response: the caller sees them in trailing_data() and drops us.
            self._stopped = True
        else:
            self._parser = _response_parser(self) if self._method == b"HEAD" else self._parser
        self._method = b""
        return True

    @property
    def reusable(self) -> bool:
        return self._sent == 2 and self._resp_done and self._keep_alive

    def trailing_data(self) -> bytes:
        tail = self._tail
        return bytes(tail) if tail is not None else b""
