"""meshproxy benchmark harness: direct vs meshproxy vs Envoy, measured with wrk.

One command, one run, same machine, same upstream:

    python benchmarks/run.py [--duration 10] [--repeats 3] [--connections 1,32]
                             [--out benchmarks/RESULTS.md] [--quick] [--only direct,envoy]

It starts a 1 KiB keep-alive upstream (nginx, or benchmarks/upstream.py when nginx is
missing), meshproxy (`python -m meshproxy run -c CONFIG`) and Envoy (`--concurrency 1`,
an equivalent static config), each at several telemetry levels (none; Istio's defaults;
metrics, 100% tracing and access logs), plus a local OTLP/HTTP sink (benchmarks/otlp_sink.py)
the tracers export to. It then runs `wrk -t1 -cN -dDs --latency` against each target,
interleaved (direct, meshproxy, meshproxy-default, ..., envoy-full, direct, ...) `repeats`
times per connection count, and reports the medians of req/s, p50 and p99, the RSS of each
process tree, the CPU time each target process tree spent per request and what each target's
telemetry delivered (span batches at the sink, access log lines). Results go to a Markdown
file; any hand-written text below the `<!-- notes -->` marker line in that file is preserved.
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
TARGETS = (
    "direct",
    "meshproxy",
    "meshproxy-default",
    "meshproxy-full",
    "meshproxy-httptools",
    "meshproxy-httptools-default",
    "envoy",
    "envoy-full",
)
# The HTTP/1.1 codec each meshproxy target runs (spec.http1Codec, issue #7); h11 when not listed.
CODECS = {"meshproxy-httptools": "httptools", "meshproxy-httptools-default": "httptools"}
# Issue #7 section 4, with routing, default retries, metrics and 1% tracing on, at 32 connections:
# (target, its req/s as a multiple of Envoy's it must reach).
ISSUE7_TARGETS = (("meshproxy-httptools-default", 1.0), ("meshproxy-default", 0.25))
LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 5.0
TOOL_TIMEOUT_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
UNIT_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
# Istio's default random sampling percentage (a sidecar with no Telemetry resource).
ISTIO_DEFAULT_SAMPLING = 1.0
# Issue #6 section 5: with telemetry at Istio's defaults, req/s within 10% of no telemetry.
DEFAULT_TELEMETRY_TARGET = 0.90
# Envoy's OpenTelemetry tracer batching (runtime keys tracing.opentelemetry.min_flush_spans and
# tracing.opentelemetry.flush_interval_ms): "meshproxy" matches meshproxy's BatchSpanProcessor
# (512 spans or 1 s, meshproxy/telemetry/tracing.py); "envoy" keeps Envoy's defaults.
ENVOY_OTEL_BATCHING = {"meshproxy": (512, 1000), "envoy": (5, 5000)}
# After a block, wait this long so batched spans (flushed at least every second) reach the sink.
SINK_SETTLE_S = 2.0
# Bound on waiting for a verification span or access log line to show up.
TELEMETRY_VERIFY_TIMEOUT_S = 10.0


class BenchError(Exception):
    """A target failed to start, answer correctly, or stay alive; the run is aborted."""


@dataclasses.dataclass(frozen=True)
class TelemetryPlan:
    """What a proxy target records and exports besides forwarding."""

    metrics: bool  # Istio's standard metrics (meshproxy); Envoy's own stats are always on
    sampling: float | None  # random tracing percentage; None: no tracer at all
    access_log: bool
    summary: str


TELEMETRY: dict[str, TelemetryPlan] = {
    "meshproxy": TelemetryPlan(
        False,
        None,
        False,
        "no telemetry: Istio metrics off (a Telemetry resource with a `disabled: true` override), "
        "tracing exporter `none`, no access log",
    ),
    "meshproxy-default": TelemetryPlan(
        True,
        ISTIO_DEFAULT_SAMPLING,
        False,
        "Istio's defaults: metrics on, OTLP/HTTP tracing to the sink at the default 1% "
        "(no Telemetry resource), no access log",
    ),
    "meshproxy-full": TelemetryPlan(
        True,
        100.0,
        True,
        "metrics on, OTLP/HTTP tracing to the sink at 100% (Telemetry "
        "`randomSamplingPercentage: 100`), text access log to a file in the temp dir",
    ),
    "meshproxy-httptools": TelemetryPlan(
        False, None, False, "as `meshproxy`, with `spec.http1Codec: httptools` (llhttp)"
    ),
    "meshproxy-httptools-default": TelemetryPlan(
        True,
        ISTIO_DEFAULT_SAMPLING,
        False,
        "as `meshproxy-default` (metrics, 1% tracing), with `spec.http1Codec: httptools`",
    ),
    "envoy": TelemetryPlan(True, None, False, "no tracing, no access log (as before)"),
    "envoy-full": TelemetryPlan(
        True,
        100.0,
        True,
        "file access log with Envoy's default format in the temp dir; HCM tracing with "
        "`envoy.tracers.opentelemetry` exporting OTLP/HTTP (`http_service`) to the sink through "
        "a static cluster, `random_sampling` 100%",
    ),
}


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


def http_get(
    port: int, path: str = "/", host: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2.0)
    try:
        conn.request("GET", path, headers={**({"Host": host} if host else {}), **(headers or {})})
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
    telemetry: TelemetryPlan | None = None
    access_log: Path | None = None  # the file its access log goes to
    trace_path: str | None = None  # the sink path its spans are POSTed to


# --------------------------------------------------------------------------- OTLP sink


@dataclasses.dataclass(frozen=True)
class Sink:
    """The local OTLP/HTTP receiver (benchmarks/otlp_sink.py) the tracing targets export to."""

    port: int
    child: Child

    def url(self, target: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{self.path(target)}"

    @staticmethod
    def path(target: str) -> str:
        return f"/{target}/v1/traces"

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per path: posts (span batches), bytes, spans, bad_batches."""
        self.child.check_alive()
        try:
            status, body = http_get(self.port, "/stats")
            stats: dict[str, dict[str, int]] = json.loads(body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise BenchError(f"OTLP sink /stats failed: {exc}\n{self.child.tail()}") from exc
        if status != 200:
            raise BenchError(f"OTLP sink /stats answered {status}\n{self.child.tail()}")
        return stats


def start_sink(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> Sink:
    (port,) = free_ports(1)
    cmd = [args.python, str(BENCH_DIR / "otlp_sink.py"), "--port", str(port)]
    child = launch("otlp-sink", cmd, workdir, stack)

    def probe() -> bool:
        status, _ = http_get(port, "/stats")
        return status == 200

    wait_ready(child, probe, args.startup_timeout)
    return Sink(port, child)


def count_lines(path: Path, offset: int) -> tuple[int, int]:
    """Newlines in `path` after byte `offset`, and the file's size (the next offset)."""
    lines = 0
    try:
        with path.open("rb") as f:
            f.seek(offset)
            while chunk := f.read(1 << 20):
                lines += chunk.count(b"\n")
                offset += len(chunk)
    except FileNotFoundError:
        pass
    return lines, offset


def verify_telemetry(target: Target, sink: Sink | None) -> None:
    """A forced-trace GET must put a span batch at the sink and, where access logs are on, a
    line in the target's access log, both within TELEMETRY_VERIFY_TIMEOUT_S."""
    plan = target.telemetry
    if plan is None or (plan.sampling is None and not plan.access_log):
        return
    before = sink.stats().get(target.trace_path or "", {}).get("posts", 0) if sink else 0
    # x-client-trace-id forces sampling (Envoy and meshproxy), so a 1% tracer reports it too.
    headers = {"x-client-trace-id": f"bench-verify-{target.name}"}
    try:
        status, body = http_get(target.port, "/", HOST_HEADER, headers)
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET via {target.name} failed: {exc}\n{target.child.tail()}") from exc
    if status != 200 or len(body) != BODY_SIZE:
        raise BenchError(f"forced-trace GET via {target.name} returned {status}")
    deadline = time.monotonic() + TELEMETRY_VERIFY_TIMEOUT_S
    want_span = plan.sampling is not None and sink is not None
    want_line = plan.access_log and target.access_log is not None
    while want_span or want_line:
        target.child.check_alive()
        if want_span and sink is not None:
            posts = sink.stats().get(target.trace_path or "", {}).get("posts", 0)
            want_span = posts <= before
        if want_line and target.access_log is not None:
            want_line = count_lines(target.access_log, 0)[0] == 0
        if not (want_span or want_line):
            break
        if time.monotonic() >= deadline:
            missing = " and ".join(
                what
                for what, still in (
                    ("a span batch at the sink", want_span),
                    ("a log line", want_line),
                )
                if still
            )
            raise BenchError(
                f"{target.name}: no {missing} {TELEMETRY_VERIFY_TIMEOUT_S:.0f}s after a "
                f"forced-trace request\n{target.child.tail()}"
            )
        time.sleep(POLL_INTERVAL_S * 4)


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


MESHPROXY_LABELS = {
    "meshproxy": "meshproxy (no telemetry)",
    "meshproxy-default": "meshproxy-default (metrics, 1% tracing)",
    "meshproxy-full": "meshproxy-full (metrics, 100% tracing, access log)",
    "meshproxy-httptools": "meshproxy-httptools (no telemetry)",
    "meshproxy-httptools-default": "meshproxy-httptools-default (metrics, 1% tracing)",
}
ENVOY_LABELS = {
    "envoy": "Envoy (--concurrency 1)",
    "envoy-full": "Envoy-full (100% OTel tracing, access log)",
}


def meshproxy_telemetry(
    name: str, plan: TelemetryPlan, sink: Sink | None, workdir: Path
) -> tuple[dict[str, object], dict[str, object] | None, Path | None]:
    """The bootstrap's `spec.telemetry`, the Telemetry resource (or None), the access log."""
    bootstrap: dict[str, object] = {}
    spec: dict[str, object] = {}
    if plan.sampling is None or sink is None:
        bootstrap["tracing"] = {"exporter": "none"}
    else:
        bootstrap["tracing"] = {"exporter": "otlp", "endpoint": sink.url(name)}
        if plan.sampling != ISTIO_DEFAULT_SAMPLING:  # the default needs no Telemetry resource
            spec["tracing"] = [
                {"providers": [{"name": "otel"}], "randomSamplingPercentage": plan.sampling}
            ]
    access_log = workdir / f"{name}-access.log" if plan.access_log else None
    if access_log is not None:
        bootstrap["accessLog"] = {"path": str(access_log), "format": "text"}
    if not plan.metrics:
        spec["metrics"] = [
            {"providers": [{"name": "prometheus"}], "overrides": [{"disabled": True}]}
        ]
    resource: dict[str, object] | None = None
    if spec:
        resource = {
            "apiVersion": "telemetry.istio.io/v1",
            "kind": "Telemetry",
            "metadata": {"name": "bench", "namespace": "default"},
            "spec": spec,
        }
    return bootstrap, resource, access_log


def start_meshproxy(
    args: argparse.Namespace,
    name: str,
    upstream_port: int,
    sink: Sink | None,
    workdir: Path,
    stack: contextlib.ExitStack,
) -> Target:
    plan = args.plans[name]
    listener_port, admin_port = free_ports(2)
    bootstrap, resource, access_log = meshproxy_telemetry(name, plan, sink, workdir)
    config = render(
        "meshproxy.yaml.tmpl",
        workdir / f"{name}.yaml",
        admin_port=admin_port,
        listener_port=listener_port,
        upstream_port=upstream_port,
        host=HOST_HEADER,
        telemetry=json.dumps(bootstrap),
        codec=CODECS.get(name, "h11"),
        telemetry_resource=f"---\n{json.dumps(resource)}" if resource else "",
    )
    cmd = [args.python, "-m", "meshproxy", "run", "-c", str(config), *args.meshproxy_arg]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = launch(name, cmd, workdir, stack, env=env)
    wait_ready(child, admin_ready(admin_port), args.startup_timeout)
    trace_path = sink.path(name) if sink and plan.sampling is not None else None
    label = MESHPROXY_LABELS[name]
    if plan is not TELEMETRY[name]:  # --meshproxy-default-sampling
        label = f"{name} (metrics, {plan.sampling:g}% sampling setting)"
    return Target(name, label, listener_port, child, plan, access_log, trace_path)


def envoy_telemetry(
    name: str, plan: TelemetryPlan, sink: Sink | None, workdir: Path, batching: str
) -> tuple[dict[str, str], Path | None]:
    """Values for envoy.yaml.tmpl's telemetry placeholders, and the access log path."""
    values = {"access_log": "[]", "hcm_tracing": "", "sink_cluster": "", "layered_runtime": ""}
    access_log = workdir / f"{name}-access.log" if plan.access_log else None
    if access_log is not None:
        file_log = {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),  # no log_format: Envoy's default text format
            },
        }
        values["access_log"] = json.dumps([file_log])
    if plan.sampling is not None and sink is not None:
        otel = {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "service_name": name,
            "http_service": {
                "http_uri": {"uri": sink.url(name), "cluster": "otlp_sink", "timeout": "1s"}
            },
        }
        tracing = {
            "random_sampling": {"value": plan.sampling},
            "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": otel},
        }
        values["hcm_tracing"] = f"tracing: {json.dumps(tracing)}"
        endpoint = {"address": {"socket_address": {"address": LOOPBACK, "port_value": sink.port}}}
        cluster = {
            "name": "otlp_sink",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "otlp_sink",
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
        }
        values["sink_cluster"] = f"- {json.dumps(cluster)}"
        min_flush_spans, flush_interval_ms = ENVOY_OTEL_BATCHING[batching]
        layer = {
            "tracing.opentelemetry.min_flush_spans": min_flush_spans,
            "tracing.opentelemetry.flush_interval_ms": flush_interval_ms,
        }
        runtime = {"layers": [{"name": "otel_batching", "static_layer": layer}]}
        values["layered_runtime"] = f"layered_runtime: {json.dumps(runtime)}"
    return values, access_log


def start_envoy(
    args: argparse.Namespace,
    name: str,
    upstream_port: int,
    sink: Sink | None,
    workdir: Path,
    stack: contextlib.ExitStack,
) -> Target:
    plan = args.plans[name]
    listener_port, admin_port = free_ports(2)
    values, access_log = envoy_telemetry(name, plan, sink, workdir, args.envoy_otel_batching)
    config = render(
        "envoy.yaml.tmpl",
        workdir / f"{name}.yaml",
        admin_port=admin_port,
        listener_port=listener_port,
        upstream_port=upstream_port,
        **values,
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
    child = launch(name, cmd, workdir, stack)
    wait_ready(child, admin_ready(admin_port), args.startup_timeout)
    trace_path = sink.path(name) if sink and plan.sampling is not None else None
    return Target(name, ENVOY_LABELS[name], listener_port, child, plan, access_log, trace_path)


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


@dataclasses.dataclass(frozen=True)
class Delivered:
    """What one target's telemetry delivered during a block (warmup and measured runs)."""

    requests: int  # requests wrk completed against the target in the block
    sampling: float | None  # the configured sampling percentage (None: no tracer)
    access_log: bool
    posts: int  # span batches POSTed to the sink
    spans: int
    bytes: int
    bad_batches: int
    log_lines: int
    sink_cpu_s: float  # the sink's CPU time during this target's wrk runs


@dataclasses.dataclass
class Block:
    """All targets at one connection count, plus memory measured right after its runs."""

    connections: int
    summaries: dict[str, Summary]
    memory: dict[str, Memory]
    delivered: dict[str, Delivered] = dataclasses.field(default_factory=dict)


class TelemetryMeter:
    """Sink counters and access log lines per target, as differences between snapshots."""

    def __init__(self, targets: list[Target], sink: Sink | None) -> None:
        self.targets = [
            t
            for t in targets
            if t.telemetry is not None and (t.trace_path is not None or t.access_log is not None)
        ]
        self.sink = sink
        self.sink_before = sink.stats() if sink and self.targets else {}
        self.log_offsets = {
            t.name: count_lines(t.access_log, 0)[1] for t in self.targets if t.access_log
        }

    def block(self, requests: dict[str, int], sink_cpu: dict[str, float]) -> dict[str, Delivered]:
        if not self.targets:
            return {}
        if self.sink is not None:
            time.sleep(SINK_SETTLE_S)  # the last batches of the block are flushed within 1 s
        after = self.sink.stats() if self.sink is not None else {}
        delivered = {}
        for t in self.targets:
            now = after.get(t.trace_path or "", {})
            then = self.sink_before.get(t.trace_path or "", {})
            lines = 0
            if t.access_log is not None:
                lines, self.log_offsets[t.name] = count_lines(
                    t.access_log, self.log_offsets[t.name]
                )
            plan = t.telemetry
            assert plan is not None
            delivered[t.name] = Delivered(
                requests=requests[t.name],
                sampling=plan.sampling if t.trace_path else None,
                access_log=t.access_log is not None,
                **{
                    k: now.get(k, 0) - then.get(k, 0)
                    for k in ("posts", "spans", "bytes", "bad_batches")
                },
                log_lines=lines,
                sink_cpu_s=sink_cpu[t.name],
            )
        self.sink_before = after
        return delivered


def run_matrix(
    args: argparse.Namespace, targets: list[Target], sink: Sink | None = None
) -> list[Block]:
    blocks = []
    total = len(args.connections) * args.repeats * len(targets)
    done = 0
    width = max(len(t.name) for t in targets)
    meter = TelemetryMeter(targets, sink)
    requests: dict[str, int] = {}
    sink_cpu: dict[str, float] = {}

    def measure(target: Target, conns: int, seconds: int) -> WrkResult:
        before = tree_cpu_seconds(sink.child.pid) if sink else 0.0
        result = run_wrk(args.wrk, target, conns, seconds)
        if sink is not None:
            sink_cpu[target.name] += tree_cpu_seconds(sink.child.pid) - before
        requests[target.name] += result.requests
        return result

    for conns in args.connections:
        requests = {t.name: 0 for t in targets}
        sink_cpu = {t.name: 0.0 for t in targets}
        if args.warmup > 0:
            for target in targets:
                print(f"[c={conns}] warmup {target.name} {args.warmup}s", flush=True)
                measure(target, conns, args.warmup)
        runs: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        for rep in range(args.repeats):
            for target in targets:
                result = measure(target, conns, args.duration)
                runs[target.name].append(result)
                done += 1
                print(
                    f"[{done}/{total}] c={conns} rep {rep + 1}/{args.repeats} "
                    f"{target.name:<{width}} {result.rps:>10.0f} req/s  "
                    f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  "
                    f"cpu {result.cpu_us_per_req:.1f} us/req  errors {result.errors}",
                    flush=True,
                )
        memory = {t.name: tree_memory(t.child.pid) for t in targets}
        summaries = {n: Summary.of(r) for n, r in runs.items()}
        blocks.append(Block(conns, summaries, memory, meter.block(requests, sink_cpu)))
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
    lines += codec_lines(block)
    lines += telemetry_lines(block, labels)
    lines += ["", "<details><summary>individual runs (req/s; p50/p99 ms)</summary>", ""]
    for name, summary in s.items():
        cells = ", ".join(f"{r.rps:,.0f} ({r.p50_ms:.3f}/{r.p99_ms:.3f})" for r in summary.runs)
        lines.append(f"- {labels[name]}: {cells}")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def codec_lines(block: Block) -> list[str]:
    """Issue #7: each codec (with Istio's default telemetry) against Envoy in the same run."""
    s = block.summaries
    envoy = s.get("envoy")
    if envoy is None or not any(name in s for name in CODECS):
        return []
    lines = [
        "",
        "HTTP/1.1 codecs (issue #7; each interleaved repeat as a multiple of the median Envoy):",
        "",
    ]
    for name in ("meshproxy", "meshproxy-default", *CODECS):
        summary = s.get(name)
        if summary is None:
            continue
        value = ratio(summary.rps, envoy.rps)
        spread = ", ".join(f"{r.rps / envoy.rps:.2f}" for r in summary.runs) if envoy.rps else ""
        goal = dict(ISSUE7_TARGETS).get(name) if block.connections == 32 else None
        verdict = ""
        if goal is not None:
            met = value is not None and value >= goal
            verdict = f" (target >= {goal:.2f}x: " + ("met" if met else "**missed**") + ")"
        p99 = ratio(summary.p99_ms, envoy.p99_ms)
        lines.append(
            f"- {name} ({CODECS.get(name, 'h11')}) / Envoy req/s: **{fmt_ratio(value)}**{verdict}; "
            f"per repeat: {spread}; p99 / Envoy's p99: {fmt_ratio(p99)}"
        )
    return lines


TELEMETRY_PAIRS = (  # (numerator, denominator) of the telemetry-cost ratio lines
    ("meshproxy-default", "meshproxy"),
    ("meshproxy-full", "meshproxy"),
    ("envoy-full", "envoy"),
    ("meshproxy-full", "envoy-full"),
)


def telemetry_lines(block: Block, labels: dict[str, str]) -> list[str]:
    """Issue #6 section 5: each telemetry level against no telemetry and against Envoy."""
    s = block.summaries
    if not any(name in s for name in ("meshproxy-default", "meshproxy-full", "envoy-full")):
        return []

    def get(name: str, attr: str) -> float | None:
        summary = s.get(name)
        return None if summary is None else float(getattr(summary, attr))

    lines = ["", "Telemetry cost (issue #6):", ""]
    for num, den in TELEMETRY_PAIRS:
        value = ratio(get(num, "rps"), get(den, "rps"))
        verdict = ""
        if (num, den) == ("meshproxy-default", "meshproxy"):
            met = value is not None and value >= DEFAULT_TELEMETRY_TARGET
            verdict = (
                f" (target >= {DEFAULT_TELEMETRY_TARGET:.2f}x: "
                + ("n/a" if value is None else "met" if met else "**missed**")
                + ")"
            )
        lines.append(f"- {num} / {den} req/s: **{fmt_ratio(value)}**{verdict}")
    cpu = ", ".join(
        f"{num} / {den} **{fmt_ratio(ratio(get(num, 'cpu_us_per_req'), get(den, 'cpu_us_per_req')))}**"
        for num, den in TELEMETRY_PAIRS
    )
    lines.append(f"- CPU per request: {cpu}")
    for attr, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        deltas = []
        for num, den in TELEMETRY_PAIRS[:3]:
            a, b = get(num, attr), get(den, attr)
            deltas.append(f"{num} {'n/a' if a is None or b is None else f'{a - b:+.3f}'} ms")
        lines.append(f"- {label} latency vs the same proxy without telemetry: " + ", ".join(deltas))
    if block.delivered:
        lines += [
            "",
            "| target | requests | span batches (POSTs) | spans | KiB | spans / request "
            "(configured) | bad batches | access log lines / request | sink CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, d in block.delivered.items():
            tracing = d.sampling is not None
            per_req = (
                f"{fmt(ratio(d.spans, d.requests), 4)} ({d.sampling / 100:.4f})"
                if d.sampling is not None
                else "n/a"
            )
            log = f"{d.log_lines:,} / {fmt(ratio(d.log_lines, d.requests), 3)}"
            lines.append(
                f"| {labels[name]} | {d.requests:,} | {d.posts:,} | {d.spans:,} "
                f"| {fmt(d.bytes / 1024, 1)} | {per_req} | {d.bad_batches if tracing else 'n/a'} "
                f"| {log if d.access_log else 'n/a'} "
                f"| {fmt(d.sink_cpu_s, 2) if tracing else 'n/a'} |"
            )
        lines += [
            "",
            "Span batches are the POSTs the OTLP sink received from that target; everything is "
            "counted over the whole block (warmup and measured runs). Requests are those wrk "
            "completed; requests still in flight when a wrk run stops are served and traced and "
            "logged too, so at 100% the per-request figures end slightly above 1. Sink CPU is the "
            "sink process's CPU time during that target's runs (not part of its CPU µs/req).",
        ]
    return lines


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
    dirty = _run_tool(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "meshproxy"])
    if dirty and not dirty.startswith(("fatal", "unavailable")):
        versions["meshproxy"] += " + uncommitted changes in meshproxy/"
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
    ]
    telemetry = [name for name in labels if name in args.plans]
    if telemetry:
        lines.append("- Telemetry per target:")
        lines += [f"  - `{name}`: {args.plans[name].summary}" for name in telemetry]
    if context.get("sink"):
        lines.append(f"- OTLP sink: {context['sink']}")
    lines.append("")
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
    parser.add_argument("--only", default=",".join(TARGETS), help="comma list of targets (all)")
    parser.add_argument(
        "--meshproxy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `meshproxy run` (repeatable; write --meshproxy-arg=--flag)",
    )
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument(
        "--meshproxy-default-sampling",
        type=float,
        metavar="PCT",
        help="give meshproxy-default a Telemetry resource with this randomSamplingPercentage "
        "instead of Istio's implicit 1%% (for experiments; the report says so)",
    )
    parser.add_argument(
        "--envoy-otel-batching",
        choices=tuple(ENVOY_OTEL_BATCHING),
        default="meshproxy",
        help="envoy-full's OTel span batching: meshproxy's (512 spans/1 s, default) or Envoy's "
        "defaults (5 spans/5 s)",
    )
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
    args.plans = dict(TELEMETRY)
    pct = args.meshproxy_default_sampling
    if pct is not None:
        if not 0.0 <= pct <= 100.0:
            parser.error("--meshproxy-default-sampling must be 0..100")
        args.plans["meshproxy-default"] = dataclasses.replace(
            TELEMETRY["meshproxy-default"],
            sampling=pct,
            summary="**experiment** (`--meshproxy-default-sampling`): metrics on, OTLP/HTTP "
            f"tracing to the sink with a Telemetry `randomSamplingPercentage: {pct:g}`, "
            "no access log",
        )
    if any(t.startswith("envoy") for t in args.targets) and not args.envoy:
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
            sink = None
            if any(args.plans[t].sampling is not None for t in args.targets if t in args.plans):
                sink = start_sink(args, workdir, stack)
                batch, interval = ENVOY_OTEL_BATCHING[args.envoy_otel_batching]
                context["sink"] = (
                    "`benchmarks/otlp_sink.py` (a separate process: threaded stdlib HTTP/1.1 "
                    "server answering 200 to `POST /<target>/v1/traces`, counting batches, "
                    "bytes and spans per target; its CPU is not in any target's CPU µs/req). "
                    f"Envoy's OTel tracer batching: `min_flush_spans` {batch}, "
                    f"`flush_interval_ms` {interval} (`--envoy-otel-batching "
                    f"{args.envoy_otel_batching}`)."
                )
            targets = [upstream] if "direct" in args.targets else []
            for name in args.targets:
                if name.startswith("meshproxy"):
                    targets.append(start_meshproxy(args, name, upstream.port, sink, workdir, stack))
                elif name.startswith("envoy"):
                    targets.append(start_envoy(args, name, upstream.port, sink, workdir, stack))
            for target in targets:
                verify_target(target)
                verify_telemetry(target, sink)
            print("all targets ready: " + ", ".join(f"{t.name}:{t.port}" for t in targets))
            blocks = run_matrix(args, targets, sink)
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
