"""``python -m meshproxy validate`` and ``run`` on configuration files, as a user runs them.

Every subprocess has a timeout; ``run`` is only ever given invalid configuration, so it must exit
on its own without binding anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import free_env

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0


def meshproxy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = free_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "--log-level", "warning", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=env,
        check=False,
    )


def doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


BOOT = doc(
    """
    apiVersion: meshproxy.io/v1alpha1
    kind: MeshProxy
    metadata: {name: app-v1, namespace: default}
    spec:
      serviceAccount: app
      admin: 127.0.0.1:0
      outbound: {address: 127.0.0.1:0}
    """
)

SE = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      ports: [{number: 9080, name: http, protocol: HTTP}]
      resolution: STATIC
      endpoints:
      - address: 127.0.0.1
        ports: {http: 9080}
    """
)

VS = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      http:
      - route:
        - destination: {host: reviews, subset: v1}
    """
)

DR = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews}
    spec:
      host: reviews
      subsets:
      - name: v1
        labels: {version: v1}
    """
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_validate_valid_config_prints_a_summary(tmp_path: Path) -> None:
    mesh = write(tmp_path / "mesh.yaml", "---\n".join([BOOT, SE, VS, DR]))
    result = meshproxy("validate", "-c", mesh)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "ok: 1 file(s), 1 ServiceEntry, 1 VirtualService, 1 DestinationRule, "
        "bootstrap app-v1.default\n"
    )


def test_validate_repeated_config_flags_and_directories(tmp_path: Path) -> None:
    boot = write(tmp_path / "boot.yaml", BOOT)
    conf = tmp_path / "conf.d"
    write(conf / "services.yml", SE)
    write(conf / "routes" / "reviews.yaml", "---\n".join([VS, DR]))
    write(conf / "notes.txt", "this: [is not read")
    result = meshproxy("validate", "-c", boot, "--config", conf)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ok: 3 file(s), 1 ServiceEntry, 1 VirtualService, 1 DestinationRule, "
        "bootstrap app-v1.default"
    ]


def test_validate_prints_every_error_and_exits_1(tmp_path: Path) -> None:
    boot = write(tmp_path / "boot.yaml", BOOT.replace("admin: 127.0.0.1:0", "admin: 127.0.0.1"))
    conf = tmp_path / "conf.d"
    services = write(conf / "services.yaml", SE.replace("resolution: STATIC", "resolution: STATIK"))
    routes = write(conf / "routes.yml", VS.replace("hosts: [reviews]", "hosts: reviews"))
    result = meshproxy("validate", "-c", boot, "-c", conf)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{boot}:6: MeshProxy app-v1: spec.admin: invalid address '127.0.0.1' (expected host:port)",
        f"{routes}:5: VirtualService reviews: spec.hosts: expected a list",
        f"{services}:7: ServiceEntry reviews: spec.resolution: invalid value 'STATIK' "
        "(expected one of: NONE, STATIC, DNS, DNS_ROUND_ROBIN)",
        "3 error(s)",
    ]


def test_validate_reports_semantic_errors_with_file_line_and_path(tmp_path: Path) -> None:
    mesh = write(tmp_path / "mesh.yaml", "---\n".join([BOOT, SE, VS]))
    result = meshproxy("validate", "-c", mesh)
    assert result.returncode == 1
    line = (
        "---\n".join([BOOT, SE, VS])
        .splitlines()
        .index("    - destination: {host: reviews, subset: v1}")
    )
    assert result.stderr.splitlines() == [
        f"{mesh}:{line + 1}: VirtualService reviews: spec.http[0].route[0].destination.subset: "
        'subset "v1" is not defined for host reviews',
        "1 error(s)",
    ]


def test_validate_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = meshproxy("validate", "-c", missing)
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{missing}:0: ")
    assert "No such file" in first


def test_validate_without_config_is_a_usage_error() -> None:
    result = meshproxy("validate")
    assert result.returncode == 2
    assert "-c/--config" in result.stderr


def test_run_refuses_to_start_on_invalid_config(tmp_path: Path) -> None:
    boot = write(tmp_path / "boot.yaml", BOOT)
    bad = write(tmp_path / "bad.yaml", SE.replace("number: 9080", "number: eighty"))
    result = meshproxy("run", "-c", boot, "-c", bad)
    assert result.returncode == 1
    assert "meshproxy ready" not in result.stdout
    assert "meshproxy ready" not in result.stderr
    lines = result.stderr.splitlines()
    assert (
        f"{bad}:6: ServiceEntry reviews: spec.ports[0].number: expected an integer, got 'eighty'"
        in lines
    )
    assert lines[-1] == "refusing to start: 1 configuration error(s)"


def test_run_refuses_to_start_on_a_semantic_error(tmp_path: Path) -> None:
    mesh = write(
        tmp_path / "mesh.yaml",
        "---\n".join([BOOT, VS.replace("subset: v1", "subset: v1, port: {number: 1}")]),
    )
    result = meshproxy("run", "-c", mesh)
    assert result.returncode == 1
    assert "meshproxy ready" not in result.stdout
    assert "spec.http[0].route[0].destination.host: host 'reviews' is not defined" in result.stderr
