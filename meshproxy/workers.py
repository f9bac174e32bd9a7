"""Several worker processes behind one set of ports: the supervisor of ``meshproxy run --workers N``.

Owns the processes of a multi-core meshproxy. Python runs one thread of Python at a time, so
where Envoy runs worker threads, meshproxy runs worker *processes*:

* **Ports.** Each worker binds the listeners itself with ``SO_REUSEPORT``; the kernel spreads new
  connections over them. A listener configured on port 0 gets its port picked here first (bound,
  never listening, so it takes no connections) and every worker is told to use it.
* **Workers** are ``meshproxy run`` processes of the same configuration files, each with its
  own loop, pools, limits and hot reload (each watches the files). They serve their admin on an
  ephemeral loopback port that only the supervisor uses. Circuit-breaker thresholds are divided
  among them (``LimitSettings.shared_by``).
* **The admin server** (``spec.admin``) is the supervisor's (and so are the scrape and health
  ports): ``/ready`` once every worker is,
  ``/stats/prometheus`` sums the workers' series (a timestamp gauge takes the latest),
  ``/clusters`` merges their counters by cluster and endpoint, ``/quitquitquit``,
  ``/healthcheck/*`` and ``/drain_listeners`` go to every worker; the rest is asked of worker 0.
* **Signals.** SIGTERM/SIGINT and SIGHUP are passed to every worker; the supervisor exits when
  they all have. A worker that dies on its own takes the others down (exit 1): a sidecar that
  silently lost part of its capacity is worse than one the kubelet restarts.

Rules: every child is owned and reaped; nothing here touches a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from meshproxy.config.model import HostPort, MeshConfig
from meshproxy.io.admin import AdminRequest, AdminResponse, AdminServer, Deferred

log = logging.getLogger(__name__)

WORKER_ENV = "MESHPROXY_WORKER"  # "index/count" in a worker's environment
SUPERVISOR_ENV = "MESHPROXY_SUPERVISOR_PID"  # the supervisor's pid, in a worker's environment
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
READY_PREFIX = "meshproxy ready: "
START_TIMEOUT = 60.0
_ADMIN_TIMEOUT = 5.0
_PROM_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's ``resources.limits.cpu``), at least one."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def worker_count(requested: int) -> int:
    """``--workers``/``spec.workers``: 0 means one per usable core."""
    return requested if requested > 0 else usable_cores()


def reserve_ports(addresses: Iterable[HostPort]) -> tuple[dict[str, int], list[socket.socket]]:
    """A port for each listener address on port 0, held by a bound (not listening) socket with
    SO_REUSEPORT until the workers have bound it too. Keyed by ``str(address)``."""
    ports: dict[str, int] = {}
    held: list[socket.socket] = []
    for address in addresses:
        if address.port != 0:
            ports[str(address)] = address.port
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, 0))
        held.append(sock)
        ports[str(address)] = sock.getsockname()[1]
    return ports, held


def as_worker(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, count) when this process was started as a worker by a supervisor."""
    value = env.get(WORKER_ENV)
    if not value:
        return None
    index, _, count = value.partition("/")
    return int(index), int(count)


def follow_supervisor(env: Mapping[str, str]) -> bool:
    """In a worker: have the kernel send SIGTERM (a drain) when the supervisor dies, however it
    dies (SIGKILL, the OOM killer), so that no orphan keeps serving the ports with SO_REUSEPORT
    beside a restarted meshproxy. False when the supervisor is already gone (the worker must
    not start)."""
    parent = int(env.get(SUPERVISOR_ENV) or 0)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    # The supervisor may have died before the prctl: then no signal comes, and the parent is
    # already someone else (init or a subreaper).
    return not parent or os.getppid() == parent


def worker_config(config: MeshConfig, env: Mapping[str, str]) -> MeshConfig:
    """A worker's view of the configuration: the listener ports the supervisor chose, an admin
    server on an ephemeral loopback port (the supervisor's is the one on spec.admin), and no
    separate scrape or health port (the supervisor serves the merged ones)."""
    binds = dict(
        item.rsplit("=", 1) for item in env.get("MESHPROXY_WORKER_BINDS", "").split(",") if item
    )
    spec = config.bootstrap.spec

    def bound(address: HostPort) -> HostPort:
        port = binds.get(str(address))
        return dataclasses.replace(address, port=int(port)) if port else address

    outbound = (
        dataclasses.replace(spec.outbound, address=bound(spec.outbound.address))
        if spec.outbound is not None
        else None
    )
    inbound = (
        dataclasses.replace(spec.inbound, address=bound(spec.inbound.address))
        if spec.inbound is not None
        else None
    )
    new_spec = dataclasses.replace(
        spec,
        outbound=outbound,
        inbound=inbound,
        admin=HostPort(host="127.0.0.1", port=0),
        telemetry=dataclasses.replace(spec.telemetry, prometheus=None),
        health=None,
    )
    bootstrap = dataclasses.replace(config.bootstrap, spec=new_spec)
    return dataclasses.replace(config, bootstrap=bootstrap)


class Worker:
    __slots__ = ("admin", "index", "listeners", "process")

    def __init__(self, index: int, process: asyncio.subprocess.Process) -> None:
        self.index = index
        self.process = process
        self.admin: tuple[str, int] | None = None
        self.listeners = ""

    async def ask(self, method: str, path: str) -> tuple[int, bytes]:
        """One admin request to this worker: (status, body); (0, b"") if it cannot answer."""
        if self.admin is None:
            return 0, b""
        host, port = self.admin
        try:
            async with asyncio.timeout(_ADMIN_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(
                        f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\n"
                        "connection: close\r\n\r\n".encode()
                    )
                    raw = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return 0, b""
        head, _, body = raw.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return status, body


class Supervisor:
    """Starts ``count`` workers of ``paths`` and serves the aggregate admin endpoints."""

    def __init__(
        self, config: MeshConfig, paths: Sequence[str], count: int, extra_args: Sequence[str]
    ) -> None:
        self.config = config
        self.paths = list(paths)
        self.count = count
        self.extra_args = list(extra_args)
        self.workers: list[Worker] = []
        self.admin: AdminServer | None = None
        self.prometheus: AdminServer | None = None
        self.health: AdminServer | None = None  # spec.health: ready once every worker is
        self._stopping = False
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # reapers and stdout pumps, owned here

    def _own(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- start ----------------------------------------------------------------------------------
    async def start(self) -> None:
        spec = self.config.bootstrap.spec
        addresses = [a for a in (spec.outbound, spec.inbound) if a is not None]
        ports, held = reserve_ports(a.address for a in addresses)
        binds = [f"{k}={v}" for k, v in ports.items()]
        try:
            for index in range(self.count):
                env = dict(os.environ, **{WORKER_ENV: f"{index}/{self.count}"})
                env["MESHPROXY_WORKER_BINDS"] = ",".join(binds)
                env[SUPERVISOR_ENV] = str(os.getpid())
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "meshproxy",
                    "run",
                    *(arg for path in self.paths for arg in ("-c", path)),
                    *self.extra_args,
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                    start_new_session=False,
                )
                self.workers.append(Worker(index, process))
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.gather(*(self._await_ready(w) for w in self.workers))
        except BaseException:
            await self._terminate()
            raise
        finally:
            for sock in held:
                sock.close()
        self.admin = AdminServer(spec.admin, self._routes())
        await self.admin.start()
        if spec.telemetry.prometheus is not None:
            route = Deferred(self._stats_prometheus)
            self.prometheus = AdminServer(
                spec.telemetry.prometheus, {("GET", "/stats/prometheus"): route}
            )
            await self.prometheus.start()
        if spec.health is not None:
            ready = Deferred(self._ready)
            self.health = AdminServer(
                spec.health, {("GET", "/healthz/ready"): ready, ("GET", "/ready"): ready}
            )
            await self.health.start()
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            self._own(loop.create_task(self._reap(worker), name=f"worker-{worker.index}-reap"))

    async def _await_ready(self, worker: Worker) -> None:
        stdout = worker.process.stdout
        assert stdout is not None
        while True:
            line = await stdout.readline()
            if not line:
                code = await worker.process.wait()
                raise RuntimeError(f"worker {worker.index} exited with {code} before it was ready")
            text = line.decode(errors="replace").strip()
            if text.startswith(READY_PREFIX):
                fields = dict(
                    part.split("=", 1) for part in text[len(READY_PREFIX) :].split() if "=" in part
                )
                host, _, port = fields.get("admin", "").rpartition(":")
                worker.admin = (host.strip("[]"), int(port))
                worker.listeners = " ".join(f"{k}={v}" for k, v in fields.items() if k != "admin")
                # From here on the worker's stdout is its access log (``-``, Istio's default
                # ``/dev/stdout``) and its reload lines: copied to ours, never dropped.
                self._own(
                    asyncio.get_running_loop().create_task(
                        _pump(stdout, sys.stdout.buffer), name=f"worker-{worker.index}-stdout"
                    )
                )
                return

    async def _reap(self, worker: Worker) -> None:
        code = await worker.process.wait()
        if not self._stopping:
            log.error("worker %d exited with %s; stopping the others", worker.index, code)
            self._failed = True
            self.stop()
        if all(w.process.returncode is not None for w in self.workers):
            self._done.set()

    # -- lifecycle --------------------------------------------------------------------------
    _failed = False

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    def stop(self) -> None:
        """Drain every worker (SIGTERM); the supervisor exits once they all have."""
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    async def wait(self) -> int:
        await self._done.wait()
        return 1 if self._failed else 0

    async def _terminate(self) -> None:
        self._stopping = True
        self._signal_all(signal.SIGKILL)
        for worker in self.workers:
            await worker.process.wait()

    async def close(self) -> None:
        for server in (self.admin, self.prometheus, self.health):
            if server is not None:
                await server.close()
        if any(w.process.returncode is None for w in self.workers):
            self.stop()
            try:
                async with asyncio.timeout(self.config.bootstrap.spec.drain_duration + 5):
                    await asyncio.gather(*(w.process.wait() for w in self.workers))
            except TimeoutError:
                await self._terminate()
        if self._tasks:
            # The stdout pumps end at their worker's EOF: let them copy its last lines (the
            # access log of the requests drained at exit) rather than cut them off.
            await asyncio.wait(list(self._tasks), timeout=_ADMIN_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def listeners_text(self) -> str:
        return self.workers[0].listeners if self.workers else ""

    # -- admin ------------------------------------------------------------------------------
    def _routes(self) -> dict[tuple[str, str], Deferred]:
        routes: dict[tuple[str, str], Deferred] = {
            ("GET", "/ready"): Deferred(self._ready),
            ("GET", "/stats/prometheus"): Deferred(self._stats_prometheus),
            ("GET", "/clusters"): Deferred(self._clusters),
            ("GET", "/workers"): Deferred(self._workers),
        }
        for path in ("/quitquitquit", "/healthcheck/fail", "/healthcheck/ok", "/drain_listeners"):
            routes[("POST", path)] = Deferred(self._broadcast)
        for path in ("/config_dump", "/certs", "/listeners", "/server_info", "/route", "/"):
            routes[("GET", path)] = Deferred(self._first)
        return routes

    async def _all(self, method: str, path: str) -> list[tuple[int, bytes]]:
        return list(await asyncio.gather(*(w.ask(method, path) for w in self.workers)))

    async def _ready(self, request: AdminRequest) -> AdminResponse:
        answers = await self._all("GET", "/ready")
        if all(status == 200 for status, _ in answers):
            return AdminResponse(status=200, body=b"LIVE\n")
        states = ", ".join(
            f"worker {i}: {body.decode(errors='replace').strip() or 'no answer'}"
            for i, (status, body) in enumerate(answers)
            if status != 200
        )
        return AdminResponse(status=503, body=f"{states}\n".encode())

    async def _broadcast(self, request: AdminRequest) -> AdminResponse:
        answers = await self._all("POST", request.path)
        if request.path == "/quitquitquit":
            self._stopping = True
        ok = all(status == 200 for status, _ in answers)
        return AdminResponse(status=200 if ok else 502, body=b"OK\n" if ok else b"partial\n")

    async def _first(self, request: AdminRequest) -> AdminResponse:
        # Encoded again: the values are decoded (a space or an & inside one would break the
        # request line or split the value).
        query = urllib.parse.urlencode([(k, v) for k, vs in request.query.items() for v in vs])
        status, body = await self.workers[0].ask(
            "GET", request.path + (f"?{query}" if query else "")
        )
        return AdminResponse(status=status or 502, body=body, content_type=_content_type(body))

    async def _workers(self, request: AdminRequest) -> AdminResponse:
        data = [
            {
                "index": w.index,
                "pid": w.process.pid,
                "admin": f"{w.admin[0]}:{w.admin[1]}" if w.admin else None,
                "running": w.process.returncode is None,
            }
            for w in self.workers
        ]
        return _json({"workers": data})

    async def _stats_prometheus(self, request: AdminRequest) -> AdminResponse:
        answers = await self._all("GET", "/stats/prometheus")
        texts = [body.decode() for status, body in answers if status == 200]
        return AdminResponse(
            status=200 if texts else 503,
            body=merge_expositions(texts),
            content_type=_PROM_CONTENT_TYPE,
        )

    async def _clusters(self, request: AdminRequest) -> AdminResponse:
        answers = await self._all("GET", "/clusters")
        docs: list[object] = []
        for status, body in answers:
            if status == 200:
                with contextlib.suppress(ValueError):
                    docs.append(json.loads(body))
        return _json(merge_json(docs) if docs else {"clusters": []})


# A worker's partial line kept back at most this long before it is written anyway.
_PUMP_LINE_MAX = 1 << 20


async def _pump(stream: asyncio.StreamReader, out: BinaryIO | None) -> None:
    """Copy a worker's stdout to ``out`` (the supervisor's) until EOF, whole lines at a time so
    that two workers' lines never interleave mid-line; the worker never blocks on a full pipe
    unless ``out`` does. If ``out`` fails (a closed pipe), the rest is read and dropped: a
    worker blocked on its stdout would stop serving."""
    pending = b""
    while chunk := await stream.read(65536):
        if out is None:
            continue
        data = pending + chunk
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) >= _PUMP_LINE_MAX:
            end = len(data)
        pending = data[end:]
        if end:
            out = _copy(out, data[:end])
    if pending and out is not None:
        _copy(out, pending)


def _copy(out: BinaryIO, data: bytes) -> BinaryIO | None:
    """Write and flush ``data``; None (stop copying) when ``out`` cannot take it."""
    try:
        out.write(data)
        out.flush()
    except (OSError, ValueError) as exc:
        log.warning("cannot copy the workers' output to stdout any more: %s", exc)
        return None
    return out


def _content_type(body: bytes) -> bytes:
    head = body.lstrip()[:1]
    if head in (b"{", b"["):
        return b"application/json"
    if head == b"<":
        return b"text/html; charset=utf-8"
    return b"text/plain"


def _json(value: object) -> AdminResponse:
    return AdminResponse(
        status=200,
        body=json.dumps(value, indent=2).encode() + b"\n",
        content_type=b"application/json",
    )


# =============================================================================================
# Aggregation (pure)


class _Merged(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def merge_expositions(texts: Sequence[str]) -> bytes:
    """Prometheus text expositions of several workers as one: samples with the same name and
    labels are summed (counters, histogram buckets, sums and counts, gauges of open
    connections), except gauges that are timestamps, which take the latest."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            latest = family.type == "gauge" and family.name.endswith("_timestamp_seconds")
            table = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in table:
                    table[key] = (
                        max(table[key], sample.value) if latest else table[key] + sample.value
                    )
                else:
                    table[key] = sample.value
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    return generate_latest(_Merged(list(families.values())))


def merge_json(docs: Sequence[object]) -> object:
    """Several workers' JSON documents of the same shape as one: numbers summed, lists of
    objects matched by their ``name`` or ``address``, anything else taken from the first."""
    first = docs[0]
    if all(isinstance(d, bool) for d in docs):
        return first
    if all(isinstance(d, int | float) and not isinstance(d, bool) for d in docs):
        return sum(d for d in docs if isinstance(d, int | float))
    if all(isinstance(d, Mapping) for d in docs):
        maps = [d for d in docs if isinstance(d, Mapping)]
        keys = list(dict.fromkeys(k for m in maps for k in m))
        return {k: merge_json([m[k] for m in maps if k in m]) for k in keys}
    if all(isinstance(d, list) for d in docs):
        lists = [d for d in docs if isinstance(d, list)]
        if all(isinstance(item, Mapping) for lst in lists for item in lst):
            groups: dict[str, list[object]] = {}
            for lst in lists:
                for item in lst:
                    key = str(item.get("name", item.get("address", id(item))))
                    groups.setdefault(key, []).append(item)
            return [merge_json(group) for group in groups.values()]
        return first
    return first
