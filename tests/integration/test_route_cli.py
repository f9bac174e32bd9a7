"""``meshproxy route`` and ``validate`` warnings as a user runs them, and the admin ``GET /route``.

The CLI runs as a subprocess on files in a temporary directory (every run has a timeout); the admin
endpoint is asked about the live config of an in-process proxy, and a real request through that
proxy must land where the explanation said.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlencode

import httpx
from helpers import bootstrap, free_env, join, proxy, service_entry, upstream

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0
REVIEWS = "reviews.default.svc.cluster.local"


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


RULES = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews}
    spec:
      host: reviews
      subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
      - {name: v3, labels: {version: v3}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      http:
      - name: canary
        match:
        - headers: {end-user: {exact: test-user}}
        route:
        - destination: {host: reviews, subset: v2}
      - name: default
        timeout: 2s
        route:
        - destination: {host: reviews, subset: v1}
          weight: 90
        - destination: {host: reviews, subset: v2}
          weight: 10
    """
)


def write_mesh(tmp_path: Path, *docs: str, ports: tuple[int, int] = (9081, 9082)) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(join(bootstrap(), service_entry("reviews", list(ports)), RULES, *docs))
    return path


# ---------------------------------------------------------------------------------------------
# meshproxy route


def test_route_explains_the_canary_rule(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
    result = meshproxy(
        "route", "-c", mesh, "-H", "end-user: test-user", "http://reviews:9080/reviews/1?q=1"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[:9] == [
        "GET http://reviews:9080/reviews/1?q=1",
        "host reviews, port 9080",
        f"VirtualService reviews.default (hosts: {REVIEWS})",
        "  http[0] (canary): matched by match[0]: header end-user exact 'test-user'",
        "route: http[0] (canary) of VirtualService reviews.default",
        "destinations:",
        f"  100% {REVIEWS} subset v2 port 9080 (weight 100)",
        f"      cluster outbound|9080|v2|{REVIEWS}, lb LEAST_REQUEST",
        "      endpoint 127.0.0.1:9082 version=v2",
    ]


def test_route_explains_why_the_earlier_rule_did_not_match(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
    result = meshproxy("route", "-c", mesh, "-X", "post", "-H", "End-User: jason", "reviews/x")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "POST http://reviews/x"
    assert lines[3:6] == [
        "  http[0] (canary): no match",
        "    match[0]: header end-user exact 'test-user' did not match",
        "  http[1] (default): matched (no match conditions)",
    ]
    assert f"  90% {REVIEWS} subset v1 port 9080 (weight 90)" in lines
    assert f"  10% {REVIEWS} subset v2 port 9080 (weight 10)" in lines
    assert "timeout: 2s (the rule's timeout)" in lines


def test_route_json(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
    result = meshproxy("route", "--json", "-c", mesh, "http://reviews:9080/")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["outcome"] == "forward"
    assert data["virtual_service"] == "reviews.default"
    assert data["rules"][0]["blocks"][0]["failed"] == "header end-user exact 'test-user'"
    assert data["rule"]["label"] == "http[1] (default)"
    assert [(d["subset"], d["share"]) for d in data["destinations"]] == [("v1", 90.0), ("v2", 10.0)]
    assert data["destinations"][0]["endpoints"] == [
        {"address": "127.0.0.1", "port": 9081, "labels": {"version": "v1"}}
    ]
    assert data["timeout"] == 2.0


def test_route_for_hosts_without_a_virtual_service(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path, service_entry("ratings", [9090]))
    ratings = json.loads(meshproxy("route", "--json", "-c", mesh, "http://ratings:9080/").stdout)
    assert ratings["outcome"] == "service"
    assert (
        ratings["destinations"][0]["cluster"] == "outbound|9080||ratings.default.svc.cluster.local"
    )
    unknown = meshproxy("route", "-c", mesh, "http://example.com/")
    assert unknown.returncode == 0
    assert "blackhole (REGISTRY_ONLY): 502" in unknown.stdout.splitlines()


def test_route_on_invalid_config_prints_errors_and_exits_1(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
    mesh.write_text(mesh.read_text().replace("subset: v2}", "subset: v9}"))
    result = meshproxy("route", "-c", mesh, "http://reviews/")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert 'subset "v9" is not defined for host reviews' in lines[0]
    assert lines[0].startswith(f"{mesh}:")
    assert lines[-1] == f"{len(lines) - 1} error(s)"


def test_route_usage_errors_exit_2(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
    assert meshproxy("route", "-c", mesh).returncode == 2  # no URL
    bad_header = meshproxy("route", "-c", mesh, "-H", "no-colon", "http://reviews/")
    assert bad_header.returncode == 2
    assert "expected -H 'name: value'" in bad_header.stderr
    no_host = meshproxy("route", "-c", mesh, "http:///x")
    assert no_host.returncode == 2
    assert "no host" in no_host.stderr


# ---------------------------------------------------------------------------------------------
# meshproxy validate warnings


def test_validate_prints_warnings_and_still_exits_0(tmp_path: Path) -> None:
    extra = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews-copy}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v3}
          - match: [{uri: {prefix: /}}]
            route:
            - destination: {host: reviews, subset: v1}
        """
    )
    mesh = write_mesh(tmp_path, extra)
    result = meshproxy("validate", "-c", mesh)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "ok: 1 file(s), 1 ServiceEntry, 2 VirtualService, 1 DestinationRule, "
        "bootstrap app-v1.default\n"
    )
    assert result.stderr.splitlines() == [
        f"warning: VirtualService reviews-copy.default: spec.hosts[0]: host {REVIEWS} is already "
        "claimed by VirtualService reviews.default; this one is ignored for it",
        "warning: VirtualService reviews-copy.default: spec.http[1]: rule can never match: every "
        "request it matches is taken first: match[0] by http[0] (no match conditions)",
        "warning: VirtualService reviews-copy.default: spec.http[0].route[0]: subset v3 of "
        f"{REVIEWS} selects no endpoint; every request will fail with 503 UH",
        "3 warning(s)",
    ]


def test_validate_without_warnings_prints_only_the_summary(tmp_path: Path) -> None:
    result = meshproxy("validate", "-c", write_mesh(tmp_path))
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("ok: 1 file(s)")


# ---------------------------------------------------------------------------------------------
# GET /route on the admin server


async def test_admin_route_explains_against_the_live_config() -> None:
    async with upstream() as v1, upstream() as v2:
        config = join(bootstrap(), service_entry("reviews", [v1.port, v2.port]), RULES)
        async with proxy(config) as px, httpx.AsyncClient() as client:
            admin = f"http://127.0.0.1:{px.admin_port}"
            query = urlencode(
                [
                    ("url", "http://reviews:9080/reviews/1?q=1"),
                    ("method", "GET"),
                    ("header", "end-user: test-user"),
                    ("header", "x-other:1"),
                ]
            )
            canary = await client.get(f"{admin}/route?{query}")
            plain = await client.get(f"{admin}/route", params={"url": "http://reviews/x"})
            # The request itself goes where the explanation said.
            sent = await client.get(
                f"{px.url}/reviews/1", headers={"host": "reviews:9080", "end-user": "test-user"}
            )
            ready = await client.get(f"{admin}/ready?verbose=1")
    assert canary.status_code == 200
    assert canary.headers["content-type"] == "application/json"
    data = canary.json()
    assert data["outcome"] == "forward"
    assert data["rule"]["name"] == "canary"
    assert data["path"] == "/reviews/1?q=1"
    [dest] = data["destinations"]
    assert dest["subset"] == "v2"
    assert dest["endpoints"] == [
        {"address": "127.0.0.1", "port": v2.port, "labels": {"version": "v2"}}
    ]
    assert sent.status_code == 200
    assert len(v2.requests) == 1 and v1.requests == []

    other = plain.json()
    assert other["rule"]["name"] == "default"
    assert other["rules"][0]["blocks"][0]["failed"] == "header end-user exact 'test-user'"
    assert (ready.status_code, ready.text) == (200, "LIVE\n")


async def test_admin_route_rejects_bad_queries() -> None:
    async with proxy(bootstrap()) as px, httpx.AsyncClient() as client:
        admin = f"http://127.0.0.1:{px.admin_port}"
        missing = await client.get(f"{admin}/route")
        bad_header = await client.get(
            f"{admin}/route", params={"url": "http://x/", "header": "nocolon"}
        )
        no_host = await client.get(f"{admin}/route", params={"url": "http:///x"})
        blackhole = await client.get(f"{admin}/route", params={"url": "http://example.com/"})
        wrong_method = await client.post(f"{admin}/route")
    assert missing.status_code == 400 and "usage" in missing.text
    assert bad_header.status_code == 400
    assert no_host.status_code == 400
    assert blackhole.status_code == 200
    assert (blackhole.json()["outcome"], blackhole.json()["status"]) == ("blackhole", 502)
    assert wrong_method.status_code == 405
