"""Every local reply over real sockets: Envoy's status, body and response flag (reference §2.5, §2.10)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from collections.abc import AsyncIterator

import pytest
from helpers import (
    RawClient,
    Reply,
    SeenRequest,
    bootstrap,
    join,
    proxy,
    raw_exchange,
    service_entry,
    upstream,
)

RESET = b"upstream connect error or disconnect/reset before headers. reset reason: "


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def flags(log: io.StringIO) -> list[str]:
    """The response-flags column of each access-log line."""
    out = []
    for line in log.getvalue().splitlines():
        after = line.split('HTTP/1.1" ', 1)[1]
        out.append(after.split(" ")[1])
    return out


async def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


GET = b"GET / HTTP/1.1\r\nHost: svc:9080\r\n\r\n"


async def one_request(port: int, request: bytes = GET) -> tuple[int, dict[str, str], bytes]:
    client = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = client
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status, headers, _ = parse(head)
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return status, headers, body
    finally:
        writer.close()


async def test_connect_failure_is_503_uf() -> None:
    log = io.StringIO()
    config = join(bootstrap(), service_entry("svc", [await closed_port()]))
    async with proxy(config, access_log=log) as px:
        status, headers, body = await one_request(px.port)
    assert status == 503
    assert body == RESET + b"remote connection failure"
    assert headers["content-type"] == "text/plain"
    # Istio's default policy retried the connect failure twice before giving up (URX).
    assert flags(log) == ["URX,UF"]


async def test_connect_timeout_is_503_uf() -> None:
    # A listener whose accept queue is full drops further SYNs: the connect hangs until the
    # DestinationRule's connectTimeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: svc}\nspec:\n  host: svc\n"
        "  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 300ms}}}\n"
    )
    log = io.StringIO()
    try:
        async with proxy(
            join(bootstrap(), service_entry("svc", [port]), rule), access_log=log
        ) as px:
            loop = asyncio.get_running_loop()
            start = loop.time()
            status, _, body = await one_request(px.port)
            elapsed = loop.time() - start
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert status == 503
    assert body == RESET + b"remote connection failure"
    # Three tries (Istio's default retries on connect-failure), each cut at 300 ms.
    assert 0.85 <= elapsed < 5
    assert flags(log) == ["URX,UF"]


async def test_no_endpoints_is_503_uh() -> None:
    log = io.StringIO()
    async with proxy(join(bootstrap(), service_entry("svc", [])), access_log=log) as px:
        status, _, body = await one_request(px.port)
    assert (status, body) == (503, b"no healthy upstream")
    assert flags(log) == ["UH"]


async def test_empty_host_is_404_nr_with_empty_body() -> None:
    log = io.StringIO()
    async with (
        upstream() as up,
        proxy(join(bootstrap(), service_entry("svc", [up.port])), access_log=log) as px,
    ):
        status, headers, body = await one_request(px.port, b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
    assert (status, body) == (404, b"")
    assert headers["content-length"] == "0"
    assert flags(log) == ["NR"]


async def test_upstream_closing_before_response_is_503_uc() -> None:
    async def accept_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(accept_and_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    log = io.StringIO()
    try:
        async with proxy(join(bootstrap(), service_entry("svc", [port])), access_log=log) as px:
            status, _, body = await one_request(px.port)
    finally:
        server.close()
    assert status == 503
    assert body == RESET + b"connection termination"
    assert flags(log) == ["UC"]


async def test_invalid_upstream_response_is_502_upe() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    log = io.StringIO()
    try:
        async with proxy(join(bootstrap(), service_entry("svc", [port])), access_log=log) as px:
            status, _, body = await one_request(px.port)
    finally:
        server.close()
    assert status == 502
    assert body == RESET + b"protocol error"
    assert flags(log) == ["UPE"]


async def test_route_timeout_from_envoy_header_is_504_ut() -> None:
    release = asyncio.Event()

    async def slow(req: SeenRequest) -> Reply:
        await release.wait()
        return Reply()

    log = io.StringIO()
    async with upstream(slow) as up:
        async with proxy(join(bootstrap(), service_entry("svc", [up.port])), access_log=log) as px:
            request = (
                b"GET / HTTP/1.1\r\nHost: svc:9080\r\nx-envoy-upstream-rq-timeout-ms: 150\r\n\r\n"
            )
            status, _, body = await one_request(px.port, request)
            release.set()
        assert up.requests[0].header("x-envoy-upstream-rq-timeout-ms") is None
    assert (status, body) == (504, b"upstream request timeout")
    assert flags(log) == ["UT"]


@pytest.fixture
async def plain_proxy() -> AsyncIterator[tuple[int, io.StringIO]]:
    log = io.StringIO()
    async with upstream() as up:
        async with proxy(join(bootstrap(), service_entry("svc", [up.port])), access_log=log) as px:
            yield px.port, log


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (b"GARBAGE\r\n\r\n", 400, b"Bad Request"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, b"Bad Request"),  # missing Host
        (b"GET / HTTP/1.1\r\nHost: svc:9080\r\nX-A : b\r\n\r\n", 400, b"Bad Request"),
        (b"GET / HTTP/1.0\r\nHost: svc:9080\r\n\r\n", 426, b"Upgrade Required"),
        (
            b"POST / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            b"Bad Request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            400,
            b"Bad Request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 4, 4\r\n\r\nabcd",
            400,
            b"Bad Request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
            400,
            b"Bad Request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: svc:9080\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            b"Not Implemented",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: svc:9080\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"FFFFFFFFFFFFFFFFF1\r\nabc",
            400,
            b"Bad Request",
        ),
        (b"GET / HTTP/1.1\r\nHost: svc:9080\r\nContent-Length: -1\r\n\r\n", 400, b"Bad Request"),
        (b"GET / HTTP/1.1\r\nHost: svc:9080\r\nX-A: a\x00b\r\n\r\n", 400, b"Bad Request"),
    ],
    ids=[
        "garbage",
        "no-host",
        "space-before-colon",
        "http10",
        "cl-and-te",
        "duplicate-cl",
        "cl-list",
        "conflicting-cl",
        "te-gzip",
        "chunk-size-over-64-bits",
        "negative-cl",
        "nul-in-value",
    ],
)
async def test_malformed_requests_get_4xx_then_close(
    plain_proxy: tuple[int, io.StringIO], request_bytes: bytes, status: int, body: bytes
) -> None:
    port, log = plain_proxy
    raw = await raw_exchange(port, request_bytes)  # returns only once the proxy closed
    got_status, headers, got_body = parse(raw)
    assert got_status == status
    assert got_body == body
    assert headers["connection"] == "close"
    assert flags(log) == ["DPE"]


async def test_request_head_over_60k_is_431(plain_proxy: tuple[int, io.StringIO]) -> None:
    port, _ = plain_proxy
    big = b"GET / HTTP/1.1\r\nHost: svc:9080\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"
    status, headers, body = parse(await raw_exchange(port, big))
    assert (status, body) == (431, b"Request Header Fields Too Large")
    assert headers["connection"] == "close"


async def test_head_just_under_the_limit_is_forwarded(plain_proxy: tuple[int, io.StringIO]) -> None:
    port, _ = plain_proxy
    client = await RawClient.connect(port)
    try:
        resp = await client.request("GET", "/", [("host", "svc:9080"), ("x-big", "a" * 50_000)])
    finally:
        await client.close()
    assert resp.status == 200


async def test_slow_request_head_gets_408_and_close() -> None:
    extra = "timeouts:\n  requestHeaders: 200ms\n"
    async with upstream() as up:
        async with proxy(join(bootstrap(extra=extra), service_entry("svc", [up.port]))) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: svc")  # ... and never the rest
            raw = await asyncio.wait_for(reader.read(), timeout=5)
            writer.close()
    status, headers, body = parse(raw)
    assert (status, body) == (408, b"request timeout")
    assert headers["connection"] == "close"


async def test_idle_keepalive_connection_is_closed_after_idle_timeout() -> None:
    extra = "timeouts:\n  idle: 200ms\n"
    async with upstream() as up:
        async with proxy(join(bootstrap(extra=extra), service_entry("svc", [up.port]))) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(GET)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert parse(head)[0] == 200
            await reader.readexactly(int(parse(head)[1]["content-length"]))
            # Nothing more is sent: the proxy closes the idle connection (EOF), within bounds.
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""
            writer.close()


async def test_the_record_keeps_every_try_with_endpoint_outcome_and_duration() -> None:
    from meshproxy.core.record import RequestRecord

    seen: list[RequestRecord] = []
    dead = await closed_port()
    async with upstream() as up:
        config = join(bootstrap(), service_entry("svc", [dead, up.port]))
        async with proxy(config, record_sinks=[seen.append]) as px:
            for _ in range(6):
                status, _, _ = await one_request(px.port)
                assert status == 200  # a refused connect is retried on the other endpoint
    tries = [t for record in seen for t in record.tries]
    assert {outcome for _, outcome, _, _ in tries} == {"200", "connect-failure"}
    assert all(seconds >= 0 for _, _, _, seconds in tries)
    failed_first = [r for r in seen if r.tries[0][1] == "connect-failure"]
    for record in failed_first:
        assert record.tries[0][0] == f"127.0.0.1:{dead}"
        assert record.tries[-1][:2] == (f"127.0.0.1:{up.port}", "200")
        assert record.tries[0][2] < record.tries[-1][2]  # tries start one after the other
