"""Review findings on ``meshproxy run --workers N`` (the Supervisor), over real processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx

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
