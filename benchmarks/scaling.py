"""Multi-core scaling: `meshproxy run --workers N` against Envoy `--concurrency N` (issue #7, §3-4).

One command, from the repository root:

    python benchmarks/scaling.py [--max-workers M] [--seconds 5] [--repeats 3]
                                 [--conns-per-worker 32] [--pin auto|on|off] [--smoke]

For every N in 1..M (default M: usable cores - 1, at least 1) it starts one meshproxy with
`--workers N` (httptools codec, run.py's `meshproxy-default` telemetry: metrics on, 1% OTLP
tracing to the local sink) and one Envoy with `--concurrency N` (run.py's `envoy` config), all
before measuring, against one nginx upstream with several worker processes. It then runs wrk
(`-t<threads> -c<conns-per-worker x N>`) against each, interleaved (N=1 meshproxy, N=1 Envoy,
N=2 meshproxy, ..., then the next repeat), plus one `direct` run per repeat (wrk -> upstream
with the largest N's load-side setup: the ceiling the load side can reach). It prints and writes
(below RESULTS.md's notes marker, between this script's markers) medians with min-max of
req/s, meshproxy / Envoy, and the scaling efficiency req/s(N) / (N x req/s(1)) of each proxy
(per repeat: the repeats are interleaved, so N and 1 are compared within one repeat).

CPU pinning (`--pin auto`: when at least 4 CPUs are usable and N < CPUs): proxies of size N are
started under `taskset -c` on the first N usable CPUs; before each run the upstream's
processes are moved to the remaining CPUs and wrk is started under `taskset` on them. Without
pinning every process shares every CPU; the report says which was used.

Any wrk error (non-2xx, socket error, non-zero exit) or a contender that dies aborts the run
with exit 1.
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import run as bench  # benchmarks/run.py: this script's directory is on sys.path
from results_section import write_section

MESH_NAME = "meshproxy-httptools-default"  # run.py's name: httptools codec, Istio's defaults
MESH_PLAN = bench.TELEMETRY[MESH_NAME]
ENVOY_PLAN = bench.TELEMETRY["envoy"]
SECTION_BEGIN = "<!-- scaling:begin (benchmarks/scaling.py replaces this section) -->"
SECTION_END = "<!-- scaling:end -->"
SECTION_TITLE = "## Multi-core scaling (issue #7 §3)"
EFFICIENCY_TARGET = 0.8  # issue #7 §4: req/s(N) >= 0.8 x N x req/s(1)
MIN_CPUS_TO_PIN = 4


@dataclasses.dataclass(frozen=True)
class Contender:
    """One proxy of size N (or the upstream itself for `direct`)."""

    kind: str  # "meshproxy", "envoy" or "direct"
    size: int
    target: bench.Target
    cpus: tuple[int, ...] | None  # proxy CPUs when pinned

    @property
    def name(self) -> str:
        return self.kind if self.kind == "direct" else f"{self.kind}-{self.size}"


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def taskset(cpus: Sequence[int] | None) -> list[str]:
    return [] if cpus is None else ["taskset", "-c", cpu_list(cpus)]


def pin_tree(root: int, cpus: Sequence[int]) -> None:
    """Move every thread of `root`'s process tree onto `cpus`."""
    for pid in bench.process_tree(root):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), set(cpus))


def split(args: argparse.Namespace, size: int) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """(proxy CPUs or None when unpinned, load-side CPUs) for proxies of `size`."""
    if not args.pinned:
        return None, tuple(args.cpus)
    return tuple(args.cpus[:size]), tuple(args.cpus[size:])


# --------------------------------------------------------------------------- processes


def start_upstream(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> tuple[bench.Target, str]:
    """run.py's nginx upstream with `--upstream-workers` worker processes (one nginx worker caps
    a multi-core proxy); run.py's choice (Python upstream) when nginx is missing."""
    nginx = bench.find_nginx()
    if nginx is None or args.upstream == "python":
        return bench.start_upstream(args, workdir, stack)
    prefix = workdir / "nginx"
    prefix.mkdir()
    (port,) = bench.free_ports(1)
    conf = bench.render(
        "nginx.conf.tmpl",
        prefix / "nginx.conf",
        user_directive="user root;" if os.geteuid() == 0 else "",
        prefix=prefix,
        port=port,
        body="x" * bench.BODY_SIZE,
    )
    text = conf.read_text()
    if "worker_processes 1;" not in text:
        raise bench.BenchError("nginx.conf.tmpl no longer says `worker_processes 1;`")
    conf.write_text(
        text.replace("worker_processes 1;", f"worker_processes {args.upstream_workers};")
    )
    cmd = [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
    child = bench.launch("nginx", cmd, workdir, stack)
    bench.wait_ready(child, bench.serves_body(port), args.startup_timeout)
    what = f"nginx ({nginx}, worker_processes {args.upstream_workers}, `return 200` with a 1024-byte body)"
    return bench.Target("direct", f"direct (nginx x{args.upstream_workers})", port, child), what


def launch_meshproxy(
    args: argparse.Namespace,
    size: int,
    upstream_port: int,
    sink: bench.Sink,
    workdir: Path,
    stack: contextlib.ExitStack,
) -> tuple[Contender, bench.Child, int]:
    listener_port, admin_port = bench.free_ports(2)
    name = f"meshproxy-{size}"
    telemetry, resource, _ = bench.meshproxy_telemetry(MESH_NAME, MESH_PLAN, sink, workdir)
    config = bench.render(
        "meshproxy.yaml.tmpl",
        workdir / f"{name}.yaml",
        admin_port=admin_port,
        listener_port=listener_port,
        upstream_port=upstream_port,
        host=bench.HOST_HEADER,
        telemetry=json.dumps(telemetry),
        codec="httptools",
        telemetry_resource=f"---\n{json.dumps(resource)}" if resource else "",
    )
    cpus, _ = split(args, size)
    cmd = [*taskset(cpus), args.python, "-m", "meshproxy", "run", "-c", str(config)]
    cmd += ["--workers", str(size)]
    child = bench.launch(name, cmd, workdir, stack, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    label = f"meshproxy --workers {size} (httptools, metrics, 1% tracing)"
    trace_path = sink.path(MESH_NAME)
    target = bench.Target(name, label, listener_port, child, MESH_PLAN, None, trace_path)
    return Contender("meshproxy", size, target, cpus), child, admin_port


def launch_envoy(
    args: argparse.Namespace,
    size: int,
    upstream_port: int,
    workdir: Path,
    stack: contextlib.ExitStack,
) -> tuple[Contender, bench.Child, int]:
    listener_port, admin_port = bench.free_ports(2)
    name = f"envoy-{size}"
    values, _ = bench.envoy_telemetry("envoy", ENVOY_PLAN, None, workdir, "meshproxy")
    config = bench.render(
        "envoy.yaml.tmpl",
        workdir / f"{name}.yaml",
        admin_port=admin_port,
        listener_port=listener_port,
        upstream_port=upstream_port,
        **values,
    )
    cpus, _ = split(args, size)
    # As run.py's start_envoy, with N worker threads.
    cmd = [*taskset(cpus), args.envoy, "-c", str(config), "--concurrency", str(size)]
    cmd += ["--disable-hot-restart", "--base-id", str(random.randint(1, 1_000_000)), "-l", "error"]
    child = bench.launch(name, cmd, workdir, stack)
    target = bench.Target(name, f"Envoy --concurrency {size}", listener_port, child, ENVOY_PLAN)
    return Contender("envoy", size, target, cpus), child, admin_port


# --------------------------------------------------------------------------- wrk


def measure(
    args: argparse.Namespace, contender: Contender, upstream: bench.Target, size: int, seconds: int
) -> bench.WrkResult:
    """One wrk run against `contender` with the load side of proxies of `size`."""
    _, load = split(args, size)
    if args.pinned:
        pin_tree(upstream.child.pid, load)
    conns = args.conns_per_worker * size
    threads = max(1, min(conns, size if not args.pinned else min(size, len(load))))
    cmd = [*taskset(load if args.pinned else None), args.wrk, f"-t{threads}", f"-c{conns}"]
    cmd += [f"-d{seconds}s", "--latency", "-H", f"Host: {bench.HOST_HEADER}"]
    cmd.append(f"http://{bench.LOOPBACK}:{contender.target.port}/")
    pid = contender.target.child.pid
    cpu_before = bench.tree_cpu_seconds(pid)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise bench.BenchError(f"{shlex.join(cmd)} hung") from exc
    cpu_used = bench.tree_cpu_seconds(pid) - cpu_before
    contender.target.child.check_alive()
    upstream.child.check_alive()
    if proc.returncode != 0:
        raise bench.BenchError(
            f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    result = bench.parse_wrk(proc.stdout, cpu_used)
    if result.errors or result.requests == 0:
        raise bench.BenchError(
            f"wrk against {contender.name}: {result.errors} errors (non-2xx or socket errors), "
            f"{result.requests} requests\n{proc.stdout}\n{contender.target.child.tail()}"
        )
    return result


def run_all(
    args: argparse.Namespace, contenders: list[Contender], upstream: bench.Target
) -> dict[str, list[bench.WrkResult]]:
    runs: dict[str, list[bench.WrkResult]] = {c.name: [] for c in contenders}
    top = args.max_workers
    if args.warmup > 0:
        for c in contenders:
            print(f"warmup {c.name} {args.warmup}s", flush=True)
            measure(args, c, upstream, c.size if c.kind != "direct" else top, args.warmup)
    width = max(len(c.name) for c in contenders)
    for rep in range(args.repeats):
        for c in contenders:  # interleaved: direct, mesh-1, envoy-1, mesh-2, envoy-2, ...
            size = c.size if c.kind != "direct" else top
            result = measure(args, c, upstream, size, args.seconds)
            runs[c.name].append(result)
            print(
                f"rep {rep + 1}/{args.repeats} {c.name:<{width}} {result.rps:>10.0f} req/s  "
                f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  "
                f"cpu {result.cpu_us_per_req:.1f} us/req",
                flush=True,
            )
    return runs


# --------------------------------------------------------------------------- report


def spread(values: Sequence[float], digits: int = 0) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    )


def efficiencies(runs: dict[str, list[bench.WrkResult]], kind: str, size: int) -> list[float]:
    """req/s(N) / (N x req/s(1)) per repeat (the repeats are interleaved)."""
    one, many = runs[f"{kind}-1"], runs[f"{kind}-{size}"]
    return [m.rps / (size * o.rps) for o, m in zip(one, many, strict=True) if o.rps > 0]


def pinning_text(args: argparse.Namespace) -> str:
    if args.pinned:
        return (
            f"pinned with `taskset`: proxies of size N on the first N of CPUs "
            f"{cpu_list(args.cpus)}, wrk and the upstream on the remaining CPUs (the upstream's "
            "threads are moved there before each run)"
        )
    why = "--pin off" if args.pin == "off" else f"only {len(args.cpus)} usable CPUs"
    return f"no CPU pinning ({why}): proxies, wrk, the upstream and the sink share every CPU"


def report_markdown(
    args: argparse.Namespace,
    contenders: list[Contender],
    runs: dict[str, list[bench.WrkResult]],
    memory: dict[str, bench.Memory],
    context: dict[str, str],
) -> str:
    sizes = list(range(1, args.max_workers + 1))
    lines = [
        SECTION_BEGIN,
        SECTION_TITLE,
        "",
        "Generated by `benchmarks/scaling.py` (this section, between its markers, is replaced on "
        "each run; see the script's docstring).",
        "",
        f"- Date: {context['date']}",
        f"- Machine: {context['nproc']} CPUs ({context['cpu']}), {context['kernel']}, "
        f"load average at start {context['loadavg']}",
        f"- CPU pinning: {pinning_text(args)}",
        f"- Python {context['python']}, uvloop {context['uvloop']}; meshproxy {context['meshproxy']}; "
        f"Envoy {context['envoy']}; wrk {context['wrk']}",
        f"- Upstream: {context['upstream']}",
        f"- Command: `{context['command']}`",
        f"- meshproxy: `meshproxy run --workers N` (SO_REUSEPORT), `spec.http1Codec: httptools`, "
        f"telemetry as run.py's `{MESH_NAME}` ({MESH_PLAN.summary}); Envoy: run.py's `envoy` "
        "config with `--concurrency N`.",
        f"- Method: `wrk -t<T> -c<{args.conns_per_worker} x N> -d{args.seconds}s` (T = N, capped "
        f"by the load-side CPUs when pinned); {args.warmup}s warmup each; {args.repeats} "
        "repeat(s) interleaved across all contenders; medians with min-max over the repeats. "
        "Efficiency = req/s(N) / (N x req/s(1)) per repeat. RSS: VmRSS of the process tree after "
        "the runs. `direct` is wrk → upstream with the largest N's load side: the most the load "
        "side can deliver. Any wrk error aborts the run.",
        "",
        "| N | meshproxy req/s | Envoy req/s | meshproxy / Envoy | meshproxy efficiency "
        "| Envoy efficiency | meshproxy RSS MiB | Envoy RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        mesh, envoy = runs[f"meshproxy-{n}"], runs[f"envoy-{n}"]
        ratios = [m.rps / e.rps for m, e in zip(mesh, envoy, strict=True) if e.rps > 0]
        mesh_eff = efficiencies(runs, "meshproxy", n)
        envoy_eff = efficiencies(runs, "envoy", n)
        lines.append(
            f"| {n} | {spread([r.rps for r in mesh])} | {spread([r.rps for r in envoy])} "
            f"| {spread(ratios, 2)} | {spread(mesh_eff, 2)} | {spread(envoy_eff, 2)} "
            f"| {memory[f'meshproxy-{n}'].rss_mib:.1f} | {memory[f'envoy-{n}'].rss_mib:.1f} |"
        )
    direct = runs.get("direct")
    lines.append("")
    if not args.pinned:
        lines.append(
            "- Caveat: unpinned, wrk, the upstream and the OTLP sink take CPU from the proxies, so "
            "the efficiencies here understate scaling; the issue #7 figure needs a pinned run "
            "with more CPUs than N (run this script there with the defaults)."
        )
    if direct:
        lines.append(
            f"- direct (wrk → upstream, load side of N={args.max_workers}): "
            f"{spread([r.rps for r in direct])} req/s"
        )
    for n in sizes[1:]:
        for kind in ("meshproxy", "envoy"):
            eff = efficiencies(runs, kind, n)
            value = statistics.median(eff)
            verdict = "met" if value >= EFFICIENCY_TARGET else "**missed**"
            lines.append(
                f"- scaling efficiency {kind} N={n}: **{value:.2f}** (min-max {min(eff):.2f}-"
                f"{max(eff):.2f}; target >= {EFFICIENCY_TARGET}: {verdict})"
            )
    lines += ["", "<details><summary>individual runs (req/s; p50/p99 ms)</summary>", ""]
    for c in contenders:
        cells = ", ".join(f"{r.rps:,.0f} ({r.p50_ms:.3f}/{r.p99_ms:.3f})" for r in runs[c.name])
        lines.append(f"- {c.target.label}: {cells}")
    lines += ["", "</details>", "", SECTION_END]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    venv = bench.REPO_ROOT / ".venv" / "bin"
    python = venv / "python" if (venv / "python").exists() else Path(sys.executable)
    envoy = venv / "envoy"
    if not envoy.exists():
        beside = Path(sys.executable).parent / "envoy"
        envoy = beside if beside.exists() else Path(shutil.which("envoy") or "envoy")
    cpus = usable_cpus()
    parser = argparse.ArgumentParser(
        description="Multi-core scaling: meshproxy --workers N vs Envoy --concurrency N."
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        help=f"largest N (default: usable CPUs - 1 = {max(1, len(cpus) - 1)})",
    )
    parser.add_argument("--seconds", type=int, help="seconds per wrk run (default 5)")
    parser.add_argument("--repeats", type=int, help="interleaved runs per contender (default 3)")
    parser.add_argument("--warmup", type=int, help="warmup seconds per contender (default 1)")
    parser.add_argument("--conns-per-worker", type=int, help="wrk connections per N (default 32)")
    parser.add_argument("--pin", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--upstream-workers", type=int, help="nginx worker processes (default: CPUs / 2)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke: N=1..2, 1 s, 1 repeat, 4 conns/worker, no write",
    )
    parser.add_argument("--out", type=Path, default=bench.BENCH_DIR / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--python", default=str(python), help="interpreter for meshproxy")
    parser.add_argument("--envoy", default=str(envoy))
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds per process")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "max_workers": 2 if smoke else max(1, len(cpus) - 1),
        "seconds": 1 if smoke else 5,
        "repeats": 1 if smoke else 3,
        "warmup": 0 if smoke else 1,
        "conns_per_worker": 4 if smoke else 32,
        "upstream_workers": max(1, len(cpus) // 2),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if smoke:
        args.no_write = True
    if min(args.max_workers, args.seconds, args.repeats, args.conns_per_worker) < 1:
        parser.error("--max-workers, --seconds, --repeats and --conns-per-worker must be >= 1")
    if args.warmup < 0 or args.upstream_workers < 1:
        parser.error("--warmup must be >= 0 and --upstream-workers >= 1")
    for tool, what in ((args.envoy, "--envoy"), (args.wrk, "--wrk")):
        if not Path(tool).exists():
            parser.error(f"{tool} not found; pass {what} PATH")
    args.cpus = cpus
    room = args.max_workers < len(cpus)
    if args.pin == "on" and not room:
        parser.error(f"--pin on needs --max-workers < usable CPUs ({len(cpus)})")
    if args.pin == "on" and shutil.which("taskset") is None:
        parser.error("--pin on needs taskset (util-linux)")
    args.pinned = args.pin == "on" or (
        args.pin == "auto"
        and room
        and len(cpus) >= MIN_CPUS_TO_PIN
        and bool(shutil.which("taskset"))
    )
    # run.py's helpers read these.
    args.plans = dict(bench.TELEMETRY)
    args.envoy_otel_batching = "meshproxy"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    signal.signal(signal.SIGTERM, bench._raise_on_sigterm)
    context = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(["python", "benchmarks/scaling.py", *raw]),
        **bench.machine_info(),
    }
    print(f"N = 1..{args.max_workers}; {pinning_text(args)}", flush=True)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-scaling-"))
    try:
        with contextlib.ExitStack() as stack:
            upstream, context["upstream"] = start_upstream(args, workdir, stack)
            sink = bench.start_sink(args, workdir, stack)
            contenders = [Contender("direct", args.max_workers, upstream, None)]
            pending = []
            for size in range(1, args.max_workers + 1):
                for contender, child, admin in (
                    launch_meshproxy(args, size, upstream.port, sink, workdir, stack),
                    launch_envoy(args, size, upstream.port, workdir, stack),
                ):
                    contenders.append(contender)
                    pending.append((child, bench.admin_ready(admin)))
            for child, probe in pending:
                bench.wait_ready(child, probe, args.startup_timeout)
            for c in contenders:
                bench.verify_target(c.target)
            bench.verify_telemetry(contenders[1].target, sink)
            print(
                f"{len(contenders)} contenders ready in {time.monotonic() - began:.1f}s", flush=True
            )
            runs = run_all(args, contenders, upstream)
            memory = {c.name: bench.tree_memory(c.target.child.pid) for c in contenders}
            context.update(bench.collect_versions(args, "nginx" in context["upstream"]))
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
    report = report_markdown(args, contenders, runs, memory, context)
    print()
    print(report)
    if not args.no_write:
        write_section(args.out, report, SECTION_BEGIN, SECTION_END)
        print(f"wrote the scaling section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
