"""meshproxy benchmark harness: direct vs meshproxy vs Envoy, measured with wrk.

One command, one run, same machine, same upstream:

    python benchmarks/run.py [--duration 10] [--repeats 3] [--connections 1,32]
                             [--out benchmarks/RESULTS.md] [--quick] [--only direct,envoy]

It starts a 1 KiB keep-alive upstream (nginx, or benchmarks/upstream.py when nginx is
missing), meshproxy (`python -m meshproxy run -c CONFIG`) and Envoy (`--concurrency 1`,
an equivalent static config), then runs `wrk -t1 -cN -dDs --latency` against each target,
interleaved (direct, meshproxy, envoy, direct, ...) `repeats` times per connection count,
and reports the medians of req/s, p50 and p99, the RSS of each process tree and the
CPU time each target process tree spent per request. Results go to a Markdown file; any
hand-written text below the `<!-- notes -->` marker line in that file is preserved.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
NOTES_MARKER = "<!-- notes -->"
BODY_SIZE = 1024
HOST_HEADER = "upstream.bench"
TARGETS = ("direct", "meshproxy", "envoy")
LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 5.0
TOOL_TIMEOUT_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
UNIT_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """A target failed to start, answer correctly, or stay alive; the run is aborted."""


# --------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Child:
    """A child process started by this harness, in its own session, logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL; then kill any stragglers left in this child's group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
        # start_new_session made the child a group leader; orphaned workers keep its pgid.
        for pid in pids_in_group(self.proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def tail_file(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    body = "\n".join(text.splitlines()[-lines:]) or "(empty)"
    return f"--- last {lines} lines of {path} ---\n{body}\n--- end of {path.name} ---"


def launch(
    name: str,
    cmd: Sequence[str],
    workdir: Path,
    stack: contextlib.ExitStack,
    env: dict[str, str] | None = None,
) -> Child:
    """Start `cmd` with output to workdir/<name>.log; its stop() is registered on `stack`."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
    child = Child(name, proc, log_path)
    stack.callback(child.stop)
    return child


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the `(comm)` field: [state, ppid, pgrp, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def pids_in_group(pgid: int) -> list[int]:
    found = []
    for pid in _all_pids():
        fields = _proc_stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(pid)
    return found


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _proc_stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    tree = [root]
    for pid in tree:  # grows while iterating; bounded by the number of processes
        tree.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of the process tree, in seconds."""
    ticks = 0
    for pid in process_tree(root):
        fields = _proc_stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


@dataclasses.dataclass(frozen=True)
class Memory:
    rss_mib: float
    hwm_mib: float
    processes: int


def tree_memory(root: int) -> Memory:
    """Sum of VmRSS and of VmHWM (peak RSS) over the process tree."""
    rss_kib = hwm_kib = count = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        count += 1
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss_kib += int(value.split()[0])
            elif key == "VmHWM":
                hwm_kib += int(value.split()[0])
    return Memory(rss_kib / 1024, hwm_kib / 1024, count)


# --------------------------------------------------------------------------- networking


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (bound together, then released for the children)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def http_get(port: int, path: str = "/", host: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2.0)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def admin_ready(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        status, body = http_get(port, "/ready")
        return status == 200 and body.strip() == b"LIVE"

    return probe


def serves_body(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        status, body = http_get(port, "/", HOST_HEADER)
        return status == 200 and len(body) == BODY_SIZE

    return probe


def wait_ready(child: Child, probe: Callable[[], bool], timeout_s: float) -> None:
    """Poll `probe` until it passes; fail if the child exits or `timeout_s` elapses."""
    deadline = time.monotonic() + timeout_s
    last_error = "probe never passed"
    for _ in range(int(timeout_s / POLL_INTERVAL_S) + 1):
        child.check_alive()
        try:
            if probe():
                return
            last_error = "probe returned an unexpected response"
        except (OSError, http.client.HTTPException) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    raise BenchError(
        f"{child.name} not ready after {timeout_s:.0f}s ({last_error})\n{child.tail()}"
    )


def verify_target(target: Target) -> None:
    """One GET through the target must return 200 with the 1 KiB body."""
    try:
        status, body = http_get(target.port, "/", HOST_HEADER)
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET via {target.name} failed: {exc}\n{target.child.tail()}") from exc
    if status != 200 or len(body) != BODY_SIZE:
        raise BenchError(
            f"GET via {target.name} returned {status} with {len(body)} bytes "
            f"(want 200, {BODY_SIZE}): {body[:200]!r}\n{target.child.tail()}"
        )


# --------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """Something wrk can load: the port to hit and the process tree that serves it."""

    name: str
    label: str
    port: int
    child: Child


def render(template: str, dest: Path, **values: object) -> Path:
    text = string.Template((BENCH_DIR / template).read_text()).substitute(values)
    dest.write_text(text)
    return dest


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def start_nginx(nginx: str, workdir: Path, stack: contextlib.ExitStack, timeout: float) -> Target:
    prefix = workdir / "nginx"
    prefix.mkdir()
    (port,) = free_ports(1)
    conf = render(
        "nginx.conf.tmpl",
        prefix / "nginx.conf",
        user_directive="user root;" if os.geteuid() == 0 else "",
        prefix=prefix,
        port=port,
        body="x" * BODY_SIZE,
    )
    error_log = prefix / "error.log"
    cmd = [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(error_log)]
    child = launch("nginx", cmd, workdir, stack)
    try:
        wait_ready(child, serves_body(port), timeout)
    except BenchError as exc:
        raise BenchError(f"{exc}\n{tail_file(error_log)}") from exc
    return Target("direct", "direct (nginx)", port, child)


def start_python_upstream(
    python: str, workdir: Path, stack: contextlib.ExitStack, timeout: float
) -> Target:
    (port,) = free_ports(1)
    cmd = [python, str(BENCH_DIR / "upstream.py"), "--port", str(port)]
    child = launch("upstream", cmd, workdir, stack)
    wait_ready(child, serves_body(port), timeout)
    return Target("direct", "direct (python upstream)", port, child)


def start_upstream(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> tuple[Target, str]:
    """Start the upstream; returns the target and a description of what was chosen."""
    nginx = find_nginx()
    if args.upstream in ("auto", "nginx") and nginx:
        try:
            return start_nginx(nginx, workdir, stack, args.startup_timeout), (
                f"nginx ({nginx}, 1 worker, `return 200` with a {BODY_SIZE}-byte body)"
            )
        except BenchError as exc:
            if args.upstream == "nginx":
                raise
            print(f"nginx failed to start, falling back to the Python upstream:\n{exc}")
            reason = "nginx failed to start"
    elif args.upstream == "nginx":
        raise BenchError("--upstream nginx given but nginx is not installed")
    else:
        reason = "nginx not installed" if args.upstream == "auto" else "--upstream python"
    target = start_python_upstream(args.python, workdir, stack, args.startup_timeout)
    return target, (f"benchmarks/upstream.py (uvloop, raw bytes, {BODY_SIZE}-byte body; {reason})")


def start_meshproxy(
    args: argparse.Namespace, upstream_port: int, workdir: Path, stack: contextlib.ExitStack
) -> Target:
    listener_port, admin_port = free_ports(2)
    config = render(
        "meshproxy.yaml.tmpl",
        workdir / "meshproxy.yaml",
        admin_port=admin_port,
        listener_port=listener_port,
        upstream_port=upstream_port,
        host=HOST_HEADER,
    )
    cmd = [args.python, "-m", "meshproxy", "run", "-c", str(config), *args.meshproxy_arg]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = launch("meshproxy", cmd, workdir, stack, env=env)
    wait_ready(child, admin_ready(admin_port), args.startup_timeout)
    return Target("meshproxy", "meshproxy", listener_port, child)


def start_envoy(
    args: argparse.Namespace, upstream_port: int, workdir: Path, stack: contextlib.ExitStack
) -> Target:
    listener_port, admin_port = free_ports(2)
    config = render(
        "envoy.yaml.tmpl",
        workdir / "envoy.yaml",
        admin_port=admin_port,
        listener_port=listener_port,
        upstream_port=upstream_port,
    )
    cmd = [
        args.envoy,
        "-c",
        str(config),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--base-id",
        str(random.randint(1, 1_000_000)),
        "-l",
        "error",
    ]
    child = launch("envoy", cmd, workdir, stack)
    wait_ready(child, admin_ready(admin_port), args.startup_timeout)
    return Target("envoy", "Envoy (--concurrency 1)", listener_port, child)


# --------------------------------------------------------------------------- wrk


@dataclasses.dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_req: float


def _latency_ms(output: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    if match is None:
        raise BenchError(f"no {percentile}% latency line in wrk output:\n{output}")
    return float(match.group(1)) * UNIT_TO_MS[match.group(2)]


def parse_wrk(output: str, cpu_seconds: float = 0.0) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in ", output, re.M)
    if rps is None or total is None:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(g) for g in sock.groups())
    requests = int(total.group(1))
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(output, "50"),
        p99_ms=_latency_ms(output, "99"),
        requests=requests,
        errors=errors,
        cpu_us_per_req=cpu_seconds * 1e6 / requests if requests else float("nan"),
    )


def run_wrk(wrk: str, target: Target, connections: int, seconds: int) -> WrkResult:
    cmd = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        f"Host: {HOST_HEADER}",
        f"http://{LOOPBACK}:{target.port}/",
    ]
    cpu_before = tree_cpu_seconds(target.child.pid)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    cpu_used = tree_cpu_seconds(target.child.pid) - cpu_before
    target.child.check_alive()
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return parse_wrk(proc.stdout, cpu_used)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Summary:
    """Medians over the repeats of one (connection count, target) cell."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    errors: int
    runs: list[WrkResult]

    @classmethod
    def of(cls, runs: list[WrkResult]) -> Summary:
        return cls(
            rps=statistics.median(r.rps for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            cpu_us_per_req=statistics.median(r.cpu_us_per_req for r in runs),
            errors=sum(r.errors for r in runs),
            runs=runs,
        )


@dataclasses.dataclass
class Block:
    """All targets at one connection count, plus memory measured right after its runs."""

    connections: int
    summaries: dict[str, Summary]
    memory: dict[str, Memory]


def run_matrix(args: argparse.Namespace, targets: list[Target]) -> list[Block]:
    blocks = []
    total = len(args.connections) * args.repeats * len(targets)
    done = 0
    for conns in args.connections:
        if args.warmup > 0:
            for target in targets:
                print(f"[c={conns}] warmup {target.name} {args.warmup}s", flush=True)
                run_wrk(args.wrk, target, conns, args.warmup)
        runs: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        for rep in range(args.repeats):
            for target in targets:
                result = run_wrk(args.wrk, target, conns, args.duration)
                runs[target.name].append(result)
                done += 1
                print(
                    f"[{done}/{total}] c={conns} rep {rep + 1}/{args.repeats} "
                    f"{target.name:<9} {result.rps:>10.0f} req/s  p50 {result.p50_ms:.3f} ms  "
                    f"p99 {result.p99_ms:.3f} ms  cpu {result.cpu_us_per_req:.1f} us/req  "
                    f"errors {result.errors}",
                    flush=True,
                )
        memory = {t.name: tree_memory(t.child.pid) for t in targets}
        blocks.append(Block(conns, {n: Summary.of(r) for n, r in runs.items()}, memory))
    return blocks


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def block_markdown(block: Block, labels: dict[str, str]) -> str:
    conns = block.connections
    title = f"{conns} connection" + ("" if conns == 1 else "s")
    lines = [
        f"## {title}",
        "",
        "| target | req/s | p50 ms | p99 ms | RSS MiB | peak RSS MiB | CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, summary in block.summaries.items():
        mem = block.memory[name]
        lines.append(
            f"| {labels[name]} | {fmt(summary.rps, 0)} | {fmt(summary.p50_ms)} "
            f"| {fmt(summary.p99_ms)} | {fmt(mem.rss_mib, 1)} | {fmt(mem.hwm_mib, 1)} "
            f"| {fmt(summary.cpu_us_per_req, 1)} | {summary.errors} |"
        )
    s = block.summaries
    direct, mesh, envoy = s.get("direct"), s.get("meshproxy"), s.get("envoy")

    def added(proxy: Summary | None, attr: str) -> float | None:
        if proxy is None or direct is None:
            return None
        value: float = getattr(proxy, attr) - getattr(direct, attr)
        return value

    rps_ratio = ratio(mesh.rps if mesh else None, envoy.rps if envoy else None)
    lines += ["", f"- meshproxy / Envoy req/s: **{fmt_ratio(rps_ratio)}**"]
    for attr, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        mesh_added, envoy_added = added(mesh, attr), added(envoy, attr)
        lines.append(
            f"- added {label} latency (proxy - direct): meshproxy {fmt(mesh_added)} ms, "
            f"Envoy {fmt(envoy_added)} ms, meshproxy / Envoy "
            f"**{fmt_ratio(ratio(mesh_added, envoy_added))}**"
        )
    cpu_ratio = ratio(
        mesh.cpu_us_per_req if mesh else None, envoy.cpu_us_per_req if envoy else None
    )
    lines.append(f"- CPU per request, meshproxy / Envoy: **{fmt_ratio(cpu_ratio)}**")
    lines += ["", "<details><summary>individual runs (req/s; p50/p99 ms)</summary>", ""]
    for name, summary in s.items():
        cells = ", ".join(f"{r.rps:,.0f} ({r.p50_ms:.3f}/{r.p99_ms:.3f})" for r in summary.runs)
        lines.append(f"- {labels[name]}: {cells}")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def _run_tool(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (proc.stdout + proc.stderr).strip()


def collect_versions(args: argparse.Namespace, nginx_used: bool) -> dict[str, str]:
    script = (
        "import json, platform, importlib.metadata as m\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return 'not installed'\n"
        "print(json.dumps({'python': platform.python_version(), "
        "'uvloop': v('uvloop'), 'h11': v('h11')}))"
    )
    versions: dict[str, str] = {}
    try:
        versions.update(json.loads(_run_tool([args.python, "-c", script]).splitlines()[-1]))
    except (ValueError, IndexError):
        versions["python"] = "unknown"
    envoy = _run_tool([args.envoy, "--version"])
    versions["envoy"] = envoy.split("version:", 1)[-1].strip() if "version:" in envoy else envoy
    wrk_line = (_run_tool([args.wrk, "-v"]).splitlines() or ["unknown"])[0]
    versions["wrk"] = wrk_line.split(" Copyright")[0].removeprefix("wrk ")
    nginx = find_nginx() or "nginx"
    nginx_version = _run_tool([nginx, "-v"]).removeprefix("nginx version: nginx/")
    versions["nginx"] = nginx_version + ("" if nginx_used else " (not used)")
    commit = _run_tool(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    versions["meshproxy"] = (
        f"git {commit}" if re.fullmatch(r"[0-9a-f]{4,40}", commit) else "no commit"
    )
    return versions


def machine_info() -> dict[str, str]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    loadavg = "unknown"
    with contextlib.suppress(OSError):
        loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "loadavg": loadavg,
    }


def report_markdown(
    args: argparse.Namespace,
    blocks: list[Block],
    labels: dict[str, str],
    context: dict[str, str],
) -> str:
    lines = [
        "# meshproxy benchmark results",
        "",
        "Generated by `benchmarks/run.py`; everything above the notes marker is rewritten on "
        "each run, everything below it is kept.",
        "",
        f"- Date: {context['date']}",
        f"- Machine: {context['nproc']} CPUs ({context['cpu']}), {context['kernel']}, "
        f"load average at start {context['loadavg']}",
        f"- Python {context['python']} (`{args.python}`), uvloop {context['uvloop']}, "
        f"h11 {context['h11']}; meshproxy {context['meshproxy']}",
        f"- Envoy {context['envoy']}",
        f"- wrk {context['wrk']}; nginx {context['nginx']}",
        f"- Upstream: {context['upstream']}",
        f"- Command: `{context['command']}`",
        f"- Method: `wrk -t1 -c<N> -d{args.duration}s --latency -H 'Host: {HOST_HEADER}'` per "
        f"target; {args.warmup}s warmup per target and connection count; {args.repeats} "
        "repeat(s) interleaved across targets; table values are medians. RSS/peak RSS are "
        "VmRSS/VmHWM summed over the target's process tree right after that block's runs; "
        "CPU µs/req is the target tree's utime+stime during a run divided by its requests; "
        "errors are non-2xx responses plus socket errors summed over the runs.",
        "",
    ]
    for block in blocks:
        lines.append(block_markdown(block, labels))
    return "\n".join(lines)


def write_results(path: Path, body: str) -> None:
    """Rewrite `path` with `body`, keeping the marker line and everything after it."""
    notes = "\n"
    if path.exists():
        text = path.read_text()
        index = text.find(NOTES_MARKER)
        if index >= 0:
            notes = text[index + len(NOTES_MARKER) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body.rstrip("\n") + "\n\n" + NOTES_MARKER + notes)
    tmp.replace(path)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    venv_envoy = REPO_ROOT / ".venv" / "bin" / "envoy"
    parser = argparse.ArgumentParser(
        description="Benchmark direct vs meshproxy vs Envoy with wrk (see benchmarks/README.md)."
    )
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 10; quick 2)")
    parser.add_argument(
        "--repeats", type=int, help="interleaved runs per cell (default 3; quick 1)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="warmup seconds (default 1, 0=off)")
    parser.add_argument("--connections", default="1,32", help="comma list (default 1,32)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 repeat")
    parser.add_argument(
        "--only", default=",".join(TARGETS), help="comma list of direct,meshproxy,envoy"
    )
    parser.add_argument(
        "--meshproxy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `meshproxy run` (repeatable; write --meshproxy-arg=--flag)",
    )
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument(
        "--python",
        default=str(venv_python) if venv_python.exists() else sys.executable,
        help="interpreter for meshproxy and the Python upstream (default: .venv/bin/python)",
    )
    parser.add_argument(
        "--envoy", default=str(venv_envoy) if venv_envoy.exists() else shutil.which("envoy")
    )
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--startup-timeout", type=float, default=30.0, help="seconds per target")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections must be a comma list of integers, got {args.connections!r}")
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(only) - set(TARGETS))
    if unknown or not only:
        parser.error(f"--only takes a comma list of {','.join(TARGETS)}; got {args.only!r}")
    args.targets = [t for t in TARGETS if t in only]
    if args.duration < 1 or args.repeats < 1 or args.warmup < 0 or not args.connections:
        parser.error("--duration and --repeats must be >= 1, --warmup >= 0, connections given")
    if min(args.connections) < 1:
        parser.error("connection counts must be >= 1")
    if "envoy" in args.targets and not args.envoy:
        parser.error("envoy not found; pass --envoy PATH or --only without envoy")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so the finally blocks stop every child process."""
    print("terminated; stopping child processes", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/run.py", *argv])])
    context = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        **machine_info(),
    }
    per_cell = args.repeats * args.duration
    estimate = len(args.connections) * len(args.targets) * (per_cell + args.warmup)
    print(f"targets {','.join(args.targets)}; connections {args.connections}; ~{estimate}s of wrk")
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            upstream, context["upstream"] = start_upstream(args, workdir, stack)
            targets = [upstream] if "direct" in args.targets else []
            if "meshproxy" in args.targets:
                targets.append(start_meshproxy(args, upstream.port, workdir, stack))
            if "envoy" in args.targets:
                targets.append(start_envoy(args, upstream.port, workdir, stack))
            for target in targets:
                verify_target(target)
            print("all targets ready: " + ", ".join(f"{t.name}:{t.port}" for t in targets))
            blocks = run_matrix(args, targets)
            labels = {t.name: t.label for t in targets}
            context.update(collect_versions(args, "nginx" in context["upstream"]))
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        if args.keep_temp:
            print(f"configs and logs kept in {workdir}", file=sys.stderr)
        else:
            print("(rerun with --keep-temp to keep the configs and logs)", file=sys.stderr)
        return 1
    finally:
        if not args.keep_temp:
            shutil.rmtree(workdir, ignore_errors=True)
    report = report_markdown(args, blocks, labels, context)
    write_results(args.out, report)
    print()
    for block in blocks:
        print(block_markdown(block, labels).split("<details>")[0].rstrip())
        print()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
