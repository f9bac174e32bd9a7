"""Istio semantics of the configuration: defaults, name resolution and cross-document validation.

Owns what Istio means by a config, as opposed to its shape (``model.py``) or its syntax
(``load.py``): short host names resolve against the resource's namespace, names must be unique per
kind and namespace, a route must point at a host and subset that something defines, oneof fields
hold exactly one value. Every problem is reported through a callback with a file, line and field path.

Rules: pure functions over the frozen model; no YAML, no sockets. Sources: istio/api protos,
istio/istio ``pkg/config/validation`` (reference §1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence

from meshproxy.config import security
from meshproxy.config.model import (
    AuthorizationPolicy,
    ClientTLSSettings,
    Destination,
    DestinationRule,
    Http1Codec,
    HTTPRoute,
    MeshConfig,
    MeshProxy,
    MtlsMode,
    PeerAuthentication,
    Resource,
    RouteDestination,
    ServiceEntry,
    StringMatch,
    Telemetry,
    TLSMode,
    VirtualService,
    WorkloadSelector,
    yaml_key,
)
from meshproxy.errors import ConfigIssue

# Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on names (router_filter.rst), for `retryOn`.
RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
# Kubernetes' cluster DNS suffix; Istio's default `domainSuffix`.
CLUSTER_DOMAIN = "cluster.local"
DEFAULT_NAMESPACE = "default"
# Istio's redirect codes (virtual_service.proto HTTPRedirect.redirect_code).
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def fqdn(host: str, namespace: str) -> str:
    """Istio's ResolveShortnameToFQDN: a name without a dot is a Kubernetes service short name."""
    host = host.lower()
    if "." in host or ":" in host or host.startswith("*"):
        return host  # already qualified, a wildcard, or an IPv6 address
    return f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def key_path(parent: str, key: str) -> str:
    """A field path step: ``parent.key``, or ``parent["key"]`` for keys that are not identifiers."""
    if _IDENT.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f'{parent}["{key}"]'


def kind_of(resource: Resource) -> str:
    return type(resource).__name__


Report = Callable[[ConfigIssue], None]
Locator = Callable[[Resource, str], tuple[str, int]]


class _Checker:
    def __init__(self, locate: Locator, report: Report, namespace: str) -> None:
        self.locate = locate
        self.report = report
        self.namespace = namespace
        self.failed = False

    def ns(self, resource: Resource) -> str:
        return resource.metadata.namespace or self.namespace

    def error(self, resource: Resource, path: str, message: str) -> None:
        file, line = self.locate(resource, path)
        self.report(
            ConfigIssue(
                file=file,
                line=line,
                where=f"{kind_of(resource)} {resource.metadata.name}",
                path=path,
                message=message,
            )
        )
        self.failed = True


def assemble(
    resources: Sequence[Resource],
    *,
    sources: tuple[str, ...],
    locate: Locator,
    report: Report,
) -> MeshConfig | None:
    """Validate the documents together and return the config with namespaces filled in."""
    bootstraps = [r for r in resources if isinstance(r, MeshProxy)]
    namespace = (bootstraps[0].metadata.namespace if bootstraps else "") or DEFAULT_NAMESPACE
    chk = _Checker(locate, report, namespace)
    if not bootstraps:
        report(
            ConfigIssue(
                file=sources[0] if sources else "-",
                line=0,
                where="",
                path="",
                message="no MeshProxy bootstrap document (apiVersion: meshproxy.io/v1alpha1, "
                "kind: MeshProxy)",
            )
        )
        return None
    for extra in bootstraps[1:]:
        chk.error(extra, "kind", "only one MeshProxy bootstrap document is allowed")

    seen: dict[tuple[str, str, str], Resource] = {}
    for r in resources:
        key = (kind_of(r), chk.ns(r), r.metadata.name)
        if key in seen and not isinstance(r, MeshProxy):
            file, line = locate(seen[key], "metadata.name")
            chk.error(
                r,
                "metadata.name",
                f"duplicate {key[0]} {key[2]!r} (first defined at {file}:{line})",
            )
        seen.setdefault(key, r)
        if not _DNS_LABEL.match(r.metadata.name.replace(".", "-")):
            chk.error(r, "metadata.name", f"invalid name {r.metadata.name!r} (a DNS-1123 name)")

    entries = [r for r in resources if isinstance(r, ServiceEntry)]
    rules = [r for r in resources if isinstance(r, DestinationRule)]
    services = [r for r in resources if isinstance(r, VirtualService)]
    telemetries = [r for r in resources if isinstance(r, Telemetry)]
    peer_auths = [r for r in resources if isinstance(r, PeerAuthentication)]
    authz = [r for r in resources if isinstance(r, AuthorizationPolicy)]

    hosts: dict[str, ServiceEntry] = {}
    for se in entries:
        _check_service_entry(chk, se, hosts)
    subsets: dict[str, set[str]] = {}
    for dr in rules:
        _check_destination_rule(chk, dr, hosts, subsets)
    for vs in services:
        _check_virtual_service(chk, vs, hosts, subsets)
    for tm in telemetries:
        for i, tr in enumerate(tm.spec.tracing):
            pct = tr.random_sampling_percentage
            if pct is not None and not 0 <= pct <= 100:
                chk.error(tm, f"spec.tracing[{i}].randomSamplingPercentage", "must be 0..100")
    for pa in peer_auths:
        _check_peer_authentication(chk, pa)
    for ap in authz:
        _check_authorization_policy(chk, ap)
    _check_bootstrap(chk, bootstraps[0])
    _check_certificates_needed(chk, bootstraps[0], peer_auths, rules)
    if chk.failed:
        return None

    def fill(r: Resource) -> Resource:
        if r.metadata.namespace:
            return r
        meta = dataclasses.replace(r.metadata, namespace=namespace)
        return dataclasses.replace(r, metadata=meta)

    return MeshConfig(
        bootstrap=fill(bootstraps[0]),  # type: ignore[arg-type]
        service_entries=tuple(fill(r) for r in entries),  # type: ignore[misc]
        virtual_services=tuple(fill(r) for r in services),  # type: ignore[misc]
        destination_rules=tuple(fill(r) for r in rules),  # type: ignore[misc]
        telemetries=tuple(fill(r) for r in telemetries),  # type: ignore[misc]
        peer_authentications=tuple(fill(r) for r in peer_auths),  # type: ignore[misc]
        authorization_policies=tuple(fill(r) for r in authz),  # type: ignore[misc]
        sources=sources,
    )


def _check_peer_authentication(chk: _Checker, pa: PeerAuthentication) -> None:
    """Semantic checks of a PeerAuthentication (rules in ``config/security.py``)."""
    for path, message in security.peer_authentication_problems(pa):
        chk.error(pa, path, message)


def _check_authorization_policy(chk: _Checker, ap: AuthorizationPolicy) -> None:
    """Semantic checks of an AuthorizationPolicy (rules in ``config/security.py``)."""
    for path, message in security.authorization_policy_problems(ap):
        chk.error(ap, path, message)


def _check_bootstrap(chk: _Checker, mp: MeshProxy) -> None:
    spec = mp.spec
    if not spec.service_account:
        chk.error(mp, "spec.serviceAccount", "must not be empty")
    if not spec.trust_domain or "/" in spec.trust_domain:
        chk.error(mp, "spec.trustDomain", f"invalid trust domain {spec.trust_domain!r}")
    if spec.outbound is None and spec.inbound is None:
        chk.error(mp, "spec", "define at least one of outbound and inbound")
    if spec.retry_buffer_bytes < 0:
        chk.error(mp, "spec.retryBufferBytes", "must not be negative")
    if spec.drain_duration < 0:
        chk.error(mp, "spec.drainDuration", "must not be negative")
    if spec.timeouts.request_headers <= 0:
        chk.error(mp, "spec.timeouts.requestHeaders", "must be positive")
    if spec.timeouts.idle <= 0:
        chk.error(mp, "spec.timeouts.idle", "must be positive")
    if spec.http1_codec is Http1Codec.HTTPTOOLS and importlib.util.find_spec("httptools") is None:
        chk.error(
            mp,
            "spec.http1Codec",
            "httptools is not installed: install meshproxy[fast], or choose h11 or auto",
        )
    bound: dict[str, str] = {}
    for path, addr in (
        ("spec.admin", spec.admin),
        ("spec.outbound.address", spec.outbound.address if spec.outbound else None),
        ("spec.inbound.address", spec.inbound.address if spec.inbound else None),
    ):
        if addr is None or addr.port == 0:
            continue
        key = str(addr)
        if key in bound:
            chk.error(mp, path, f"address {key} is already used by {bound[key]}")
        bound[key] = path
    _check_workload_tls(chk, mp)


def _check_workload_tls(chk: _Checker, mp: MeshProxy) -> None:
    tls = mp.spec.tls
    if tls is None:
        return
    files = {"certChain": tls.cert_chain, "privateKey": tls.private_key, "rootCert": tls.root_cert}
    if tls.ca:
        for key, value in files.items():
            if value:
                chk.error(mp, f"spec.tls.{key}", "set either ca (self-issued) or the three files")
    else:
        for key, value in files.items():
            if not value:
                chk.error(mp, f"spec.tls.{key}", "required (or set spec.tls.ca for a dev CA)")
    if tls.ttl < 60:
        chk.error(mp, "spec.tls.ttl", "must be at least 1m")
    if tls.handshake_timeout <= 0:
        chk.error(mp, "spec.tls.handshakeTimeout", "must be positive")


def _check_client_tls(
    chk: _Checker, dr: DestinationRule, path: str, tls: ClientTLSSettings
) -> None:
    """DestinationRule ``tls`` (istio/api ClientTLSSettings; Istio's validation rules)."""
    if tls.credential_name:
        chk.error(
            dr,
            f"{path}.credentialName",
            "Kubernetes secrets are not read by meshproxy: give clientCertificate, privateKey "
            "and caCertificates file paths",
        )
    if tls.mode is TLSMode.ISTIO_MUTUAL:
        for name in ("client_certificate", "private_key", "ca_certificates"):
            if getattr(tls, name):
                chk.error(
                    dr, f"{path}.{yaml_key(name)}", "must be empty with ISTIO_MUTUAL (the mesh's)"
                )
    elif tls.mode is TLSMode.MUTUAL and not tls.credential_name:
        for name in ("client_certificate", "private_key"):
            if not getattr(tls, name):
                chk.error(dr, f"{path}.{yaml_key(name)}", "required with MUTUAL")
    elif tls.mode is TLSMode.DISABLE or tls.mode is TLSMode.SIMPLE:
        for name in ("client_certificate", "private_key"):
            if getattr(tls, name):
                chk.error(dr, f"{path}.{yaml_key(name)}", f"not used with {tls.mode.value}")


def _applies_to(selector: WorkloadSelector | None, ns: str, mp: MeshProxy) -> bool:
    if ns not in (mp.metadata.namespace or DEFAULT_NAMESPACE, ROOT_NAMESPACE):
        return False
    labels = selector.match_labels if selector is not None else {}
    return all(mp.metadata.labels.get(k) == v for k, v in labels.items())


def _check_certificates_needed(
    chk: _Checker,
    mp: MeshProxy,
    peer_auths: Sequence[PeerAuthentication],
    rules: Sequence[DestinationRule],
) -> None:
    """mTLS without a certificate cannot work: say so at load, at the field that asks for it."""
    if mp.spec.tls is not None:
        return
    need = "needs this workload's certificate: set spec.tls in the MeshProxy bootstrap"
    if mp.spec.inbound is not None:
        for pa in peer_auths:
            if not _applies_to(pa.spec.selector, chk.ns(pa), mp):
                continue
            if pa.spec.mtls is not None and pa.spec.mtls.mode is MtlsMode.STRICT:
                chk.error(pa, "spec.mtls.mode", f"STRICT {need}")
            for port, mtls in pa.spec.port_level_mtls.items():
                if mtls.mode is MtlsMode.STRICT:
                    chk.error(pa, f"spec.portLevelMtls.{port}.mode", f"STRICT {need}")
    for dr in rules:
        for path, tls in _client_tls_settings(dr):
            if tls.mode is TLSMode.ISTIO_MUTUAL:
                chk.error(dr, f"{path}.mode", f"ISTIO_MUTUAL {need}")


def _client_tls_settings(dr: DestinationRule) -> list[tuple[str, ClientTLSSettings]]:
    out: list[tuple[str, ClientTLSSettings]] = []
    policies = [("spec.trafficPolicy", dr.spec.traffic_policy)] + [
        (f"spec.subsets[{i}].trafficPolicy", s.traffic_policy)
        for i, s in enumerate(dr.spec.subsets)
    ]
    for path, tp in policies:
        if tp is None:
            continue
        if tp.tls is not None:
            out.append((f"{path}.tls", tp.tls))
        for j, pls in enumerate(tp.port_level_settings):
            if pls.tls is not None:
                out.append((f"{path}.portLevelSettings[{j}].tls", pls.tls))
    return out


def _check_service_entry(chk: _Checker, se: ServiceEntry, hosts: dict[str, ServiceEntry]) -> None:
    spec = se.spec
    ns = chk.ns(se)
    if not spec.hosts:
        chk.error(se, "spec.hosts", "at least one host is required")
    for i, host in enumerate(spec.hosts):
        path = f"spec.hosts[{i}]"
        if not host or host == "*" or " " in host:
            chk.error(se, path, f"invalid host {host!r}")
            continue
        name = fqdn(host, ns)
        if name in hosts and hosts[name] is not se:
            other = hosts[name]
            chk.error(
                se,
                path,
                f"host {name!r} is already defined by ServiceEntry {other.metadata.name}",
            )
        hosts[name] = se
    names: set[str] = set()
    numbers: set[int] = set()
    for i, port in enumerate(spec.ports):
        path = f"spec.ports[{i}]"
        if not 0 < port.number < 65536:
            chk.error(se, f"{path}.number", f"invalid port {port.number}")
        if port.number in numbers:
            chk.error(se, f"{path}.number", f"duplicate port {port.number}")
        numbers.add(port.number)
        if port.name:
            if port.name in names:
                chk.error(se, f"{path}.name", f"duplicate port name {port.name!r}")
            names.add(port.name)
        if port.target_port is not None and not 0 < port.target_port < 65536:
            chk.error(se, f"{path}.targetPort", f"invalid port {port.target_port}")
    if not spec.ports:
        chk.error(se, "spec.ports", "at least one port is required")
    for i, address in enumerate(spec.addresses):
        # Istio's ValidateIPSubnet: each address is an IP or a CIDR (captured connections are
        # routed by them, core/routing.py HostTable.by_address).
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            chk.error(se, f"spec.addresses[{i}]", f"{address!r} is not an IP address or CIDR")
    wildcard = any(h.startswith("*") for h in spec.hosts)
    # STATIC with no endpoints is valid in Istio (endpoints may arrive later): 503 UH until then.
    if spec.resolution.value == "NONE" and spec.endpoints:
        chk.error(se, "spec.endpoints", "resolution NONE takes no endpoints (use STATIC or DNS)")
    if wildcard and spec.resolution.value not in ("NONE", "DNS"):
        chk.error(se, "spec.resolution", "wildcard hosts need resolution NONE or DNS")
    for i, ep in enumerate(spec.endpoints):
        path = f"spec.endpoints[{i}]"
        if not ep.address:
            chk.error(se, f"{path}.address", "required field is missing")
        elif spec.resolution.value == "STATIC" and not ep.address.startswith("unix://"):
            try:
                ipaddress.ip_address(ep.address)
            except ValueError:
                chk.error(
                    se,
                    f"{path}.address",
                    f"{ep.address!r} is not an IP address (resolution STATIC; use DNS for names)",
                )
        for pname, pnum in ep.ports.items():
            if pname not in names:
                chk.error(
                    se,
                    key_path(f"{path}.ports", pname),
                    f"port name {pname!r} is not one of spec.ports",
                )
            if not 0 < pnum < 65536:
                chk.error(se, key_path(f"{path}.ports", pname), f"invalid port {pnum}")
        if ep.weight is not None and ep.weight < 0:
            chk.error(se, f"{path}.weight", "must not be negative")


def _check_destination_rule(
    chk: _Checker,
    dr: DestinationRule,
    hosts: dict[str, ServiceEntry],
    subsets: dict[str, set[str]],
) -> None:
    host = fqdn(dr.spec.host, chk.ns(dr))
    if not dr.spec.host:
        chk.error(dr, "spec.host", "required field is missing")
    elif not host.startswith("*") and host not in hosts:
        chk.error(dr, "spec.host", f"host {dr.spec.host!r} is not defined by any ServiceEntry")
    names = subsets.setdefault(host, set())
    for i, subset in enumerate(dr.spec.subsets):
        if not subset.name:
            chk.error(dr, f"spec.subsets[{i}].name", "required field is missing")
        elif subset.name in names:
            chk.error(dr, f"spec.subsets[{i}].name", f"duplicate subset {subset.name!r} for {host}")
        names.add(subset.name)
    policies = [("spec.trafficPolicy", dr.spec.traffic_policy)] + [
        (f"spec.subsets[{i}].trafficPolicy", s.traffic_policy)
        for i, s in enumerate(dr.spec.subsets)
    ]
    for path, tls in _client_tls_settings(dr):
        _check_client_tls(chk, dr, path, tls)
    for path, tp in policies:
        if tp is None:
            continue
        lb = tp.load_balancer
        if lb is not None and lb.simple is not None and lb.consistent_hash is not None:
            chk.error(dr, f"{path}.loadBalancer", "simple and consistentHash are exclusive")
        if lb is not None and lb.consistent_hash is not None:
            ch = lb.consistent_hash
            keys = [
                ch.http_header_name is not None,
                ch.http_cookie is not None,
                bool(ch.use_source_ip),
                ch.http_query_parameter_name is not None,
            ]
            if sum(keys) != 1:
                chk.error(
                    dr,
                    f"{path}.loadBalancer.consistentHash",
                    "set exactly one of httpHeaderName, httpCookie, useSourceIp, "
                    "httpQueryParameterName",
                )
        tcp = tp.connection_pool.tcp if tp.connection_pool is not None else None
        if tcp is not None and tcp.connect_timeout is not None and tcp.connect_timeout < 0.001:
            chk.error(dr, f"{path}.connectionPool.tcp.connectTimeout", "must be at least 1ms")
        rb = tp.retry_budget
        if rb is not None and rb.percent is not None and not 0 <= rb.percent.value <= 100:
            chk.error(dr, f"{path}.retryBudget.percent.value", "must be 0..100")
        od = tp.outlier_detection
        if od is not None:
            for name in ("interval", "base_ejection_time"):
                value = getattr(od, name)
                if value is not None and value < 0.001:
                    chk.error(
                        dr, f"{path}.outlierDetection.{yaml_key(name)}", "must be at least 1ms"
                    )
            for name in ("max_ejection_percent", "min_health_percent"):
                value = getattr(od, name)
                if value is not None and not 0 <= value <= 100:
                    chk.error(dr, f"{path}.outlierDetection.{yaml_key(name)}", "must be 0..100")


# RE2 (Envoy's regex engine) has no backreferences, lookaround or conditionals; Envoy rejects
# such patterns when the config loads, and so do we, never at request time.
_NOT_RE2 = re.compile(r"\\[1-9]|\(\?[=!<]|\(\?P=|\\g<|\(\?\(")


def re2_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not an RE2 regex meshproxy can honour, or None."""
    if pattern == "*":
        return None  # Istio accepts "*" as a presence test
    if _NOT_RE2.search(pattern):
        return "uses a feature RE2 does not support (backreference, lookaround or conditional)"
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return None


def _check_match(chk: _Checker, vs: VirtualService, path: str, m: StringMatch | None) -> None:
    if m is None:
        return
    set_count = sum(v is not None for v in (m.exact, m.prefix, m.regex))
    if set_count > 1:
        chk.error(vs, path, "set only one of exact, prefix and regex")
    if m.regex is not None:
        problem = re2_problem(m.regex)
        if problem is not None:
            chk.error(vs, f"{path}.regex", f"invalid regex {m.regex!r}: {problem}")


def _check_destination(
    chk: _Checker,
    vs: VirtualService,
    path: str,
    dest: Destination,
    hosts: dict[str, ServiceEntry],
    subsets: dict[str, set[str]],
) -> None:
    host = fqdn(dest.host, chk.ns(vs))
    if not dest.host:
        chk.error(vs, f"{path}.host", "required field is missing")
        return
    if host not in hosts and not _wildcard_covers(hosts, host):
        chk.error(vs, f"{path}.host", f"host {dest.host!r} is not defined by any ServiceEntry")
        return
    if dest.subset and dest.subset not in subsets.get(host, ()):
        chk.error(
            vs, f"{path}.subset", f'subset "{dest.subset}" is not defined for host {dest.host}'
        )
    if dest.port is not None and host in hosts:
        ports = {p.number for p in hosts[host].spec.ports}
        if dest.port.number not in ports:
            chk.error(
                vs, f"{path}.port.number", f"port {dest.port.number} is not a port of {dest.host}"
            )


def _wildcard_covers(hosts: Iterable[str], host: str) -> bool:
    return any(h.startswith("*") and host.endswith(h[1:]) for h in hosts)


def _check_route(
    chk: _Checker,
    vs: VirtualService,
    path: str,
    route: HTTPRoute,
    hosts: dict[str, ServiceEntry],
    subsets: dict[str, set[str]],
) -> None:
    actions = sum(
        x
        for x in (bool(route.route), route.redirect is not None, route.direct_response is not None)
    )
    if route.delegate is not None:
        actions += 1
    if actions > 1:
        chk.error(vs, path, "route, redirect, directResponse and delegate are exclusive")
    if actions == 0:
        chk.error(vs, path, "one of route, redirect, directResponse or delegate is required")
    for j, m in enumerate(route.match):
        mp = f"{path}.match[{j}]"
        for fname in ("uri", "scheme", "method", "authority"):
            _check_match(chk, vs, f"{mp}.{fname}", getattr(m, fname))
        for group in ("headers", "without_headers", "query_params"):
            for key, sm in getattr(m, group).items():
                gp = key_path(f"{mp}.{yaml_key(group)}", key)
                if group != "query_params" and key != key.lower():
                    chk.error(vs, gp, f"header name {key!r} must be lower case")
                _check_match(chk, vs, gp, sm)
    weights = []
    for j, dest in enumerate(route.route):
        dp = f"{path}.route[{j}]"
        _check_destination(chk, vs, f"{dp}.destination", dest.destination, hosts, subsets)
        if dest.weight is not None and dest.weight < 0:
            chk.error(vs, f"{dp}.weight", "must not be negative")
        weights.append(
            dest.weight if dest.weight is not None else (100 if len(route.route) == 1 else 0)
        )
    if len(route.route) > 1 and not any(w for w in weights):
        chk.error(vs, f"{path}.route", "all weights are zero")
    if route.timeout is not None and route.timeout < 0:
        chk.error(vs, f"{path}.timeout", "must not be negative")
    if route.retries is not None:
        if route.retries.attempts < 0:
            chk.error(vs, f"{path}.retries.attempts", "must not be negative")
        for raw in route.retries.retry_on.split(","):
            token = raw.strip()
            if token and not (token.isdigit() and len(token) == 3) and token not in RETRY_ON:
                chk.error(
                    vs,
                    f"{path}.retries.retryOn",
                    f"unknown retry condition {token!r} (Envoy's x-envoy-retry-on names or "
                    "HTTP status codes)",
                )
        if route.retries.backoff is not None and route.retries.backoff < 0.001:
            chk.error(vs, f"{path}.retries.backoff", "must be at least 1ms")
        if route.retries.per_try_timeout is not None and route.retries.per_try_timeout < 0.001:
            chk.error(vs, f"{path}.retries.perTryTimeout", "must be at least 1ms")
    if route.redirect is not None and route.redirect.redirect_code not in _REDIRECT_CODES:
        chk.error(
            vs,
            f"{path}.redirect.redirectCode",
            f"invalid redirect code {route.redirect.redirect_code}",
        )
    if route.direct_response is not None and not 200 <= route.direct_response.status <= 599:
        chk.error(vs, f"{path}.directResponse.status", "must be an HTTP status 200..599")
    if route.fault is not None:
        for fname in ("delay", "abort"):
            f = getattr(route.fault, fname)
            if f is not None and f.percentage is not None and not 0 <= f.percentage.value <= 100:
                chk.error(vs, f"{path}.fault.{fname}.percentage.value", "must be 0..100")
        if route.fault.abort is not None:
            status = route.fault.abort.http_status
            if status is not None and not 200 <= status <= 599:
                chk.error(vs, f"{path}.fault.abort.httpStatus", "must be an HTTP status 200..599")
    if route.mirror is not None:
        _check_destination(chk, vs, f"{path}.mirror", route.mirror, hosts, subsets)
    for j, mirror in enumerate(route.mirrors):
        _check_destination(
            chk, vs, f"{path}.mirrors[{j}].destination", mirror.destination, hosts, subsets
        )
    if route.mirror_percentage is not None and not 0 <= route.mirror_percentage.value <= 100:
        chk.error(vs, f"{path}.mirrorPercentage.value", "must be 0..100")
    if route.rewrite is not None and route.rewrite.uri_regex_rewrite is not None:
        problem = re2_problem(route.rewrite.uri_regex_rewrite.match)
        if problem is not None:
            chk.error(vs, f"{path}.rewrite.uriRegexRewrite.match", f"invalid regex: {problem}")
    if route.rewrite is not None and route.rewrite.uri and route.rewrite.uri_regex_rewrite:
        chk.error(vs, f"{path}.rewrite", "uri and uriRegexRewrite are exclusive")
    if route.redirect is not None and route.redirect.uri and route.redirect.prefix_rewrite:
        chk.error(vs, f"{path}.redirect", "uri and prefixRewrite are exclusive")
    if route.cors_policy is not None:
        for j, origin in enumerate(route.cors_policy.allow_origins):
            _check_match(chk, vs, f"{path}.corsPolicy.allowOrigins[{j}]", origin)


def _check_virtual_service(
    chk: _Checker,
    vs: VirtualService,
    hosts: dict[str, ServiceEntry],
    subsets: dict[str, set[str]],
) -> None:
    if not vs.spec.hosts:
        chk.error(vs, "spec.hosts", "at least one host is required")
    names: set[str] = set()
    for i, route in enumerate(vs.spec.http):
        path = f"spec.http[{i}]"
        if route.name:
            if route.name in names:
                chk.error(vs, f"{path}.name", f"duplicate route name {route.name!r}")
            names.add(route.name)
        _check_route(chk, vs, path, route, hosts, subsets)
    l4_routes: list[tuple[str, tuple[RouteDestination, ...]]] = [
        (f"spec.tcp[{i}]", r.route) for i, r in enumerate(vs.spec.tcp)
    ] + [(f"spec.tls[{i}]", r.route) for i, r in enumerate(vs.spec.tls)]
    for prefix, dests in l4_routes:
        for j, dest in enumerate(dests):
            _check_destination(
                chk, vs, f"{prefix}.route[{j}].destination", dest.destination, hosts, subsets
            )


# ---------------------------------------------------------------------------------------------
# Telemetry resources: which apply to this proxy (istio/api telemetry.proto "precedence").

ROOT_NAMESPACE = "istio-system"


def applicable_telemetries(config: MeshConfig) -> list[Telemetry]:
    """The ``Telemetry`` resources that apply to this proxy, most specific first (Istio's
    precedence: a workload selector in the proxy's namespace, then the namespace-wide one, then
    the mesh-wide one in the root namespace); within a level, in file order. Resources with
    ``targetRefs`` select gateways and services, not sidecars, and are left out."""
    meta = config.bootstrap.metadata
    labels = meta.labels
    workload: list[Telemetry] = []
    namespace: list[Telemetry] = []
    mesh: list[Telemetry] = []
    for tm in config.telemetries:
        spec = tm.spec
        if spec.target_refs:
            continue
        ns = tm.metadata.namespace or meta.namespace
        selector = spec.selector.match_labels if spec.selector is not None else {}
        if selector:
            if ns in (meta.namespace, ROOT_NAMESPACE) and all(
                labels.get(k) == v for k, v in selector.items()
            ):
                workload.append(tm)
        elif ns == meta.namespace:
            namespace.append(tm)
        elif ns == ROOT_NAMESPACE:
            mesh.append(tm)
    return [*workload, *namespace, *mesh]


def metrics_enabled(config: MeshConfig) -> bool:
    """Istio's standard metrics are on unless the most specific Telemetry that configures
    ``metrics`` disables them all (an override with ``disabled: true`` and no metric match)."""
    for tm in applicable_telemetries(config):
        for metrics in tm.spec.metrics:
            for override in metrics.overrides:
                everything = override.match is None or override.match.metric in ("", "ALL_METRICS")
                if everything and override.disabled is not None:
                    return not override.disabled
    return True
