"""The SIGTERM order over real processes (reference §6 #2-#4): inbound drains at once, outbound
keeps serving the app until it stops sending, the process exits when no connection is left, and
POST /quitquitquit exits at once even mid-drain."""

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

from meshproxy.app import OUTBOUND_QUIET


class Gate:
    """The local app: holds its responses until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def handler(self, req: SeenRequest) -> Reply:
        self.arrived.set()
        await self.release.wait()
        return Reply(body=b"app " + req.target.encode())


@pytest.fixture
async def app_and_remote() -> AsyncIterator[tuple[Gate, Upstream, Upstream]]:
    gate = Gate()
    async with upstream(gate.handler) as app, upstream() as remote:
        yield gate, app, remote
        gate.release.set()


async def start(tmp_path: Path, config: str) -> ProxyProcess:
    path = tmp_path / "mesh.yaml"
    path.write_text(config)
    return await ProxyProcess(str(path)).start()


async def wait_draining(admin: int) -> None:
    """/ready turns 503 DRAINING as the signal is handled (bounded: 200 probes)."""
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            ready = await client.get(f"http://127.0.0.1:{admin}/ready")
            if ready.status_code == 503:
                break
    assert (ready.status_code, ready.text) == (503, "DRAINING\n")


async def test_sigterm_drains_inbound_while_outbound_keeps_serving_the_app(
    tmp_path: Path, app_and_remote: tuple[Gate, Upstream, Upstream]
) -> None:
    gate, app, remote = app_and_remote
    config = join(
        bootstrap(inbound_app=app.port, drain="30s"), service_entry("reviews", [remote.port])
    )
    px = await start(tmp_path, config)
    try:
        inbound, outbound = px.ports["inbound"], px.ports["outbound"]
        caller = await RawClient.connect(inbound)  # a peer calling our app, held in flight
        held = asyncio.ensure_future(caller.request("GET", "/work", [("host", "app")], timeout=20))
        async with asyncio.timeout(10):
            await gate.arrived.wait()
        kept = await RawClient.connect(outbound)  # the app's keep-alive connection to its sidecar
        first = await kept.request("GET", "/before", [("host", "reviews")])
        assert first.status == 200

        px.signal(signal.SIGTERM)
        await wait_draining(px.ports["admin"])
        # Inbound: no new connection.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", inbound)
        # Outbound: the app, still finishing its inbound request, calls out: on its kept-alive
        # connection and on a new one, both served and kept alive.
        during = await kept.request("GET", "/during", [("host", "reviews")])
        fresh = await RawClient.connect(outbound)
        other = await fresh.request("GET", "/fresh", [("host", "reviews")])
        assert (during.status, during.body) == (200, b"GET /during")
        assert (other.status, other.body) == (200, b"GET /fresh")
        assert during.header("connection") is None and other.header("connection") is None

        gate.release.set()
        answered = await held
        assert (answered.status, answered.body) == (200, b"app /work")
        assert answered.header("connection") == "close"  # the inbound side is draining
        # The inbound side is empty; the app keeps sending (shutting down, flushing): served.
        for i in range(20):
            r = await kept.request("GET", f"/after/{i}", [("host", "reviews")])
            assert (r.status, r.body) == (200, f"GET /after/{i}".encode())
        assert [r.target for r in remote.requests][-3:] == ["/after/17", "/after/18", "/after/19"]

        # The app exits: its connections close, nothing is left on any listener: exit 0 long
        # before drainDuration (30 s).
        loop = asyncio.get_running_loop()
        for client in (kept, fresh, caller):
            await client.close()
        closed_at = loop.time()
        assert await px.wait(timeout=10) == 0
        assert loop.time() - closed_at < 5
    finally:
        px.stop()


async def test_outbound_drains_once_the_app_goes_quiet(tmp_path: Path) -> None:
    async with upstream() as remote:
        config = join(bootstrap(drain="30s"), service_entry("reviews", [remote.port]))
        px = await start(tmp_path, config)
        try:
            # An app that keeps an idle pooled connection open and sends nothing more.
            idle = await RawClient.connect(px.ports["outbound"])
            assert (await idle.request("GET", "/", [("host", "reviews")])).status == 200
            loop = asyncio.get_running_loop()
            started = loop.time()
            px.signal(signal.SIGTERM)
            # After OUTBOUND_QUIET seconds without a request the outbound side drains: the idle
            # connection is closed and, no connection left, the process exits.
            assert await asyncio.wait_for(idle.reader.read(), 10) == b""
            assert await px.wait(timeout=10) == 0
            assert OUTBOUND_QUIET * 0.9 <= loop.time() - started < 10
            await idle.close()
        finally:
            px.stop()


async def test_quitquitquit_exits_at_once_even_while_draining(
    tmp_path: Path, app_and_remote: tuple[Gate, Upstream, Upstream]
) -> None:
    gate, app, remote = app_and_remote
    config = join(
        bootstrap(inbound_app=app.port, drain="60s"), service_entry("reviews", [remote.port])
    )
    px = await start(tmp_path, config)
    try:
        caller = await RawClient.connect(px.ports["inbound"])
        held = asyncio.ensure_future(caller.request("GET", "/job", [("host", "app")], timeout=20))
        async with asyncio.timeout(10):
            await gate.arrived.wait()
        px.signal(signal.SIGTERM)
        await wait_draining(px.ports["admin"])
        # A Job's app is done: it tells the sidecar to go now, whatever is still open.
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://127.0.0.1:{px.ports['admin']}/quitquitquit")
        assert (r.status_code, r.text) == (200, "OK\n")
        assert await px.wait(timeout=10) == 0
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        await caller.close()
    finally:
        px.stop()
