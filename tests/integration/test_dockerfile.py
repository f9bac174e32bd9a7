"""The container image (issue #8 §1), checked without a Docker engine.

No Docker daemon runs on our machines, so this module does two things instead of `docker build`:

1. It parses the ``Dockerfile`` itself (line continuations, comments, JSON and shell forms) and
   checks what the issue asks: the base pinned by version and digest, two stages, uid 1337, the
   exact ENTRYPOINT and CMD, a HEALTHCHECK on the admin ``/ready`` (run for real against a live
   proxy), every COPY source present in the repo and let through by ``.dockerignore``, no compiler
   installed in the final stage (only iptables, for the capture init container), and EXPOSE
   naming exactly the non-loopback ports of the bootstrap the image ships.
2. ``test_install_steps_in_a_fresh_venv`` (marker ``container``, ~15 s, needs the package index)
   runs the SAME pip steps: ``pip wheel --wheel-dir W .`` on a copy of exactly the files the build
   stage COPYs, then ``pip install --no-index --find-links W meshproxy`` into a fresh ``venv``, and
   runs the installed ``meshproxy`` on the shipped configs. It uses the interpreter running the
   tests, not the image's 3.12.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
from helpers import bootstrap, join, proxy, service_entry

from meshproxy.config.load import load_paths

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DEFAULT_CONFIG = REPO / "examples" / "container" / "meshproxy.yaml"
LOOPBACK = re.compile(r"^(127\.|::1$|localhost$)")
COMPILERS = {
    "gcc",
    "g++",
    "cc",
    "c++",
    "clang",
    "make",
    "cmake",
    "build-essential",
    "rustc",
    "cargo",
    "python3-dev",
    "libffi-dev",
    "libssl-dev",
}

# Debian packages the final stage may install: iptables, for `meshproxy iptables --apply`.
RUNTIME_PACKAGES = {"iptables"}
APT_WORDS = {"apt-get", "update", "install", "rm", "/var/lib/apt/lists/*"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # 0-based index of the FROM it belongs to
    line: int


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Instruction]]:
    """Parser directives and instructions, as BuildKit reads them (continuations joined,
    comment lines inside a continuation dropped)."""
    directives: dict[str, str] = {}
    lines = text.splitlines()
    body = 0  # directives: only at the very top, `# key=value`
    while body < len(lines) and (m := re.match(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$", lines[body])):
        directives[m.group(1).lower()] = m.group(2)
        body += 1
    out: list[Instruction] = []
    stage = -1
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(lines[body:], start=body + 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(p for p in buf if p)
        buf = []
        keyword, _, args = joined.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage, start))
    assert not buf, "the Dockerfile ends inside a line continuation"
    return directives, out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _final(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last and i.keyword == keyword]


def _only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = _final(instructions, keyword)
    assert len(found) == 1, f"the final stage needs exactly one {keyword}, has {len(found)}"
    return found[0]


def test_parser_handles_continuations_comments_and_stages() -> None:
    directives, ins = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "FROM a:1 AS build\n"
        "RUN one \\\n"
        "# a comment inside the continuation\n"
        "    two\n"
        "\n"
        "FROM b:2\n"
        'CMD ["x", "y"]\n'
    )
    assert directives == {"syntax": "docker/dockerfile:1"}
    assert [(i.keyword, i.args, i.stage, i.line) for i in ins] == [
        ("FROM", "a:1 AS build", 0, 2),
        ("RUN", "one two", 0, 3),
        ("FROM", "b:2", 1, 7),
        ("CMD", '["x", "y"]', 1, 8),
    ]
    with pytest.raises(AssertionError, match="continuation"):
        parse_dockerfile("FROM a:1\nRUN x \\\n")


def test_base_is_a_slim_python_pinned_by_version_and_digest(
    dockerfile: tuple[dict[str, str], list[Instruction]],
) -> None:
    directives, ins = dockerfile
    # RUN --mount needs the BuildKit frontend named by this directive.
    assert directives.get("syntax") == "docker/dockerfile:1"
    froms = [i.args.split() for i in ins if i.keyword == "FROM"]
    assert len(froms) == 2, "multi-stage: a build stage and the final stage"
    assert froms[0][1:] == ["AS", "build"] and len(froms[1]) == 1
    images = {f[0] for f in froms}
    assert len(images) == 1, "both stages use the same base, so the wheels match its Python"
    (image,) = images
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(\w+)@sha256:([0-9a-f]{64})", image)
    assert m, f"base not pinned by full version and digest: {image}"
    assert (int(m.group(1)), int(m.group(2))) >= (3, 11)  # requires-python


def test_runs_as_istio_proxy_uid_with_the_exact_entrypoint_and_cmd(
    dockerfile: tuple[dict[str, str], list[Instruction]],
) -> None:
    _, ins = dockerfile
    users = _final(ins, "USER")
    assert users and users[-1].args.split(":")[0] == "1337"
    run_user = [i for i in _final(ins, "RUN") if "useradd" in i.args]
    assert run_user and "--uid 1337" in run_user[0].args
    assert exec_form(_only(ins, "ENTRYPOINT").args) == ["meshproxy"]
    assert exec_form(_only(ins, "CMD").args) == ["run", "-c", "/etc/meshproxy"]
    # The last USER comes before ENTRYPOINT: nothing after it runs as root.
    assert users[-1].line < _only(ins, "ENTRYPOINT").line


def test_no_writes_at_run_time_and_no_pip_cache(
    dockerfile: tuple[dict[str, str], list[Instruction]],
) -> None:
    _, ins = dockerfile
    env = " ".join(i.args for i in _final(ins, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PIP_NO_CACHE_DIR=1" in env
    assert "TMPDIR=/tmp" in env


def test_final_stage_installs_from_the_wheels_only_and_no_compiler(
    dockerfile: tuple[dict[str, str], list[Instruction]],
) -> None:
    _, ins = dockerfile
    build_runs = [i.args for i in ins if i.stage == 0 and i.keyword == "RUN"]
    assert any("pip wheel --wheel-dir /wheels ." in r for r in build_runs)
    final_runs = [i.args for i in _final(ins, "RUN")]
    installs = [r for r in final_runs if "pip install" in r]
    assert len(installs) == 1
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in installs[0]
    assert "pip install --no-index --find-links /wheels meshproxy" in installs[0]
    for run in final_runs:
        words = set(shlex.split(run.replace("&&", " ")))
        assert not words & COMPILERS, f"compiler in the final stage: {run}"
        assert "apk" not in words
        if "apt-get" in words:
            # Only the capture init container's runtime tool, without recommends or apt lists.
            packages = {w for w in words if not w.startswith("-")} - APT_WORDS
            assert packages == RUNTIME_PACKAGES, run
            assert "--no-install-recommends" in words
            assert "rm -rf /var/lib/apt/lists/*" in run
    # The wheels never land in a layer of the final stage.
    assert not [c for c in _final(ins, "COPY") if "--from=build" in c.args]


def _copy_sources(ins: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for i in ins:
        if i.keyword not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(i.args) if not p.startswith("--")]
        assert "--from" not in i.args, "a COPY --from would be checked against the wrong tree"
        sources.extend(parts[:-1])
    return sources


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used: the last matching pattern wins; a pattern
    matches the path or any parent directory of it."""
    ignored = False
    parents = [str(Path(*Path(path).parts[: n + 1])) for n in range(len(Path(path).parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!")
        if any(fnmatch(p, pat) for p in parents):
            ignored = not negate
    return ignored


def test_every_copy_source_exists_and_is_in_the_build_context(
    dockerfile: tuple[dict[str, str], list[Instruction]],
) -> None:
    _, ins = dockerfile
    sources = _copy_sources(ins)
    assert sources, "the Dockerfile copies nothing?"
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    for src in sources:
        assert (REPO / src).exists(), f"COPY source missing from the repo: {src}"
        assert not _ignored(src, patterns), f"COPY source excluded by .dockerignore: {src}"
    # The wheel is built from pyproject.toml; its `readme` must be in the context too.
    assert {"pyproject.toml", "README.md"} <= set(sources)
    assert _ignored(".git", patterns) and _ignored("tests/helpers.py", patterns)


def test_dockerignore_matcher() -> None:
    pats = ["*", "!meshproxy", "**/__pycache__"]
    assert _ignored("tests", pats)
    assert not _ignored("meshproxy/app.py", pats)
    assert _ignored("meshproxy/__pycache__", pats)


def test_expose_names_the_bootstraps_non_loopback_ports(
    dockerfile: tuple[dict[str, str], list[Instruction]],
) -> None:
    _, ins = dockerfile
    copies = [shlex.split(c.args) for c in _final(ins, "COPY")]
    assert ["examples/container/meshproxy.yaml", "/etc/meshproxy/meshproxy.yaml"] in copies
    spec = load_paths([DEFAULT_CONFIG]).bootstrap.spec
    assert spec.outbound is not None and spec.inbound is not None
    assert spec.health is not None and spec.telemetry.prometheus is not None
    bound = [
        spec.admin,
        spec.outbound.address,
        spec.inbound.address,
        spec.health,
        spec.telemetry.prometheus,
    ]
    public = {a.port for a in bound if not LOOPBACK.match(a.host)}
    exposed = {int(p) for i in _final(ins, "EXPOSE") for p in i.args.split()}
    assert exposed == public
    assert spec.admin.port not in exposed, "the admin (with /quitquitquit) is never exposed"


def _healthcheck_command(ins: list[Instruction]) -> list[str]:
    args = _only(ins, "HEALTHCHECK").args
    _, sep, cmd = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    return exec_form(cmd)


async def test_healthcheck_hits_the_admin_ready_and_follows_it(
    dockerfile: tuple[dict[str, str], list[Instruction]],
) -> None:
    _, ins = dockerfile
    cmd = _healthcheck_command(ins)
    assert cmd[:2] == ["python", "-c"], "no curl in a slim image: python's urllib"
    admin = load_paths([DEFAULT_CONFIG]).bootstrap.spec.admin
    url = f"http://{admin}/ready"
    assert url in cmd[2]
    # Run the exact script against a live proxy (its admin on an ephemeral port instead).
    config = join(bootstrap(), service_entry("reviews", [9]))
    async with proxy(config) as px, httpx.AsyncClient() as client:
        script = cmd[2].replace(url, f"http://127.0.0.1:{px.admin_port}/ready")

        def check() -> int:
            return subprocess.run(
                [sys.executable, "-c", script], capture_output=True, timeout=10
            ).returncode

        assert await asyncio.to_thread(check) == 0
        await client.post(f"http://127.0.0.1:{px.admin_port}/healthcheck/fail")
        assert await asyncio.to_thread(check) != 0


def test_shipped_bootstrap_validates_with_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", "-c", str(DEFAULT_CONFIG.parent)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 file(s)")


# ---------------------------------------------------------------------------------------------
# The same install steps, in a fresh venv (needs the package index; ~15 s)


def _pip(python: Path | str, *args: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        [str(python), "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


@pytest.mark.container
async def test_install_steps_in_a_fresh_venv(
    tmp_path: Path, dockerfile: tuple[dict[str, str], list[Instruction]]
) -> None:
    _, ins = dockerfile
    # The build stage's context: exactly the files it COPYs (proves the COPY set suffices).
    src = tmp_path / "src"
    src.mkdir()
    for name in _copy_sources([i for i in ins if i.stage == 0]):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    wheels = tmp_path / "wheels"
    # Build stage: RUN pip wheel --wheel-dir /wheels .
    _pip(sys.executable, "wheel", "--wheel-dir", str(wheels), ".", cwd=src)
    built = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(n.startswith("meshproxy-") for n in built), built
    # Final stage: pip install --no-index --find-links /wheels meshproxy, in a fresh venv.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    _pip(py, "install", "--no-index", "--find-links", str(wheels), "meshproxy", cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cli = venv / "bin" / "meshproxy"
    # Imported from the venv, not from this checkout.
    where = subprocess.run(
        [str(py), "-c", "import meshproxy; print(meshproxy.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    # The example config embedded in the wheel (package data) and the image's bootstrap.
    bookinfo = Path(where).parent / "examples" / "bookinfo"
    for config in (
        [str(bookinfo / "mesh"), str(bookinfo / "sidecars" / "reviews-v1.yaml")],
        [str(DEFAULT_CONFIG.parent)],
    ):
        args = [x for c in config for x in ("-c", c)]
        result = subprocess.run(
            [str(cli), "validate", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: ")

    # And it runs: listeners, the health port, readiness, then /quitquitquit.
    conf = tmp_path / "run.yaml"
    conf.write_text(join(bootstrap(extra="health: 127.0.0.1:0\n"), service_entry("reviews", [9])))
    proc = subprocess.Popen(
        [str(cli), "--log-level", "warning", "run", "-c", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).decode()
        assert line.startswith("meshproxy ready:"), line
        ports = dict(p.split("=", 1) for p in line.split(":", 1)[1].split())
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://{ports['health']}/healthz/ready")
            assert (r.status_code, r.text) == (200, "LIVE\n")
            await client.post(f"http://{ports['admin']}/quitquitquit")
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
