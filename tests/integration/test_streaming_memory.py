"""Streaming through a meshproxy process: 1 GiB each way in bounded memory, and backpressure.

meshproxy runs as a subprocess so its memory can be read from /proc on its own: the peak resident
set (VmHWM, reset through /proc/<pid>/clear_refs before each transfer) must stay within a few
watermarks' worth of the resident set before it. The client and the upstream are plain asyncio
Protocols in the test process, writing 1 MiB memoryviews under flow control and counting what they
read, so that the proxy, not the test, is what limits the speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import typing
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import ProxyProcess, bootstrap, join, service_entry

MIB = 1 << 20
GIB = 1 << 30
BLOCK = memoryview(os.urandom(MIB))
BLOCK_CRC = zlib.crc32(BLOCK)
RSS_GROWTH_LIMIT_KIB = 32 * 1024
TRANSFER_LIMIT_S = 60.0
HOST = "bulk:9080"


def pattern_crc(size: int) -> int:
    """CRC-32 of ``size`` bytes of BLOCK repeated, as both ends produce and check it."""
    crc = 0
    full, rest = divmod(size, MIB)
    for _ in range(full):
        crc = zlib.crc32(BLOCK, crc)
    return zlib.crc32(BLOCK[:rest], crc)


# --------------------------------------------------------------------------------------------
# The upstream: one server that sinks uploads (POST) and sources downloads (GET /<size>).


class BulkServerConnection(asyncio.Protocol):
    def __init__(self, server: BulkServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.in_body = False
        self.remaining = 0
        self.count = 0
        self.crc = 0
        # Download state
        self.to_send = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=MIB, low=MIB // 4)
        self.server.connections.add(self)
        if self.server.hold_reads:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.in_body:
            self._body(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = bytes(self.head[:end]), bytes(self.head[end + 4 :])
        self.head.clear()
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
        if method == b"POST":
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.in_body, self.remaining, self.count, self.crc = True, length, 0, 0
            self._body(rest)
        else:
            self.to_send = int(target.lstrip(b"/"))
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.to_send)
            self.server.sent = 0
            self._pump()

    def _body(self, data: bytes) -> None:
        if not data:
            if self.remaining == 0:
                self._answer_upload()
            return
        self.count += len(data)
        self.crc = zlib.crc32(data, self.crc)
        self.remaining -= len(data)
        if self.remaining <= 0:
            self._answer_upload()

    def _answer_upload(self) -> None:
        self.in_body = False
        self.server.uploads.append((self.count, self.crc))
        body = b"%d %d" % (self.count, self.crc)
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    # Flow-controlled download: write until the transport says stop, carry on when it says go.
    def _pump(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.to_send and not self.paused and not transport.is_closing():
            n = min(MIB, self.to_send)
            transport.write(BLOCK[:n])
            self.to_send -= n
            self.server.sent += n

    def pause_writing(self) -> None:
        self.paused = True
        self.server.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.server.paused = False
        self._pump()


class BulkServer:
    def __init__(self) -> None:
        self.connections: set[BulkServerConnection] = set()
        self.uploads: list[tuple[int, int]] = []
        self.sent = 0  # body bytes of the current download handed to the transport
        self.paused = False  # the current download's transport is over its high watermark
        self.hold_reads = False  # new connections start with reading paused (a slow app)
        self.port = 0

    def hold_reads_now(self) -> None:
        """Stop reading on every connection, the pooled keep-alive ones included."""
        self.hold_reads = True
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.pause_reading()

    def release_reads(self) -> None:
        self.hold_reads = False
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.resume_reading()


@contextlib.asynccontextmanager
async def bulk_server() -> AsyncIterator[BulkServer]:
    state = BulkServer()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: BulkServerConnection(state), "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for conn in list(state.connections):
            if conn.transport is not None:
                conn.transport.abort()


@contextlib.asynccontextmanager
async def meshproxy(tmp_path: Path, upstream_port: int) -> AsyncIterator[ProxyProcess]:
    config = tmp_path / "mesh.yaml"
    config.write_text(join(bootstrap(), service_entry("bulk", [upstream_port])))
    proc = ProxyProcess(str(config))
    try:
        await proc.start()
        yield proc
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------------
# The client side


class Download(asyncio.Protocol):
    """GET /<size>; count and checksum the body."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.status = 0
        self.length = -1
        self.count = 0
        self.crc = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.length < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = bytes(self.head[:end]), bytes(self.head[end + 4 :])
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split(b" ")[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.length = int(value)
            assert self.length >= 0, head
        self.count += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self.count >= self.length and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed after {self.count} bytes: {exc}"))


async def download(port: int, size: int, *, paused: bool = False) -> Download:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if paused:
        # A small, fixed receive window: a client that does not read soon stops the flow.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    transport, proto = await loop.create_connection(lambda: Download(size), sock=sock)
    if paused:
        # Before the request goes out, so that not one byte of the response is read.
        transport.pause_reading()
    transport.write(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (size, HOST.encode()))
    return proto


class Progress:
    def __init__(self) -> None:
        self.written = 0  # body bytes the client's writes have got past drain() with


async def upload(port: int, size: int, progress: Progress | None = None) -> bytes:
    """POST ``size`` bytes in 1 MiB writes under flow control; return the response body."""
    progress = progress or Progress()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MIB)
    try:
        writer.transport.set_write_buffer_limits(high=4 * MIB)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
            % (HOST.encode(), size)
        )
        left = size
        while left:
            n = min(MIB, left)
            writer.write(BLOCK[:n])
            left -= n
            await writer.drain()
            progress.written += n
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answer = await reader.readexactly(length)
    except BaseException:
        writer.transport.abort()  # unsent data must not hold the close (and the test) up
        raise
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return answer


def reset_peak(proc: ProxyProcess) -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
        f.write("5")


async def warm_up(proc: ProxyProcess) -> None:
    """One small exchange each way, so that what a first request allocates is in the baseline."""
    port = proc.ports["outbound"]
    assert await upload(port, 3 * MIB) == b"%d %d" % (3 * MIB, pattern_crc(3 * MIB))
    dl = await download(port, 3 * MIB)
    await asyncio.wait_for(dl.done, 10)
    assert dl.transport is not None
    dl.transport.close()


# --------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_1gib_upload_streams_in_bounded_memory(tmp_path: Path) -> None:
    async with bulk_server() as up, meshproxy(tmp_path, up.port) as proc:
        await warm_up(proc)
        baseline = proc.rss_kib()
        reset_peak(proc)
        started = time.monotonic()
        async with asyncio.timeout(TRANSFER_LIMIT_S):
            answer = await upload(proc.ports["outbound"], GIB)
        elapsed = time.monotonic() - started
        peak, after = proc.hwm_kib(), proc.rss_kib()
    print(
        f"\n1 GiB upload: {elapsed:.1f}s, RSS baseline {baseline} KiB, peak {peak} KiB "
        f"(+{peak - baseline} KiB), after {after} KiB"
    )
    assert answer == b"%d %d" % (GIB, pattern_crc(GIB))
    assert up.uploads[-1] == (GIB, pattern_crc(GIB))
    assert peak - baseline < RSS_GROWTH_LIMIT_KIB


@pytest.mark.slow
async def test_1gib_download_streams_in_bounded_memory(tmp_path: Path) -> None:
    async with bulk_server() as up, meshproxy(tmp_path, up.port) as proc:
        await warm_up(proc)
        baseline = proc.rss_kib()
        reset_peak(proc)
        started = time.monotonic()
        async with asyncio.timeout(TRANSFER_LIMIT_S):
            dl = await download(proc.ports["outbound"], GIB)
            try:
                await dl.done
            finally:
                assert dl.transport is not None
                dl.transport.close()
        elapsed = time.monotonic() - started
        peak, after = proc.hwm_kib(), proc.rss_kib()
    print(
        f"\n1 GiB download: {elapsed:.1f}s, RSS baseline {baseline} KiB, peak {peak} KiB "
        f"(+{peak - baseline} KiB), after {after} KiB"
    )
    assert dl.status == 200
    assert dl.length == GIB
    assert dl.count == GIB
    assert dl.crc == pattern_crc(GIB)
    assert up.sent == GIB
    assert peak - baseline < RSS_GROWTH_LIMIT_KIB


async def until_stalled(
    progress: typing.Callable[[], int],
    blocked: typing.Callable[[], bool],
    *,
    window: float = 0.3,
    limit: float = 10.0,
) -> int:
    """Wait until a sender stops making progress; return the bytes it got out.

    A stall is the absence of progress, which only time can show: the sender is blocked by flow
    control and its count has not moved for a whole ``window``. Bounded by ``limit`` seconds
    (and so by a number of windows).
    """
    last = -1
    for _ in range(int(limit / window) + 1):
        if blocked() and progress() == last:
            return last
        last = progress()
        await asyncio.sleep(window)
    raise AssertionError(f"the sender never stalled: {progress()} bytes out, blocked={blocked()}")


async def test_slow_reader_stalls_the_upstream_instead_of_buffering(tmp_path: Path) -> None:
    size = 256 * MIB
    async with bulk_server() as up, meshproxy(tmp_path, up.port) as proc:
        await warm_up(proc)
        baseline = proc.rss_kib()
        reset_peak(proc)
        async with asyncio.timeout(TRANSFER_LIMIT_S):
            dl = await download(proc.ports["outbound"], size, paused=True)
            try:
                stalled_at = await until_stalled(lambda: up.sent, lambda: up.paused)
                # Only socket buffers and a few watermarks' worth can be in flight: far less
                # than the body, and not in the proxy's memory.
                assert stalled_at < 64 * MIB, stalled_at
                assert dl.count == 0
                still = await until_stalled(lambda: up.sent, lambda: up.paused)
                assert still == stalled_at
                peak_while_stalled = proc.hwm_kib()
                assert dl.transport is not None
                dl.transport.resume_reading()
                await dl.done
            finally:
                assert dl.transport is not None
                dl.transport.close()
        peak = proc.hwm_kib()
    print(
        f"\nbackpressure: upstream stalled after {stalled_at / MIB:.1f} MiB of {size // MIB} MiB; "
        f"RSS baseline {baseline} KiB, peak while stalled {peak_while_stalled} KiB, "
        f"peak {peak} KiB"
    )
    assert peak_while_stalled - baseline < RSS_GROWTH_LIMIT_KIB
    assert peak - baseline < RSS_GROWTH_LIMIT_KIB
    assert dl.status == 200
    assert dl.count == size
    assert dl.crc == pattern_crc(size)


async def test_slow_upstream_reader_stalls_the_client_instead_of_buffering(tmp_path: Path) -> None:
    size = 256 * MIB
    async with bulk_server() as up, meshproxy(tmp_path, up.port) as proc:
        await warm_up(proc)
        baseline = proc.rss_kib()
        reset_peak(proc)
        up.hold_reads_now()
        uploads_before = len(up.uploads)
        progress = Progress()
        async with asyncio.timeout(TRANSFER_LIMIT_S):
            sending = asyncio.create_task(upload(proc.ports["outbound"], size, progress))
            try:
                # The upload is blocked in drain() (a write in flight, no progress).
                stalled_at = await until_stalled(lambda: progress.written, lambda: True)
                assert stalled_at < 64 * MIB, stalled_at
                assert len(up.uploads) == uploads_before
                peak_while_stalled = proc.hwm_kib()
                up.release_reads()
                answer = await sending
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        peak = proc.hwm_kib()
    print(
        f"\nupload backpressure: client stalled after {stalled_at / MIB:.1f} MiB of "
        f"{size // MIB} MiB; RSS baseline {baseline} KiB, peak while stalled "
        f"{peak_while_stalled} KiB, peak {peak} KiB"
    )
    assert peak_while_stalled - baseline < RSS_GROWTH_LIMIT_KIB
    assert peak - baseline < RSS_GROWTH_LIMIT_KIB
    assert answer == b"%d %d" % (size, pattern_crc(size))
