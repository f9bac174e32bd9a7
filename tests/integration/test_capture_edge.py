"""``io/capture.original_destination`` on real, unredirected connections: it answers "" and never
raises, for IPv4, IPv6, a dual-stack socket and uvloop's socket object. (A redirected connection's
answer is exercised end to end in ``test_capture_netns.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from meshproxy.io.capture import original_destination


@contextlib.contextmanager
def accepted(family: socket.AddressFamily, bind: str, connect: str) -> Iterator[socket.socket]:
    """The server side of one real loopback connection."""
    with socket.socket(family, socket.SOCK_STREAM) as server:
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind((bind, 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection((connect, port), timeout=5):
            conn, _ = server.accept()
            with conn:
                yield conn


@pytest.mark.parametrize(
    ("family", "bind", "connect"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # dual stack: an IPv4 peer on an IPv6 socket
    ],
)
def test_not_redirected_gives_nothing(
    family: socket.AddressFamily, bind: str, connect: str
) -> None:
    with accepted(family, bind, connect) as conn:
        assert original_destination(conn) == ""


async def test_uvloop_socket_is_asked_too() -> None:
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            seen.set_result(original_destination(transport.get_extra_info("socket")))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(seen, 5) == ""
        writer.close()
