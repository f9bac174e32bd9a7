"""Memory per idle keep-alive connection: meshproxy (one worker) against Envoy (issue #7 §4).

One command, from the repository root:

    python benchmarks/idle_conns.py [--connections 10000] [--codec httptools,h11] [--smoke]

It starts run.py's upstream and OTLP sink, meshproxy with `--workers 1` per codec (run.py's
`meshproxy-httptools-default` / `meshproxy-default`: Istio's default telemetry) and Envoy
`--concurrency 1` (run.py's `envoy`). For each proxy in turn it reads the RSS of the process
tree at idle (after one request), opens K HTTP/1.1 keep-alive connections from this process with
asyncio, `--batch` at a time, and sends one `GET /` on each (so each is a connection the proxy
has served and keeps alive, with whatever upstream connections that left in its pool), reads
the RSS again, proves every connection is still open with a second request on each, and closes
them. KiB per connection = (RSS after - RSS before) / K. Everything is bounded by
`--timeout` per phase. RLIMIT_NOFILE is raised (soft to hard, or beyond when allowed) before
the proxies start, as they inherit it. A failed connection or request aborts with exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import run as bench  # benchmarks/run.py: this script's directory is on sys.path
from results_section import write_section

SECTION_BEGIN = "<!-- idle_conns:begin (benchmarks/idle_conns.py replaces this section) -->"
SECTION_END = "<!-- idle_conns:end -->"
SECTION_TITLE = "## Idle keep-alive connections (issue #7 §4)"
MESH_NAMES = {"httptools": "meshproxy-httptools-default", "h11": "meshproxy-default"}
IDLE_RSS_TARGET = 0.6  # issue #7 §4: RSS at idle <= 0.6x Envoy's
FD_MARGIN = 512  # descriptors beyond the connections: upstream pool, admin, files
REQUEST = f"GET / HTTP/1.1\r\nHost: {bench.HOST_HEADER}\r\n\r\n".encode()


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    label: str
    idle: bench.Memory  # after one request, before the connections
    loaded: bench.Memory  # with K idle keep-alive connections open
    connections: int
    open_s: float

    @property
    def kib_per_conn(self) -> float:
        return (self.loaded.rss_mib - self.idle.rss_mib) * 1024 / self.connections


# --------------------------------------------------------------------------- client


async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.1 ") else b"?"
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
            raise bench.BenchError("the proxy answered `connection: close`")
    if status != b"200" or length is None:
        raise bench.BenchError(f"unexpected response head {head[:200]!r}")
    await reader.readexactly(length)


async def open_idle(
    port: int, count: int, batch: int, timeout: float
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections that each completed one request, opened `batch` at a time."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_one() -> None:
        reader, writer = await asyncio.open_connection(bench.LOOPBACK, port)
        conns.append((reader, writer))
        await one_request(reader, writer)

    try:
        async with asyncio.timeout(timeout):
            for start in range(0, count, batch):
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(batch, count - start)):
                        group.create_task(open_one())
    except BaseException:
        close_all(conns)
        raise
    return conns


async def reuse_all(
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], batch: int, timeout: float
) -> None:
    """A second request on every connection: each was still open and kept alive."""
    async with asyncio.timeout(timeout):
        for start in range(0, len(conns), batch):
            async with asyncio.TaskGroup() as group:
                for reader, writer in conns[start : start + batch]:
                    group.create_task(one_request(reader, writer))


def close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.transport.abort()


async def measure_async(args: argparse.Namespace, target: bench.Target) -> Result:
    idle = bench.tree_memory(target.child.pid)
    began = time.monotonic()
    try:
        conns = await open_idle(target.port, args.connections, args.batch, args.timeout)
    except* (OSError, asyncio.IncompleteReadError, ValueError) as group:
        raise bench.BenchError(
            f"opening {args.connections} connections to {target.name} failed: "
            f"{group.exceptions[0]!r}\n{target.child.tail()}"
        ) from None
    except* TimeoutError:
        raise bench.BenchError(
            f"{target.name}: connections not open after {args.timeout}s"
        ) from None
    open_s = time.monotonic() - began
    try:
        target.child.check_alive()
        loaded = bench.tree_memory(target.child.pid)
        try:
            await reuse_all(conns, args.batch, args.timeout)
        except* (OSError, asyncio.IncompleteReadError, ValueError) as group:
            raise bench.BenchError(
                f"{target.name} dropped idle keep-alive connections: {group.exceptions[0]!r}"
            ) from None
        except* TimeoutError:
            raise bench.BenchError(f"{target.name}: second requests hung") from None
    finally:
        close_all(conns)
    return Result(target.name, target.label, idle, loaded, args.connections, open_s)


def measure(args: argparse.Namespace, target: bench.Target) -> Result:
    try:
        return asyncio.run(measure_async(args, target))
    except* bench.BenchError as group:
        raise group.exceptions[0] from None


# --------------------------------------------------------------------------- report


def raise_nofile(needed: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), max(hard, needed)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        raise bench.BenchError(
            f"RLIMIT_NOFILE hard limit {hard} < {needed} needed for the connections; lower "
            "--connections or raise the limit (ulimit -Hn, as root)"
        )
    return f"RLIMIT_NOFILE {soft} (soft) / {hard} (hard)"


def report_markdown(
    args: argparse.Namespace, results: list[Result], context: dict[str, str]
) -> str:
    envoy = next(r for r in results if r.name == "envoy")
    lines = [
        SECTION_BEGIN,
        SECTION_TITLE,
        "",
        "Generated by `benchmarks/idle_conns.py` (this section, between its markers, is replaced "
        "on each run; see the script's docstring).",
        "",
        f"- Date: {context['date']}",
        f"- Machine: {context['nproc']} CPUs ({context['cpu']}), {context['kernel']}, "
        f"load average at start {context['loadavg']}; no CPU pinning",
        f"- Python {context['python']}, uvloop {context['uvloop']}; meshproxy {context['meshproxy']}; "
        f"Envoy {context['envoy']}",
        f"- Upstream: {context['upstream']}; {context['nofile']}",
        f"- Command: `{context['command']}`",
        f"- Method: per proxy, RSS (VmRSS summed over the process tree) after one request; then "
        f"{args.connections:,} HTTP/1.1 keep-alive connections opened from one asyncio client, "
        f"{args.batch} at a time, each sending one `GET /` (1 KiB response); RSS again; then a "
        "second request on every connection (all were still open) and close. The RSS growth "
        "includes the upstream connections the proxy kept pooled (at most one per concurrent "
        f"request, so <= {args.batch}). meshproxy: `--workers 1`, run.py's default telemetry "
        "(metrics, 1% tracing); Envoy: run.py's `envoy` config, `--concurrency 1`.",
        "",
        "| proxy | idle RSS MiB | RSS with connections MiB | KiB / connection "
        "| / Envoy's KiB per connection | opened in s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rel = bench.ratio(r.kib_per_conn, envoy.kib_per_conn)
        lines.append(
            f"| {r.label} | {r.idle.rss_mib:.1f} | {r.loaded.rss_mib:.1f} | {r.kib_per_conn:.2f} "
            f"| {bench.fmt_ratio(rel)} | {r.open_s:.1f} |"
        )
    lines.append("")
    for r in results:
        if r.name == "envoy":
            continue
        rel = bench.ratio(r.kib_per_conn, envoy.kib_per_conn)
        met = rel is not None and rel < 1.0
        idle = bench.ratio(r.idle.rss_mib, envoy.idle.rss_mib)
        lines.append(
            f"- {r.name} / Envoy KiB per connection: **{bench.fmt_ratio(rel)}** (target < 1.00x: "
            + ("met" if met else "**missed**")
            + f"); idle RSS / Envoy's: **{bench.fmt_ratio(idle)}** (target <= "
            + f"{IDLE_RSS_TARGET:.2f}x: "
            + ("met" if idle is not None and idle <= IDLE_RSS_TARGET else "**missed**")
            + ")"
        )
    lines += ["", SECTION_END]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    venv = bench.REPO_ROOT / ".venv" / "bin"
    python = venv / "python" if (venv / "python").exists() else Path(sys.executable)
    envoy = venv / "envoy"
    if not envoy.exists():
        beside = Path(sys.executable).parent / "envoy"
        envoy = beside if beside.exists() else Path(shutil.which("envoy") or "envoy")
    parser = argparse.ArgumentParser(description="Memory per idle keep-alive connection.")
    parser.add_argument("--connections", type=int, help="idle connections per proxy (10000)")
    parser.add_argument("--batch", type=int, default=200, help="connections opened at once")
    parser.add_argument("--codec", default="httptools,h11", help="meshproxy codecs, comma list")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per phase")
    parser.add_argument("--smoke", action="store_true", help="CI smoke: 200 connections, no write")
    parser.add_argument("--out", type=Path, default=bench.BENCH_DIR / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--python", default=str(python), help="interpreter for meshproxy")
    parser.add_argument("--envoy", default=str(envoy))
    parser.add_argument("--startup-timeout", type=float, default=30.0, help="seconds per process")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    if args.connections is None:
        args.connections = 200 if args.smoke else 10_000
    if args.smoke:
        args.no_write = True
    if args.connections < 1 or args.batch < 1 or args.timeout <= 0:
        parser.error("--connections, --batch and --timeout must be positive")
    args.codecs = [c.strip() for c in args.codec.split(",") if c.strip()]
    if (
        not args.codecs
        or set(args.codecs) - set(MESH_NAMES)
        or len(set(args.codecs)) < len(args.codecs)
    ):
        parser.error(f"--codec takes a comma list of {','.join(MESH_NAMES)}; got {args.codec!r}")
    if not Path(args.envoy).exists():
        parser.error(f"{args.envoy} not found; pass --envoy PATH")
    # run.py's helpers read these.
    args.wrk = shutil.which("wrk") or "/usr/bin/wrk"
    args.plans = dict(bench.TELEMETRY)
    args.envoy_otel_batching = "meshproxy"
    args.meshproxy_arg = ["--workers", "1"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    signal.signal(signal.SIGTERM, bench._raise_on_sigterm)
    context = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(["python", "benchmarks/idle_conns.py", *raw]),
        **bench.machine_info(),
    }
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-idle-"))
    results: list[Result] = []
    try:
        # Each proxy holds a descriptor per client connection plus its upstream pool; this
        # process holds the client ends. Children inherit the limit.
        context["nofile"] = raise_nofile(args.connections + args.batch + FD_MARGIN)
        with contextlib.ExitStack() as stack:
            upstream, context["upstream"] = bench.start_upstream(args, workdir, stack)
            sink = bench.start_sink(args, workdir, stack)
            targets = [
                bench.start_meshproxy(args, MESH_NAMES[c], upstream.port, sink, workdir, stack)
                for c in args.codecs
            ]
            targets.append(bench.start_envoy(args, "envoy", upstream.port, None, workdir, stack))
            for target in targets:
                bench.verify_target(target)
            print(f"ready in {time.monotonic() - began:.1f}s", flush=True)
            for target in targets:
                result = measure(args, target)
                results.append(result)
                print(
                    f"{target.name}: idle {result.idle.rss_mib:.1f} MiB, with "
                    f"{args.connections} connections {result.loaded.rss_mib:.1f} MiB: "
                    f"{result.kib_per_conn:.2f} KiB per connection (opened in {result.open_s:.1f}s)",
                    flush=True,
                )
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
    report = report_markdown(args, results, context)
    print()
    print(report)
    if not args.no_write:
        write_section(args.out, report, SECTION_BEGIN, SECTION_END)
        print(f"wrote the idle connections section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
