"""A review of the asyncio edge (io/downstream.py, io/pool.py) over real sockets.

Tests named ``test_bug_*`` fail today and show a defect; ``test_guard_*`` pass today and guard a
path where counters (active requests, pending, connections, retry slots) could leak. Counters are
read from the ``/clusters`` snapshot (``limits`` holds the cluster's live counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import typing
from collections.abc import AsyncIterator, Callable

from helpers import (
    RawClient,
    Reply,
    RunningProxy,
    SeenRequest,
    bootstrap,
    join,
    proxy,
    service_entry,
    svc_destination_rule,
    svc_virtual_service,
    upstream,
)

from meshproxy.io.downstream import DownstreamConnection, Phase
from meshproxy.io.pool import HIGH_WATER

HOST = "svc"
CLUSTER = "outbound|9080||svc.default.svc.cluster.local"


destination_rule = svc_destination_rule


virtual_service = svc_virtual_service


async def cluster(px: RunningProxy) -> dict[str, typing.Any]:
    """The cluster's ``/clusters`` entry, read in-process (``limits`` has the live counters)."""
    assert px.app.pools is not None
    (state,) = [s for s in px.app.pools.states() if s.cluster.name == CLUSTER]
    return typing.cast(dict[str, typing.Any], state.snapshot(asyncio.get_running_loop().time()))


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition on the proxy's live state (no fixed sleeps)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


async def until_cluster(
    px: RunningProxy, check: Callable[[dict[str, typing.Any]], bool], timeout: float = 5.0
) -> dict[str, typing.Any]:
    async with asyncio.timeout(timeout):
        while True:
            state = await cluster(px)
            if check(state):
                return state
            await asyncio.sleep(0.005)


def idle_counters(state: dict[str, typing.Any]) -> bool:
    limits = state["limits"]
    endpoints = state["endpoints"]
    return (
        limits["requests"] == 0
        and limits["pending_requests"] == 0
        and limits["retries"] == 0
        and all(e["active_requests"] == 0 and e["waiting_requests"] == 0 for e in endpoints)
    )


def downstreams(px: RunningProxy) -> list[DownstreamConnection]:
    return list(px.app.listeners["outbound"].connections)


GET = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n"


# --------------------------------------------------------------------------------------------
# Bug 1: an upstream connection goes back to the pool with its reading paused


@contextlib.asynccontextmanager
async def two_part_upstream(first: int, go: asyncio.Event, second: list[int]) -> AsyncIterator[int]:
    """Request 1 (chunked): the head and ``first`` body bytes, then (once ``go`` is set again) the
    last ``second[0]`` bytes and the end in one write. Later requests: ``200 next`` at once."""

    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            await go.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n" % (first, b"." * first))
            go.clear()
            await go.wait()  # the test sets the size of the rest
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (second[0], b"_" * second[0]))
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.transport.abort()


async def read_until(sock: socket.socket, end: bytes, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(timeout):
        while not data.endswith(end):
            chunk = await loop.sock_recv(sock, 1 << 16)
            if not chunk:
                break
            data += chunk
    return bytes(data)


async def test_bug_upstream_released_to_pool_with_reading_paused() -> None:
    """The response's last read pushes the client's write buffer over the high watermark:
    ``pause_writing`` pauses the upstream, then ``on_response_end`` releases it to the pool still
    paused; ``resume_writing`` no longer knows it. The next request on it never gets its response.
    """
    go = asyncio.Event()
    second = [0]
    first = 200_000
    async with two_part_upstream(first, go, second) as port:
        config = join(bootstrap(), service_entry(HOST, [port]))
        async with proxy(config) as px:
            # Small socket buffers both sides, so the proxy's own write buffer does the queueing.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", px.port))
            try:
                await until(lambda: len(downstreams(px)) == 1)
                (dc,) = downstreams(px)
                assert dc.transport is not None
                dc.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
                )
                await loop.sock_sendall(sock, GET)  # the client does not read for now
                await until(lambda: dc.record is not None)
                go.set()
                await until(lambda: dc.record is not None and dc.record.bytes_sent == first)
                buffered = dc.transport.get_write_buffer_size()
                assert buffered < HIGH_WATER and not dc.write_paused  # setup: not paused yet
                # The rest (and the end of the response) crosses the watermark in one read.
                second[0] = HIGH_WATER - buffered + 2_000
                go.set()
                await until(lambda: dc.record is None)  # the response ended on the proxy
                (state,) = [s for s in px.app.pools.states() if s.cluster.name == CLUSTER]
                (pool,) = state.pools
                assert len(pool.idle) == 1
                idle = pool.idle[0]
                assert idle.transport is not None
                # Now the client reads the whole response.
                body = await read_until(sock, b"\r\n0\r\n\r\n")
                assert body.count(b"_") == second[0]
                assert idle.transport.is_reading(), "pooled connection left with reading paused"
                await loop.sock_sendall(sock, GET)
                assert (await read_until(sock, b"next")).startswith(b"HTTP/1.1 200")
            finally:
                sock.close()


# --------------------------------------------------------------------------------------------
# Bug 2: the keep-alive replay does not use a fresh connection


async def test_bug_keepalive_replay_takes_another_pooled_connection() -> None:
    """A reused connection resets before any response byte: the request is replayed "once, on a
    fresh connection" (reuse=False), but ``EndpointPool.acquire`` takes an idle one anyway. When
    the upstream dropped all of its idle connections, the replay meets another dead one: 503."""
    both = asyncio.Event()
    stale: set[int] = set()

    async def handler(req: SeenRequest) -> Reply:
        if req.connection_id in stale:  # the app's idle connections, closed on its side
            for proto in up.open:
                if proto.id == req.connection_id and proto.transport is not None:
                    proto.transport.abort()
            return Reply()
        if len(up.requests) == 2:
            both.set()
        await both.wait()  # the first two overlap: two pooled connections
        return Reply(body=b"conn %d" % req.connection_id)

    async with upstream(handler) as up:
        async with proxy(join(bootstrap(), service_entry(HOST, [up.port]))) as px:

            async def call() -> int:
                client = await RawClient.connect(px.port)
                try:
                    resp = await client.request("GET", "/", [("host", HOST)])
                    status: int = resp.status
                    return status
                finally:
                    await client.close()

            assert list(await asyncio.gather(call(), call())) == [200, 200]
            await until_cluster(px, lambda s: s["endpoints"][0]["idle_connections"] == 2)
            stale.update({1, 2})
            status = await call()
    assert [r.connection_id for r in up.requests[2:]] == [2, 3]  # actual: [2, 1]
    assert status == 200


# --------------------------------------------------------------------------------------------
# Bug 3: a declined upgrade leaves the keep-alive connection in the HEAD phase


async def test_bug_declined_websocket_upgrade_then_idle_gets_408() -> None:
    """h11 holds an Upgrade request's connection in MIGHT_SWITCH_PROTOCOL, so the codec signals
    PAUSED and ``_PAUSE_PIPELINE`` is set; when the upstream declines (a plain 200), ``_finish``
    sees that bit and sets ``Phase.HEAD`` although no byte of a next request was received. The
    sweeper then treats the idle keep-alive connection as a slow request head: 408 and close."""
    extra = "timeouts:\n  requestHeaders: 200ms\n"
    async with upstream() as up:
        async with proxy(join(bootstrap(extra=extra), service_entry(HOST, [up.port]))) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            try:
                writer.write(
                    b"GET /chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await until(lambda: all(d.record is None for d in downstreams(px)))
                (dc,) = downstreams(px)
                assert dc.phase == Phase.IDLE  # actual: Phase.HEAD
                # An idle client, well within the 1 h idle timeout, must not get anything.
                with contextlib.suppress(TimeoutError):
                    unsolicited = await asyncio.wait_for(reader.read(100), 1.0)
                    raise AssertionError(f"unsolicited bytes: {unsolicited!r}")
            finally:
                writer.close()


# --------------------------------------------------------------------------------------------
# Bug 4: a client that leaves while its request has no upstream is not noticed


async def settled(
    px: RunningProxy, check: Callable[[dict[str, typing.Any]], bool], timeout: float
) -> dict[str, typing.Any]:
    """``/clusters`` once ``check`` holds, or the last one read when ``timeout`` passes first."""
    state = await cluster(px)
    with contextlib.suppress(TimeoutError):
        state = await until_cluster(px, check, timeout)
    return state


async def test_bug_client_leaving_while_queued_behind_max_connections() -> None:
    """``_start_attempt`` pauses reading (``_PAUSE_CONNECTING``) while the request waits for a
    connection, so the client's FIN/RST is not seen: its pending slot stays taken, and when a
    connection frees up the abandoned request is still sent upstream."""
    release = asyncio.Event()

    async def held(req: SeenRequest) -> Reply:
        await release.wait()
        return Reply(body=b"held")

    policy = "connectionPool: {tcp: {maxConnections: 1}}"
    async with upstream(held) as up:
        config = join(bootstrap(), service_entry(HOST, [up.port]), destination_rule(policy))
        async with proxy(config) as px:
            first = await RawClient.connect(px.port)
            try:
                task = asyncio.create_task(first.request("GET", "/", [("host", HOST)]))
                await until(lambda: len(up.requests) == 1)
                _reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
                writer.write(GET)
                await writer.drain()
                await until_cluster(px, lambda s: s["limits"]["pending_requests"] == 1)
                writer.transport.abort()  # the queued client leaves (RST)
                state = await settled(px, lambda s: s["limits"]["pending_requests"] == 0, 1.0)
                release.set()
                assert (await task).status == 200
                await until_cluster(px, idle_counters)
            finally:
                await first.close()
    assert state["limits"]["pending_requests"] == 0  # actual: 1 (held until a connection frees)
    assert len(up.requests) == 1  # actual: 2, the abandoned request was forwarded


async def test_bug_client_leaving_during_retry_backoff() -> None:
    """The same during a retry's backoff: the retry slot and the request stay counted until the
    backoff ends, and the retry is then sent upstream for a client that is gone."""
    route = "retries: {attempts: 3, retryOn: 5xx, backoff: 2s}"
    async with upstream(lambda req: Reply(status=503, body=b"no")) as up:
        config = join(bootstrap(), service_entry(HOST, [up.port]), virtual_service(route))
        async with proxy(config) as px:
            _reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(GET)
            await writer.drain()
            await until_cluster(px, lambda s: s["limits"]["retries"] == 1)
            writer.transport.abort()
            state = await settled(px, idle_counters, 0.5)
            await until_cluster(px, idle_counters, timeout=20)
    assert state["limits"]["retries"] == 0  # actual: 1 until the backoff ends
    assert len(up.requests) == 1  # actual: more, retries sent after the client left


# --------------------------------------------------------------------------------------------
# Guards: paths that release their counters today


async def test_guard_route_timeout_during_backoff_frees_the_retry_slot() -> None:
    route = "timeout: 300ms\nretries: {attempts: 3, retryOn: 5xx, backoff: 10s}"
    async with upstream(lambda req: Reply(status=503, body=b"no")) as up:
        config = join(bootstrap(), service_entry(HOST, [up.port]), virtual_service(route))
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            try:
                resp = await client.request("GET", "/", [("host", HOST)])
            finally:
                await client.close()
            assert resp.status == 504
            await until_cluster(px, idle_counters)
