"""The typed, frozen configuration model: the Istio kinds meshproxy reads and its own bootstrap.

Owns the shape of every configuration document. Field names are Istio's, in snake_case; the YAML
key is the camelCase form (``max_connections`` <-> ``maxConnections``) unless a field says otherwise
with ``metadata={"yaml": ...}``. A field without a default is required. The loader
(``config/load.py``) decodes YAML into these classes by reading their type hints, so adding a field
here is all it takes to accept it. Defaults that are Istio semantics (not just "absent") live in
``config/istio.py``.

Rules: frozen and slotted; tuples and read-only mappings inside; no I/O, no YAML, no asyncio.
Sources: istio/api ``networking/v1alpha3/{service_entry,virtual_service,destination_rule}.proto``.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NewType

# Seconds, parsed from Istio's duration form ("250ms", "1.5s", "1m", "1h").
Duration = NewType("Duration", float)

EMPTY_MAP: Mapping[str, str] = MappingProxyType({})


def yaml_key(name: str) -> str:
    """The YAML (Istio camelCase) key of a model field: ``max_connections`` -> ``maxConnections``."""
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _no_map() -> Mapping[str, typing.Any]:
    return EMPTY_MAP


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPort:
    """A ``host:port`` socket address (``[::1]:15000`` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Metadata:
    name: str
    namespace: str = ""  # empty: the bootstrap's namespace
    labels: Mapping[str, str] = field(default_factory=_no_map)
    annotations: Mapping[str, str] = field(default_factory=_no_map)


# =============================================================================================
# MeshProxy bootstrap (ours)


class TrafficPolicyMode(enum.Enum):
    ALLOW_ANY = "ALLOW_ANY"
    REGISTRY_ONLY = "REGISTRY_ONLY"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundListener:
    address: HostPort


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundListener:
    address: HostPort
    app: HostPort


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Downstream timeouts. Istio leaves these to Envoy; defaults chosen to stop slowloris clients."""

    # Envoy request_headers_timeout is off by default; a sidecar facing the mesh needs one.
    request_headers: Duration = Duration(10.0)
    # Envoy HTTP idle_timeout default 1 h (reference §2.2).
    idle: Duration = Duration(3600.0)


class TracingExporter(enum.Enum):
    NONE = "none"
    OTLP = "otlp"  # OTLP over HTTP/protobuf (Jaeger, Tempo, the OpenTelemetry Collector)
    CONSOLE = "console"


class AccessLogFormat(enum.Enum):
    TEXT = "text"  # Envoy's default format (reference §2.5)
    JSON = "json"  # the same fields as a JSON object per line


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """Where spans go (Istio's MeshConfig extensionProviders, in our bootstrap)."""

    exporter: TracingExporter = TracingExporter.NONE
    endpoint: str = "http://127.0.0.1:4318/v1/traces"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogSettings:
    path: str = "/dev/stdout"
    format: AccessLogFormat = AccessLogFormat.TEXT


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetrySettings:
    """The bootstrap's telemetry providers; the Istio ``Telemetry`` resource turns them on."""

    prometheus: HostPort | None = None  # a separate scrape port, as Istio's :15090
    tracing: TracingSettings = TracingSettings()
    access_log: AccessLogSettings | None = None  # set: access logs on, as if a Telemetry said so


class Http1Codec(enum.Enum):
    """The HTTP/1.1 parser both sides use (issue #7): h11 is the codec of record."""

    H11 = "h11"
    HTTPTOOLS = "httptools"  # llhttp through httptools: ``pip install meshproxy[fast]``
    AUTO = "auto"  # httptools when installed, else h11


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadTLS:
    """``spec.tls``: this workload's certificate, key and trust bundle (PEM files), or a dev CA
    directory (``ca``) from which the proxy issues itself a short-lived certificate.

    The files are watched: when cert-manager, SPIRE's helper or the dev CA rewrites them, new
    handshakes use the new pair (istio-agent's SDS rotation, without the agent).
    """

    cert_chain: str = ""  # cert.pem: the leaf first, then intermediates
    private_key: str = ""  # key.pem
    root_cert: str = ""  # ca.pem: the trust bundle peers are verified against
    ca: str = ""  # a `meshproxy ca init` directory: self-issue, re-issue at half the lifetime
    # Istio's workload certificate lifetime (SECRET_TTL 24 h) for certificates issued from `ca`.
    ttl: Duration = Duration(24 * 3600.0)
    # Envoy's transport_socket_connect_timeout is unset by default; a stalled ClientHello must not
    # hold a connection forever, so a handshake gets this long (reference §6 #9).
    handshake_timeout: Duration = Duration(10.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshProxySpec:
    service_account: str = "default"
    trust_domain: str = "cluster.local"
    admin: HostPort = HostPort(host="127.0.0.1", port=15000)
    # A probe-only port, as Istio's :15021 /healthz/ready: the kubelet probes the pod IP, so this
    # one may bind 0.0.0.0 while the admin (with /quitquitquit) stays on loopback. None: off.
    health: HostPort | None = None
    outbound: OutboundListener | None = None
    inbound: InboundListener | None = None
    outbound_traffic_policy: TrafficPolicyMode = TrafficPolicyMode.ALLOW_ANY
    drain_duration: Duration = Duration(5.0)
    timeouts: Timeouts = Timeouts()
    # How much of a request body is kept so a try can be replayed (issue #4: 64 KiB default).
    retry_buffer_bytes: int = 64 * 1024
    telemetry: TelemetrySettings = TelemetrySettings()
    tls: WorkloadTLS | None = None  # no certificates: no mTLS either way
    http1_codec: Http1Codec = Http1Codec.H11
    # Worker processes sharing the listeners through SO_REUSEPORT (0: one per usable core).
    workers: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshProxy:
    metadata: Metadata
    spec: MeshProxySpec


# =============================================================================================
# ServiceEntry


class Resolution(enum.Enum):
    NONE = "NONE"
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"


class Location(enum.Enum):
    MESH_EXTERNAL = "MESH_EXTERNAL"
    MESH_INTERNAL = "MESH_INTERNAL"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    number: int
    name: str = ""
    protocol: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadEntry:
    address: str = ""
    ports: Mapping[str, int] = field(default_factory=_no_map)
    labels: Mapping[str, str] = field(default_factory=_no_map)
    network: str = ""
    locality: str = ""
    weight: int | None = None
    service_account: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEntrySpec:
    hosts: tuple[str, ...]
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: Location = Location.MESH_EXTERNAL
    resolution: Resolution = Resolution.NONE
    endpoints: tuple[WorkloadEntry, ...] = ()
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEntry:
    metadata: Metadata
    spec: ServiceEntrySpec


# =============================================================================================
# VirtualService


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatch:
    """Istio StringMatch: exactly one of exact / prefix / regex (RE2, full match)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PortSelector:
    number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Percent:
    value: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    host: str
    subset: str = ""
    port: PortSelector | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderOperations:
    set: Mapping[str, str] = field(default_factory=_no_map)
    add: Mapping[str, str] = field(default_factory=_no_map)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPMatchRequest:
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: Mapping[str, StringMatch] = field(default_factory=_no_map)
    without_headers: Mapping[str, StringMatch] = field(default_factory=_no_map)
    query_params: Mapping[str, StringMatch] = field(default_factory=_no_map)
    ignore_uri_case: bool = False
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=_no_map)
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""
    stat_prefix: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteDestination:
    destination: Destination
    weight: int | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRedirect:
    uri: str = ""
    authority: str = ""
    port: int | None = None
    derive_port: str = ""
    scheme: str = ""
    redirect_code: int = 301
    prefix_rewrite: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPBody:
    string: str | None = None
    bytes_: str | None = field(default=None, metadata={"yaml": "bytes"})  # base64 in YAML


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPDirectResponse:
    status: int
    body: HTTPBody | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RegexRewrite:
    match: str
    rewrite: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRewrite:
    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRetry:
    attempts: int = 0
    per_try_timeout: Duration | None = None
    retry_on: str = ""
    retry_remote_localities: bool = False
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDelay:
    fixed_delay: Duration | None = None
    exponential_delay: Duration | None = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated integer form


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: str = ""
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPFaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPMirrorPolicy:
    destination: Destination
    percentage: Percent | None = None


class UnmatchedPreflights(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    FORWARD = "FORWARD"
    IGNORE = "IGNORE"


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[str, ...] = ()  # deprecated
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: UnmatchedPreflights = UnmatchedPreflights.UNSPECIFIED


@dataclass(frozen=True, slots=True, kw_only=True)
class Delegate:
    name: str
    namespace: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percentage: Percent | None = None
    mirror_percent: int | None = None  # deprecated integer form
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDestination:
    destination: Destination
    weight: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class L4MatchAttributes:
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=_no_map)
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSMatchAttributes:
    sni_hosts: tuple[str, ...]
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=_no_map)
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TCPRoute:
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSRoute:
    match: tuple[TLSMatchAttributes, ...]
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualServiceSpec:
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualService:
    metadata: Metadata
    spec: VirtualServiceSpec


# =============================================================================================
# DestinationRule


class SimpleLB(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    LEAST_CONN = "LEAST_CONN"  # deprecated alias of LEAST_REQUEST
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPCookie:
    name: str
    path: str = ""
    ttl: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RingHash:
    minimum_ring_size: int = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class MagLev:
    table_size: int = 65537


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: int | None = None  # deprecated


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancerSettings:
    simple: SimpleLB | None = None
    consistent_hash: ConsistentHashLB | None = None
    warmup_duration_secs: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpKeepalive:
    probes: int | None = None
    time: Duration | None = None
    interval: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: str = ""
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    consecutive_errors: int | None = None  # deprecated
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


class TLSMode(enum.Enum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTLSSettings:
    mode: TLSMode = TLSMode.DISABLE
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PortTrafficPolicy:
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    """``trafficPolicy.retryBudget``: Envoy's retry budget (circuit_breaker.proto RetryBudget).

    When the block is present, Istio fills ``percent`` 20% and ``minRetryConcurrency`` 3
    (``cluster_traffic_policy.go applyRetryBudget``); the budget then replaces ``maxRetries``.
    """

    percent: Percent | None = None
    min_retry_concurrency: int | None = None
    budget_interval: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Subset:
    name: str
    labels: Mapping[str, str] = field(default_factory=_no_map)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationRuleSpec:
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationRule:
    metadata: Metadata
    spec: DestinationRuleSpec


# =============================================================================================
# The whole configuration


# =============================================================================================
# Telemetry (istio/api telemetry/v1alpha1/telemetry.proto)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSelector:
    match_labels: Mapping[str, str] = field(default_factory=_no_map)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyTargetReference:
    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderRef:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LiteralTag:
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvironmentTag:
    name: str
    default_value: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderTag:
    name: str
    default_value: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomTag:
    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: HeaderTag | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSelector:
    mode: str = ""  # CLIENT_AND_SERVER | CLIENT | SERVER


@dataclass(frozen=True, slots=True, kw_only=True)
class Tracing:
    match: TracingSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    random_sampling_percentage: float | None = None  # Istio default 1%
    disable_span_reporting: bool | None = None
    custom_tags: Mapping[str, CustomTag] = field(default_factory=_no_map)
    use_request_id_for_trace_sampling: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLoggingFilter:
    expression: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogging:
    match: TracingSelector | None = None
    providers: tuple[ProviderRef, ...] = ()
    disabled: bool | None = None
    filter: AccessLoggingFilter | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricSelector:
    metric: str = ""
    custom_metric: str = ""
    mode: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TagOverride:
    operation: str = ""  # UPSERT | REMOVE
    value: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsOverrides:
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: Mapping[str, TagOverride] = field(default_factory=_no_map)


@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics:
    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverrides, ...] = ()
    reporting_interval: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetrySpec:
    selector: WorkloadSelector | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    tracing: tuple[Tracing, ...] = ()
    access_logging: tuple[AccessLogging, ...] = ()
    metrics: tuple[Metrics, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Telemetry:
    metadata: Metadata
    spec: TelemetrySpec


# =============================================================================================
# PeerAuthentication (istio/api security/v1beta1/peer_authentication.proto)


class MtlsMode(enum.Enum):
    UNSET = "UNSET"  # inherit from the parent; at the top: PERMISSIVE
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthenticationMutualTLS:
    mode: MtlsMode = MtlsMode.UNSET


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthenticationSpec:
    selector: WorkloadSelector | None = None
    mtls: PeerAuthenticationMutualTLS | None = None
    # Keyed by the workload (container) port, as a string ("8080"); only with a selector.
    port_level_mtls: Mapping[str, PeerAuthenticationMutualTLS] = field(default_factory=_no_map)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthentication:
    metadata: Metadata
    spec: PeerAuthenticationSpec


# =============================================================================================
# AuthorizationPolicy (istio/api security/v1beta1/authorization_policy.proto)


class AuthorizationAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationSource:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationOperation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleFrom:
    source: AuthorizationSource


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleTo:
    operation: AuthorizationOperation


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationRule:
    from_: tuple[RuleFrom, ...] = field(default=(), metadata={"yaml": "from"})
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtensionProvider:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicySpec:
    selector: WorkloadSelector | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    # Absent rules with ALLOW: allow nothing (Istio's `spec: {}`); absent rules otherwise: no-op.
    rules: tuple[AuthorizationRule, ...] = ()
    action: AuthorizationAction = AuthorizationAction.ALLOW
    provider: ExtensionProvider | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy:
    metadata: Metadata
    spec: AuthorizationPolicySpec


Resource = (
    MeshProxy
    | ServiceEntry
    | VirtualService
    | DestinationRule
    | Telemetry
    | PeerAuthentication
    | AuthorizationPolicy
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """Everything loaded from the files, validated, with namespaces filled in."""

    bootstrap: MeshProxy
    service_entries: tuple[ServiceEntry, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    telemetries: tuple[Telemetry, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    sources: tuple[str, ...] = ()  # the files read, in order
