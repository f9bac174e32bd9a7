"""Review findings on the mTLS accept path, each over real sockets and real handshakes."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from meshproxy.app import App
from meshproxy.config.load import load_texts
from tests.helpers import join, upstream
from tests.integration.test_mtls import _boot
from tests.pki import Pki, peer_authentication, tls_block


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """A bounded wait for listener state no event announces."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def _tls_get_on(sock: socket.socket, ctx: ssl.SSLContext) -> bytes:
    """Handshake on an already connected socket, one GET, read to EOF (blocking, in a thread)."""
    sock.settimeout(5)
    with ctx.wrap_socket(sock) as tls:
        tls.sendall(b"GET /late HTTP/1.1\r\nhost: reviews\r\n\r\n")
        data = bytearray()
        while chunk := tls.recv(65536):
            data += chunk
    return bytes(data)


async def test_drain_waits_for_a_handshake_accepted_before_it(pki: Pki) -> None:
    """SIGTERM with a client accepted but still before its handshake: the client is served (its
    response closes the connection) and only then does the proxy stop. It used to count only
    finished handshakes as connections, so the drain saw none, stopped at once and the close
    cut the accepted client off mid-handshake."""
    server_files = pki.issue("reviews")
    async with upstream() as app_server:
        text = join(
            _boot("reviews", inbound_app=app_server.port, extra=tls_block(server_files)),
            peer_authentication("STRICT"),
        )
        app = App(load_texts([("test.yaml", text)]), seed=1)
        await app.start()

        async def serve() -> None:  # as cli's _serve: stop, then close
            await app.wait_stopped()
            await app.close()

        serving = asyncio.create_task(serve())
        sock = socket.create_connection(("127.0.0.1", app.listeners["inbound"].port))
        try:
            listener = app.listeners["inbound"]
            await _until(lambda: len(listener.tasks) == 1)  # accepted, waiting for its hello
            assert listener.active == 1
            app.begin_drain()
            ctx = pki.client_context(pki.issue("sleep"))
            data = await asyncio.to_thread(_tls_get_on, sock, ctx)
            assert data.startswith(b"HTTP/1.1 200 "), data[:200]
            assert b"\r\nconnection: close\r\n" in data.lower()
            await asyncio.wait_for(serving, 10)  # and then the proxy stops
        finally:
            sock.close()
            if not serving.done():
                serving.cancel()
                await app.close()
