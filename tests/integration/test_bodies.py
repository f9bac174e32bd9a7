"""Message bodies through the outbound listener: framing, bodiless responses, 100-continue,
WebSocket tunnels and clients that leave mid-request.

Every exchange runs over real loopback sockets. Clients write raw bytes and parse what comes back
byte for byte, so framing mistakes (a stray body after HEAD, a lost chunk) show up as failures
rather than being smoothed over by a lenient client library.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from helpers import (
    RawClient,
    RawResponse,
    Reply,
    RunningProxy,
    SeenRequest,
    bootstrap,
    join,
    proxy,
    service_entry,
    upstream,
)

TIMEOUT = 5.0
HOST = b"reviews:9080"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def config_for(port: int) -> str:
    return join(bootstrap(), service_entry("reviews", [port]))


# --------------------------------------------------------------------------------------------
# A raw HTTP/1.1 reader: parses exactly what is on the wire (status line, headers, framing).


@dataclass
class Head:
    status: int  # 0 for a request head
    headers: list[tuple[str, str]]
    start_line: str = ""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


async def read_head(reader: asyncio.StreamReader) -> Head:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = raw[:-4].decode("latin-1").split("\r\n")
    first, *_ = lines[0].split(" ", 2)
    if first.startswith("HTTP/"):
        assert first == "HTTP/1.1", lines[0]
        status = int(lines[0].split(" ", 2)[1])
    else:
        assert lines[0].endswith(" HTTP/1.1"), lines[0]
        status = 0
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return Head(status, headers, lines[0])


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Decode a chunked body (RFC 9112 §7.1), checking every size line and CRLF on the way."""
    body = bytearray()
    for _ in range(100_000):
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            trailer = await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT)
            assert trailer == b"\r\n", trailer  # no trailers expected
            return bytes(body)
        body += await asyncio.wait_for(reader.readexactly(size), TIMEOUT)
        assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\r\n"
    raise AssertionError("too many chunks")


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> RawResponse:
    """One final response, framed as RFC 9112 §6.3 says; 1xx heads are not expected here."""
    head = await read_head(reader)
    if head_request or head.status in (204, 304) or 100 <= head.status < 200:
        body = b""
    elif (head.header("transfer-encoding") or "").lower() == "chunked":
        body = await read_chunked(reader)
    elif head.header("content-length") is not None:
        n = int(head.header("content-length") or "0")
        body = await asyncio.wait_for(reader.readexactly(n), TIMEOUT)
    else:
        body = await asyncio.wait_for(reader.read(), TIMEOUT)
    return RawResponse(head.status, head.headers, body)


@contextlib.asynccontextmanager
async def client(
    px: RunningProxy, *, leave: str = "close"
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection; on exit it closes (FIN) or, with ``leave="reset"``, resets (RST)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
    try:
        yield reader, writer
    finally:
        if leave == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def get(target: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST.decode()}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --------------------------------------------------------------------------------------------
# A raw TCP upstream: each accepted connection is handed to the test, which plays the server.


class TcpUpstream:
    def __init__(self) -> None:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.accepted.put((reader, writer))

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.accepted.get(), TIMEOUT)

    async def __aenter__(self) -> TcpUpstream:
        self.server = await asyncio.start_server(self._on_accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Wait for the peer to close (FIN or RST); returns what was still unread."""
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        raise AssertionError(f"the connection is still open {TIMEOUT}s later") from None


def endpoint_snapshot(px: RunningProxy, port: int) -> dict[str, object]:
    assert px.app.pools is not None
    for _, pool in px.app.pools.all_pools():
        if pool.port == port:
            return pool.snapshot()
    raise AssertionError(f"no pool for port {port}")


async def admin_endpoint(px: RunningProxy, port: int) -> dict[str, object]:
    admin = await RawClient.connect(px.admin_port)
    try:
        r = await admin.request("GET", "/clusters", [("host", "admin")])
    finally:
        await admin.close()
    assert r.status == 200
    for cluster in json.loads(r.body)["clusters"]:
        for ep in cluster["endpoints"]:
            if ep["address"] == f"127.0.0.1:{port}":
                return dict(ep)
    raise AssertionError(f"no endpoint 127.0.0.1:{port} in /clusters: {r.body!r}")


NOTHING_IN_USE = {"active_requests": 0, "active_connections": 0, "idle_connections": 0}


def in_use(snap: dict[str, object]) -> dict[str, object]:
    return {k: snap[k] for k in NOTHING_IN_USE}


async def settle(px: RunningProxy, port: int) -> dict[str, object]:
    """The endpoint's counters once the proxy has run its pending close callbacks.

    The upstream seeing its connection closed and the proxy's own ``connection_lost`` are two
    callbacks of the same loop; a bounded number of loop turns lets the second one run.
    """
    snap = endpoint_snapshot(px, port)
    for _ in range(100):
        if in_use(snap) == NOTHING_IN_USE:
            break
        await asyncio.sleep(0)
        snap = endpoint_snapshot(px, port)
    return snap


# --------------------------------------------------------------------------------------------
# 1. Framing: chunked and Content-Length, both ways


async def test_chunked_request_body_reaches_upstream_chunked() -> None:
    pieces = [b"first-", os.urandom(300 * 1024), b"-last"]
    async with upstream(lambda r: Reply(body=hashlib.sha256(r.body).hexdigest().encode())) as up:
        async with proxy(config_for(up.port)) as px, client(px) as (reader, writer):
            writer.write(
                get("/upload", "Transfer-Encoding: chunked", "Content-Type: x/y", method="POST")
            )
            for piece in pieces:
                writer.write(chunk(piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            r = await read_response(reader)
    body = b"".join(pieces)
    assert r.status == 200
    assert r.body == hashlib.sha256(body).hexdigest().encode()
    seen = up.requests[0]
    assert seen.method == "POST"
    assert seen.body == body
    assert seen.all("transfer-encoding") == ["chunked"]
    assert seen.header("content-length") is None
    assert seen.header("content-type") == "x/y"


async def test_chunked_response_body_reaches_client_complete() -> None:
    pieces = [b"alpha ", os.urandom(200 * 1024), b" omega"]
    async with TcpUpstream() as up, proxy(config_for(up.port)) as px, client(px) as (cr, cw):
        cw.write(get("/stream"))
        await cw.drain()
        ur, uw = await up.accept()
        req = await read_head(ur)
        assert req.start_line == "GET /stream HTTP/1.1"
        uw.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n")
        for piece in pieces:
            uw.write(chunk(piece))
            await uw.drain()
        uw.write(b"0\r\n\r\n")
        await uw.drain()
        r = await read_response(cr)
    assert r.status == 200
    assert r.header("transfer-encoding") == "chunked"
    assert r.header("content-length") is None
    assert r.header("x-up") == "1"
    assert r.body == b"".join(pieces)


async def test_close_delimited_response_body_reaches_client_complete() -> None:
    body = os.urandom(150_000)
    async with TcpUpstream() as up, proxy(config_for(up.port)) as px, client(px) as (cr, cw):
        cw.write(get("/old"))
        await cw.drain()
        ur, uw = await up.accept()
        assert (await read_head(ur)).start_line == "GET /old HTTP/1.1"
        # No Content-Length, no Transfer-Encoding: the body ends where the connection does.
        uw.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        await uw.drain()
        uw.close()
        r = await read_response(cr)
    assert r.status == 200
    assert r.body == body


async def test_content_length_bodies_both_ways() -> None:
    request_body = os.urandom(1024 * 1024 + 7)
    response_body = os.urandom(2 * 1024 * 1024 + 3)

    def handler(req: SeenRequest) -> Reply:
        return Reply(body=response_body if req.body == request_body else b"mismatch")

    async with upstream(handler) as up, proxy(config_for(up.port)) as px:
        async with client(px) as (reader, writer):
            writer.write(get("/cl", f"Content-Length: {len(request_body)}", method="PUT"))
            writer.write(request_body)
            await writer.drain()
            r = await read_response(reader)
            # And a second exchange on the same connection: the framing left nothing behind.
            writer.write(get("/again", "Content-Length: 3", method="POST") + b"abc")
            await writer.drain()
            again = await read_response(reader)
    assert r.status == 200
    assert r.header("content-length") == str(len(response_body))
    assert r.header("transfer-encoding") is None
    assert r.body == response_body
    seen = up.requests[0]
    assert seen.header("content-length") == str(len(request_body))
    assert seen.header("transfer-encoding") is None
    assert seen.body == request_body
    assert again.status == 200
    assert up.requests[1].body == b"abc"


# --------------------------------------------------------------------------------------------
# 2. Responses without a body


async def serve_canned(up: TcpUpstream, replies: dict[str, bytes], count: int) -> None:
    """Play a keep-alive server for ``count`` bodiless requests, answering by path."""
    reader, writer = await up.accept()
    for _ in range(count):
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        method, path, _ = raw.split(b"\r\n", 1)[0].decode().split(" ")
        writer.write(replies[f"{method} {path}"])
        await writer.drain()


async def test_head_response_has_no_body_and_connection_stays_usable() -> None:
    replies = {
        "HEAD /doc": b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n",
        "GET /next": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
    }
    async with TcpUpstream() as up, proxy(config_for(up.port)) as px, client(px) as (cr, cw):
        server = asyncio.create_task(serve_canned(up, replies, 2))
        cw.write(get("/doc", method="HEAD"))
        await cw.drain()
        head = await read_head(cr)
        # Nothing may follow the HEAD response's head: the next bytes must be the next response.
        cw.write(get("/next"))
        await cw.drain()
        following = await read_response(cr)
        await asyncio.wait_for(server, TIMEOUT)
    assert head.status == 200
    assert head.header("content-length") == "1234"
    assert head.header("transfer-encoding") is None
    assert following.status == 200
    assert following.body == b"next"


async def test_204_and_304_carry_no_body_and_connection_stays_usable() -> None:
    replies = {
        "DELETE /item": b"HTTP/1.1 204 No Content\r\nX-Deleted: yes\r\n\r\n",
        "GET /cached": (b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5000\r\n\r\n'),
        "GET /next": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
    }
    async with TcpUpstream() as up, proxy(config_for(up.port)) as px, client(px) as (cr, cw):
        server = asyncio.create_task(serve_canned(up, replies, 3))
        cw.write(get("/item", method="DELETE"))
        await cw.drain()
        no_content = await read_head(cr)
        cw.write(get("/cached", 'If-None-Match: "v1"'))
        await cw.drain()
        not_modified = await read_head(cr)
        cw.write(get("/next"))
        await cw.drain()
        following = await read_response(cr)
        await asyncio.wait_for(server, TIMEOUT)
    assert no_content.status == 204
    assert no_content.header("x-deleted") == "yes"
    assert no_content.header("transfer-encoding") is None
    assert no_content.header("connection") != "close"
    assert not_modified.status == 304
    assert not_modified.header("etag") == '"v1"'
    assert not_modified.header("transfer-encoding") is None
    assert following.status == 200
    assert following.body == b"next"


# --------------------------------------------------------------------------------------------
# 3. Expect: 100-continue


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    body = os.urandom(100_000)
    async with upstream(lambda r: Reply(body=b"got %d" % len(r.body))) as up:
        async with proxy(config_for(up.port)) as px, client(px) as (reader, writer):
            writer.write(
                get("/put", "Expect: 100-continue", f"Content-Length: {len(body)}", method="PUT")
            )
            await writer.drain()
            # The body is held back until the proxy says to go on.
            interim = await read_head(reader)
            assert interim.status == 100
            assert not up.requests
            writer.write(body)
            await writer.drain()
            final = await read_response(reader)
    assert final.status == 200
    assert final.body == b"got %d" % len(body)
    seen = up.requests[0]
    assert seen.body == body
    assert seen.header("expect") is None
    assert seen.header("content-length") == str(len(body))


# --------------------------------------------------------------------------------------------
# 4. WebSocket: a real handshake and framed echo through the tunnel


def ws_frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame (RFC 6455 §5.2); clients mask, servers do not."""
    first = 0x80 | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + unmask(payload, key)


def unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


async def ws_read(reader: asyncio.StreamReader, *, expect_masked: bool) -> tuple[int, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    assert b0 & 0x80, "fragmented frames are not used here"
    assert bool(b1 & 0x80) == expect_masked
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    key = await reader.readexactly(4) if expect_masked else b""
    payload = await asyncio.wait_for(reader.readexactly(n), TIMEOUT)
    return b0 & 0x0F, unmask(payload, key) if key else payload


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


@dataclass
class EchoServer:
    """A minimal WebSocket server: handshake, then echo each data frame; answers a close."""

    up: TcpUpstream
    greeting: bytes = b""  # a frame sent in the same write as the 101
    request: Head | None = None
    messages: list[bytes] = field(default_factory=list)
    closed_by_client = False  # the TCP connection ended without a close frame

    async def run(self) -> None:
        reader, writer = await self.up.accept()
        self.request = head = await read_head(reader)
        key = head.header("sec-websocket-key") or ""
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n%s"
            % (ws_accept(key).encode(), ws_frame(1, self.greeting, masked=False))
        )
        await writer.drain()
        for _ in range(1000):
            try:
                opcode, payload = await ws_read(reader, expect_masked=True)
            except (asyncio.IncompleteReadError, ConnectionResetError):
                self.closed_by_client = True
                writer.close()  # the peer is gone: end this side too
                return
            if opcode == 8:  # close: answer it, then end the TCP connection (§5.5.1)
                writer.write(ws_frame(8, payload, masked=False))
                await writer.drain()
                writer.close()
                return
            self.messages.append(payload)
            writer.write(ws_frame(opcode, payload, masked=False))
            await writer.drain()


def ws_upgrade(key: str) -> bytes:
    return get(
        "/chat",
        "Connection: Upgrade",
        "Upgrade: websocket",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    )


async def test_websocket_echo_through_the_tunnel_both_ways() -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    messages = [b"hello", os.urandom(300), os.urandom(70_000), b"", b"last one"]
    async with TcpUpstream() as up, proxy(config_for(up.port)) as px, client(px) as (cr, cw):
        echo = EchoServer(up, greeting=b"welcome")
        server = asyncio.create_task(echo.run())
        # The first frame goes in the same write as the upgrade request.
        cw.write(ws_upgrade(key) + ws_frame(2, messages[0], masked=True))
        await cw.drain()
        head = await read_head(cr)
        assert head.status == 101
        assert head.header("sec-websocket-accept") == ws_accept(key)
        assert (head.header("upgrade") or "").lower() == "websocket"
        assert "upgrade" in (head.header("connection") or "").lower()
        # Sent by the server together with its 101.
        assert await ws_read(cr, expect_masked=False) == (1, b"welcome")
        assert await ws_read(cr, expect_masked=False) == (2, messages[0])
        for message in messages[1:]:
            cw.write(ws_frame(2, message, masked=True))
            await cw.drain()
            assert await ws_read(cr, expect_masked=False) == (2, message)
        # Close handshake: the server answers and ends its connection; the client's ends too.
        cw.write(ws_frame(8, b"\x03\xe8", masked=True))
        await cw.drain()
        assert await ws_read(cr, expect_masked=False) == (8, b"\x03\xe8")
        assert await closed_by_peer(cr) == b""
        await asyncio.wait_for(server, TIMEOUT)
    assert echo.messages == messages and not echo.closed_by_client
    req = echo.request
    assert req is not None
    assert (req.header("upgrade") or "").lower() == "websocket"
    assert "upgrade" in (req.header("connection") or "").lower()
    assert req.header("sec-websocket-key") == key
    assert req.header("sec-websocket-version") == "13"


async def test_websocket_upstream_close_closes_the_client_side() -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    async with TcpUpstream() as up, proxy(config_for(up.port)) as px:
        echo = EchoServer(up)
        server = asyncio.create_task(echo.run())
        async with client(px) as (cr, cw):
            cw.write(ws_upgrade(key))
            await cw.drain()
            assert (await read_head(cr)).status == 101
            assert await ws_read(cr, expect_masked=False) == (1, b"")
            # The server answers the close frame and ends its TCP connection.
            cw.write(ws_frame(8, b"\x03\xe8bye", masked=True))
            await cw.drain()
            assert await ws_read(cr, expect_masked=False) == (8, b"\x03\xe8bye")
            assert await closed_by_peer(cr) == b""
        await asyncio.wait_for(server, TIMEOUT)
        snap = await settle(px, up.port)
        assert in_use(snap) == NOTHING_IN_USE


@pytest.mark.parametrize("leave", ["close", "reset"])
async def test_websocket_client_close_closes_the_upstream_side(leave: str) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    async with TcpUpstream() as up, proxy(config_for(up.port)) as px:
        echo = EchoServer(up)
        server = asyncio.create_task(echo.run())
        async with client(px, leave=leave) as (cr, cw):
            cw.write(ws_upgrade(key))
            await cw.drain()
            assert (await read_head(cr)).status == 101
            assert await ws_read(cr, expect_masked=False) == (1, b"")
            cw.write(ws_frame(1, b"ping?", masked=True))
            await cw.drain()
            assert await ws_read(cr, expect_masked=False) == (1, b"ping?")
        # The client's TCP connection is gone (no close frame): the upstream's must end too.
        await asyncio.wait_for(server, TIMEOUT)
        assert echo.closed_by_client
        assert echo.messages == [b"ping?"]
        snap = await settle(px, up.port)
        assert in_use(snap) == NOTHING_IN_USE


async def test_upgrade_other_than_websocket_is_forbidden() -> None:
    async with upstream() as up, proxy(config_for(up.port)) as px, client(px) as (cr, cw):
        cw.write(
            get(
                "/",
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
            )
        )
        await cw.drain()
        r = await read_response(cr)
    assert r.status == 403
    assert up.connections == 0 and not up.requests


# --------------------------------------------------------------------------------------------
# 5. Clients that leave mid-request


@pytest.mark.parametrize("leave", ["close", "reset"])
async def test_client_disconnect_mid_body_frees_the_upstream_connection(leave: str) -> None:
    log = io.StringIO()
    async with TcpUpstream() as up, proxy(config_for(up.port), access_log=log) as px:
        async with client(px, leave=leave) as (cr, cw):
            cw.write(get("/upload", "Content-Length: 100000", method="POST") + b"x" * 1000)
            await cw.drain()
            ur, _ = await up.accept()
            head = await read_head(ur)
            assert head.header("content-length") == "100000"
            assert await asyncio.wait_for(ur.readexactly(1000), TIMEOUT) == b"x" * 1000
            assert endpoint_snapshot(px, up.port)["active_requests"] == 1
        # The client is gone with 99000 bytes unsent: the upstream exchange is cancelled.
        assert await closed_by_peer(ur) == b""
        snap = await settle(px, up.port)
        assert in_use(snap) == NOTHING_IN_USE
        assert in_use(await admin_endpoint(px, up.port)) == NOTHING_IN_USE
        assert " DC " in log.getvalue()

        # The proxy keeps serving: a new request gets a new upstream connection.
        async with client(px) as (cr, cw):
            cw.write(get("/after"))
            await cw.drain()
            ur2, uw2 = await up.accept()
            assert (await read_head(ur2)).start_line == "GET /after HTTP/1.1"
            uw2.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            r = await read_response(cr)
        assert r.status == 200 and r.body == b"ok"


@pytest.mark.parametrize("leave", ["close", "reset"])
async def test_client_disconnect_while_upstream_is_slow_closes_the_upstream(leave: str) -> None:
    release = asyncio.Event()  # the slow upstream answers only once this is set: never, here

    async def slow_upstream(up: TcpUpstream, got_request: asyncio.Event) -> bytes:
        reader, writer = await up.accept()
        assert (await read_head(reader)).start_line == "GET /slow HTTP/1.1"
        got_request.set()
        answer = asyncio.create_task(release.wait())
        gone = asyncio.create_task(closed_by_peer(reader))
        try:
            done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                return gone.result()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            raise AssertionError("released before the client left")
        finally:
            for task in (answer, gone):
                task.cancel()
            await asyncio.gather(answer, gone, return_exceptions=True)

    async with TcpUpstream() as up, proxy(config_for(up.port)) as px:
        got_request = asyncio.Event()
        server = asyncio.create_task(slow_upstream(up, got_request))
        async with client(px, leave=leave) as (_, cw):
            cw.write(get("/slow"))
            await cw.drain()
            await asyncio.wait_for(got_request.wait(), TIMEOUT)
            assert endpoint_snapshot(px, up.port)["active_requests"] == 1
        # The client left while the upstream was still working: its connection is closed.
        assert await asyncio.wait_for(server, 2 * TIMEOUT) == b""
        snap = await settle(px, up.port)
        assert in_use(snap) == NOTHING_IN_USE

        # The proxy keeps serving on a fresh upstream connection.
        async with client(px) as (cr, cw):
            cw.write(get("/after"))
            await cw.drain()
            ur, uw = await up.accept()
            assert (await read_head(ur)).start_line == "GET /after HTTP/1.1"
            uw.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            r = await read_response(cr)
        assert r.status == 200 and r.body == b"ok"
