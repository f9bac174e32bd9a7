"""The bundled bookinfo mesh and the README's main command, run as a newcomer would.

``meshproxy demo`` is run as a subprocess, as typed; it uses the YAML's fixed ports and falls back to
free ones when one is taken, so it cannot collide with another run. The in-process tests use free
ports only (``Ports.AUTO``).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from meshproxy.config.load import load_paths
from meshproxy.examples import demo as demo_module
from meshproxy.examples import mesh as mesh_module
from meshproxy.examples.demo import TEST_USER, demo, visit_productpage
from meshproxy.examples.mesh import (
    BOOKINFO,
    MESH_DIR,
    SIDECARS_DIR,
    WORKLOADS,
    Mesh,
    Ports,
    Workload,
    rewrite_ports,
)
from meshproxy.examples.services import http_get

CLI = [sys.executable, "-m", "meshproxy", "--log-level", "warning"]
ANONYMOUS_LINE = re.compile(
    r"^  GET /productpage +200  productpage v1 -> reviews v1  \(no stars; ratings not called\)$",
    re.M,
)
TEST_USER_LINE = re.compile(
    r"^  GET /productpage  end-user: test-user +200  "
    r"productpage v1 -> reviews v2 -> ratings v1  \(black stars\)$",
    re.M,
)
# What a clean exit leaves on stderr: nothing of these.
UNCLEAN = ("Traceback", "ERROR", "was destroyed", "never awaited", "unclosed", "ResourceWarning")


def _assert_clean(stderr: str) -> None:
    for marker in UNCLEAN:
        assert marker not in stderr, stderr


# -- meshproxy demo -----------------------------------------------------------------------------
def test_meshproxy_demo_shows_the_canary_routing() -> None:
    result = subprocess.run(
        [*CLI, "demo"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    _assert_clean(result.stderr)
    # Every workload is listed with its ports.
    for workload in WORKLOADS:
        assert re.search(rf"^  {workload.name} +\d+ +\d+ +\d+ +\d+ ", out, re.M), out
    # --requests defaults to 3: three as the anonymous user (v1, no ratings), three as test-user
    # (v2, which calls ratings); v3 never answers.
    assert len(ANONYMOUS_LINE.findall(out)) == 3, out
    assert len(TEST_USER_LINE.findall(out)) == 3, out
    assert "reviews v3" not in out
    assert "x-request-id (added by productpage's sidecar) and traceparent reached" in out
    assert "Routing as configured: anonymous -> reviews v1 (3 of 3), test-user -> reviews v2" in out
    # The commands to try more.
    port = re.search(r"^  curl http://127\.0\.0\.1:(\d+)/productpage$", out, re.M)
    assert port is not None, out
    url = f"http://127.0.0.1:{port.group(1)}/productpage"
    assert f"  curl -H 'end-user: test-user' {url}\n" in out
    route = re.search(r"^  meshproxy route -c (\S+) -c (\S+) (.*)$", out, re.M)
    assert route is not None, out
    assert Path(route.group(1)).resolve() == (SIDECARS_DIR / "productpage-v1.yaml").resolve()
    assert Path(route.group(2)).resolve() == MESH_DIR.resolve()
    assert route.group(3) == "-H 'end-user: test-user' http://reviews:9080/reviews/0"
    assert "meshproxy demo --serve" in out
    assert "examples/README.md" in out
    assert out.rstrip().endswith("demo ok")


def test_meshproxy_demo_requests_sets_how_many_per_user() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--ports", "auto", "--requests", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(ANONYMOUS_LINE.findall(result.stdout)) == 1
    assert len(TEST_USER_LINE.findall(result.stdout)) == 1


def test_meshproxy_demo_serve_answers_curl_and_stops_on_sigint() -> None:
    proc = subprocess.Popen(
        [*CLI, "demo", "--ports", "auto", "--serve", "--requests", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        seen: list[str] = []
        for line in proc.stdout:  # until the demo says it serves (pytest-timeout bounds this)
            seen.append(line)
            if "Ctrl-C stops the mesh" in line:
                break
        else:
            pytest.fail("demo --serve ended before serving:\n" + "".join(seen) + proc.stderr.read())
        text = "".join(seen)
        assert "The mesh is serving. In another shell, try:" in text
        found = re.search(r"^  curl (http://127\.0\.0\.1:\d+/productpage)$", text, re.M)
        assert found is not None, text

        # The curl line printed, as test-user: productpage -> reviews v2 -> ratings v1.
        request = urllib.request.Request(found.group(1), headers={"end-user": TEST_USER})
        with urllib.request.urlopen(request, timeout=10) as response:
            page = json.load(response)
        assert page["service"] == "productpage"
        assert page["reviews"]["version"] == "v2"
        assert page["reviews"]["ratings"]["service"] == "ratings"

        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, rest + stderr
    _assert_clean(stderr)
    # The access log of every sidecar on the way, each line named by its workload.
    assert re.search(
        r"^productpage-v1 +\| .*\"GET /productpage HTTP/1\.1\" 200 .* inbound$", rest, re.M
    )
    assert "outbound|9080|v2|reviews.default.svc.cluster.local outbound" in rest
    assert re.search(r"^reviews-v2 +\| .*\"GET /ratings/0 HTTP/1\.1\" 200 ", rest, re.M), rest
    assert "stopping" in rest
    assert rest.rstrip().endswith("demo ok")


# -- the bundled YAML ---------------------------------------------------------------------------
def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    args = [a for p in paths for a in ("-c", str(p))]
    return subprocess.run([*CLI, "validate", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_each_sidecar_validates_with_the_whole_mesh(workload: Workload) -> None:
    result = _validate(workload.bootstrap, MESH_DIR)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "ok: 4 file(s), 3 ServiceEntry, 1 VirtualService, 3 DestinationRule, bootstrap "
        f"{workload.name}.default"
    ), result.stdout
    assert result.stderr == ""  # no warnings either


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_each_sidecar_validates_with_what_its_app_calls(workload: Workload) -> None:
    result = _validate(*workload.files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {len(workload.files)} file(s), "), result.stdout
    assert result.stderr == ""


def test_every_bundled_yaml_file_is_used() -> None:
    shipped = {p.relative_to(BOOKINFO) for p in BOOKINFO.rglob("*.yaml")}
    used = {f.relative_to(BOOKINFO) for w in WORKLOADS for f in w.files}
    used |= {p.relative_to(BOOKINFO) for p in MESH_DIR.glob("*.yaml")}
    assert shipped == used
    assert Path("mesh/productpage.yaml") in shipped  # part of the mesh, though no app calls it


def test_bundled_yaml_ports_follow_the_documented_plan() -> None:
    """Four ports per workload; each ServiceEntry endpoint is a sidecar inbound with its version."""
    inbound_of: dict[tuple[str, str], int] = {}
    for workload in WORKLOADS:
        spec = load_paths([workload.bootstrap]).bootstrap.spec
        assert spec.inbound is not None and spec.outbound is not None
        base = spec.inbound.app.port
        assert base % 10 == 0 and 19080 <= base <= 19120
        assert spec.inbound.address.port == base + 1
        assert spec.outbound.address.port == base + 2
        assert spec.admin.port == base + 3
        inbound_of[(workload.service, workload.version)] = base + 1
    config = load_paths([SIDECARS_DIR / "productpage-v1.yaml", MESH_DIR])
    endpoints = {
        (entry.metadata.name, ep.labels["version"]): ep.ports["http"]
        for entry in config.service_entries
        for ep in entry.spec.endpoints
    }
    assert endpoints == inbound_of
    (vs,) = config.virtual_services
    first, second = vs.spec.http
    assert first.match[0].headers["end-user"].exact == TEST_USER
    assert [d.destination.subset for d in first.route] == ["v2"]
    assert not second.match and [d.destination.subset for d in second.route] == ["v1"]


def test_rewrite_ports_replaces_whole_numbers_only() -> None:
    text = "address: 127.0.0.1:19081\nports: {http: 19081}\nnumber: 9080\nother: 190810\n"
    assert rewrite_ports(text, {19081: 40000, 9080: 9080}) == (
        "address: 127.0.0.1:40000\nports: {http: 40000}\nnumber: 9080\nother: 190810\n"
    )
    assert rewrite_ports(text, {}) == text


# -- the mesh, in process -----------------------------------------------------------------------
async def test_mesh_routes_the_canary_and_closes_every_task() -> None:
    mesh = Mesh(Ports.AUTO)
    try:
        await mesh.start()
        assert [r.workload for r in mesh] == list(WORKLOADS)
        for user in (None, TEST_USER, None, TEST_USER):
            outcome = await visit_productpage(mesh, user)
            assert outcome.ok, outcome
            assert outcome.trace_kept, outcome
        # The rule applies in the caller's sidecar: ask productpage's outbound listener directly.
        outbound = mesh["productpage-v1"].outbound
        for headers, version in (([("end-user", TEST_USER)], "v2"), ([], "v1")):
            reply = await http_get(
                (outbound.host, outbound.port), "reviews:9080", "/reviews/7", headers
            )
            assert (reply.status, reply.body["version"], reply.body["id"]) == (200, version, 7)
        # A sidecar loads only what its app calls: reviews v1's knows no ratings (REGISTRY_ONLY).
        v1 = mesh["reviews-v1"].outbound
        reply = await http_get((v1.host, v1.port), "ratings:9080", "/ratings/0")
        assert reply.status == 502
    finally:
        await mesh.close()
    await mesh.close()  # twice is harmless
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_fixed_ports_fall_back_to_free_ones_when_taken() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            # SO_REUSEADDR, as the mesh's listeners: a TIME_WAIT left by an earlier run does not
            # stop this bind, and only a listening socket (this one, or another) makes it fail.
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", 19081))  # productpage-v1's sidecar inbound
            holder.listen()
        except OSError:
            pass  # already taken by something else: just as good
        mesh = Mesh(Ports.FIXED)
        try:
            await mesh.start()
            assert mesh.fallback is not None and not mesh.fixed
            assert mesh["productpage-v1"].inbound.port != 19081
            assert (await visit_productpage(mesh, TEST_USER)).ok
        finally:
            await mesh.close()
    finally:
        holder.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_demo_output_and_exit_status_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    assert await demo(requests=2, ports=Ports.AUTO, out=out) == 0
    assert len(TEST_USER_LINE.findall(out.getvalue())) == 2
    assert out.getvalue().rstrip().endswith("demo ok")

    # Requests that do not go where the rule says make the demo fail: here the user it sends as
    # "test-user" is no longer the one the VirtualService matches.
    monkeypatch.setattr(demo_module, "TEST_USER", "someone-else")
    out = io.StringIO()
    assert await demo(requests=1, ports=Ports.AUTO, out=out) == 1
    text = out.getvalue()
    assert "<-- expected reviews v2 -> ratings v1" in text
    assert "Routing NOT as configured" in text
    assert text.rstrip().endswith("demo FAILED: the mesh did not route as configured")
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_demo_reports_invalid_yaml_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A newcomer edits the canary into a subset that does not exist.
    shutil.copytree(BOOKINFO, tmp_path / "bookinfo")
    reviews = tmp_path / "bookinfo" / "mesh" / "reviews.yaml"
    reviews.write_text(reviews.read_text().replace("subset: v2", "subset: v9"))
    monkeypatch.setattr(mesh_module, "MESH_DIR", tmp_path / "bookinfo" / "mesh")
    monkeypatch.setattr(mesh_module, "SIDECARS_DIR", tmp_path / "bookinfo" / "sidecars")
    assert await demo(requests=1, ports=Ports.AUTO, out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "reviews.yaml:" in err and 'subset "v9"' in err, err
    assert "cannot start the demo mesh: 1 error(s)" in err
    assert asyncio.all_tasks() == {asyncio.current_task()}
