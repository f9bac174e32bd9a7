"""Fallback benchmark upstream, used by benchmarks/run.py when nginx is not installed.

A minimal keep-alive HTTP/1.1 server on uvloop (plain asyncio if uvloop is missing) that
answers every request with a fixed, pre-encoded 200 response carrying a 1 KiB body. It
parses only what wrk sends (header-only requests, possibly pipelined); request bodies are
not supported.

    python benchmarks/upstream.py --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

BODY_SIZE = 1024
BODY = b"x" * BODY_SIZE
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % BODY_SIZE
RESPONSE = _HEAD + b"\r\n" + BODY
CLOSE_RESPONSE = _HEAD + b"Connection: close\r\n\r\n" + BODY
MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 1024


def _wants_close(head: bytes) -> bool:
    """True for `Connection: close` requests and HTTP/1.0 (lower-cased request head)."""
    request_line = head.split(b"\r\n", 1)[0]
    if request_line.endswith(b"http/1.0"):
        return True
    return b"\r\nconnection: close" in head or b"\r\nconnection:close" in head


class UpstreamProtocol(asyncio.Protocol):
    """One connection: answer each complete request head with the canned response."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._buffer += data
        out: list[bytes] = []
        for _ in range(MAX_PIPELINED):
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(self._buffer[:end]).lower()
            del self._buffer[: end + 4]
            if _wants_close(head):
                out.append(CLOSE_RESPONSE)
                transport.write(b"".join(out))
                transport.close()
                return
            out.append(RESPONSE)
        if out:
            transport.write(b"".join(out))
        if len(self._buffer) > MAX_HEADER_BYTES:
            transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024)
    print(f"upstream listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
