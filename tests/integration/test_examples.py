"""The bundled example and the README's main command, run as a newcomer would."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources


def test_meshproxy_demo_shows_requests_going_through() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "--log-level", "warning", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("-> 200 from reviews v") == 3
    assert "-> 502 (not in the registry" in out
    assert "demo ok" in out
    # The access log lines name the cluster each request went to.
    assert "outbound|9080||reviews.default.svc.cluster.local" in out


def test_bundled_example_config_validates() -> None:
    path = resources.files("meshproxy.examples").joinpath("demo.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 file(s), 1 ServiceEntry")
