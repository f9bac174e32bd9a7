"""Both HTTP/1.1 codecs through a real proxy: the same bytes in give the same bytes out (issue #7).

Each case sends the same raw bytes over a real socket to a proxy running ``http1Codec: h11`` and to
one running ``httptools``, in front of a real upstream that records the raw bytes it receives and
answers with raw canned responses. Both runs must give the upstream the same bytes and the client
the same bytes (the only fields that vary by run, ``date`` and the upstream service time, are
masked), and a hostile request must get the same 4xx/5xx and a closed connection, with nothing
forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import typing
from collections.abc import AsyncIterator

import h11
import pytest
from helpers import bootstrap, join, proxy, service_entry

HOST = b"svc:9080"
# Raw responses the upstream gives, chosen by the request target.
CANNED = {
    b"/cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: a \r\n\r\nhello",
    b"/chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    ),
    b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"/204": b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n",
    b"/304": b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"/until-close": b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\nuntil the upstream closes",
    b"/close": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"/ws": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
}
_MASK = re.compile(rb"(?im)^(date|x-envoy-upstream-service-time): [^\r\n]*")


class _Recorder(asyncio.Protocol):
    """One upstream connection: keeps every byte received, answers each request it parses."""

    def __init__(self, log: list[bytes]) -> None:
        self.log = log
        self.index = len(log)
        log.append(b"")
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.tunnel = False
        self.target = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.log[self.index] += data
        assert self.transport is not None
        if self.tunnel:
            self.transport.write(b"echo:" + data)
            if self.log[self.index].endswith(b"later"):
                self.transport.close()  # the test's last bytes: end the tunnel
            return
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if isinstance(event, h11.Request):
                self.target = event.target
            elif isinstance(event, h11.EndOfMessage):
                target = self.target
                self.transport.write(CANNED[target])
                if target in (b"/until-close", b"/close"):
                    self.transport.close()
                    return
                if target == b"/ws":
                    self.tunnel = True
                    return
                # The answers are raw bytes, so h11 (which only splits requests here) starts over
                # with what it has not parsed yet.
                rest = self.conn.trailing_data[0]
                self.conn = h11.Connection(h11.SERVER)
                if rest:
                    self.conn.receive_data(rest)
            elif not isinstance(event, h11.Data):  # NEED_DATA, PAUSED, ConnectionClosed
                return


@contextlib.asynccontextmanager
async def recording_upstream() -> AsyncIterator[tuple[int, list[bytes]]]:
    log: list[bytes] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Recorder(log), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], log
    finally:
        server.close()


async def exchange(port: int, data: bytes, *, then: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send ``data`` (then ``then`` once a first reply is in); read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = b""
        if then:
            out = await asyncio.wait_for(reader.read(65536), timeout)
            writer.write(then)  # no FIN: Envoy (and we) take a client's FIN as a disconnect
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
        return out
    finally:
        writer.close()


async def run(codec: str, data: bytes, then: bytes = b"") -> tuple[list[bytes], bytes]:
    async with recording_upstream() as (port, log):
        config = join(
            bootstrap(extra=f"http1Codec: {codec}\n"), service_entry("svc", [port], port=9080)
        )
        async with proxy(config) as px:
            out = await exchange(px.port, data, then=then)
    return log, _MASK.sub(rb"\1: *", out)


async def same_from_both(data: bytes, then: bytes = b"") -> tuple[list[bytes], bytes]:
    h11_run = await run("h11", data, then)
    assert await run("httptools", data, then) == h11_run
    return h11_run


def req(method: bytes, target: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n%s" % (method, target, HOST, headers, body)


CLOSE = b"Connection: close\r\n"


async def test_a_pipelined_keep_alive_session_is_forwarded_identically() -> None:
    data = b"".join(
        [
            req(b"GET", b"/cl", b"X-Mixed-Case: V\r\nX-Pad:  p \r\n"),
            req(b"POST", b"/chunked", b"Content-Length: 3\r\n", b"abc"),
            req(
                b"POST",
                b"/cl",
                b"Transfer-Encoding: chunked\r\n",
                b"2\r\nxy\r\n0\r\nX-T: 1\r\n\r\n",
            ),
            req(b"HEAD", b"/head"),
            req(b"GET", b"/204"),
            req(b"GET", b"/304"),
            req(b"GET", b"/cl", CLOSE),
        ]
    )
    upstream_bytes, client_bytes = await same_from_both(data)
    assert client_bytes.count(b"HTTP/1.1 ") == 7
    assert b"hello world" not in client_bytes  # chunked stays chunked: pieces, not joined
    assert b"5\r\nhello\r\n" in client_bytes
    assert b"".join(upstream_bytes).count(b"svc:9080") == 7


@pytest.mark.parametrize("target", [b"/until-close", b"/close"])
async def test_responses_ended_by_the_upstream_closing(target: bytes) -> None:
    upstream_bytes, client_bytes = await same_from_both(req(b"GET", target, CLOSE))
    assert client_bytes.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(upstream_bytes) == 1


async def test_expect_100_continue() -> None:
    head = req(b"POST", b"/cl", b"Content-Length: 4\r\nExpect: 100-continue\r\n" + CLOSE)
    upstream_bytes, client_bytes = await same_from_both(head, then=b"body")
    assert client_bytes.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert upstream_bytes[0].endswith(b"\r\n\r\nbody")
    assert b"expect" not in upstream_bytes[0].lower()


async def test_websocket_upgrade_tunnels_the_same_bytes() -> None:
    head = req(b"GET", b"/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    upstream_bytes, client_bytes = await same_from_both(head + b"early", then=b"later")
    assert client_bytes.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert upstream_bytes[0].endswith(b"\r\n\r\nearlylater")
    assert client_bytes.endswith(b"echo:later")


HOSTILE = {
    "cl+te": (req(b"POST", b"/cl", b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"), 400),
    "two-cl": (req(b"POST", b"/cl", b"Content-Length: 1\r\nContent-Length: 1\r\n", b"x"), 400),
    "cl-list": (req(b"POST", b"/cl", b"Content-Length: 1, 1\r\n", b"x"), 400),
    "te-gzip": (req(b"POST", b"/cl", b"Transfer-Encoding: gzip\r\n"), 501),
    "http-1.0": (b"GET /cl HTTP/1.0\r\nHost: svc:9080\r\n\r\n", 426),
    "space-before-colon": (req(b"GET", b"/cl", b"X-A : b\r\n"), 400),
    "nul-in-value": (req(b"GET", b"/cl", b"X-A: b\x00c\r\n"), 400),
    "missing-host": (b"GET /cl HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    "chunk-size-overflow": (
        req(b"POST", b"/cl", b"Transfer-Encoding: chunked\r\n", b"FFFFFFFFFFFFFFFFF1\r\nabc"),
        400,
    ),
    "head-over-60-kib": (req(b"GET", b"/cl", b"X-Big: " + b"v" * 70 * 1024 + b"\r\n"), 431),
    "smuggled-after-a-good-one": (
        req(b"GET", b"/cl")
        + req(b"POST", b"/cl", b"Content-Length: 1\r\nTransfer-Encoding: x\r\n"),
        501,
    ),
}


@pytest.mark.parametrize(("data", "status"), HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_requests_get_the_same_answer_and_a_closed_connection(
    data: bytes, status: int
) -> None:
    upstream_bytes, client_bytes = await same_from_both(data)  # exchange() read until close
    last = client_bytes[client_bytes.rfind(b"HTTP/1.1 ") :]
    assert last.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close" in last.lower()
    assert len(upstream_bytes) <= 1  # at most the good request before it was forwarded
    assert b"Transfer-Encoding: x" not in b"".join(upstream_bytes)
