"""The admin server's page (``GET /``) in a real browser: headless Chromium loads it from a live
proxy after traffic, runs its fetch() polling of ``/dashboard.json``, and the DOM it renders shows
the live numbers: request rate, error rate, per-destination counts, cluster endpoint health and the
recent requests with their response flags. Also the Dashboard sink itself, with a fake clock."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import RawClient, bootstrap, join, proxy, service_entry, upstream

from meshproxy.core.record import Direction, RequestRecord
from meshproxy.telemetry.dashboard import PAGE, Dashboard

CHROMIUM = shutil.which("chromium")
SVC = "outbound|9080||svc.default.svc.cluster.local"
DEAD = "outbound|9080||dead.default.svc.cluster.local"


# -- reading the rendered DOM -------------------------------------------------------------------


class Dom(HTMLParser):
    """The text of every element with an id, and the rows of every table (by table id)."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.attrs_by_tag: dict[str, dict[str, str | None]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._open: list[str] = []  # ids of the elements we are inside
        self._table: str | None = None
        self._in_body = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.attrs_by_tag.setdefault(tag, a)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []  # type: ignore[index]
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        if a.get("id") and tag not in ("table",):
            self._open.append(a["id"])  # type: ignore[arg-type]
            self.text[a["id"]] = ""  # type: ignore[index]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None
        elif tag in ("div", "span", "h1") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for ident in self._open:
            self.text[ident] += data


async def chromium_dom(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran (5 s of virtual time: several polls)."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        "--virtual-time-budget=5000",
        url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def admin_get(port: int, path: str) -> tuple[int, str, bytes]:
    client = await RawClient.connect(port)
    try:
        resp = await client.request("GET", path, [("host", "admin")])
    finally:
        await client.close()
    return resp.status, resp.header("content-type") or "", resp.body


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def send_traffic(port: int) -> None:
    """5 x 200 to svc, one 502 to an unknown host, one 503 URX,UF to a dead endpoint."""
    client = await RawClient.connect(port)
    try:
        for i in range(5):
            resp = await client.request("GET", f"/items/{i}?token=SECRET", [("host", "svc")])
            assert resp.status == 200
        assert (await client.request("GET", "/x", [("host", "unknown.example")])).status == 502
        assert (await client.request("GET", "/down", [("host", "dead")])).status == 503
    finally:
        await client.close()


# -- the page in Chromium -----------------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_chromium_renders_the_live_numbers(tmp_path: Path) -> None:
    async with upstream() as up:
        config = join(
            bootstrap(), service_entry("svc", [up.port]), service_entry("dead", [closed_port()])
        )
        async with proxy(config) as px:
            await send_traffic(px.port)

            status, ctype, body = await admin_get(px.admin_port, "/")
            assert (status, ctype) == (200, "text/html; charset=utf-8")
            assert body == PAGE
            status, ctype, body = await admin_get(px.admin_port, "/dashboard.json")
            assert (status, ctype) == (200, "application/json")
            data = json.loads(body)
            assert data["totals"]["total"] == 7 and data["totals"]["errors"] == 2

            html = await chromium_dom(f"http://127.0.0.1:{px.admin_port}/", tmp_path / "profile")

    dom = Dom()
    dom.feed(html)
    # The script ran and its fetch() polls succeeded.
    assert int(dom.attrs_by_tag["body"]["data-polls"] or 0) >= 1, html[:2000]
    assert dom.text["status"] == "live"
    assert dom.text["node"] == "app-v1.default \u00b7 LIVE"
    # Headline numbers: 7 requests, 2 of them 5xx, all within the 10 s window.
    assert dom.text["total"] == "7"
    assert float(dom.text["rps"]) > 0
    assert dom.text["error-rate"] == "28.6%"
    assert dom.text["p99"].endswith(" ms")

    by_destination = {row[0]: row for row in dom.tables["destinations"]}
    _, direction, rps, errors, p50, _, _, in_window, total = by_destination[SVC]
    assert (direction, errors, in_window, total) == ("outbound", "0.0%", "5", "5")
    assert float(rps) > 0 and float(p50) > 0
    assert by_destination[DEAD][3] == "100.0%" and by_destination[DEAD][8] == "1"

    clusters = {row[0]: row for row in dom.tables["clusters"] if row[0]}
    svc_row = clusters[SVC]
    assert svc_row[1:5] == [f"127.0.0.1:{up.port}", "healthy", "0", "5"]
    dead_row = clusters[DEAD]
    assert dead_row[2] == "healthy" and int(dead_row[5]) >= 1  # connect failures
    assert dead_row[6] == "2"  # Istio's default retries on connect-failure

    recent = dom.tables["recent"]
    assert len(recent) == 7
    # Newest first: ago, direction, method, path, status, flags, ms, destination, upstream host.
    assert [(r[3], r[4], r[5]) for r in recent[:2]] == [
        ("/down", "503", "URX,UF"),
        ("/x", "502", "-"),
    ]
    assert [r[3] for r in recent[2:]] == [f"/items/{i}" for i in range(4, -1, -1)]
    assert all(r[4] == "200" and r[7] == SVC for r in recent[2:])
    assert "SECRET" not in html  # query strings never reach the page


async def test_the_page_is_self_contained() -> None:
    page = PAGE.decode()
    for external in ("http://", "https://", "src=", "<link", "@import"):
        assert external not in page
    assert 'fetch("dashboard.json"' in page and "setInterval(poll, 1000)" in page
    assert "innerHTML" not in page  # request data goes in as text only


async def test_dashboard_json_before_any_traffic() -> None:
    async with proxy(join(bootstrap(), service_entry("svc", [closed_port()]))) as px:
        status, _, body = await admin_get(px.admin_port, "/dashboard.json")
    data = json.loads(body)
    assert status == 200
    assert data["totals"]["total"] == 0 and data["totals"]["p99_ms"] is None
    assert data["destinations"] == [] and data["recent"] == []
    assert [c["name"] for c in data["clusters"]] == ["outbound|9080||svc.default.svc.cluster.local"]
    assert data["access_log"] is None and data["server"]["state"] == "LIVE"


# -- the Dashboard sink, with a fake clock ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rec(
    end: float, ms: float, code: int = 200, cluster: str = SVC, path: str = "/a"
) -> RequestRecord:
    r = RequestRecord(Direction.OUTBOUND, end - ms / 1000, "127.0.0.1:1")
    r.end = end
    r.response_code = code
    r.cluster = cluster
    r.method = "GET"
    r.path = path
    return r


def test_window_rates_percentiles_and_expiry() -> None:
    clock = FakeClock()
    dash = Dashboard(list, clock, window=10)
    clock.now = 1020.0  # up for 20 s: rates are over the full 10 s window
    for _ in range(90):
        dash.record(rec(1015.5, 10.0))
    for _ in range(10):
        dash.record(rec(1016.5, 100.0, code=503))
    snap = dash.snapshot()
    totals = snap["totals"]
    assert isinstance(totals, dict)
    assert (totals["requests"], totals["errors"], totals["total"]) == (100, 10, 100)
    assert totals["rps"] == 10.0 and totals["error_rate"] == 0.1
    assert 8.0 <= totals["p50_ms"] <= 12.0  # type: ignore[operator]
    assert 80.0 <= totals["p99_ms"] <= 120.0  # type: ignore[operator]
    clock.now = 1030.0  # 10 s later the window is empty; totals since start remain
    later = dash.snapshot()["totals"]
    assert isinstance(later, dict)
    assert (later["requests"], later["rps"], later["total"]) == (0, 0.0, 100)
    # A slot reused a window later counts only its new second.
    dash.record(rec(1026.5, 1.0))
    again = dash.snapshot()["totals"]
    assert isinstance(again, dict) and again["requests"] == 1


def test_recent_is_bounded_newest_first_and_paths_lose_their_query() -> None:
    clock = FakeClock()
    dash = Dashboard(list, clock, recent=3)
    for i in range(5):
        dash.record(rec(clock.now, 1.0, path=f"/p/{i}?api_key=SECRET"))
    dash.record(rec(clock.now, 1.0, path="/" + "x" * 500))
    recent = dash.snapshot()["recent"]
    assert isinstance(recent, list)
    assert [r["path"] for r in recent] == ["/" + "x" * 95 + "\u2026", "/p/4", "/p/3"]


def test_destinations_are_bounded() -> None:
    clock = FakeClock()
    dash = Dashboard(list, clock, max_destinations=3)
    for i in range(10):
        dash.record(rec(clock.now, 1.0, cluster=f"outbound|80||h{i}"))
    names = [d["name"] for d in dash.snapshot()["destinations"]]  # type: ignore[union-attr]
    assert len(names) == 4 and "(other)" in names


def test_cluster_snapshots_are_summarised_and_merged_by_name() -> None:
    snaps = [
        {
            "name": "passthrough",
            "retries": 1,
            "limits": {"overflow_requests": 2, "overflow_pending": 1, "max_requests": 9},
            "endpoints": [{"address": "1.1.1.1:80", "health": "healthy", "total_requests": 4}],
        },
        {
            "name": "passthrough",
            "retries": 2,
            "outlier_detection": {"ejections_total": 3},
            "endpoints": [{"address": "2.2.2.2:80", "health": "ejected", "returns_in_seconds": 7}],
        },
    ]
    dash = Dashboard(lambda: snaps, FakeClock())
    (cluster,) = dash.snapshot()["clusters"]  # type: ignore[misc]
    assert (cluster["retries"], cluster["overflows"], cluster["ejections"]) == (3, 3, 3)
    assert [(e["address"], e["health"]) for e in cluster["endpoints"]] == [
        ("1.1.1.1:80", "healthy"),
        ("2.2.2.2:80", "ejected"),
    ]
