"""``meshproxy run --workers N``: worker processes behind one port (SO_REUSEPORT), with the
supervisor's admin server aggregating theirs."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import httpx

from meshproxy.workers import merge_expositions, merge_json
from tests.helpers import ProxyProcess, bootstrap, join, service_entry, upstream


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_two_workers_share_the_port_and_the_admin_sums_them(tmp_path: Path) -> None:
    async with upstream() as app:
        config = tmp_path / "mesh.yaml"
        config.write_text(join(bootstrap(), service_entry("svc", [app.port])))
        proc = await ProxyProcess(str(config), "--workers", "2").start()
        try:
            port, admin = proc.ports["outbound"], proc.ports["admin"]
            status, body = await asyncio.to_thread(_get, admin, "/workers")
            workers = json.loads(body)["workers"]
            assert status == 200 and len(workers) == 2
            assert all(w["running"] for w in workers)
            assert (await asyncio.to_thread(_get, admin, "/ready"))[0] == 200
            # New connections each time: the kernel spreads them over both workers.
            total = 60
            for _ in range(total):
                async with httpx.AsyncClient() as http:
                    resp = await http.get(f"http://127.0.0.1:{port}/", headers={"host": "svc:9080"})
                    assert resp.status_code == 200
            served = []
            for w in workers:
                wport = int(w["admin"].rsplit(":", 1)[1])
                _, text = await asyncio.to_thread(_get, wport, "/stats/prometheus")
                served.append(_requests(text.decode()))
            assert sum(served) == total
            assert all(n > 0 for n in served), served  # both took a share
            _, merged = await asyncio.to_thread(_get, admin, "/stats/prometheus")
            assert _requests(merged.decode()) == total
            _, clusters = await asyncio.to_thread(_get, admin, "/clusters")
            svc = next(
                c
                for c in json.loads(clusters)["clusters"]
                if c["name"].endswith("svc.default.svc.cluster.local")
            )
            assert sum(ep["total_requests"] for ep in svc["endpoints"]) == total
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            proc.stop()


def _requests(text: str) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("istio_requests_total{") and 'reporter="source"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_merge_expositions_sums_series_and_keeps_latest_timestamp() -> None:
    a = (
        '# HELP x_total X.\n# TYPE x_total counter\nx_total{a="1"} 2.0\n'
        "# HELP t_timestamp_seconds T.\n# TYPE t_timestamp_seconds gauge\n"
        't_timestamp_seconds{c="w"} 100.0\n'
    )
    b = (
        '# HELP x_total X.\n# TYPE x_total counter\nx_total{a="1"} 3.0\nx_total{a="2"} 1.0\n'
        "# HELP t_timestamp_seconds T.\n# TYPE t_timestamp_seconds gauge\n"
        't_timestamp_seconds{c="w"} 90.0\n'
    )
    text = merge_expositions([a, b]).decode()
    assert 'x_total{a="1"} 5.0' in text
    assert 'x_total{a="2"} 1.0' in text
    assert 't_timestamp_seconds{c="w"} 100.0' in text


def test_merge_json_sums_numbers_and_matches_lists_by_name() -> None:
    one = {"clusters": [{"name": "a", "n": 1, "endpoints": [{"address": "x", "r": 2}]}]}
    two = {
        "clusters": [
            {"name": "a", "n": 2, "endpoints": [{"address": "x", "r": 3}]},
            {"name": "b", "n": 7, "endpoints": []},
        ]
    }
    assert merge_json([one, two]) == {
        "clusters": [
            {"name": "a", "n": 3, "endpoints": [{"address": "x", "r": 5}]},
            {"name": "b", "n": 7, "endpoints": []},
        ]
    }
