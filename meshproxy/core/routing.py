"""Destinations: clusters built from the config, and the host table that maps a request to one.

Owns the runtime view of the service registry: every ServiceEntry host and port becomes a
``Cluster`` (named as Istio names it, ``outbound|9080||reviews.default.svc.cluster.local``) with its
endpoints and connection settings, and the ``HostTable`` answers "which cluster serves this Host
header?" the way a sidecar's virtual hosts do (reference §1.7): short name, ``name.namespace``,
``name.namespace.svc`` and the FQDN, each with or without the port; exact names beat wildcards.
For a transparently captured connection whose Host names no registered host, ``by_address`` finds
the ServiceEntry whose ``addresses`` (IPs or CIDRs) hold the connection's original destination and
which declares its port (Envoy picks the listener by that address and port).
VirtualService routing on top of this is a later layer.

Rules: pure; built once per config and immutable; lookups are dict hits on the hot path.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshproxy.config.istio import CLUSTER_DOMAIN, fqdn
from meshproxy.config.model import (
    ConsistentHashLB,
    DestinationRule,
    MeshConfig,
    Resolution,
    ServiceEntry,
    ServicePort,
    SimpleLB,
    TrafficPolicy,
    TrafficPolicyMode,
)
from meshproxy.core.identity import spiffe_uri

# Istio/Envoy defaults (reference §1.3 connectionPool table; §1.6).
DEFAULT_CONNECT_TIMEOUT = 10.0  # mesh connectTimeout
DEFAULT_IDLE_TIMEOUT = 3600.0  # connectionPool.http.idleTimeout
_LOOKUP_CACHE_MAX = 4096
_CACHEABLE_AUTHORITY = 256


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


class LbKind(enum.Enum):
    LEAST_REQUEST = "LEAST_REQUEST"  # Istio's default when loadBalancer is unset
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"  # the request's own destination (original dst)
    RING_HASH = "RING_HASH"
    MAGLEV = "MAGLEV"


@dataclass(frozen=True, slots=True, kw_only=True)
class LbPolicy:
    kind: LbKind = LbKind.LEAST_REQUEST
    hash: ConsistentHashLB | None = None  # the key, for RING_HASH and MAGLEV
    ring_size: int = 1024  # ringHash.minimumRingSize default (destination_rule.proto)
    table_size: int = 65537  # maglev.tableSize default (Envoy)


DEFAULT_LB = LbPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    name: str
    service: str  # FQDN of the service ("" for passthrough)
    port: int
    kind: ClusterKind
    subset: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_requests_per_connection: int = 0  # 0 = unlimited
    lb: LbPolicy = DEFAULT_LB
    policy: TrafficPolicy | None = None  # the effective DestinationRule policy, for later layers
    # Who the endpoints are expected to be over mTLS: the ServiceEntry's subjectAltNames, else
    # the SPIFFE IDs of its endpoints' service accounts (core/origination.py).
    identities: tuple[str, ...] = ()


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
    # isascii: str.isdigit() also accepts superscripts and other digits int() cannot take whole.
    if port_s.isascii() and port_s.isdigit() and len(port_s) <= 5 and 0 < int(port_s) < 65536:
        return host.lower(), int(port_s)
    return host.lower(), default_port


def _endpoint_port(port: ServicePort, ep_ports: Mapping[str, int]) -> int:
    # Istio: the endpoint's port for this port name, else targetPort, else the service port.
    if port.name and port.name in ep_ports:
        return ep_ports[port.name]
    return port.target_port or port.number


def _pool_settings(tp: TrafficPolicy | None) -> tuple[float, float, int]:
    connect, idle, per_conn = DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, 0
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


def _override(base: TrafficPolicy | None, over: TrafficPolicy) -> TrafficPolicy:
    """Subset over rule: each block the subset sets replaces the rule's (Istio MergeTrafficPolicy)."""
    if base is None:
        return over
    return TrafficPolicy(
        load_balancer=over.load_balancer or base.load_balancer,
        connection_pool=over.connection_pool or base.connection_pool,
        outlier_detection=over.outlier_detection or base.outlier_detection,
        tls=over.tls or base.tls,
        port_level_settings=over.port_level_settings,
        retry_budget=over.retry_budget or base.retry_budget,
    )


def _for_port(tp: TrafficPolicy | None, port: int) -> TrafficPolicy | None:
    """A matching ``portLevelSettings`` entry replaces the policy whole: destination_rule.proto,
    "settings specified at the destination-level will not be inherited when overridden by
    port-level settings, i.e. default values will be applied to fields omitted"."""
    if tp is None:
        return None
    for pl in tp.port_level_settings:
        if pl.port is not None and pl.port.number == port:
            return TrafficPolicy(
                load_balancer=pl.load_balancer,
                connection_pool=pl.connection_pool,
                outlier_detection=pl.outlier_detection,
                tls=pl.tls,
                retry_budget=tp.retry_budget,  # port levels have none of their own
            )
    return tp


def effective_policy(
    rule: DestinationRule | None, port: int, subset: str = ""
) -> TrafficPolicy | None:
    """The DR policy for a port and subset, as Istio's cluster builder computes it: the rule's
    policy for the port, then the subset's blocks over it, then the subset's port level."""
    if rule is None:
        return None
    policy = _for_port(rule.spec.traffic_policy, port)
    if subset:
        for s in rule.spec.subsets:
            if s.name == subset and s.traffic_policy is not None:
                policy = _for_port(_override(policy, s.traffic_policy), port)
    return policy


def lb_policy(tp: TrafficPolicy | None) -> LbPolicy:
    lb = tp.load_balancer if tp is not None else None
    if lb is None:
        return DEFAULT_LB
    ch = lb.consistent_hash
    if ch is not None:
        if ch.maglev is not None:
            return LbPolicy(kind=LbKind.MAGLEV, hash=ch, table_size=ch.maglev.table_size)
        ring = ch.ring_hash.minimum_ring_size if ch.ring_hash is not None else None
        ring = ring or ch.minimum_ring_size or 1024
        return LbPolicy(kind=LbKind.RING_HASH, hash=ch, ring_size=ring)
    simple = lb.simple
    if simple is SimpleLB.ROUND_ROBIN:
        return LbPolicy(kind=LbKind.ROUND_ROBIN)
    if simple is SimpleLB.RANDOM:
        return LbPolicy(kind=LbKind.RANDOM)
    if simple is SimpleLB.PASSTHROUGH:
        return LbPolicy(kind=LbKind.PASSTHROUGH)
    return DEFAULT_LB  # UNSPECIFIED, LEAST_REQUEST and the deprecated LEAST_CONN


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def host_aliases(name: str, namespace: str) -> list[str]:
    """The names a sidecar in ``namespace`` answers for a service FQDN (Istio virtual host domains):
    the FQDN, ``name.ns.svc``, ``name.ns`` and, in the same namespace, the short name."""
    suffix = f".svc.{CLUSTER_DOMAIN}"
    if not name.endswith(suffix):
        return [name]
    short_ns = name[: -len(suffix)]  # "reviews.default"
    short, _, ns = short_ns.partition(".")
    aliases = [name, f"{short_ns}.svc", short_ns]
    if ns == namespace:
        aliases.append(short)
    return aliases


@dataclass(frozen=True, slots=True)
class Service:
    name: str  # FQDN
    clusters: Mapping[int, Cluster]  # by service port, no subset
    subsets: Mapping[tuple[int, str], Cluster]  # by (service port, subset name)
    default: Cluster

    def cluster(self, port: int | None, subset: str = "") -> Cluster | None:
        """The cluster for a destination; a port is optional when the service has only one."""
        if port is None:
            port = self.default.port  # the only port, else 80, else the first
        if subset:
            return self.subsets.get((port, subset))
        return self.clusters.get(port)


class HostTable:
    """Maps a request's authority to a cluster, as a sidecar's outbound virtual hosts do."""

    __slots__ = (
        "_by_ip",
        "_cache",
        "_dst_cache",
        "_exact",
        "_mode",
        "_namespace",
        "_networks",
        "_trust_domain",
        "_wildcards",
        "clusters",
        "services",
    )

    def __init__(self, config: MeshConfig) -> None:
        self._namespace = config.bootstrap.metadata.namespace
        self._trust_domain = config.bootstrap.spec.trust_domain
        self._mode = config.bootstrap.spec.outbound_traffic_policy
        rules = {fqdn(r.spec.host, r.metadata.namespace): r for r in config.destination_rules}
        self._exact: dict[str, Service] = {}
        self._wildcards: list[tuple[str, Service]] = []
        self.clusters: dict[str, Cluster] = {}
        self.services: dict[str, Service] = {}
        # ServiceEntry ``addresses`` (VIPs and CIDRs) -> its service, for captured connections
        # whose Host names no registered host: single addresses in a dict, ranges longest first.
        self._by_ip: dict[str, Service] = {}
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Service]] = []
        for se in config.service_entries:
            first: Service | None = None
            for host in se.spec.hosts:
                name = fqdn(host, se.metadata.namespace)
                service = self._build_service(se, name, rules.get(name))
                self.services[name] = service
                first = first or service
                if name.startswith("*"):
                    self._wildcards.append((name[1:], service))
                    continue
                for alias in host_aliases(name, self._namespace):
                    self._exact.setdefault(alias, service)
            if first is not None:
                self._index_addresses(se.spec.addresses, first)
        # The longest wildcard suffix is the most specific (Envoy virtual host domain matching).
        self._wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        self._networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self._cache: dict[str, Target | Miss] = {}
        self._dst_cache: dict[str, Target | None] = {}

    def _index_addresses(self, addresses: tuple[str, ...], service: Service) -> None:
        # A ServiceEntry with several hosts shares its addresses; its first host answers for them
        # (the first definition wins, as for host names).
        for text in addresses:
            net = ipaddress.ip_network(text, strict=False)  # validated at load (config/istio.py)
            if net.prefixlen == net.max_prefixlen:
                self._by_ip.setdefault(str(net.network_address), service)
            else:
                self._networks.append((net, service))

    def _build_service(self, se: ServiceEntry, name: str, rule: DestinationRule | None) -> Service:
        clusters: dict[int, Cluster] = {}
        subsets: dict[tuple[int, str], Cluster] = {}
        identities = se.spec.subject_alt_names or tuple(
            dict.fromkeys(
                spiffe_uri(self._trust_domain, se.metadata.namespace, ep.service_account)
                for ep in se.spec.endpoints
                if ep.service_account
            )
        )
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
            subset_names = [s.name for s in rule.spec.subsets] if rule is not None else []
            for subset in ("", *subset_names):
                policy = effective_policy(rule, port.number, subset)
                selected = endpoints
                if subset and rule is not None:
                    selector = next(s.labels for s in rule.spec.subsets if s.name == subset)
                    selected = tuple(e for e in endpoints if labels_match(selector, e.labels))
                connect, idle, per_conn = _pool_settings(policy)
                lb = lb_policy(policy)
                cluster = Cluster(
                    name=cluster_name(port.number, name, subset),
                    service=name,
                    port=port.number,
                    kind=ClusterKind.ORIGINAL_DST if lb.kind is LbKind.PASSTHROUGH else kind,
                    subset=subset,
                    endpoints=selected,
                    connect_timeout=connect,
                    idle_timeout=idle,
                    max_requests_per_connection=per_conn,
                    lb=lb,
                    policy=policy,
                    identities=identities,
                )
                if subset:
                    subsets[(port.number, subset)] = cluster
                else:
                    clusters[port.number] = cluster
                self.clusters[cluster.name] = cluster
        ports = se.spec.ports
        # A Host without a port: the service's only port, else port 80, else its first port.
        if len(ports) == 1:
            default = clusters[ports[0].number]
        else:
            default = clusters.get(80) or clusters[ports[0].number]
        return Service(name, MappingProxyType(clusters), MappingProxyType(subsets), default)

    def service(self, name: str) -> Service | None:
        """A service by FQDN (or a wildcard entry covering it)."""
        found = self.services.get(name)
        if found is None:
            for suffix, candidate in self._wildcards:
                if name.endswith(suffix):
                    return candidate
        return found

    def knows(self, host: str) -> bool:
        """Whether a host name (lower-case, no port) is a registered host or under a wildcard."""
        if host in self._exact:
            return True
        return any(host.endswith(suffix) for suffix, _ in self._wildcards)

    def by_address(self, original_dst: str) -> Target | None:
        """The service whose ServiceEntry ``addresses`` hold a captured connection's original
        destination (``ip:port``, IPv6 in brackets) and which declares that port, else None."""
        cache = self._dst_cache
        if original_dst in cache:
            return cache[original_dst]
        result = self._by_address(original_dst)
        if len(cache) >= _LOOKUP_CACHE_MAX:
            cache.clear()
        cache[original_dst] = result
        return result

    def _by_address(self, original_dst: str) -> Target | None:
        host, port = split_authority(original_dst, None)
        if port is None or (not self._by_ip and not self._networks):
            return None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        service = self._by_ip.get(str(ip))
        cluster = service.clusters.get(port) if service is not None else None
        if cluster is None:
            # Ranges, most specific first; the first one whose service has the port.
            for net, candidate in self._networks:
                if ip.version == net.version and ip in net:
                    cluster = candidate.clusters.get(port)
                    if cluster is not None:
                        break
        if cluster is None:
            return None
        return Target(cluster=cluster, host=cluster.service, port=port)

    def resolve(self, authority: str) -> Target | Miss:
        """Resolve a Host header value (any case, with or without a port)."""
        hit = self._cache.get(authority)
        if hit is not None:
            return hit
        result = self._resolve(authority)
        if len(authority) <= _CACHEABLE_AUTHORITY:  # bounded in bytes, not only in entries
            if len(self._cache) >= _LOOKUP_CACHE_MAX:
                self._cache.clear()  # an attacker cycling Host values cannot grow it
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
