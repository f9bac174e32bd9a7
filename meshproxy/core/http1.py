"""The HTTP/1.1 codec seam: message heads, events, and the sans-I/O codec interface.

Owns the vocabulary the edge and the layers speak about HTTP/1.1 messages, independent of the parser
behind it. h11 is the codec of record (``core/h11codec.py``); a faster codec (httptools) slots in
beside it by implementing ``ServerCodec`` and ``ClientCodec``. The request-smuggling defences that
h11 does not give us (reference §2.11) are checked here, above the codec, by ``check_request_head``,
so every codec gets them.

Rules: never sees a socket; bytes in, events out; header names are lower-case bytes, always.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from meshproxy.errors import BadRequest, HeadersTooLarge, NotImplementedEncoding, UpgradeRequired

Header = tuple[bytes, bytes]
HeaderList = Sequence[Header]

# Envoy max_request_headers_kb default (60 KiB) -> 431 beyond it (reference §2.11).
MAX_HEAD_BYTES = 60 * 1024
# A chunk-size line longer than 16 hex digits cannot fit in 64 bits; Envoy answers 400 (§2.11).
MAX_CHUNK_SIZE = (1 << 64) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: HeaderList  # lower-cased names, in wire order
    http_version: bytes = b"1.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHead:
    status: int
    headers: HeaderList
    reason: bytes = b""
    http_version: bytes = b"1.1"


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    trailers: HeaderList = ()


@dataclass(frozen=True, slots=True)
class Informational:
    """A 1xx response head (100, 103, and 101 which switches protocols)."""

    head: ResponseHead


class Signal(enum.Enum):
    NEED_DATA = "need-data"  # feed more bytes
    PAUSED = "paused"  # the next message waits until start_next_cycle() (pipelining, upgrade)
    CLOSED = "closed"  # the peer closed cleanly between messages


RequestEvent = RequestHead | Body | EndOfMessage | Signal
ResponseEvent = ResponseHead | Informational | Body | EndOfMessage | Signal


class ServerCodec(Protocol):
    """Parses requests from a client and frames the responses sent back to it."""

    def feed(self, data: bytes) -> None: ...
    def feed_eof(self) -> None: ...
    def next_event(self) -> RequestEvent:
        """Next parsed event; raises a ``BadRequest`` subclass on malformed input."""

    def send_informational(self, head: ResponseHead) -> bytes: ...
    def send_head(self, head: ResponseHead) -> bytes: ...
    def send_body(self, data: bytes) -> Sequence[bytes]: ...
    def send_end(self, trailers: HeaderList = ()) -> bytes: ...
    def start_next_cycle(self) -> bool:
        """After a complete exchange: True if the connection can carry another request."""

    @property
    def keep_alive(self) -> bool: ...
    @property
    def response_started(self) -> bool: ...
    @property
    def switched(self) -> bool: ...
    def trailing_data(self) -> bytes: ...
    def send_error_head(self, head: ResponseHead) -> bytes:
        """Frame a local reply after ``next_event`` raised, whatever state the parser is in."""


class ClientCodec(Protocol):
    """Frames requests to an upstream and parses its responses."""

    def send_head(self, head: RequestHead) -> bytes: ...
    def send_body(self, data: bytes) -> Sequence[bytes]: ...
    def send_end(self, trailers: HeaderList = ()) -> bytes: ...
    def feed(self, data: bytes) -> None: ...
    def feed_eof(self) -> None: ...
    def next_event(self) -> ResponseEvent:
        """Next parsed event; raises ``UpstreamProtocolError`` on an invalid response."""

    def start_next_cycle(self) -> bool: ...
    @property
    def reusable(self) -> bool: ...
    def trailing_data(self) -> bytes: ...


def check_request_head(head: RequestHead, raw_head: bytes | None) -> None:
    """Reject what Envoy rejects among the smuggling vectors a codec may let through (§2.11).

    ``raw_head`` is the request head exactly as received (request line to the blank line), or None
    when the codec cannot provide it; the codec reports the head size separately.
    """
    content_length: bytes | None = None
    transfer_encoding: bytes | None = None
    for name, value in head.headers:
        if name == b"content-length":
            if content_length is not None:
                raise BadRequest("duplicate content-length")
            content_length = value
        elif name == b"transfer-encoding":
            if transfer_encoding is not None:
                raise NotImplementedEncoding("more than one transfer-encoding")
            transfer_encoding = value
    if transfer_encoding is not None:
        if transfer_encoding.lower() != b"chunked":
            raise NotImplementedEncoding(f"transfer-encoding {transfer_encoding!r}")
        if content_length is not None:
            raise BadRequest("both content-length and transfer-encoding")
    if content_length is not None and raw_head is not None:
        # A codec may merge `CL: 4` twice, or `CL: 4, 4`, into one value; Envoy rejects both.
        lowered = raw_head.lower()
        if lowered.count(b"\ncontent-length:") > 1 or b"," in _header_line(lowered):
            raise BadRequest("duplicate content-length")
    if head.http_version != b"1.1":
        # Envoy with accept_http_10 off answers HTTP/1.0 (and any other version) with 426. Checked
        # last, so a head with a framing defect gets the same 400 from every codec (llhttp rejects
        # `Content-Length: 4, 4` while parsing, before it knows anything of versions).
        raise UpgradeRequired(f"HTTP/{head.http_version.decode('latin-1')} request")


def _header_line(lowered: bytes) -> bytes:
    start = lowered.find(b"\ncontent-length:")
    end = lowered.find(b"\n", start + 1)
    return lowered[start:end]


def check_head_size(size: int) -> None:
    if size > MAX_HEAD_BYTES:
        raise HeadersTooLarge(f"request head of {size} bytes")
