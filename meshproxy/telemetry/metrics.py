"""Prometheus metrics: Istio's standard request metrics and the proxy's own internals.

Owns the proxy's ``CollectorRegistry`` (never prometheus_client's global one) and everything in it:

- Istio's standard metrics (reference §3.1; istio.io ``docs/reference/config/metrics``), with Istio's
  names, types and label set in Istio's order: ``istio_requests_total``,
  ``istio_request_duration_milliseconds``, ``istio_request_bytes``, ``istio_response_bytes`` and,
  for upgraded (101, tunnelled) connections, the ``istio_tcp_*`` counters with
  ``request_protocol="tcp"``. Histograms use Envoy's default buckets in milliseconds (reference
  §2.8). They are fed by ``MeshMetrics.sink``, the ``RecordSink`` the stacks call once per
  finished request.
- Proxy internals in Envoy's spirit (``meshproxy_cluster_*``, ``meshproxy_listener_*``), read at
  scrape time from snapshot callables the composition root passes in, so this module never touches
  pools or listeners (``telemetry`` never imports ``io``, ``layers`` or ``stacks``).
- Config reload counters (fed by ``App.reload``) and a certificate expiry gauge (the workload
  certificate and each root of its trust bundle).

Rules: label values are bounded. Every value comes from the config (workload, cluster, service,
endpoint labels), from a fixed set (reporter, flags, policy) or is the response code; raw paths
and hosts never become labels. The label values for each (cluster, endpoint) pair are computed once,
at config load; per-label-set children are bound once and cached, so a request costs two dict
lookups, one counter increment and three histogram observations. On the inbound side a request
that came over mTLS is reported ``mutual_tls`` with the caller's SPIFFE ID as
``source_principal`` (at most 1,024 distinct principals, then ``unknown``); the rest of the peer's
identity (workload, namespace) needs Istio's metadata exchange and stays ``unknown``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from meshproxy.config.istio import CLUSTER_DOMAIN, DEFAULT_NAMESPACE, fqdn
from meshproxy.config.model import MeshConfig
from meshproxy.core.identity import spiffe_uri
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routing import PASSTHROUGH_NAME, Cluster, ClusterKind, host_aliases

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST.encode()
"""The exposition's content type (Prometheus text format), for the HTTP response."""

UNKNOWN: Final = "unknown"
BLACKHOLE_NAME: Final = "BlackHoleCluster"  # Istio's cluster for REGISTRY_ONLY misses

# Envoy's default histogram buckets, in milliseconds (reference §2.8, observed on Envoy 1.40;
# Envoy source/common/stats/histogram_impl.h). Istio keeps them for every istio_* histogram unless
# the pod annotation sidecar.istio.io/statsHistogramBuckets overrides them. +Inf is implicit.
ENVOY_BUCKETS: Final = (
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    300000.0,
    600000.0,
    1800000.0,
    3600000.0,
)

# Istio's labels in Istio's order (reference §3.1, istio/proxy istio_stats.cc). The first twenty
# describe the two workloads and the service; they are fixed per (direction, cluster, endpoint).
PEER_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
)
HTTP_LABELS: Final = (
    *PEER_LABELS,
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
)
_SOURCE_PRINCIPAL: Final = PEER_LABELS.index("source_principal")
# Distinct callers' principals kept as label values; beyond this they are reported "unknown".
_SECURE_PEERS_MAX: Final = 1024
# TCP metrics carry no response code or gRPC status (reference §3.1: "HTTP only", "gRPC only").
TCP_LABELS: Final = (
    *PEER_LABELS,
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

# Istio's canonical service and revision labels, then its fallbacks (istio/istio
# pkg/model/labels: canonical-name > app.kubernetes.io/name > app; revision likewise > "latest").
_CANONICAL_NAME = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)

ClusterSnapshots = Callable[[], Iterable[Mapping[str, object]]]
"""Each cluster state's ``/clusters`` snapshot (name, limits, counters, endpoints, outlier)."""
ListenerSnapshots = Callable[[], Iterable[tuple[str, int]]]
"""(listener, reason, count) for each reason a listener refused connections at the TLS layer."""
TlsRefusals = Callable[[], Iterable[tuple[str, str, int]]]
"""(listener name, active downstream connections) for each listener."""
CertificateExpiries = Callable[[], Iterable[tuple[str, float]]]
"""(certificate name, notAfter as Unix time) for each certificate the proxy holds."""


def _nothing() -> tuple[()]:
    return ()


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """Istio's workload identity, ``spiffe://<trust domain>/ns/<namespace>/sa/<account>``
    (``core.identity.spiffe_uri``, kept under this name for the metric label code)."""
    return spiffe_uri(trust_domain, namespace, service_account)


def _first(labels: Mapping[str, str], keys: Sequence[str]) -> str:
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return ""


def _workload(
    name: str, namespace: str, principal: str, labels: Mapping[str, str], cluster: str
) -> tuple[str, ...]:
    """The seven workload labels plus the cluster label, for one side of a request."""
    canonical = _first(labels, _CANONICAL_NAME) or name
    revision = _first(labels, _CANONICAL_REVISION) or ("latest" if canonical else "")
    return (
        name or UNKNOWN,
        namespace or UNKNOWN,
        principal or UNKNOWN,
        labels.get("app") or UNKNOWN,
        labels.get("version") or UNKNOWN,
        canonical or UNKNOWN,
        revision or UNKNOWN,
        cluster or UNKNOWN,
    )


_UNKNOWN_WORKLOAD: Final = (UNKNOWN,) * 8


def split_service(service: str, namespaces: Mapping[str, str]) -> tuple[str, str]:
    """(destination_service_name, destination_service_namespace) for a service FQDN.

    ``reviews.default.svc.cluster.local`` gives (reviews, default); any other host is its own
    name, in the namespace of the ServiceEntry that declared it (Istio does the same for
    ServiceEntry hosts).
    """
    suffix = f".svc.{CLUSTER_DOMAIN}"
    if service.endswith(suffix):
        name, _, namespace = service[: -len(suffix)].partition(".")
        return name or UNKNOWN, namespace or UNKNOWN
    return service or UNKNOWN, namespaces.get(service) or UNKNOWN


class _Peer:
    """The fixed label values of one (direction, cluster, endpoint): reporter to
    destination_cluster, and the connection security policy. Hashed by identity."""

    __slots__ = ("security", "values")

    def __init__(self, values: tuple[str, ...], security: str) -> None:
        assert len(values) == len(PEER_LABELS)
        self.values = values
        self.security = security


_BUCKETS: Final = tuple(float(b) for b in ENVOY_BUCKETS)


class _Histogram:
    """One series' buckets (non-cumulative; the last one is +Inf) and sum, exposed cumulatively."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value takes it.
        self.counts[bisect_left(_BUCKETS, value)] += 1
        self.total += value

    def exposed(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0.0
        for bound, count in zip((*_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else _bound_text(bound), running))
        return out


def _bound_text(bound: float) -> str:
    return str(int(bound)) + ".0" if bound.is_integer() else repr(bound)


class _HttpChildren:
    """The series of one full HTTP label set, kept as plain numbers.

    prometheus_client's children take a lock per update; a request updates four of them, which
    measured ~3.5 us a request. Plain counters and bucket arrays, rendered by a collector at
    scrape time, cost a fraction of that (the event loop is the only writer and the scrape runs
    on it too, so no lock is needed).
    """

    __slots__ = ("duration", "request_bytes", "requests", "response_bytes", "values")

    def __init__(self, metrics: MeshMetrics, values: tuple[str, ...]) -> None:
        self.values = values
        self.requests = 0
        self.duration = _Histogram()
        self.request_bytes = _Histogram()
        self.response_bytes = _Histogram()


class _HttpCollector(Collector):
    """istio_requests_total and the three request histograms, from the plain series."""

    def __init__(self, series: Mapping[tuple[_Peer, int, str], _HttpChildren]) -> None:
        self._series = series

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "istio_requests_total",
            "Requests handled by the proxy (Istio standard metric).",
            labels=HTTP_LABELS,
        )
        histograms = [
            (
                HistogramMetricFamily(
                    "istio_request_duration_milliseconds",
                    "Request duration in milliseconds, from the first request byte to the last "
                    "response byte (Istio standard metric).",
                    labels=HTTP_LABELS,
                ),
                "duration",
            ),
            (
                HistogramMetricFamily(
                    "istio_request_bytes",
                    "Request body size in bytes (Istio standard metric).",
                    labels=HTTP_LABELS,
                ),
                "request_bytes",
            ),
            (
                HistogramMetricFamily(
                    "istio_response_bytes",
                    "Response body size in bytes (Istio standard metric).",
                    labels=HTTP_LABELS,
                ),
                "response_bytes",
            ),
        ]
        for series in list(self._series.values()):
            values = list(series.values)
            requests.add_metric(values, float(series.requests))
            for family, attr in histograms:
                hist: _Histogram = getattr(series, attr)
                family.add_metric(values, hist.exposed(), hist.total)
        yield requests
        for family, _ in histograms:
            yield family


class _TcpChildren:
    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self, metrics: MeshMetrics, values: tuple[str, ...]) -> None:
        self.opened = metrics.tcp_opened.labels(*values)
        self.closed = metrics.tcp_closed.labels(*values)
        self.sent = metrics.tcp_sent.labels(*values)
        self.received = metrics.tcp_received.labels(*values)


class MeshMetrics:
    """The proxy's metrics: a registry, Istio's request metrics and the internals collector.

    ``sink`` is the per-request entry point; ``exposition()`` renders the registry for
    ``GET /stats/prometheus``. ``load`` rebuilds the label lookup from a config (a reload calls it
    with the new config; children already bound keep their series).
    """

    __slots__ = (
        "_by_cluster",
        "_by_endpoint",
        "_http",
        "_inbound",
        "_inbound_unknown",
        "_outbound_unknown",
        "_secure",
        "_tcp",
        "config_reloads",
        "registry",
        "tcp_closed",
        "tcp_opened",
        "tcp_received",
        "tcp_sent",
    )

    def __init__(
        self,
        config: MeshConfig,
        clusters: Iterable[Cluster],
        *,
        cluster_snapshots: ClusterSnapshots = _nothing,
        listener_snapshots: ListenerSnapshots = _nothing,
        tls_refusals: TlsRefusals = _nothing,
        certificates: CertificateExpiries = _nothing,
    ) -> None:
        self.registry = registry = CollectorRegistry()
        self._http: dict[tuple[_Peer, int, str], _HttpChildren] = {}
        registry.register(_HttpCollector(self._http))
        # Upgraded (101) connections become byte tunnels: they are counted as TCP connections
        # as well, once, when the tunnel closes (the record is read once, at the end).
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened_total",
            "Tunnelled (upgraded) connections opened, counted when they close (Istio standard "
            "metric).",
            TCP_LABELS,
            registry=registry,
        )
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed_total",
            "Tunnelled (upgraded) connections closed (Istio standard metric).",
            TCP_LABELS,
            registry=registry,
        )
        self.tcp_sent = Counter(
            "istio_tcp_sent_bytes_total",
            "Bytes sent to the downstream client over tunnelled connections (Istio standard "
            "metric).",
            TCP_LABELS,
            registry=registry,
        )
        self.tcp_received = Counter(
            "istio_tcp_received_bytes_total",
            "Bytes received from the downstream client over tunnelled connections (Istio "
            "standard metric).",
            TCP_LABELS,
            registry=registry,
        )
        self.config_reloads = Counter(
            "meshproxy_config_reloads_total",
            "Configuration reloads (file change or SIGHUP) by result: accepted (now serving), "
            "rejected (invalid or unbindable; the previous config keeps serving).",
            ("result",),
            registry=registry,
        )
        for result in ("accepted", "rejected"):
            self.config_reloads.labels(result)
        registry.register(
            _ProxyCollector(cluster_snapshots, listener_snapshots, certificates, tls_refusals)
        )
        self._tcp: dict[tuple[_Peer, str], _TcpChildren] = {}
        self._by_endpoint: dict[tuple[str, str], _Peer] = {}
        self._by_cluster: dict[str, _Peer] = {}
        self._inbound: dict[str, _Peer] = {}
        self._secure: dict[tuple[_Peer, str], _Peer] = {}
        self._outbound_unknown = self._inbound_unknown = _Peer(("",) * len(PEER_LABELS), "")
        self.load(config, clusters)

    # -- config load ----------------------------------------------------------------------------
    def load(self, config: MeshConfig, clusters: Iterable[Cluster]) -> None:
        """Build the label lookup: (cluster, endpoint) -> label values, once per config."""
        meta = config.bootstrap.metadata
        spec = config.bootstrap.spec
        namespace = meta.namespace or DEFAULT_NAMESPACE
        principal = spiffe_id(spec.trust_domain, namespace, spec.service_account)
        # No cluster ID in the bootstrap yet (Istio's is "Kubernetes" by default): unknown.
        own = _workload(meta.name, namespace, principal, meta.labels, "")
        # Which namespace declared each service host (for destination_service_namespace), and
        # every name a caller may put in Host for it (for the inbound destination_service).
        namespaces: dict[str, str] = {}
        aliases: dict[str, str] = {}
        for se in config.service_entries:
            se_ns = se.metadata.namespace or namespace
            for host in se.spec.hosts:
                name = fqdn(host, se_ns)
                namespaces.setdefault(name, se_ns)
                if name.startswith("*"):
                    continue  # a wildcard names no one service
                for alias in host_aliases(name, namespace):
                    aliases.setdefault(alias, name)
                    for port in se.spec.ports:
                        aliases.setdefault(f"{alias}:{port.number}", name)

        def service(name: str) -> tuple[str, str, str]:
            short, ns = split_service(name, namespaces)
            return name, short, ns

        def outbound(svc: tuple[str, str, str], labels: Mapping[str, str]) -> _Peer:
            # The peer is known only by the endpoint's labels: its workload name, namespace,
            # principal and cluster need Istio's metadata exchange (or mTLS): unknown.
            app = labels.get("app") or UNKNOWN
            version = labels.get("version") or UNKNOWN
            canonical = _first(labels, _CANONICAL_NAME) or UNKNOWN
            revision = _first(labels, _CANONICAL_REVISION) or (
                "latest" if canonical != UNKNOWN else UNKNOWN
            )
            dest = (UNKNOWN, UNKNOWN, UNKNOWN, app, version, *svc, canonical, revision, UNKNOWN)
            # Istio: the source reporter cannot know the connection's policy: "unknown".
            return _Peer(("source", *own, *dest), UNKNOWN)

        by_endpoint: dict[tuple[str, str], _Peer] = {}
        by_cluster: dict[str, _Peer] = {}
        no_labels: Mapping[str, str] = {}
        for cluster in clusters:
            if cluster.kind is ClusterKind.INBOUND:
                continue  # inbound records are labelled by direction, below
            svc = service(cluster.service) if cluster.service else service(cluster.name)
            by_cluster[cluster.name] = outbound(svc, no_labels)
            if cluster.kind is ClusterKind.SERVICE:
                for ep in cluster.endpoints:
                    by_endpoint[(cluster.name, ep.key)] = outbound(svc, ep.labels)
        # Unregistered hosts: Istio's cluster names stand in for the (unbounded) host names.
        for name in (PASSTHROUGH_NAME, BLACKHOLE_NAME):
            by_cluster[name] = outbound((name, name, UNKNOWN), no_labels)
        unknown_out = outbound((UNKNOWN, UNKNOWN, UNKNOWN), no_labels)
        by_cluster[""] = unknown_out  # answered before routing chose a cluster (NR, 400s)

        def inbound(svc: tuple[str, str, str]) -> _Peer:
            # This workload is the destination; the caller is unknown (over mTLS its principal
            # is known: _mutual_tls). Plaintext is reported as "none".
            dest = (*own[:5], *svc, *own[5:])
            return _Peer(("destination", *_UNKNOWN_WORKLOAD, *dest), "none")

        inbound_by_service = {name: inbound(service(name)) for name in set(aliases.values())}
        self._inbound = {alias: inbound_by_service[name] for alias, name in aliases.items()}
        self._inbound_unknown = inbound((UNKNOWN, UNKNOWN, UNKNOWN))
        self._by_endpoint = by_endpoint
        self._by_cluster = by_cluster
        self._outbound_unknown = unknown_out
        # Children are cached by peer identity: new peers, new keys. The registry keeps the
        # series themselves (same label values, same child), so counts carry across a reload.
        self._http.clear()
        self._tcp.clear()
        self._secure.clear()

    # -- the hot path ---------------------------------------------------------------------------
    def sink(self, record: RequestRecord) -> None:
        """Count one finished request (the ``RecordSink``): two dict hits, then the updates."""
        if record.direction is Direction.OUTBOUND:
            peer = self._by_endpoint.get((record.cluster, record.upstream_host))
            if peer is None:
                peer = self._by_cluster.get(record.cluster) or self._outbound_unknown
        else:
            peer = self._inbound.get(record.authority) or self._inbound_peer(record.authority)
            if record.tls:
                peer = self._mutual_tls(peer, record.source_principal)
        flags = record.flags
        code = record.response_code
        key = (peer, code, ",".join(flags) if flags else "-")
        children = self._http.get(key)
        if children is None:
            children = self._bind(key)
        children.requests += 1
        end = record.end
        children.duration.observe((end - record.start) * 1000.0 if end else 0.0)
        children.request_bytes.observe(record.bytes_received)
        children.response_bytes.observe(record.bytes_sent)
        if code == 101:
            self._tunnel(peer, key[2], record)

    def _mutual_tls(self, peer: _Peer, principal: str) -> _Peer:
        """The inbound peer of a request that came over mTLS: the destination reports the
        connection as ``mutual_tls`` and knows the caller's ``source_principal`` from its
        certificate (its workload name and namespace need Istio's metadata exchange)."""
        key = (peer, principal)
        found = self._secure.get(key)
        if found is None:
            if len(self._secure) >= _SECURE_PEERS_MAX:
                principal = UNKNOWN  # bounded label values, whatever callers present
                key = (peer, principal)
                found = self._secure.get(key)
            if found is None:
                values = list(peer.values)
                values[_SOURCE_PRINCIPAL] = principal or UNKNOWN
                found = self._secure[key] = _Peer(tuple(values), "mutual_tls")
        return found

    def _inbound_peer(self, authority: str) -> _Peer:
        # Host headers are case-insensitive (RFC 9110 §4.2.3); the lookup table is lower case.
        return self._inbound.get(authority.lower()) or self._inbound_unknown

    def _bind(self, key: tuple[_Peer, int, str]) -> _HttpChildren:
        peer, code, flags = key
        values = (*peer.values, "http", flags, peer.security, str(code), "")
        children = self._http[key] = _HttpChildren(self, values)
        return children

    def _tunnel(self, peer: _Peer, flags: str, record: RequestRecord) -> None:
        key = (peer, flags)
        children = self._tcp.get(key)
        if children is None:
            values = (*peer.values, "tcp", flags, peer.security)
            children = self._tcp[key] = _TcpChildren(self, values)
        children.opened.inc()
        children.closed.inc()
        children.sent.inc(record.bytes_sent)
        children.received.inc(record.bytes_received)

    # -- reload (App.reload calls these) --------------------------------------------------------
    def reload_accepted(self) -> None:
        self.config_reloads.labels("accepted").inc()

    def reload_rejected(self) -> None:
        self.config_reloads.labels("rejected").inc()

    # -- exposition -----------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (``CONTENT_TYPE``), without ``*_created``."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(Collector):
    """The registry minus prometheus_client's ``*_created`` series, which Istio does not export.

    (``disable_created_metrics()`` would do it process-wide: global state we keep out of.)
    Each scrape gets fresh ``Metric`` objects from ``collect``, so trimming them is safe.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


# =============================================================================================
# Proxy internals, read at scrape time


def _int(mapping: Mapping[str, object], key: str) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _mapping(mapping: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = mapping.get(key)
    return value if isinstance(value, Mapping) else {}


def _entries(mapping: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    value = mapping.get(key)
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, Mapping)]


# (snapshot key in "limits", label value): Envoy's circuit breaker resources.
_RESOURCES: Final = (
    ("connections", "connections"),
    ("pending_requests", "pending_requests"),
    ("requests", "requests"),
    ("retries", "retries"),
)
# (snapshot key in "limits", kind label): Envoy upstream_cx_overflow, upstream_rq_pending_overflow,
# the request limit's overflow and upstream_rq_retry_overflow.
_OVERFLOWS: Final = (
    ("overflow_connections", "connections"),
    ("overflow_pending", "pending"),
    ("overflow_requests", "requests"),
    ("overflow_retries", "retries"),
)
_EJECTION_KINDS: Final = (
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
)


class _ClusterTotals:
    """One cluster's numbers, summed over the cluster states that share its name (passthrough)."""

    __slots__ = ("counts", "ejections", "limits", "remaining")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.limits: dict[str, int] = {}
        self.remaining: dict[str, int] = {}
        self.ejections: dict[str, int] = {}

    def add(self, snap: Mapping[str, object]) -> None:
        counts = self.counts
        limits = _mapping(snap, "limits")
        endpoints = _entries(snap, "endpoints")
        healthy = sum(1 for ep in endpoints if ep.get("health") == "healthy")
        values = {
            "cx_active": _int(limits, "connections"),
            "cx_total": sum(_int(ep, "total_connections") for ep in endpoints),
            "cx_connect_fail": sum(_int(ep, "connect_failures") for ep in endpoints),
            "rq_active": _int(limits, "requests"),
            "rq_total": sum(_int(ep, "total_requests") for ep in endpoints),
            "rq_pending_active": _int(limits, "pending_requests"),
            "rq_retry": _int(snap, "retries"),
            "rq_timeout": _int(snap, "timeouts"),
            "membership_total": len(endpoints),
            "membership_healthy": healthy,
        }
        for name, value in values.items():
            counts[name] = counts.get(name, 0) + value
        for key, label in _RESOURCES:
            # Limits are per cluster, the same for every state sharing a name: keep one.
            self.limits[label] = _int(limits, f"max_{key}")
            # Passthrough hosts each have their own limits: report the least headroom left.
            left = _int(limits, f"remaining_{key}")
            self.remaining[label] = min(self.remaining.get(label, left), left)
        for key, kind in _OVERFLOWS:
            name = f"overflow_{kind}"
            counts[name] = counts.get(name, 0) + _int(limits, key)
        outlier = _mapping(snap, "outlier_detection")
        for name, key in (
            ("ejections_active", "ejected"),
            ("ejections_overflow", "ejections_overflow"),
        ):
            counts[name] = counts.get(name, 0) + _int(outlier, key)
        for kind in _EJECTION_KINDS:
            self.ejections[kind] = self.ejections.get(kind, 0) + _int(outlier, f"ejections_{kind}")


class _ProxyCollector(Collector):
    """Envoy-style internals from the snapshots the composition root supplies, read per scrape."""

    def __init__(
        self,
        clusters: ClusterSnapshots,
        listeners: ListenerSnapshots,
        certificates: CertificateExpiries,
        tls_refusals: TlsRefusals,
    ) -> None:
        self._clusters = clusters
        self._listeners = listeners
        self._certificates = certificates
        self._tls_refusals = tls_refusals

    def describe(self) -> Iterable[Metric]:
        return []  # names are not checked against the registry's: they are ours alone

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, _ClusterTotals] = {}
        for snap in self._clusters():
            name = snap.get("name")
            if isinstance(name, str):
                totals.setdefault(name, _ClusterTotals()).add(snap)
        yield from _cluster_families(totals)

        active = GaugeMetricFamily(
            "meshproxy_listener_downstream_cx_active",
            "Downstream (client) connections open on each listener.",
            labels=("listener_name",),
        )
        for listener, count in self._listeners():
            active.add_metric((listener,), count)
        yield active

        refused = CounterMetricFamily(
            "meshproxy_listener_tls_refused",
            "Connections a listener refused at the TLS layer, by reason (plaintext on a STRICT "
            "port, bad or missing client certificate, no SPIFFE ID, handshake timeout or error).",
            labels=("listener_name", "reason"),
        )
        for listener, reason, count in self._tls_refusals():
            refused.add_metric((listener, reason), count)
        yield refused

        expiry = GaugeMetricFamily(
            "meshproxy_certificate_expiration_timestamp_seconds",
            "Unix time at which each certificate the proxy holds expires (the workload "
            "certificate and each root of its trust bundle; none without spec.tls).",
            labels=("certificate",),
        )
        for certificate, not_after in self._certificates():
            expiry.add_metric((certificate,), not_after)
        yield expiry


# (count key, metric name, help, is a counter)
_CLUSTER_SERIES: Final = (
    ("cx_active", "meshproxy_cluster_upstream_cx_active", "Upstream connections open.", False),
    ("cx_total", "meshproxy_cluster_upstream_cx_total", "Upstream connections opened.", True),
    (
        "cx_connect_fail",
        "meshproxy_cluster_upstream_cx_connect_fail_total",
        "Upstream connection attempts that failed.",
        True,
    ),
    ("rq_active", "meshproxy_cluster_upstream_rq_active", "Upstream requests in flight.", False),
    ("rq_total", "meshproxy_cluster_upstream_rq_total", "Upstream requests (each try).", True),
    (
        "rq_pending_active",
        "meshproxy_cluster_upstream_rq_pending_active",
        "Requests waiting for an upstream connection.",
        False,
    ),
    ("rq_retry", "meshproxy_cluster_upstream_rq_retry_total", "Retries sent.", True),
    (
        "rq_timeout",
        "meshproxy_cluster_upstream_rq_timeout_total",
        "Requests that hit the route or per-try timeout.",
        True,
    ),
    ("membership_total", "meshproxy_cluster_membership_total", "Endpoints.", False),
    (
        "membership_healthy",
        "meshproxy_cluster_membership_healthy",
        "Endpoints not ejected by outlier detection.",
        False,
    ),
    (
        "ejections_active",
        "meshproxy_cluster_outlier_detection_ejections_active",
        "Endpoints ejected now by outlier detection.",
        False,
    ),
    (
        "ejections_overflow",
        "meshproxy_cluster_outlier_detection_ejections_overflow_total",
        "Ejections skipped because maxEjectionPercent was reached.",
        True,
    ),
)


def _cluster_families(totals: Mapping[str, _ClusterTotals]) -> Iterator[Metric]:
    label = ("cluster_name",)
    for key, name, doc, counter in _CLUSTER_SERIES:
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily(name, doc, labels=label)
            if counter
            else GaugeMetricFamily(name, doc, labels=label)
        )
        for cluster, t in totals.items():
            family.add_metric((cluster,), t.counts.get(key, 0))
        yield family
    overflow = CounterMetricFamily(
        "meshproxy_cluster_upstream_overflow_total",
        "Requests or retries refused by a concurrency limit (Envoy circuit breaker overflows), "
        "by kind: connections, pending, requests, retries.",
        labels=("cluster_name", "kind"),
    )
    for cluster, t in totals.items():
        for _, kind in _OVERFLOWS:
            overflow.add_metric((cluster, kind), t.counts.get(f"overflow_{kind}", 0))
    yield overflow
    ejections = CounterMetricFamily(
        "meshproxy_cluster_outlier_detection_ejections_total",
        "Endpoints ejected by outlier detection, by kind (Envoy ejections_enforced_*).",
        labels=("cluster_name", "kind"),
    )
    for cluster, t in totals.items():
        for kind in _EJECTION_KINDS:
            ejections.add_metric((cluster, kind), t.ejections.get(kind, 0))
    yield ejections
    limit = GaugeMetricFamily(
        "meshproxy_cluster_limit",
        "Concurrency limit per resource (Envoy circuit breaker thresholds).",
        labels=("cluster_name", "resource"),
    )
    remaining = GaugeMetricFamily(
        "meshproxy_cluster_limit_remaining",
        "Headroom left under each concurrency limit (Envoy circuit_breakers remaining_*).",
        labels=("cluster_name", "resource"),
    )
    for cluster, t in totals.items():
        for _, resource in _RESOURCES:
            limit.add_metric((cluster, resource), t.limits.get(resource, 0))
            remaining.add_metric((cluster, resource), t.remaining.get(resource, 0))
    yield limit
    yield remaining
