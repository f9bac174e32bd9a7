"""Destinations: clusters built from the config, and the host table that maps a request to one.

Owns the runtime view of the service registry: every ServiceEntry host and port becomes a
``Cluster`` (named as Istio names it, ``outbound|9080||reviews.default.svc.cluster.local``) with its
endpoints and connection settings, and the ``HostTable`` answers "which cluster serves this Host
header?" the way a sidecar's virtual hosts do (reference §1.7): short name, ``name.namespace``,
``name.namespace.svc`` and the FQDN, each with or without the port; exact names beat wildcards.
VirtualService routing on top of this is a later layer.

Rules: pure; built once per config and immutable; lookups are dict hits on the hot path.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshproxy.config.istio import CLUSTER_DOMAIN, fqdn
from meshproxy.config.model import (
    DestinationRule,
    MeshConfig,
    Resolution,
    ServiceEntry,
    ServicePort,
    TrafficPolicyMode,
)

# Istio/Envoy defaults (reference §1.3 connectionPool table; §1.6).
DEFAULT_CONNECT_TIMEOUT = 10.0  # mesh connectTimeout
DEFAULT_IDLE_TIMEOUT = 3600.0  # connectionPool.http.idleTimeout
_LOOKUP_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    address: str  # IP, or a DNS name resolved at connect time
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else f"{self.address}:{self.port}"
        )


class ClusterKind(enum.Enum):
    SERVICE = "service"  # ServiceEntry endpoints (STATIC / DNS)
    ORIGINAL_DST = "original-dst"  # resolution NONE or ALLOW_ANY passthrough: the request's host
    INBOUND = "inbound"  # the local app


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    name: str
    service: str  # FQDN of the service ("" for passthrough)
    port: int
    kind: ClusterKind
    endpoints: tuple[Endpoint, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_requests_per_connection: int = 0  # 0 = unlimited


class Miss(enum.Enum):
    """Why a host did not resolve to a cluster."""

    PASSTHROUGH = "passthrough"  # ALLOW_ANY: send it to the host itself
    BLACKHOLE = "blackhole"  # REGISTRY_ONLY: 502


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where a request goes: a registered cluster, or the host and port it names (passthrough)."""

    cluster: Cluster
    host: str
    port: int


def split_authority(authority: str, default_port: int | None) -> tuple[str, int | None]:
    """``host:port`` -> (host, port); IPv6 in brackets; a missing or bad port gives ``default_port``."""
    if authority.startswith("["):
        end = authority.find("]")
        host = authority[1:end] if end > 0 else authority
        rest = authority[end + 1 :] if end > 0 else ""
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep:
            host, port_s = authority, ""
    if port_s.isdigit() and 0 < int(port_s) < 65536:
        return host.lower(), int(port_s)
    return host.lower(), default_port


def _endpoint_port(port: ServicePort, ep_ports: Mapping[str, int]) -> int:
    # Istio: the endpoint's port for this port name, else targetPort, else the service port.
    if port.name and port.name in ep_ports:
        return ep_ports[port.name]
    return port.target_port or port.number


def _pool_settings(rule: DestinationRule | None) -> tuple[float, float, int]:
    connect, idle, per_conn = DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, 0
    tp = rule.spec.traffic_policy if rule is not None else None
    pool = tp.connection_pool if tp is not None else None
    if pool is not None and pool.tcp is not None:
        if pool.tcp.connect_timeout is not None:
            connect = pool.tcp.connect_timeout
        if pool.tcp.idle_timeout is not None:
            idle = pool.tcp.idle_timeout
    if pool is not None and pool.http is not None:
        if pool.http.idle_timeout is not None:
            idle = pool.http.idle_timeout
        if pool.http.max_requests_per_connection is not None:
            per_conn = pool.http.max_requests_per_connection
    return connect, idle, per_conn


def cluster_name(port: int, service: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{service}"


@dataclass(frozen=True, slots=True)
class _Service:
    clusters: Mapping[int, Cluster]
    default: Cluster


class HostTable:
    """Maps a request's authority to a cluster, as a sidecar's outbound virtual hosts do."""

    __slots__ = ("_cache", "_exact", "_mode", "_namespace", "_wildcards", "clusters")

    def __init__(self, config: MeshConfig) -> None:
        self._namespace = config.bootstrap.metadata.namespace
        self._mode = config.bootstrap.spec.outbound_traffic_policy
        rules = {fqdn(r.spec.host, r.metadata.namespace): r for r in config.destination_rules}
        self._exact: dict[str, _Service] = {}
        self._wildcards: list[tuple[str, _Service]] = []
        self.clusters: dict[str, Cluster] = {}
        for se in config.service_entries:
            for host in se.spec.hosts:
                name = fqdn(host, se.metadata.namespace)
                service = self._build_service(se, name, rules.get(name))
                if name.startswith("*"):
                    self._wildcards.append((name[1:], service))
                    continue
                for alias in self._aliases(name):
                    self._exact.setdefault(alias, service)
        # The longest wildcard suffix is the most specific (Envoy virtual host domain matching).
        self._wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        self._cache: dict[str, Target | Miss] = {}

    def _build_service(self, se: ServiceEntry, name: str, rule: DestinationRule | None) -> _Service:
        connect, idle, per_conn = _pool_settings(rule)
        clusters: dict[int, Cluster] = {}
        for port in se.spec.ports:
            endpoints: tuple[Endpoint, ...]
            if se.spec.resolution is Resolution.NONE or name.startswith("*"):
                kind, endpoints = ClusterKind.ORIGINAL_DST, ()
            elif se.spec.endpoints or se.spec.resolution is Resolution.STATIC:
                kind = ClusterKind.SERVICE
                endpoints = tuple(
                    Endpoint(
                        address=ep.address,
                        port=_endpoint_port(port, ep.ports),
                        labels=ep.labels,
                    )
                    for ep in se.spec.endpoints
                )
            else:
                # DNS resolution without endpoints: the host name itself is the endpoint.
                kind = ClusterKind.SERVICE
                endpoints = (Endpoint(address=name, port=port.target_port or port.number),)
            cluster = Cluster(
                name=cluster_name(port.number, name),
                service=name,
                port=port.number,
                kind=kind,
                endpoints=endpoints,
                connect_timeout=connect,
                idle_timeout=idle,
                max_requests_per_connection=per_conn,
            )
            clusters[port.number] = cluster
            self.clusters[cluster.name] = cluster
        ports = se.spec.ports
        # A Host without a port: the service's only port, else port 80, else its first port.
        if len(ports) == 1:
            default = clusters[ports[0].number]
        else:
            default = clusters.get(80) or clusters[ports[0].number]
        return _Service(MappingProxyType(clusters), default)

    def _aliases(self, name: str) -> list[str]:
        suffix = f".svc.{CLUSTER_DOMAIN}"
        if not name.endswith(suffix):
            return [name]
        short_ns = name[: -len(suffix)]  # "reviews.default"
        short, _, ns = short_ns.partition(".")
        aliases = [name, f"{short_ns}.svc", short_ns]
        if ns == self._namespace:
            aliases.append(short)
        return aliases

    def resolve(self, authority: str) -> Target | Miss:
        """Resolve a Host header value (any case, with or without a port)."""
        hit = self._cache.get(authority)
        if hit is not None:
            return hit
        result = self._resolve(authority)
        if len(self._cache) >= _LOOKUP_CACHE_MAX:
            self._cache.clear()  # bounded: an attacker cycling Host values cannot grow it
        self._cache[authority] = result
        return result

    def _resolve(self, authority: str) -> Target | Miss:
        host, port = split_authority(authority, None)
        service = self._exact.get(host)
        if service is None:
            for suffix, candidate in self._wildcards:
                if host.endswith(suffix):
                    service = candidate
                    break
        if service is None:
            if self._mode is TrafficPolicyMode.REGISTRY_ONLY:
                return Miss.BLACKHOLE
            return Miss.PASSTHROUGH
        if port is None:
            cluster = service.default
        else:
            found = service.clusters.get(port)
            if found is None:
                # A registered host on a port it does not declare is not in the registry.
                if self._mode is TrafficPolicyMode.REGISTRY_ONLY:
                    return Miss.BLACKHOLE
                return Miss.PASSTHROUGH
            cluster = found
        return Target(cluster=cluster, host=host, port=cluster.port)


PASSTHROUGH_NAME = "PassthroughCluster"


def passthrough(host: str, port: int, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Target:
    """ALLOW_ANY: a cluster that is just the named host (Istio's PassthroughCluster)."""
    cluster = Cluster(
        name=PASSTHROUGH_NAME,
        service="",
        port=port,
        kind=ClusterKind.ORIGINAL_DST,
        connect_timeout=connect_timeout,
    )
    return Target(cluster=cluster, host=host, port=port)


def inbound_cluster(port: int, app_host: str, app_port: int) -> Cluster:
    return Cluster(
        name=f"inbound|{port}||",
        service="",
        port=port,
        kind=ClusterKind.INBOUND,
        endpoints=(Endpoint(address=app_host, port=app_port),),
    )
