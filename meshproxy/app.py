"""The composition root: configuration in, running listeners out; reload, drain and exit.

Owns the lifetime of one meshproxy process. ``_build`` turns a validated ``MeshConfig`` into a
``Runtime`` (host and route tables, pools, one stack per listener): the one place per-config
objects are made. ``start`` starts the admin server, awaits the readiness gates (certificates,
once mTLS lands), binds every listener, and only then reports ready (``GET /ready`` 200 LIVE).

Hot reload (the ``run -c`` files are stat-polled every second; SIGHUP reloads at once): the whole
config is re-read and re-validated, a new Runtime built, listeners whose address changed bound
anew, and then, without an await, everything is swapped: new requests (on kept-alive connections
too: a connection reads its listener's stack per request) use the new objects, requests in flight
finish on the old ones, replaced listeners drain, and pools of clusters that changed close as their
connections come back idle. Unchanged clusters keep their pools. An invalid config, or an address
that cannot be bound, is rejected whole: logged (file, line, field), counted in
``meshproxy_config_reloads_total{result="rejected"}``, and the old config keeps serving.

Shutdown (SIGTERM/SIGINT; the order is in ``_drain``): the inbound side drains at once while the
outbound side serves the app until it goes quiet; the process exits when no connection is left or
at ``drainDuration``. ``POST /quitquitquit`` exits at once.

Rules: the only place where config meets I/O; every task it starts is owned and awaited; a swap
never awaits half-way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from meshproxy import __version__
from meshproxy.config.istio import metrics_enabled
from meshproxy.config.load import load_paths
from meshproxy.config.model import (
    AccessLogFormat,
    HostPort,
    MeshConfig,
    MtlsMode,
    TracingExporter,
    WorkloadTLS,
    yaml_key,
)
from meshproxy.core.authz import Authorizer
from meshproxy.core.codecs import codec_factory
from meshproxy.core.identity import spiffe_uri
from meshproxy.core.peerauth import effective_mtls
from meshproxy.core.record import Direction
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import Cluster, HostTable, inbound_cluster
from meshproxy.errors import CertificateError, ConfigError
from meshproxy.io.admin import AdminRequest, AdminResponse, AdminRoute, AdminServer, WithRequest
from meshproxy.io.downstream import Phase
from meshproxy.io.handler import Handler
from meshproxy.io.listener import InboundTLS, Listener, Sweeper
from meshproxy.io.pool import ClusterState, PoolManager
from meshproxy.io.tls import ClientContexts, WorkloadCredentials
from meshproxy.io.watch import FileWatcher
from meshproxy.layers.tracing import TracingStep, tracing_policy
from meshproxy.stacks.inbound import InboundStack
from meshproxy.stacks.outbound import OutboundStack
from meshproxy.telemetry.access_log import AccessLog, build_access_log
from meshproxy.telemetry.dashboard import PAGE, Dashboard
from meshproxy.telemetry.metrics import CONTENT_TYPE, MeshMetrics
from meshproxy.telemetry.sinks import RecordSink

if TYPE_CHECKING:
    from meshproxy.telemetry.tracing import SpanReporter

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


# Something that must have happened before the proxy reports ready and binds its listeners:
# awaited in order by App.start (e.g. the workload certificates loaded, for mTLS).
ReadinessGate = Callable[[], Awaitable[None]]

# Shutdown: once the inbound side is empty, the outbound listener keeps serving the app until it
# has sent nothing for this long (its connections idle), then drains too. Istio's agent waits
# MINIMUM_DRAIN_DURATION (5 s) before polling for zero connections; one second without a request
# is enough to tell an app that stopped from one between two calls, and drainDuration caps it all.
OUTBOUND_QUIET = 1.0
# How often the drain looks at its exit conditions (a bounded poll, not a timer per connection).
_DRAIN_POLL = 0.02
# How often the config files are stat-polled for changes (SIGHUP reloads at once).
RELOAD_POLL = 1.0


@dataclasses.dataclass(slots=True, kw_only=True)
class Runtime:
    """Everything built from one configuration version: what a reload swaps whole.

    ``App._build`` is the one function that makes it; add more per-config objects (mTLS peer
    authentication modes, the authorizer, TLS contexts) there and here, and read them from the
    stacks it builds. Stacks hold what they need; listeners read their stack per request.
    """

    config: MeshConfig
    version: int
    loaded_at: float  # wall clock, for /config_dump
    hosts: HostTable
    routes: RouteTable
    pools: PoolManager
    clusters: tuple[Cluster, ...]
    handlers: dict[str, Handler]  # listener name -> its stack
    addresses: dict[str, HostPort]  # listener name -> where it listens
    # listener name -> its mTLS termination (PeerAuthentication mode; None: plaintext only)
    tls: dict[str, InboundTLS | None]
    retired: list[ClusterState]  # the previous runtime's cluster states this one dropped


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReloadResult:
    """What one reload did: accepted (now serving ``version``) or rejected with its errors."""

    accepted: bool
    version: int
    errors: tuple[str, ...] = ()


def _credential_settings(config: MeshConfig) -> WorkloadTLS | None:
    """``spec.tls`` less what a reload may change (the handshake timeout, read per listener)."""
    tls = config.bootstrap.spec.tls
    if tls is None:
        return None
    return dataclasses.replace(tls, handshake_timeout=WorkloadTLS().handshake_timeout)


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
        config_paths: Sequence[str] = (),
        readiness_gates: Sequence[ReadinessGate] = (),
        worker: tuple[int, int] | None = None,
    ) -> None:
        self.config = config
        # (index, count) when this process is one of several workers (meshproxy/workers.py):
        # its listeners share their ports through SO_REUSEPORT and it holds its share of each
        # cluster's limits.
        self.worker = worker
        # This workload's certificate (spec.tls): loaded before anything is built, rotated by
        # its own watcher; the outbound contexts follow it.
        self.credentials: WorkloadCredentials | None = None
        self._contexts: ClientContexts | None = None
        self.state = State.STARTING
        self.listeners: dict[str, Listener] = {}
        self.admin: AdminServer | None = None
        # Istio's metrics and the proxy's internals; a second scrape-only server as Istio's :15090.
        self.metrics: MeshMetrics | None = None
        self.prometheus: AdminServer | None = None
        # Readiness only, for the kubelet (Istio's :15021 /healthz/ready); spec.health.
        self.health: AdminServer | None = None
        self.pools: PoolManager | None = None
        # Spans of sampled requests (None: the bootstrap's tracing exporter is `none`).
        self.tracer: SpanReporter | None = None
        # The live routing tables, for the admin /route explainer.
        self.hosts: HostTable | None = None
        self.routes: RouteTable | None = None
        # The objects built from the config now serving (see Runtime); replaced by a reload.
        self.runtime: Runtime | None = None
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
        # Awaited, in order, before the listeners bind and /ready says LIVE (mTLS: certificates).
        self.readiness_gates: list[ReadinessGate] = list(readiness_gates)
        # Hot reload: the files `run -c` named (watched, and re-read on SIGHUP).
        self.config_paths = tuple(config_paths)
        self.on_reload: Callable[[ReloadResult], None] | None = None
        self._watcher: FileWatcher | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        # Listeners replaced by a reload, draining until empty (or drainDuration), then closed;
        # cluster states a reload dropped, closed as their connections become idle.
        self._retiring: set[Listener] = set()
        self._retired_states: list[ClusterState] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # spec.http1Codec: the HTTP/1.1 parser both sides use (issue #7); chosen for the process's
        # lifetime (a reload keeps it: pooled connections and listeners carry their codec).
        self.codecs = codec_factory(config.bootstrap.spec.http1_codec)

    # -- start ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build, start the admin server, pass the readiness gates, bind the listeners: LIVE.

        Ready means: the configuration loaded (it was, to construct the App), every readiness
        gate passed (certificates, once mTLS lands) and every listener bound. The admin server
        comes first so that a probe sees 503 STARTING rather than a refused connection while a
        gate is pending.
        """
        spec = self.config.bootstrap.spec
        loop = asyncio.get_running_loop()
        self.access_log = build_access_log(
            self.config, loop.time(), out=self._access_log_out, format=self._access_log_format
        )
        # Traces: sampled requests' spans, exported off the loop (exporter `none`: tracing off).
        if spec.telemetry.tracing.exporter is not TracingExporter.NONE:
            # Imported only when tracing is on: the OpenTelemetry SDK costs ~20 ms of start-up.
            from meshproxy.telemetry.tracing import span_reporter

            self.tracer = span_reporter(self.config)
        self.dashboard = Dashboard(lambda: self._cluster_snapshots(loop.time()), loop.time)
        # Certificates before anything is built: auto mTLS needs to know whether this workload
        # has one, and ready means they are loaded. A certificate that cannot be loaded stops
        # the start (CertificateError names the failed check).
        if spec.tls is not None:
            meta = self.config.bootstrap.metadata
            self.credentials = WorkloadCredentials(
                spec.tls,
                base=Path.cwd(),
                namespace=meta.namespace,
                service_account=spec.service_account,
            )
            try:
                self.credentials.load()
            except CertificateError:
                await self.close()
                raise
            self.credentials.start_watching()
        self._contexts = ClientContexts(self.credentials)
        runtime = self._build(self.config, None)
        self._commit(runtime)
        try:
            self.admin = AdminServer(spec.admin, self._admin_routes())
            await self.admin.start()
            if spec.telemetry.prometheus is not None:
                scrape = {("GET", "/stats/prometheus"): self._stats_prometheus}
                self.prometheus = AdminServer(spec.telemetry.prometheus, scrape)
                await self.prometheus.start()
            if spec.health is not None:
                # The same answer as the admin /ready, and nothing else: this port may face the
                # pod network, so it must never serve /quitquitquit or /healthcheck/fail.
                probe = {("GET", "/healthz/ready"): self._ready, ("GET", "/ready"): self._ready}
                self.health = AdminServer(spec.health, probe)
                await self.health.start()
            for gate in self.readiness_gates:
                await gate()
            for name, address in runtime.addresses.items():
                self.listeners[name] = await self._listen(
                    name, address, runtime.handlers[name], runtime.tls[name]
                )
        except BaseException:  # a bind that failed, a gate that raised, a cancelled start
            await self.close()
            raise
        self._start_sweeper()
        if self.config_paths:
            self._watcher = FileWatcher(self.config_paths, RELOAD_POLL, self.request_reload)
            self._watcher.start()
        self.state = State.LIVE

    def _sinks(self, config: MeshConfig) -> list[RecordSink]:
        """Where finished requests' records go under ``config`` (metrics may be turned off)."""
        sinks: list[RecordSink] = list(self._record_sinks)
        if self.access_log is not None:
            sinks.insert(0, self.access_log.write)
        assert self.metrics is not None
        if metrics_enabled(config):  # a Telemetry resource may turn Istio's metrics off
            sinks.append(self.metrics.sink)
        if self.dashboard is not None:
            sinks.append(self.dashboard.record)
        if self.tracer is not None:
            sinks.append(self.tracer.write)
        return sinks

    def _build(self, config: MeshConfig, previous: Runtime | None) -> Runtime:
        """The runtime objects for ``config``: tables, pools, stacks (synchronous; nothing
        starts, nothing of ``previous`` changes, so a reload that fails later just drops it).

        Raises ValueError when the tables cannot be built. The seam for per-config objects:
        mTLS contexts, peer authentication and the authorizer belong here (and in Runtime).
        """
        spec = config.bootstrap.spec
        loop = asyncio.get_running_loop()
        hosts = HostTable(config)
        routes = RouteTable(config, hosts)
        app_cluster = (
            inbound_cluster(spec.inbound.address.port, spec.inbound.app.host, spec.inbound.app.port)
            if spec.inbound is not None
            else None
        )
        clusters = list(hosts.clusters.values())
        if app_cluster is not None:
            clusters.append(app_cluster)
        # Unchanged clusters keep their pools, limits and ejections across a reload.
        retired: list[ClusterState] = []
        if previous is None:
            pools = PoolManager(
                clusters,
                self._contexts,
                self.worker[1] if self.worker is not None else 1,
                client_codec=self.codecs.client,
            )
        else:
            pools, retired = previous.pools.successor(clusters)
        if self.metrics is None:
            self.metrics = MeshMetrics(
                config,
                clusters,
                cluster_snapshots=lambda: self._cluster_snapshots(loop.time()),
                listener_snapshots=lambda: [(n, lst.active) for n, lst in self.listeners.items()],
                certificates=self._certificate_expiries,
                tls_refusals=lambda: [
                    (name, reason, count)
                    for name, lst in self.listeners.items()
                    for reason, count in lst.tls_failures.items()
                ],
            )
        sinks = self._sinks(config)
        handlers: dict[str, Handler] = {}
        addresses: dict[str, HostPort] = {}
        tls: dict[str, InboundTLS | None] = {}
        if spec.outbound is not None:
            handlers["outbound"] = OutboundStack(
                hosts,
                routes,
                pools,
                self._rng,
                loop.time,
                sinks,
                tracing=self._trace_step(config, Direction.OUTBOUND, 80),
            )
            addresses["outbound"] = spec.outbound.address
            tls["outbound"] = None
        if spec.inbound is not None and app_cluster is not None:
            meta = config.bootstrap.metadata
            handlers["inbound"] = InboundStack(
                app_cluster,
                pools,
                self._rng,
                sinks,
                tracing=self._trace_step(config, Direction.INBOUND, spec.inbound.app.port),
                authorizer=Authorizer.from_config(config),
                own_uri=spiffe_uri(spec.trust_domain, meta.namespace, spec.service_account),
                app_port=spec.inbound.app.port,
            )
            addresses["inbound"] = spec.inbound.address
            tls["inbound"] = self._inbound_tls(config)
        return Runtime(
            config=config,
            version=previous.version + 1 if previous is not None else 1,
            loaded_at=time.time(),
            hosts=hosts,
            routes=routes,
            pools=pools,
            clusters=tuple(clusters),
            handlers=handlers,
            addresses=addresses,
            tls=tls,
            retired=retired,
        )

    def _commit(self, runtime: Runtime) -> None:
        """Make ``runtime`` the one serving new requests (no await: atomic for the loop)."""
        if self.runtime is not None and self.metrics is not None:
            self.metrics.load(runtime.config, runtime.clusters)
        self.runtime = runtime
        self.config = runtime.config
        self.hosts = runtime.hosts
        self.routes = runtime.routes
        self.pools = runtime.pools
        for state in runtime.retired:
            if not state.close_idle():
                self._retired_states.append(state)
        timeouts = runtime.config.bootstrap.spec.timeouts
        for name, listener in self.listeners.items():
            listener.handler = runtime.handlers[name]
            listener.idle_timeout = timeouts.idle
            listener.request_headers_timeout = timeouts.request_headers
            listener.retry_buffer = runtime.config.bootstrap.spec.retry_buffer_bytes

    def _cluster_snapshots(self, now: float) -> list[dict[str, object]]:
        pools = self.pools
        return [s.snapshot(now) for s in pools.states()] if pools is not None else []

    def _start_sweeper(self) -> None:
        # One sweep serves every timeout; it runs at a quarter of the shortest (at most 1 s).
        assert self.runtime is not None and self.pools is not None
        timeouts = self.config.bootstrap.spec.timeouts
        states = self.pools.states()
        shortest = min(
            [
                timeouts.request_headers,
                timeouts.idle,
                *(c.idle_timeout for c in self.runtime.clusters),
                *(s.max_duration for s in states if s.max_duration),
                *(s.outlier.settings.interval for s in states if s.outlier),
            ]
        )
        period = min(1.0, max(shortest / 4, 0.01))
        if self._sweeper is not None:
            self._sweeper.stop()
        self._sweeper = Sweeper(period, self._sweep)
        self._sweeper.start()

    def _trace_step(
        self, config: MeshConfig, direction: Direction, default_port: int
    ) -> TracingStep | None:
        if self.tracer is None:
            return None
        policy = tracing_policy(config, direction, os.environ)
        # Ids and draws from the system's entropy: unique even when a test fixes the seed.
        return TracingStep(policy, direction, random.Random(), default_port)

    def _inbound_tls(self, config: MeshConfig) -> InboundTLS | None:
        """mTLS on the inbound listener: the PeerAuthentication mode for the app's port (Istio
        keys portLevelMtls by the workload port). Without a certificate there is nothing to
        terminate with: plaintext (validation refuses STRICT without spec.tls)."""
        spec = config.bootstrap.spec
        assert spec.inbound is not None
        mode = effective_mtls(config, spec.inbound.app.port)
        if mode is MtlsMode.DISABLE or self.credentials is None or spec.tls is None:
            return None
        return InboundTLS(
            mode=mode,
            credentials=self.credentials,
            handshake_timeout=spec.tls.handshake_timeout,
        )

    def _certificate_expiries(self) -> list[tuple[str, float]]:
        return self.credentials.expiries() if self.credentials is not None else []

    async def _listen(
        self,
        name: str,
        address: HostPort,
        handler: Handler,
        tls: InboundTLS | None = None,
        sock: socket.socket | None = None,
    ) -> Listener:
        spec = self.config.bootstrap.spec
        listener = Listener(
            name,
            address,
            handler,
            idle_timeout=spec.timeouts.idle,
            request_headers_timeout=spec.timeouts.request_headers,
            retry_buffer=spec.retry_buffer_bytes,
            tls=tls,
            reuse_port=self.worker is not None,
            # Only outbound routes by where the app connected (transparent capture, issue #8).
            original_dst=name == "outbound",
            server_codec=self.codecs.server,
        )
        await listener.start(sock)
        return listener

    def _sweep(self, now: float) -> None:
        for listener in self.listeners.values():
            listener.sweep(now)
        for listener in self._retiring:
            listener.sweep(now)
        if self.pools is not None:
            self.pools.sweep(now)
        if self._retired_states:
            # Connections of dropped clusters close as they come back idle, never mid-request.
            self._retired_states = [s for s in self._retired_states if not s.close_idle()]

    # -- reload ---------------------------------------------------------------------------------
    def request_reload(self) -> None:
        """Reload soon (SIGHUP, or the files changed). One reload runs at a time: requests made
        before it reads the files are served by it; one made while it runs (it may have read the
        files too early) makes it run once more."""
        if self.state is not State.LIVE:
            return
        task = self._reload_task
        if task is not None and not task.done():
            self._reload_again = True
            return
        self._reload_task = self._own(self._reload_loop(), "reload")

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again or self.state is not State.LIVE:
                return

    async def reload(self, config: MeshConfig | None = None) -> ReloadResult:
        """Re-read the config files (or take ``config``), validate, build and swap, or reject.

        All or nothing: an invalid config, tables that cannot be built, or a new listener address
        that cannot be bound leave the running config untouched; the errors are logged (file,
        line, field) and counted in ``meshproxy_config_reloads_total{result="rejected"}``.
        """
        previous = self.runtime
        assert previous is not None and self.metrics is not None
        if config is None:
            if self._watcher is not None:
                self._watcher.rebase()  # a change from here on triggers the next reload
            try:
                config = await asyncio.to_thread(load_paths, self.config_paths)
            except ConfigError as exc:
                return self._rejected(previous, [str(issue) for issue in exc.issues])
        if _credential_settings(config) != _credential_settings(previous.config):
            # The credentials (and the mTLS they allow) are loaded once, at start; swapping the
            # rest around them would, e.g., accept a STRICT inbound with no certificate loaded
            # and serve it in plaintext. The certificate files themselves rotate without this.
            return self._rejected(
                previous,
                [
                    "spec.tls changed: the workload certificate settings apply at start; "
                    "restart to change them (rewritten certificate files rotate on their own)"
                ],
            )
        try:
            runtime = self._build(config, previous)
        except ValueError as exc:  # validation should have caught it; reject, don't crash
            return self._rejected(previous, [str(exc)])
        if self.state is not State.LIVE:
            return self._rejected(previous, [f"not reloading while {self.state.value}"])
        # Listeners whose address changed (or that are new) are bound first; only when all of
        # them are does anything change. The ones they replace then drain.
        bound: dict[str, Listener] = {}
        try:
            for name, address in runtime.addresses.items():
                current = self.listeners.get(name)
                # A new address, or a new mTLS mode (PeerAuthentication changed): a new listener;
                # the old one drains. Certificates rotate without it (io/tls.py).
                if (
                    current is None
                    or current.address != address
                    or current.tls != runtime.tls[name]
                ):
                    # Same address, new mTLS mode: the port cannot be bound again while the old
                    # listener listens, so the new one takes over its socket (a second
                    # descriptor; the old one's close then leaves it listening).
                    adopted = (
                        current.listening_socket()
                        if current is not None and current.address == address
                        else None
                    )
                    bound[name] = await self._listen(
                        name, address, runtime.handlers[name], runtime.tls[name], adopted
                    )
        except OSError as exc:
            for listener in bound.values():
                await listener.close()
            return self._rejected(previous, [f"cannot listen: {exc}"])
        if self.state is not State.LIVE:  # SIGTERM arrived while binding: keep the old config
            for listener in bound.values():
                await listener.close()
            return self._rejected(previous, [f"not reloading while {self.state.value}"])
        # From here to the end: no await, so no request sees half of the swap.
        listeners: dict[str, Listener] = {}
        for name in runtime.addresses:
            listeners[name] = bound.get(name) or self.listeners[name]
        for name, old in self.listeners.items():
            if listeners.get(name) is not old:
                self._retire(old)
        self.listeners = listeners
        self._commit(runtime)
        self._start_sweeper()
        self.metrics.reload_accepted()
        log.info(
            "config version %d loaded: %d file(s)", runtime.version, len(runtime.config.sources)
        )
        return self._reported(ReloadResult(accepted=True, version=runtime.version))

    def _rejected(self, previous: Runtime, errors: list[str]) -> ReloadResult:
        assert self.metrics is not None
        self.metrics.reload_rejected()
        for error in errors:
            log.error("config reload rejected: %s", error)
        log.error(
            "config reload rejected: %d error(s); still serving version %d",
            len(errors),
            previous.version,
        )
        result = ReloadResult(accepted=False, version=previous.version, errors=tuple(errors))
        return self._reported(result)

    def _reported(self, result: ReloadResult) -> ReloadResult:
        if self.on_reload is not None:
            self.on_reload(result)
        return result

    def _retire(self, listener: Listener) -> None:
        """A listener a reload replaced: stop accepting, let its requests finish, then close."""
        listener.start_drain()
        self._retiring.add(listener)
        self._own(self._close_when_drained(listener), f"retire listener {listener.name}")

    async def _close_when_drained(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.bootstrap.spec.drain_duration
        try:
            while listener.active and loop.time() < deadline:
                await asyncio.sleep(_DRAIN_POLL)
        finally:
            self._retiring.discard(listener)
            await listener.close()

    def _own(self, coro: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- lifecycle ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain)
        if self.config_paths:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def begin_drain(self) -> None:
        """SIGTERM: drain the inbound side; keep the outbound side serving the app (see _drain)."""
        if self.state is not State.LIVE:
            return
        self.state = State.DRAINING
        log.info("draining: %d connection(s) open", self.active_connections)
        if self._watcher is not None:
            self._watcher.stop()
        for listener in self.listeners.values():
            if listener.handler.direction is Direction.INBOUND:
                listener.start_drain()
        self._drain_task = self._own(self._drain(), "drain")

    async def _drain(self) -> None:
        """The shutdown order (reference §6 #2, #4): one deadline, drainDuration, and

        1. at once: inbound listeners stop accepting, close idle connections, and answer their
           in-flight requests with ``connection: close``; /ready says 503 DRAINING;
        2. meanwhile the outbound listener serves the app as before (new connections too), so
           calls the app makes while it finishes its work, or shuts down, still succeed;
        3. once the inbound side is empty and the app has sent nothing for OUTBOUND_QUIET seconds
           (no outbound request in flight), the outbound listener drains as well;
        4. the process exits as soon as no connection is left on any listener
           (``EXIT_ON_ZERO_ACTIVE_CONNECTIONS``), or when drainDuration has passed, whichever
           comes first. ``POST /quitquitquit`` exits at once at any time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.bootstrap.spec.drain_duration
        inbound_empty_at: float | None = None
        while self.active_connections and loop.time() < deadline:
            now = loop.time()
            open_listeners = [lst for lst in self.listeners.values() if not lst.draining]
            if open_listeners:
                inbound = sum(lst.active for lst in self.listeners.values() if lst.draining)
                if inbound:
                    inbound_empty_at = None
                else:
                    inbound_empty_at = inbound_empty_at or now
                    if self._quiet_since(open_listeners, inbound_empty_at) + OUTBOUND_QUIET <= now:
                        log.info("outbound quiet for %.1fs: draining it", OUTBOUND_QUIET)
                        for listener in open_listeners:
                            listener.start_drain()
            await asyncio.sleep(_DRAIN_POLL)
        self.stop()

    @staticmethod
    def _quiet_since(listeners: Sequence[Listener], floor: float) -> float:
        """When the app last used these listeners: the end of its last request (``inf`` while
        one is in flight), no earlier than ``floor``."""
        since = floor
        for listener in listeners:
            for conn in listener.connections:
                if conn.phase is not Phase.IDLE:
                    return float("inf")
                since = max(since, conn.since)
        return since

    def stop(self) -> None:
        self._stopped.set()

    @property
    def active_connections(self) -> int:
        listeners = [*self.listeners.values(), *self._retiring]
        return sum(listener.active for listener in listeners)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        self.state = State.STOPPED
        if self._sweeper is not None:
            self._sweeper.stop()
        if self._watcher is not None:
            self._watcher.stop()
        for listener in [*self.listeners.values(), *self._retiring]:
            await listener.close()
        for state in self._retired_states:
            for pool in state.pools:
                pool.close_all()
        if self.pools is not None:
            await self.pools.close()
        if self.admin is not None:
            await self.admin.close()
        if self.prometheus is not None:
            await self.prometheus.close()
        if self.health is not None:
            await self.health.close()
        if self.access_log is not None:
            # After the listeners: the last requests' lines are queued. Joined off the loop.
            await asyncio.to_thread(self.access_log.close)
        if self.tracer is not None:
            await self.tracer.aclose()  # the last spans, flushed off the loop (bounded)
        if self.credentials is not None:
            await self.credentials.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

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
            ("GET", "/certs"): self._certs,
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
        """The config now serving, with its version (1 at start, +1 per accepted reload) and
        when it was loaded (RFC 3339, UTC)."""
        dump = to_jsonable(self.config)
        runtime = self.runtime
        if isinstance(dump, dict) and runtime is not None:
            loaded = datetime.datetime.fromtimestamp(runtime.loaded_at, datetime.UTC)
            dump = {
                "version": runtime.version,
                "loadedAt": loaded.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                **dump,
            }
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
                    "mtls": lst.tls.mode.value if lst.tls is not None else "DISABLE",
                    "tls_refused": dict(lst.tls_failures),
                }
                for name, lst in self.listeners.items()
            }
        )

    def _certs(self) -> AdminResponse:
        """Envoy's ``/certs``: the certificates this proxy holds (SPIFFE ID, serial, validity),
        how many rotations were applied or refused; never a key."""
        creds = self.credentials
        if creds is None:
            return _json({"certificates": []})
        return _json(
            {
                "certificates": creds.describe(),
                "rotations": creds.rotations,
                "rejected": creds.rejected,
                "last_error": creds.last_error,
            }
        )

    def _server_info(self) -> AdminResponse:
        return _json(
            {
                "version": __version__,
                "state": self.state.value,
                "uptime_seconds": int(time.time() - self._started_at),
                "config_version": self.runtime.version if self.runtime is not None else 0,
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
        # Imported on first use: an operator's tool, not worth its import at every start-up.
        from meshproxy.core.explain import explain_request, to_json

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
