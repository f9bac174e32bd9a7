"""meshproxy as a process: readiness, SIGTERM/SIGINT drain with requests in flight, quitquitquit."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers import (
    ProxyProcess,
    RawClient,
    Reply,
    SeenRequest,
    Upstream,
    bootstrap,
    join,
    service_entry,
    upstream,
)


class Gate:
    """Holds upstream responses until released; counts arrivals."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self.arrival = asyncio.Event()

    async def handler(self, req: SeenRequest) -> Reply:
        self.arrived += 1
        self.arrival.set()
        await self.release.wait()
        return Reply(body=b"done " + req.target.encode())

    async def wait_arrived(self, count: int) -> None:
        async with asyncio.timeout(10):
            while self.arrived < count:
                self.arrival.clear()
                await self.arrival.wait()


@pytest.fixture
async def gated() -> AsyncIterator[tuple[Gate, Upstream]]:
    gate = Gate()
    async with upstream(gate.handler) as up:
        yield gate, up
        gate.release.set()


async def start(
    tmp_path: Path, up: Upstream, drain: str = "5s", inbound_app: int | None = None
) -> ProxyProcess:
    path = tmp_path / "mesh.yaml"
    config = join(
        bootstrap(drain=drain, inbound_app=inbound_app), service_entry("reviews", [up.port])
    )
    path.write_text(config)
    return await ProxyProcess(str(path)).start()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_in_flight_requests_then_exits_0(
    tmp_path: Path, gated: tuple[Gate, Upstream], sig: signal.Signals
) -> None:
    # The inbound side drains at once (the outbound side's order: test_shutdown_order.py).
    gate, up = gated
    px = await start(tmp_path, up, inbound_app=up.port)
    try:
        port, admin = px.ports["inbound"], px.ports["admin"]
        clients = [await RawClient.connect(port) for _ in range(5)]
        idle = await RawClient.connect(port)  # connected, no request: closed at drain
        calls = [
            asyncio.ensure_future(c.request("GET", f"/{i}", [("host", "reviews")], timeout=15))
            for i, c in enumerate(clients)
        ]
        await gate.wait_arrived(5)
        px.signal(sig)
        async with httpx.AsyncClient() as client:
            # Draining: readiness fails while the in-flight requests are still held.
            for _ in range(100):
                ready = await client.get(f"http://127.0.0.1:{admin}/ready")
                if ready.status_code == 503:
                    break
            assert (ready.status_code, ready.text) == (503, "DRAINING\n")
        # New connections are refused once draining started.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(idle.reader.read(), 5) == b""
        gate.release.set()
        responses = await asyncio.gather(*calls)
        assert [r.status for r in responses] == [200] * 5
        assert [r.body for r in responses] == [f"done /{i}".encode() for i in range(5)]
        assert all(r.header("connection") == "close" for r in responses)
        assert await px.wait(timeout=10) == 0
        for c in [*clients, idle]:
            await c.close()
    finally:
        px.stop()


async def test_drain_gives_up_after_drain_duration(
    tmp_path: Path, gated: tuple[Gate, Upstream]
) -> None:
    gate, up = gated
    px = await start(tmp_path, up, drain="500ms")
    try:
        client = await RawClient.connect(px.ports["outbound"])
        call = asyncio.ensure_future(
            client.request("GET", "/stuck", [("host", "reviews")], timeout=15)
        )
        await gate.wait_arrived(1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        px.signal(signal.SIGTERM)
        assert await px.wait(timeout=10) == 0
        assert 0.4 <= loop.time() - started < 5
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await client.close()
    finally:
        px.stop()


async def test_quitquitquit_exits_at_once(tmp_path: Path, gated: tuple[Gate, Upstream]) -> None:
    _, up = gated
    px = await start(tmp_path, up)
    try:
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://127.0.0.1:{px.ports['admin']}/quitquitquit")
        assert r.status_code == 200
        assert await px.wait(timeout=10) == 0
    finally:
        px.stop()


async def test_ready_is_live_once_started(tmp_path: Path, gated: tuple[Gate, Upstream]) -> None:
    _, up = gated
    px = await start(tmp_path, up)
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{px.ports['admin']}/ready")
        assert (r.status_code, r.text) == (200, "LIVE\n")
    finally:
        px.signal(signal.SIGTERM)
        assert await px.wait(timeout=10) == 0
        px.stop()


async def test_run_exits_3_when_the_port_is_taken(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    config = bootstrap().replace(
        "  outbound:\n    address: 127.0.0.1:0", f"  outbound:\n    address: 127.0.0.1:{port}"
    )
    path = tmp_path / "mesh.yaml"
    path.write_text(config)
    px = ProxyProcess(str(path))
    try:
        with pytest.raises(RuntimeError, match="cannot listen"):
            await px.start()
        assert px.proc is not None and px.proc.returncode == 3
    finally:
        px.stop()
        blocker.close()
