"""Access logs over real sockets: off by default, turned on by a Telemetry resource or the
bootstrap, to stdout or a file, in Envoy's text format or JSON (reference §2.5)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import RawClient, bootstrap, join, proxy, service_entry, upstream

TELEMETRY_ON = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
"""

# Envoy's default text format, then our cluster and direction (telemetry/access_log.py).
TEXT_LINE = re.compile(
    r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "(?P<method>\S+) (?P<path>\S+) HTTP/1\.1" '
    r"(?P<status>\d+) (?P<flags>\S+) \d+ \d+ \d+ (?:\d+|-) "
    r'"[^"]*" "[^"]*" "[^"]*" "[^"]*" "[^"]*" (?P<cluster>\S+) (?P<direction>outbound|inbound)$'
)


def telemetry(body: str, name: str = "sidecar-logs") -> str:
    return (
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        f"metadata: {{name: {name}, namespace: default}}\nspec:\n  accessLogging:\n{body}"
    )


def to_file(path: Path, fmt: str = "text") -> str:
    return f"telemetry:\n  accessLog: {{path: {path}, format: {fmt}}}\n"


async def traffic(port: int) -> None:
    """One 200 to svc, one 502 to an unknown host (REGISTRY_ONLY), with a secret-bearing request."""
    client = await RawClient.connect(port)
    try:
        ok = await client.request(
            "GET",
            "/items/1",
            [
                ("host", "svc"),
                ("user-agent", "test-agent/1"),
                ("cookie", "session=SECRET-COOKIE"),
                ("authorization", "Bearer SECRET-TOKEN"),
            ],
            body=b"SECRET-BODY",
        )
        assert ok.status == 200
        missing = await client.request("GET", "/nowhere", [("host", "unknown.example")])
        assert missing.status == 502
    finally:
        await client.close()


async def test_off_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    async with upstream() as up:
        async with proxy(join(bootstrap(), service_entry("svc", [up.port]))) as px:
            assert px.app.access_log is None
            await traffic(px.port)
    assert "HTTP/1.1" not in capsys.readouterr().out


async def test_a_telemetry_resource_turns_them_on_to_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("svc", [up.port]), TELEMETRY_ON)
        async with proxy(config) as px:
            assert px.app.access_log is not None
            await traffic(px.port)
    out = capsys.readouterr().out
    lines = [m.groupdict() for m in map(TEXT_LINE.match, out.splitlines()) if m]
    assert [(x["method"], x["path"], x["status"], x["direction"]) for x in lines] == [
        ("GET", "/items/1", "200", "outbound"),
        ("GET", "/nowhere", "502", "outbound"),
    ]
    assert lines[0]["cluster"] == "outbound|9080||svc.default.svc.cluster.local"
    assert "SECRET" not in out


async def test_a_telemetry_resource_with_the_bootstraps_file_and_json(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    async with upstream() as up:
        config = join(
            bootstrap(extra=to_file(path, "json")),
            service_entry("svc", [up.port]),
            telemetry("  - providers: [{name: envoy}]\n"),
        )
        async with proxy(config) as px:
            await traffic(px.port)
            alog = px.app.access_log
            assert alog is not None and alog._thread is not None  # a file: the writer thread
    text = path.read_text()
    assert "SECRET" not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert len(entries) == 2
    ok, missing = entries
    assert ok["method"] == "GET" and ok["path"] == "/items/1"
    assert (ok["response_code"], ok["response_flags"]) == (200, "-")
    assert ok["upstream_cluster"] == "outbound|9080||svc.default.svc.cluster.local"
    assert ok["upstream_host"] == f"127.0.0.1:{up.port}"
    assert ok["authority"] == "svc"
    assert ok["user_agent"] == "test-agent/1"
    assert ok["bytes_received"] == len(b"SECRET-BODY")
    assert ok["direction"] == "outbound"
    assert isinstance(ok["duration"], int) and isinstance(ok["upstream_service_time"], int)
    assert re.fullmatch(r"[0-9a-f-]{36}", ok["request_id"])
    assert missing["response_code"] == 502
    assert missing["upstream_host"] is None and missing["user_agent"] is None


async def test_a_disabled_telemetry_turns_the_bootstraps_log_off(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    async with upstream() as up:
        config = join(
            bootstrap(extra=to_file(path)),
            service_entry("svc", [up.port]),
            telemetry("  - disabled: true\n"),
        )
        async with proxy(config) as px:
            assert px.app.access_log is None
            await traffic(px.port)
    assert not path.exists()


async def test_the_bootstrap_alone_turns_them_on_and_a_filter_applies(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    body = "  - providers: [{name: envoy}]\n    filter: {expression: 'response.code >= 500'}\n"
    async with upstream() as up:
        async with proxy(
            join(bootstrap(extra=to_file(path)), service_entry("svc", [up.port]))
        ) as px:
            await traffic(px.port)
        async with proxy(
            join(bootstrap(extra=to_file(path)), service_entry("svc", [up.port]), telemetry(body))
        ) as px:
            await traffic(px.port)
    statuses = [TEXT_LINE.match(line)["status"] for line in path.read_text().splitlines()]  # type: ignore[index]
    # First proxy: both requests; second: only the 5xx one, appended to the same file.
    assert statuses == ["200", "502", "502"]


async def test_meshproxy_run_access_log_file_json_is_flushed_on_sigterm(tmp_path: Path) -> None:
    async with upstream() as up:
        cfg = tmp_path / "mesh.yaml"
        cfg.write_text(join(bootstrap(drain="1s"), service_entry("svc", [up.port])))
        log_path = tmp_path / "run.log"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshproxy",
            "--log-level",
            "warning",
            "run",
            "-c",
            str(cfg),
            "--access-log",
            str(log_path),
            "--access-log-format",
            "json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert ready.startswith("meshproxy ready:"), ready
            port = int(re.search(r"outbound=127\.0\.0\.1:(\d+)", ready)[1])  # type: ignore[index]
            client = await RawClient.connect(port)
            for i in range(20):
                resp = await client.request("GET", f"/n/{i}", [("host", "svc")])
                assert resp.status == 200
            await client.close()
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    paths = [json.loads(line)["path"] for line in log_path.read_text().splitlines()]
    assert paths == [f"/n/{i}" for i in range(20)]
