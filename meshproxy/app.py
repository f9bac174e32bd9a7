"""The composition root: configuration in, running listeners out; drain and exit.

Owns the lifetime of one meshproxy process: it builds the runtime objects from a validated
``MeshConfig`` (host table, pools, stacks, listeners, admin server), reports readiness only once
every listener is bound, drains on SIGTERM/SIGINT (stop accepting, finish in-flight requests with
``connection: close``, exit when none is left or ``drainDuration`` has passed), and exits at once on
``POST /quitquitquit``.

Rules: the only place where config meets I/O; every task it starts is owned and awaited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from meshproxy import __version__
from meshproxy.config.istio import metrics_enabled
from meshproxy.config.model import AccessLogFormat, MeshConfig, yaml_key
from meshproxy.core.codecs import codec_factory
from meshproxy.core.explain import explain_request, to_json
from meshproxy.core.record import Direction
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import HostTable, inbound_cluster
from meshproxy.io.admin import AdminRequest, AdminResponse, AdminRoute, AdminServer, WithRequest
from meshproxy.io.listener import Listener, Sweeper
from meshproxy.io.pool import PoolManager
from meshproxy.layers.tracing import TracingStep, tracing_policy
from meshproxy.stacks.inbound import InboundStack
from meshproxy.stacks.outbound import OutboundStack
from meshproxy.telemetry.access_log import AccessLog, build_access_log
from meshproxy.telemetry.dashboard import PAGE, Dashboard
from meshproxy.telemetry.metrics import CONTENT_TYPE, MeshMetrics
from meshproxy.telemetry.sinks import RecordSink
from meshproxy.telemetry.tracing import SpanReporter, span_reporter

log = logging.getLogger(__name__)

_SECRET_FIELDS = frozenset({"private_key", "privateKey"})


def to_jsonable(value: object) -> object:
    """The config model as JSON: camelCase keys as in the YAML, absent fields left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, object] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None or item == () or (isinstance(item, Mapping) and not item):
                continue
            key = f.metadata.get("yaml") or yaml_key(f.name)
            out[key] = "[redacted]" if f.name in _SECRET_FIELDS else to_jsonable(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    return value


class State(enum.Enum):
    STARTING = "STARTING"
    LIVE = "LIVE"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"


class App:
    """One meshproxy process worth of runtime objects."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        access_log: TextIO | None = None,
        access_log_format: AccessLogFormat | None = None,
        record_sinks: Sequence[RecordSink] = (),
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.state = State.STARTING
        self.listeners: dict[str, Listener] = {}
        self.admin: AdminServer | None = None
        # Istio's metrics and the proxy's internals; a second scrape-only server as Istio's :15090.
        self.metrics: MeshMetrics | None = None
        self.prometheus: AdminServer | None = None
        self.pools: PoolManager | None = None
        # Spans of sampled requests (None: the bootstrap's tracing exporter is `none`).
        self.tracer: SpanReporter | None = None
        # The live routing tables, for the admin /route explainer.
        self.hosts: HostTable | None = None
        self.routes: RouteTable | None = None
        self._access_log_out = access_log
        self._access_log_format = access_log_format
        # Off unless a Telemetry resource, the bootstrap or ``access_log`` turns it on.
        self.access_log: AccessLog | None = None
        # The admin page's live numbers (GET / and /dashboard.json).
        self.dashboard: Dashboard | None = None
        self._record_sinks = tuple(record_sinks)
        self._rng = random.Random(seed)
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._sweeper: Sweeper | None = None
        self._started_at = time.time()
        self._health_failed = False
        # spec.http1Codec: which HTTP/1.1 parser both sides use (issue #7).
        self.codecs = codec_factory(config.bootstrap.spec.http1_codec)

    # -- start ----------------------------------------------------------------------------------
    async def start(self) -> None:
        spec = self.config.bootstrap.spec
        loop = asyncio.get_running_loop()
        sinks: list[RecordSink] = list(self._record_sinks)
        self.access_log = build_access_log(
            self.config, loop.time(), out=self._access_log_out, format=self._access_log_format
        )
        if self.access_log is not None:
            sinks.insert(0, self.access_log.write)
        self.hosts = table = HostTable(self.config)
        self.routes = routes = RouteTable(self.config, table)
        app_cluster = (
            inbound_cluster(spec.inbound.address.port, spec.inbound.app.host, spec.inbound.app.port)
            if spec.inbound is not None
            else None
        )
        clusters = list(table.clusters.values())
        if app_cluster is not None:
            clusters.append(app_cluster)
        self.pools = pools = PoolManager(clusters, self.codecs.client)
        self.metrics = MeshMetrics(
            self.config,
            clusters,
            cluster_snapshots=lambda: [s.snapshot(loop.time()) for s in pools.states()],
            listener_snapshots=lambda: [(n, lst.active) for n, lst in self.listeners.items()],
        )
        if metrics_enabled(self.config):  # a Telemetry resource may turn Istio's metrics off
            sinks.append(self.metrics.sink)
        self.dashboard = Dashboard(
            lambda: [s.snapshot(loop.time()) for s in pools.states()], loop.time
        )
        sinks.append(self.dashboard.record)
        # Traces: sampled requests' spans, exported off the loop (exporter `none`: tracing off).
        self.tracer = span_reporter(self.config)
        if self.tracer is not None:
            sinks.append(self.tracer.write)
        timeouts = spec.timeouts
        try:
            if spec.outbound is not None:
                stack = OutboundStack(
                    table,
                    routes,
                    pools,
                    self._rng,
                    loop.time,
                    sinks,
                    tracing=self._trace_step(Direction.OUTBOUND, 80),
                )
                await self._listen("outbound", spec.outbound.address, stack)
            if spec.inbound is not None and app_cluster is not None:
                inbound = InboundStack(
                    app_cluster,
                    pools,
                    self._rng,
                    sinks,
                    tracing=self._trace_step(Direction.INBOUND, spec.inbound.app.port),
                )
                await self._listen("inbound", spec.inbound.address, inbound)
            self.admin = AdminServer(spec.admin, self._admin_routes())
            await self.admin.start()
            if spec.telemetry.prometheus is not None:
                scrape = {("GET", "/stats/prometheus"): self._stats_prometheus}
                self.prometheus = AdminServer(spec.telemetry.prometheus, scrape)
                await self.prometheus.start()
        except OSError:
            await self.close()
            raise
        # One sweep serves every timeout; it runs at a quarter of the shortest (at most 1 s).
        shortest = min(
            [
                timeouts.request_headers,
                timeouts.idle,
                *(c.idle_timeout for c in clusters),
                *(s.max_duration for s in pools.states() if s.max_duration),
                *(s.outlier.settings.interval for s in pools.states() if s.outlier),
            ]
        )
        period = min(1.0, max(shortest / 4, 0.01))
        self._sweeper = Sweeper(period, self._sweep)
        self._sweeper.start()
        self.state = State.LIVE

    def _trace_step(self, direction: Direction, default_port: int) -> TracingStep | None:
        if self.tracer is None:
            return None
        policy = tracing_policy(self.config, direction, os.environ)
        # Ids and draws from the system's entropy: unique even when a test fixes the seed.
        return TracingStep(policy, direction, random.Random(), default_port)

    async def _listen(
        self, name: str, address: object, stack: OutboundStack | InboundStack
    ) -> None:
        timeouts = self.config.bootstrap.spec.timeouts
        listener = Listener(
            name,
            address,  # type: ignore[arg-type]
            stack,
            idle_timeout=timeouts.idle,
            request_headers_timeout=timeouts.request_headers,
            retry_buffer=self.config.bootstrap.spec.retry_buffer_bytes,
            server_codec=self.codecs.server,
        )
        await listener.start()
        self.listeners[name] = listener

    def _sweep(self, now: float) -> None:
        for listener in self.listeners.values():
            listener.sweep(now)
        if self.pools is not None:
            self.pools.sweep(now)

    # -- lifecycle ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain)

    def begin_drain(self) -> None:
        if self.state is not State.LIVE:
            return
        self.state = State.DRAINING
        log.info("draining: %d connection(s) open", self.active_connections)
        for listener in self.listeners.values():
            listener.start_drain()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.bootstrap.spec.drain_duration
        # Bounded poll: the drain ends when no connection is left or at drainDuration.
        while self.active_connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        self.stop()

    def stop(self) -> None:
        self._stopped.set()

    @property
    def active_connections(self) -> int:
        return sum(listener.active for listener in self.listeners.values())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        self.state = State.STOPPED
        if self._sweeper is not None:
            self._sweeper.stop()
        for listener in self.listeners.values():
            await listener.close()
        if self.pools is not None:
            await self.pools.close()
        if self.admin is not None:
            await self.admin.close()
        if self.prometheus is not None:
            await self.prometheus.close()
        if self.access_log is not None:
            # After the listeners: the last requests' lines are queued. Joined off the loop.
            await asyncio.to_thread(self.access_log.close)
        if self.tracer is not None:
            await self.tracer.aclose()  # the last spans, flushed off the loop (bounded)
        task = self._drain_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def serve(self) -> None:
        """Start, run until drained or told to quit, then close."""
        await self.start()
        try:
            await self.wait_stopped()
        finally:
            await self.close()

    # -- admin ----------------------------------------------------------------------------------
    def _admin_routes(self) -> dict[tuple[str, str], AdminRoute]:
        return {
            ("GET", "/"): self._admin_page,
            ("GET", "/dashboard.json"): self._dashboard_json,
            ("GET", "/ready"): self._ready,
            ("GET", "/config_dump"): self._config_dump,
            ("GET", "/clusters"): self._clusters,
            ("GET", "/listeners"): self._listeners,
            ("GET", "/server_info"): self._server_info,
            ("GET", "/stats/prometheus"): self._stats_prometheus,
            ("GET", "/route"): WithRequest(self._route),
            ("POST", "/quitquitquit"): self._quit,
            ("POST", "/drain_listeners"): self._drain_listeners,
            ("POST", "/healthcheck/fail"): self._healthcheck_fail,
            ("POST", "/healthcheck/ok"): self._healthcheck_ok,
        }

    def _ready(self) -> AdminResponse:
        if self.state is State.LIVE and not self._health_failed:
            return AdminResponse(status=200, body=b"LIVE\n")
        # Envoy: after POST /healthcheck/fail the server reports DRAINING (reference §2.8).
        state = State.DRAINING if self._health_failed else self.state
        return AdminResponse(status=503, body=f"{state.value}\n".encode())

    def _healthcheck_fail(self) -> AdminResponse:
        self._health_failed = True
        return AdminResponse(status=200, body=b"OK\n")

    def _healthcheck_ok(self) -> AdminResponse:
        self._health_failed = False
        return AdminResponse(status=200, body=b"OK\n")

    def _config_dump(self) -> AdminResponse:
        dump = to_jsonable(self.config)
        return _json(dump)

    def _clusters(self) -> AdminResponse:
        """Per cluster: its limits and their use, each endpoint's connections, requests and
        health (ejected until when), and the retry, overflow, timeout and ejection counters."""
        assert self.pools is not None
        now = asyncio.get_running_loop().time()
        clusters: dict[str, dict[str, object]] = {}
        for state in self.pools.states():
            snap = state.snapshot(now)
            name = state.cluster.name
            if name in clusters:  # passthrough destinations share one cluster name
                merged = clusters[name]
                merged["endpoints"] = [*merged["endpoints"], *snap["endpoints"]]  # type: ignore[misc]
            else:
                clusters[name] = snap
        return _json({"clusters": list(clusters.values())})

    def _listeners(self) -> AdminResponse:
        return _json(
            {
                name: {
                    "address": f"{lst.address.host}:{lst.port}",
                    "active_connections": lst.active,
                }
                for name, lst in self.listeners.items()
            }
        )

    def _server_info(self) -> AdminResponse:
        return _json(
            {
                "version": __version__,
                "state": self.state.value,
                "uptime_seconds": int(time.time() - self._started_at),
                "node": {
                    "name": self.config.bootstrap.metadata.name,
                    "namespace": self.config.bootstrap.metadata.namespace,
                },
            }
        )

    def _route(self, request: AdminRequest) -> AdminResponse:
        """``GET /route?url=...&method=...&header=name:value``: the route explainer, live config."""
        url = request.param("url")
        if not url:
            return AdminResponse(
                status=400, body=b"usage: /route?url=URL[&method=M][&header=n:v]\n"
            )
        headers: dict[str, str] = {}
        for item in request.params("header"):
            name, sep, value = item.partition(":")
            name = name.strip().lower()
            if not sep or not name:
                return AdminResponse(status=400, body=b"header must be name:value\n")
            value = value.strip()
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        if self.hosts is None or self.routes is None:
            return AdminResponse(status=503, body=b"not started\n")
        try:
            expl = explain_request(
                self.hosts,
                self.routes,
                method=request.param("method") or "GET",
                url=url,
                headers=headers,
            )
        except ValueError as exc:
            return AdminResponse(status=400, body=f"{exc}\n".encode())
        return _json(to_json(expl))

    def _stats_prometheus(self) -> AdminResponse:
        """Istio's standard metrics and the proxy's internals, Prometheus text format."""
        if self.metrics is None:
            return AdminResponse(status=503, body=b"not started\n")
        return AdminResponse(status=200, body=self.metrics.exposition(), content_type=CONTENT_TYPE)

    def _admin_page(self) -> AdminResponse:
        return AdminResponse(status=200, body=PAGE, content_type=b"text/html; charset=utf-8")

    def _dashboard_json(self) -> AdminResponse:
        """The admin page's data: rates, latency and errors by destination, clusters, recent
        requests (telemetry/dashboard.py), and this proxy's name, state and access log counters."""
        if self.dashboard is None:
            return AdminResponse(status=503, body=b"not started\n")
        data = self.dashboard.snapshot()
        meta = self.config.bootstrap.metadata
        data["server"] = {"node": f"{meta.name}.{meta.namespace}", "state": self.state.value}
        alog = self.access_log
        data["access_log"] = (
            {"written": alog.written, "dropped": alog.dropped, "queued": alog.queued}
            if alog is not None
            else None
        )
        return _json(data)

    def _quit(self) -> AdminResponse:
        # Exit now, for Jobs (Envoy /quitquitquit, istio-agent :15020/quitquitquit).
        asyncio.get_running_loop().call_soon(self.stop)
        return AdminResponse(status=200, body=b"OK\n")

    def _drain_listeners(self) -> AdminResponse:
        asyncio.get_running_loop().call_soon(self.begin_drain)
        return AdminResponse(status=200, body=b"OK\n")


def _json(value: object) -> AdminResponse:
    body = json.dumps(value, indent=2, sort_keys=False).encode() + b"\n"
    return AdminResponse(status=200, body=body, content_type=b"application/json")
