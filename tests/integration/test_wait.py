"""``meshproxy wait`` and readiness: a real wait process against a proxy that starts late, one
held STARTING by a readiness gate, one that never comes (timeout, exit 1, saying what it saw),
and bad arguments (exit 2)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ProxyProcess, bootstrap, join, service_entry

from meshproxy.app import App, State
from meshproxy.config.load import load_texts


async def wait_cmd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshproxy",
        "wait",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def reserved_port() -> Iterator[tuple[socket.socket, int]]:
    """A loopback port bound (so no one else gets it) but not listening (so connecting is
    refused); the proxy binds it too (SO_REUSEADDR) and listens."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


async def test_wait_blocks_until_a_slow_starting_proxy_is_ready(
    tmp_path: Path, reserved_port: tuple[socket.socket, int]
) -> None:
    placeholder, port = reserved_port
    config = bootstrap().replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{port}")
    path = tmp_path / "mesh.yaml"
    path.write_text(join(config, service_entry("reviews", [9])))
    px = ProxyProcess(str(path))

    async def slow_start() -> None:
        await asyncio.sleep(1.0)  # the simulated slow start (the proxy is launched 1 s late)
        await px.start()
        placeholder.close()

    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        waiter = asyncio.ensure_future(wait_cmd("--admin", f"127.0.0.1:{port}", "--timeout", "30s"))
        starter = asyncio.ensure_future(slow_start())
        code, out, err = await waiter
        await starter
        assert (code, out, err) == (0, "meshproxy wait: ready (200 LIVE)\n", "")
        assert loop.time() - began >= 1.0
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{port}/ready")
        assert (r.status_code, r.text) == (200, "LIVE\n")
        px.signal(signal.SIGTERM)
        assert await px.wait() == 0
    finally:
        px.stop()


async def test_ready_waits_for_the_readiness_gates_before_binding_listeners() -> None:
    """A gate (the certificates, once mTLS loads them) holds the proxy STARTING: the admin
    server answers 503 STARTING, no listener is bound, and ``wait`` keeps waiting."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def certificates_loaded() -> None:
        entered.set()
        await release.wait()

    config = load_texts([("t.yaml", join(bootstrap(), service_entry("reviews", [9])))])
    app = App(config, readiness_gates=[certificates_loaded])
    starting = asyncio.ensure_future(app.start())
    try:
        async with asyncio.timeout(10):
            await entered.wait()
        assert app.admin is not None
        admin = f"127.0.0.1:{app.admin.port}"
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://{admin}/ready")
        assert (r.status_code, r.text) == (503, "STARTING\n")
        assert app.listeners == {} and app.state is State.STARTING
        early = await wait_cmd("--admin", admin, "--timeout", "300ms")
        assert early[0] == 1 and "last saw: 503 STARTING" in early[2]
        waiter = asyncio.ensure_future(wait_cmd("--admin", admin, "--timeout", "30s"))
        release.set()
        await starting
        assert await waiter == (0, "meshproxy wait: ready (200 LIVE)\n", "")
        assert app.state is State.LIVE and set(app.listeners) == {"outbound"}
    finally:
        release.set()
        await asyncio.gather(starting, return_exceptions=True)
        await app.close()


async def test_wait_times_out_with_exit_1_saying_connection_refused(
    reserved_port: tuple[socket.socket, int],
) -> None:
    _, port = reserved_port
    loop = asyncio.get_running_loop()
    began = loop.time()
    code, out, err = await wait_cmd("--admin", f"127.0.0.1:{port}", "--timeout", "400ms")
    assert (code, out) == (1, "")
    assert err.startswith("meshproxy wait: not ready after 400ms (")
    assert err.endswith("; last saw: connection refused\n")
    tries = int(err.split("(")[1].split()[0])
    assert 2 <= tries <= 8  # 50, 100, 200 ms backoff within 400 ms: bounded, not a busy loop
    assert loop.time() - began < 10


async def test_wait_times_out_on_a_proxy_that_reports_503(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(join(bootstrap(), service_entry("reviews", [9])))
    px = await ProxyProcess(str(path)).start()
    try:
        admin = f"127.0.0.1:{px.ports['admin']}"
        async with httpx.AsyncClient() as client:
            assert (await client.post(f"http://{admin}/healthcheck/fail")).status_code == 200
        code, out, err = await wait_cmd("--admin", admin, "--timeout", "300ms")
        assert (code, out) == (1, "")
        assert err.endswith("; last saw: 503 DRAINING\n")
        px.signal(signal.SIGTERM)
        assert await px.wait() == 0
    finally:
        px.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout", "soon"], "meshproxy wait: invalid duration 'soon'"),
        (["--admin", "localhost"], "meshproxy wait: invalid address 'localhost'"),
        (["--admin", "127.0.0.1:99999"], "meshproxy wait: invalid port in address"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
    ids=["bad-duration", "no-port", "bad-port", "unknown-flag"],
)
async def test_wait_usage_errors_exit_2(args: list[str], message: str) -> None:
    code, out, err = await wait_cmd(*args)
    assert (code, out) == (2, "")
    assert message in err


async def test_a_failing_readiness_gate_fails_the_start_and_closes_everything() -> None:
    async def certificates_missing() -> None:
        raise FileNotFoundError("/etc/certs/cert-chain.pem")

    config = load_texts([("t.yaml", join(bootstrap(), service_entry("reviews", [9])))])
    app = App(config, readiness_gates=[certificates_missing])
    with pytest.raises(FileNotFoundError):
        await app.start()
    assert app.state is State.STOPPED and app.listeners == {}
    assert app.admin is not None and app.admin.server is not None
    assert not app.admin.server.is_serving()  # the admin server was closed again
