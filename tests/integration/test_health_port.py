"""The probe-only health port (``spec.health``, Istio's :15021 ``/healthz/ready``), over sockets.

The kubelet probes the pod IP, so this port may bind 0.0.0.0 in a pod while the admin port, which
can stop the proxy, stays on loopback. These tests bind it on 127.0.0.1 (port 0, read back): its
readiness must track the admin ``/ready`` exactly, and it must serve nothing else.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import ProxyProcess, bootstrap, join, proxy, service_entry

REPO = Path(__file__).resolve().parents[2]

HEALTH = "health: 127.0.0.1:0\n"


def _config(extra: str = HEALTH) -> str:
    return join(bootstrap(extra=extra), service_entry("reviews", [9]))


async def test_ready_on_both_paths_tracks_admin_healthcheck_fail_and_ok() -> None:
    async with proxy(_config()) as px, httpx.AsyncClient() as client:
        assert px.app.health is not None
        health = f"http://127.0.0.1:{px.app.health.port}"
        admin = f"http://127.0.0.1:{px.admin_port}"
        for path in ("/healthz/ready", "/ready"):
            r = await client.get(health + path)
            assert (r.status_code, r.text) == (200, "LIVE\n")

        # POST /healthcheck/fail is an admin (loopback) action; the probe port reports it.
        assert (await client.post(admin + "/healthcheck/fail")).status_code == 200
        for path in ("/healthz/ready", "/ready"):
            r = await client.get(health + path)
            assert (r.status_code, r.text) == (503, "DRAINING\n")
        assert (await client.get(admin + "/ready")).status_code == 503

        assert (await client.post(admin + "/healthcheck/ok")).status_code == 200
        r = await client.get(health + "/healthz/ready")
        assert (r.status_code, r.text) == (200, "LIVE\n")


async def test_ready_is_503_while_draining() -> None:
    async with proxy(_config()) as px, httpx.AsyncClient() as client:
        assert px.app.health is not None
        px.app.begin_drain()
        r = await client.get(f"http://127.0.0.1:{px.app.health.port}/healthz/ready")
        assert (r.status_code, r.text) == (503, "DRAINING\n")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/quitquitquit"),
        ("GET", "/quitquitquit"),
        ("POST", "/healthcheck/fail"),
        ("POST", "/drain_listeners"),
        ("GET", "/config_dump"),
        ("GET", "/stats/prometheus"),
    ],
)
async def test_health_port_serves_nothing_but_readiness(method: str, path: str) -> None:
    async with proxy(_config()) as px, httpx.AsyncClient() as client:
        assert px.app.health is not None
        r = await client.request(method, f"http://127.0.0.1:{px.app.health.port}{path}")
        assert r.status_code == 404
        # The listing names only the probe paths: nothing else is reachable here.
        assert sorted(r.text.splitlines()) == ["GET /healthz/ready", "GET /ready"]
        # And the request changed nothing: the proxy is still up and ready.
        ready = await client.get(f"http://127.0.0.1:{px.admin_port}/ready")
        assert (ready.status_code, ready.text) == (200, "LIVE\n")


async def test_post_to_a_probe_path_is_405() -> None:
    async with proxy(_config()) as px, httpx.AsyncClient() as client:
        assert px.app.health is not None
        r = await client.post(f"http://127.0.0.1:{px.app.health.port}/healthz/ready")
        assert r.status_code == 405


async def test_no_health_port_unless_configured() -> None:
    async with proxy(_config(extra="")) as px:
        assert px.app.health is None


async def test_process_reports_health_port_and_quitquitquit_only_on_admin(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(_config())
    px = await ProxyProcess(str(path)).start()
    try:
        async with httpx.AsyncClient() as client:
            health = f"http://127.0.0.1:{px.ports['health']}"
            assert (await client.get(health + "/healthz/ready")).status_code == 200
            assert (await client.post(health + "/quitquitquit")).status_code == 404
            assert px.proc is not None and px.proc.poll() is None  # still running
            await client.post(f"http://127.0.0.1:{px.ports['admin']}/quitquitquit")
        assert await px.wait() == 0
    finally:
        px.stop()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


def test_health_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "mesh.yaml"
        path.write_text(_config(extra=f"health: 127.0.0.1:{port}\n"))
        result = _run("run", "-c", str(path))
    assert result.returncode == 3, result.stderr
    assert "cannot listen" in result.stderr
    assert "meshproxy ready" not in result.stdout


def test_bad_health_address_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(_config(extra="health: no-port-here\n"))
    result = _run("validate", "-c", str(path))
    assert result.returncode == 1
    assert "spec.health" in result.stderr, result.stderr


async def test_with_workers_the_supervisor_serves_the_health_port(tmp_path: Path) -> None:
    """``--workers 2``: one health port, the supervisor's, ready only while every worker is;
    the workers bind none (two of them on a fixed 15021 would collide)."""
    path = tmp_path / "mesh.yaml"
    path.write_text(_config())
    px = await ProxyProcess(str(path), "--workers", "2").start()
    try:
        async with httpx.AsyncClient() as client:
            health = f"http://127.0.0.1:{px.ports['health']}"
            admin = f"http://127.0.0.1:{px.ports['admin']}"
            workers = (await client.get(admin + "/workers")).json()["workers"]
            assert len(workers) == 2
            for w in workers:  # each worker's own view of the bootstrap: no health port
                dump = (await client.get(f"http://{w['admin']}/config_dump")).json()
                assert "admin" in dump["bootstrap"]["spec"]
                assert "health" not in dump["bootstrap"]["spec"]
            r = await client.get(health + "/healthz/ready")
            assert (r.status_code, r.text) == (200, "LIVE\n")
            assert (await client.post(health + "/quitquitquit")).status_code == 404
            await client.post(admin + "/healthcheck/fail")  # broadcast to every worker
            r = await client.get(health + "/healthz/ready")
            assert r.status_code == 503
            assert "DRAINING" in r.text
            await client.post(admin + "/quitquitquit")
        assert await px.wait() == 0
    finally:
        px.stop()
