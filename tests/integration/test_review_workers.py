"""Review findings on ``meshproxy run --workers N`` (the Supervisor), over real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import httpx

from meshproxy.workers import _pump
from tests.helpers import ProxyProcess, bootstrap, join, service_entry, upstream


async def test_workers_access_log_on_stdout_reaches_the_supervisors_stdout(
    tmp_path: Path,
) -> None:
    """``--access-log -`` (and Istio's default ``/dev/stdout``) under workers: each worker writes
    its lines to its stdout, a pipe to the supervisor; they must come out of the supervisor's
    stdout, as one process's would (kubectl logs). The supervisor used to read and drop them."""
    async with upstream() as app:
        config = tmp_path / "mesh.yaml"
        config.write_text(join(bootstrap(), service_entry("svc", [app.port])))
        proc = await ProxyProcess(
            str(config), "--workers", "2", "--access-log", "-", "--access-log-format", "json"
        ).start()
        try:
            port = proc.ports["outbound"]
            total = 10
            for i in range(total):
                async with httpx.AsyncClient() as http:  # a new connection each: both workers
                    resp = await http.get(
                        f"http://127.0.0.1:{port}/n/{i}", headers={"host": "svc:9080"}
                    )
                    assert resp.status_code == 200
            paths = set()
            while len(paths) < total:
                line = await proc.line("{")
                paths.add(json.loads(line)["path"])
            assert paths == {f"/n/{i}" for i in range(total)}
            # One more, then SIGTERM at once: its line still comes out before the supervisor
            # exits (the copies run until each worker's EOF).
            async with httpx.AsyncClient() as http:
                resp = await http.get(f"http://127.0.0.1:{port}/last", headers={"host": "svc:9080"})
                assert resp.status_code == 200
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
            assert proc.proc is not None and proc.proc.stdout is not None
            rest = [json.loads(raw) for raw in proc.proc.stdout.read().splitlines()]
            assert "/last" in {doc["path"] for doc in rest}
        finally:
            proc.stop()


def _worker_pids(admin_port: int) -> list[int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/workers", timeout=5) as resp:
        return [int(w["pid"]) for w in json.loads(resp.read())["workers"]]


async def _exited(pid: int, timeout: float) -> bool:
    """True once process ``pid`` (not our child) has exited: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, a plain ``kill -9``) gives the supervisor no chance to stop its
    workers. They used to live on as orphans, still bound to the ports with SO_REUSEPORT, so
    a restarted meshproxy shared its ports with the old configuration's workers. Each worker
    now asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG) and drains."""
    async with upstream() as app:
        config = tmp_path / "mesh.yaml"
        config.write_text(join(bootstrap(drain="1s"), service_entry("svc", [app.port])))
        proc = await ProxyProcess(str(config), "--workers", "2").start()
        pids: list[int] = []
        try:
            pids = await asyncio.to_thread(_worker_pids, proc.ports["admin"])
            assert len(pids) == 2
            proc.signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
            for pid in pids:
                assert await _exited(pid, 10), f"worker {pid} outlived its supervisor"
        finally:
            proc.stop()
            for pid in pids:  # the orphans of a failed run, not left behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_worker_whose_supervisor_is_gone_does_not_start(tmp_path: Path) -> None:
    """A worker whose parent is no longer the supervisor that started it (it died before the
    worker could ask for PR_SET_PDEATHSIG) would never get the signal: it refuses to start."""
    config = tmp_path / "mesh.yaml"
    config.write_text(bootstrap())
    env = dict(os.environ, MESHPROXY_WORKER="0/2", MESHPROXY_SUPERVISOR_PID="1")
    done = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", "-c", str(config)],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert b"its supervisor is gone; not starting" in done.stderr
    assert done.stdout == b""


async def test_stdout_copy_keeps_draining_a_worker_when_stdout_is_broken() -> None:
    """The supervisor's stdout may fail (its reader went away: a closed pipe). The copy must
    still read each worker's pipe to EOF, or a worker blocks on its next stdout line (a reload
    line is printed on its event loop) and stops serving."""
    loop = asyncio.get_running_loop()
    worker_r, worker_w = os.pipe()  # a worker's stdout, as the supervisor sees it
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(worker_r, "rb", 0)
    )
    out_r, out_w = os.pipe()
    os.close(out_r)  # nobody reads the supervisor's stdout any more
    out = os.fdopen(out_w, "wb")
    try:
        copying = asyncio.create_task(_pump(reader, out))

        def worker_writes() -> int:
            line = b"x" * 1023 + b"\n"
            with os.fdopen(worker_w, "wb") as stdout:
                for _ in range(1024):  # 1 MiB: far more than a pipe holds
                    stdout.write(line)
            return 1024

        assert await asyncio.wait_for(asyncio.to_thread(worker_writes), 10) == 1024
        await asyncio.wait_for(copying, 10)
    finally:
        transport.close()
        with contextlib.suppress(OSError):
            out.close()


async def test_supervisor_forwards_admin_queries_encoded(tmp_path: Path) -> None:
    """``/route`` and the other worker-0 pages are forwarded with their query. The supervisor
    re-joined the decoded values raw: a space (``header=x-user: jason``) broke the request line
    it sent, and an ``&`` inside the ``url`` value split it into two parameters. It must answer
    exactly what worker 0 answers for the same URL."""
    async with upstream() as app:
        config = tmp_path / "mesh.yaml"
        config.write_text(join(bootstrap(), service_entry("svc", [app.port])))
        proc = await ProxyProcess(str(config), "--workers", "2").start()
        try:
            admin = proc.ports["admin"]
            _, body = await asyncio.to_thread(_get, admin, "/workers")
            worker0 = json.loads(body)["workers"][0]["admin"].rsplit(":", 1)[1]
            query = urllib.parse.urlencode(
                {"url": "http://svc:9080/a b?x=1&y=2", "header": "x-user: jason j"}
            )
            direct = await asyncio.to_thread(_get, int(worker0), f"/route?{query}")
            assert direct[0] == 200, direct
            assert "x=1&y=2" in direct[1].decode(), direct[1][:300]
            forwarded = await asyncio.to_thread(_get, admin, f"/route?{query}")
            assert forwarded == direct
        finally:
            proc.stop()


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
