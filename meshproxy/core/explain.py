"""The route explainer: why a request goes where it goes, and what in a config can never work.

Owns ``meshproxy route`` and the admin ``GET /route`` answer, and the warnings of ``meshproxy
validate``. ``explain_request`` walks the same compiled objects the live route step reads
(``RouteTable``, ``HostTable``, the rules' match blocks) and states, without sending anything: the
VirtualService and rule that match, each earlier rule's first failing condition per match block,
every destination with its share and the endpoints its subset selects, and the timeout, retries,
fault, rewrite, redirect or direct response, mirrors and header operations that apply. A host
without a VirtualService goes to its own cluster; an unknown host is passed through under
``ALLOW_ANY`` or answered 502 under ``REGISTRY_ONLY``; no rule matching is a 404 ``NR``
(reference §1.7).

``lint`` reports what Istio lets through silently: two VirtualServices claiming one host, a rule an
earlier rule always takes the requests of, and weight on a subset that selects no endpoint. It is
sound rather than complete: a warning is given only when it is certain.

Rules: pure; no I/O, no clock, no randomness; the explanation mirrors ``layers/route.py`` and must
change with it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from urllib.parse import urlsplit

from meshproxy.config.istio import fqdn
from meshproxy.config.model import (
    HTTPMatchRequest,
    HTTPRoute,
    MeshConfig,
    StringMatch,
    VirtualService,
)
from meshproxy.core.match import MatchBlock, RequestView
from meshproxy.core.routetable import (
    ActionKind,
    CompiledVirtualService,
    HeaderOps,
    Route,
    RouteTable,
    redirect_location,
    rewrite_target,
    shadow_authority,
)
from meshproxy.core.routing import (
    PASSTHROUGH_NAME,
    Cluster,
    ClusterKind,
    Endpoint,
    HostTable,
    LbKind,
    Miss,
    Target,
    split_authority,
)

# Istio's retry policy for a route without `retries` (reference §1.2, retry.go defaultRetryOn).
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
_BODY_PREVIEW = 200  # characters of a direct response body shown
_TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
_MAX_TIMEOUT_MS = 2**63 - 1


class Outcome(enum.Enum):
    """What the proxy does with the request."""

    FORWARD = "forward"  # a VirtualService rule sends it to weighted destinations
    REDIRECT = "redirect"  # the rule answers with a redirect
    DIRECT_RESPONSE = "direct_response"  # the rule answers itself
    NO_ROUTE = "no_route"  # the host has a VirtualService and no rule matches: 404 NR
    SERVICE = "service"  # no VirtualService: the host's own cluster
    PASSTHROUGH = "passthrough"  # unknown host, ALLOW_ANY: Istio's PassthroughCluster
    BLACKHOLE = "blackhole"  # unknown host, REGISTRY_ONLY: Istio's BlackHoleCluster, 502


# ---------------------------------------------------------------------------------------------
# The explanation


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointInfo:
    address: str
    port: int
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderOpsInfo:
    """Header operations as configured, names lower-case; applied remove -> set -> add."""

    set: Mapping[str, str]
    add: Mapping[str, str]
    remove: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationInfo:
    host: str  # the service FQDN, or the request's host for a passthrough
    subset: str
    port: int
    cluster: str
    weight: int
    share: float  # percent of the requests this rule takes
    lb: str  # the DestinationRule's load balancer
    original_dst: bool  # no endpoint list: the request's own host and port
    endpoints: tuple[EndpointInfo, ...]
    request_headers: HeaderOpsInfo | None = None
    response_headers: HeaderOpsInfo | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockCheck:
    """One ``match[]`` block of a rule: the first condition that failed, or None if it matched."""

    index: int
    name: str
    conditions: tuple[str, ...]
    failed: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleCheck:
    index: int  # the rule's position in the VirtualService's ``http[]``
    name: str
    matched: bool
    blocks: tuple[BlockCheck, ...]  # empty: the rule has no match conditions

    @property
    def label(self) -> str:
        return f"http[{self.index}]" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryInfo:
    attempts: int  # retries, not tries: at most 1 + attempts tries
    retry_on: str
    per_try_timeout: float | None
    istio_default: bool  # the route sets no ``retries``


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultInfo:
    delay: float | None
    delay_percent: float
    abort_status: int | None
    abort_grpc: str
    abort_percent: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RewriteInfo:
    uri: str | None
    regex: str | None
    substitution: str
    authority: str | None
    path: str  # the upstream request target after the rewrite


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorInfo:
    host: str
    cluster: str
    percent: float
    shadow_authority: str  # the copy's Host: ``-shadow`` appended to the host part
    endpoints: tuple[EndpointInfo, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    method: str
    url: str
    scheme: str
    authority: str
    host: str
    port: int | None  # the destination port routing compares (None: not known)
    path: str
    outcome: Outcome
    status: int | None = None  # a local answer's status (404, 502, a redirect, a direct response)
    flag: str = ""  # the response flag the access log shows (NR)
    virtual_service: str | None = None  # "name.namespace"
    virtual_service_hosts: tuple[str, ...] = ()
    rules: tuple[RuleCheck, ...] = ()  # every rule tried, in order, up to the matching one
    rule: RuleCheck | None = None  # the rule that matched
    destinations: tuple[DestinationInfo, ...] = ()
    timeout: float | None = None
    timeout_source: str = ""
    retries: RetryInfo | None = None
    fault: FaultInfo | None = None
    rewrite: RewriteInfo | None = None
    redirect_location: str | None = None
    direct_body: str | None = None
    mirrors: tuple[MirrorInfo, ...] = ()
    request_headers: HeaderOpsInfo | None = None
    response_headers: HeaderOpsInfo | None = None
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# explain_request


def parse_url(url: str) -> tuple[str, str, str]:
    """``http://reviews:9080/p?q=1`` -> (scheme, authority, target); no scheme means http."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    authority = parts.netloc.rpartition("@")[2]  # never userinfo
    target = parts.path or "/"
    if not target.startswith("/"):
        target = "/" + target
    if parts.query:
        target += "?" + parts.query
    return parts.scheme.lower() or "http", authority, target


def explain_request(
    hosts: HostTable,
    routes: RouteTable,
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
) -> Explanation:
    """Where ``method url`` with ``headers`` goes, and why. A ``host`` header overrides the URL's
    authority. Raises ``ValueError`` when there is no authority at all."""
    scheme, authority, path = parse_url(url)
    view_headers: dict[str, str] = {}
    for name, value in headers.items():
        key = name.strip().lower()
        view_headers[key] = f"{view_headers[key]},{value}" if key in view_headers else value
    if view_headers.get("host"):
        authority = view_headers["host"].strip()
    if not authority:
        raise ValueError(f"no host in {url!r} and no host header")
    # What the live path adds before routing reads the request (layers/headers.py).
    view_headers["host"] = authority
    view_headers.setdefault("x-forwarded-proto", scheme)
    method = method.upper()
    host, port = split_authority(authority, None)
    base = Explanation(
        method=method,
        url=url,
        scheme=scheme,
        authority=authority,
        host=host,
        port=port,
        path=path,
        outcome=Outcome.NO_ROUTE,  # each answer below says what it is
    )
    vs = routes.lookup(host) if routes.virtual_services else None
    if vs is None:
        return _without_virtual_service(hosts, authority, host, port, base)
    if port is None:
        # As the route step: a Host without a port means the service's default port.
        service = hosts.service(vs.hosts[0]) if vs.hosts else None
        port = service.default.port if service is not None else 80
    view = RequestView(
        method=method,
        path=path,
        authority=authority,
        scheme=scheme,
        port=port,
        headers=view_headers,
    )
    base = replace(base, port=port, virtual_service=vs.name, virtual_service_hosts=vs.hosts)
    checks, found = _check_rules(vs, view)
    if found is None:
        return replace(
            base,
            outcome=Outcome.NO_ROUTE,
            status=404,
            flag="NR",
            rules=checks,
            notes=(f"no rule of VirtualService {vs.name} matched: 404 NR (reference §1.7)",),
        )
    route, block = found
    return _with_rule(route, block, checks, view, view_headers, base)


def _without_virtual_service(
    hosts: HostTable, authority: str, host: str, port: int | None, base: Explanation
) -> Explanation:
    found = hosts.resolve(authority)
    if isinstance(found, Target):
        cluster = found.cluster
        return replace(
            base,
            outcome=Outcome.SERVICE,
            port=cluster.port,
            destinations=(_destination(cluster, cluster.service, 100, 100),),
            retries=_retries(None),
            timeout_source="no VirtualService: no route timeout (Istio's default: disabled)",
            notes=(f"no VirtualService for {host}: the service's own cluster",),
        )
    if found is Miss.BLACKHOLE:
        return replace(
            base,
            outcome=Outcome.BLACKHOLE,
            port=port,
            status=502,
            notes=(f"{host} is not in the registry and outboundTrafficPolicy is REGISTRY_ONLY",),
        )
    port = port or 80
    return replace(
        base,
        outcome=Outcome.PASSTHROUGH,
        port=port,
        destinations=(
            DestinationInfo(
                host=host,
                subset="",
                port=port,
                cluster=PASSTHROUGH_NAME,
                weight=100,
                share=100.0,
                lb=LbKind.PASSTHROUGH.value,
                original_dst=True,
                endpoints=(),
            ),
        ),
        retries=_retries(None),
        notes=(
            f"{host} is not in the registry; outboundTrafficPolicy ALLOW_ANY passes it through "
            f"to {host}:{port}",
        ),
    )


def _check_rules(
    vs: CompiledVirtualService, view: RequestView
) -> tuple[tuple[RuleCheck, ...], tuple[Route, MatchBlock | None] | None]:
    """Every rule in order up to the first match, with each block's first failing condition."""
    checks: list[RuleCheck] = []
    for route in vs.routes:
        blocks: list[BlockCheck] = []
        matched: MatchBlock | None = None
        for block in route.blocks:
            failed = block.first_failure(view)
            blocks.append(
                BlockCheck(
                    index=block.index,
                    name=block.name,
                    conditions=tuple(c.description for c in block.conditions),
                    failed=failed.description if failed is not None else None,
                )
            )
            if failed is None:
                matched = block
                break
        ok = not route.blocks or matched is not None
        checks.append(
            RuleCheck(index=route.index, name=route.name, matched=ok, blocks=tuple(blocks))
        )
        if ok:
            return tuple(checks), (route, matched)
    return tuple(checks), None


def _with_rule(
    route: Route,
    block: MatchBlock | None,
    checks: tuple[RuleCheck, ...],
    view: RequestView,
    headers: Mapping[str, str],
    base: Explanation,
) -> Explanation:
    notes: list[str] = []
    base = replace(
        base,
        rules=checks,
        rule=checks[-1],
        request_headers=_ops(route.request_ops),
        response_headers=_ops(route.response_ops),
    )
    cors = route.cors
    origin = headers.get("origin")
    if cors is not None and origin is not None:
        preflight = view.method == "OPTIONS" and "access-control-request-method" in headers
        allowed = cors.allowed(origin)
        if preflight and allowed:
            notes.append(f"CORS preflight from allowed origin {origin}: answered 200 by the proxy")
            return replace(base, outcome=Outcome.DIRECT_RESPONSE, status=200, notes=tuple(notes))
        if preflight and not cors.forward_unmatched:
            notes.append(
                f"CORS preflight from origin {origin} (not allowed): answered 200, no CORS"
            )
            return replace(base, outcome=Outcome.DIRECT_RESPONSE, status=200, notes=tuple(notes))
        if preflight:
            notes.append(f"CORS preflight from origin {origin} (not allowed): forwarded")
        elif allowed:
            notes.append(f"CORS: origin {origin} allowed; access-control-* response headers added")
        else:
            notes.append(f"CORS: origin {origin} not allowed; no CORS response headers")
    if route.kind is ActionKind.REDIRECT:
        redirect = route.redirect
        return replace(
            base,
            outcome=Outcome.REDIRECT,
            status=redirect.redirect_code if redirect is not None else 301,
            redirect_location=redirect_location(redirect, block, view)
            if redirect is not None
            else None,
            notes=tuple(notes),
        )
    if route.kind is ActionKind.DIRECT:
        body = route.direct_body.decode("utf-8", "replace")
        if len(body) > _BODY_PREVIEW:
            body = body[:_BODY_PREVIEW] + "..."
        return replace(
            base,
            outcome=Outcome.DIRECT_RESPONSE,
            status=route.direct_status,
            direct_body=body,
            notes=tuple(notes),
        )

    total = route.total_weight
    destinations = tuple(
        _destination(
            wc.cluster,
            wc.service,
            wc.weight,
            total,
            request_ops=wc.request_ops,
            response_ops=wc.response_ops,
        )
        for wc in route.clusters
    )
    if not destinations:
        notes.append("the rule names no destination (delegate is not supported)")
    fault = route.fault
    fault_info = None
    if fault is not None:
        fault_info = FaultInfo(
            delay=fault.delay,
            delay_percent=fault.delay_percent,
            abort_status=fault.abort_status,
            abort_grpc=fault.abort_grpc,
            abort_percent=fault.abort_percent,
        )
    # The route's deadline (none by default); a fault disables timeout and retries (Istio's proto
    # comment on HTTPFaultInjection); the request header overrides it (Envoy router filter).
    timeout = None if fault is not None else route.timeout
    if fault is not None:
        source = "the rule injects faults, which turns off timeout and retries in Istio"
    elif route.timeout is not None:
        source = "the rule's timeout"
    else:
        source = "none set (Istio's default: disabled)"
    header_ms = _uint(headers.get(_TIMEOUT_HEADER))
    if header_ms:
        timeout = min(header_ms, _MAX_TIMEOUT_MS) / 1000.0
        source = f"the request's {_TIMEOUT_HEADER} header"
    retries = None if fault is not None else _retries(route)
    authority_override = (
        route.request_ops.authority()
        or (route.clusters[0].request_ops.authority() if len(route.clusters) == 1 else None)
        or (route.rewrite.authority if route.rewrite is not None else None)
    )
    rewrite = None
    if route.rewrite is not None:
        rw = route.rewrite
        rewrite = RewriteInfo(
            uri=rw.uri,
            regex=rw.regex.pattern if rw.regex is not None else None,
            substitution=rw.regex_substitution,
            authority=authority_override,
            path=rewrite_target(route, block, view.path),
        )
    elif authority_override is not None:
        rewrite = RewriteInfo(
            uri=None, regex=None, substitution="", authority=authority_override, path=view.path
        )
    shadow = shadow_authority(view.authority)
    mirrors = tuple(
        MirrorInfo(
            host=m.service,
            cluster=m.cluster.name,
            percent=m.percent,
            shadow_authority=shadow,
            endpoints=_endpoints(m.cluster.endpoints),
        )
        for m in route.mirrors
    )
    return replace(
        base,
        outcome=Outcome.FORWARD,
        destinations=destinations,
        timeout=timeout,
        timeout_source=source,
        retries=retries,
        fault=fault_info,
        rewrite=rewrite,
        mirrors=mirrors,
        notes=tuple(notes),
    )


def _uint(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None


def _endpoints(endpoints: Iterable[Endpoint]) -> tuple[EndpointInfo, ...]:
    return tuple(
        EndpointInfo(address=e.address, port=e.port, labels=MappingProxyType(dict(e.labels)))
        for e in endpoints
    )


def _lb(cluster: Cluster) -> str:
    lb = cluster.lb
    ch = lb.hash
    if ch is None:
        return lb.kind.value
    if ch.http_header_name:
        key = f"header {ch.http_header_name}"
    elif ch.http_cookie is not None:
        key = f"cookie {ch.http_cookie.name}"
    elif ch.use_source_ip:
        key = "source IP"
    elif ch.http_query_parameter_name:
        key = f"query parameter {ch.http_query_parameter_name}"
    else:
        key = "no key"
    return f"{lb.kind.value} by {key}"


def _destination(
    cluster: Cluster,
    service: str,
    weight: int,
    total: int,
    *,
    request_ops: HeaderOps | None = None,
    response_ops: HeaderOps | None = None,
) -> DestinationInfo:
    return DestinationInfo(
        host=service,
        subset=cluster.subset,
        port=cluster.port,
        cluster=cluster.name,
        weight=weight,
        share=round(weight * 100.0 / total, 4) if total else 0.0,
        lb=_lb(cluster),
        original_dst=cluster.kind is ClusterKind.ORIGINAL_DST,
        endpoints=_endpoints(cluster.endpoints),
        request_headers=_ops(request_ops),
        response_headers=_ops(response_ops),
    )


def _ops(ops: HeaderOps | None) -> HeaderOpsInfo | None:
    if ops is None or ops.empty:
        return None

    def text(items: Sequence[tuple[bytes, bytes]]) -> Mapping[str, str]:
        return MappingProxyType({n.decode("latin-1"): v.decode("latin-1") for n, v in items})

    return HeaderOpsInfo(
        set=text(ops.set),
        add=text(ops.add),
        remove=tuple(sorted(n.decode("latin-1") for n in ops.remove)),
    )


def _retries(route: Route | None) -> RetryInfo:
    policy = route.retries if route is not None else None
    if policy is None:
        return RetryInfo(
            attempts=DEFAULT_RETRY_ATTEMPTS,
            retry_on=DEFAULT_RETRY_ON,
            per_try_timeout=None,
            istio_default=True,
        )
    return RetryInfo(
        attempts=policy.attempts,
        retry_on=policy.retry_on,
        per_try_timeout=policy.per_try_timeout,
        istio_default=False,
    )


# ---------------------------------------------------------------------------------------------
# Text and JSON


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:g}ms"
    return f"{value:g}s"


def _percent(value: float) -> str:
    return f"{value:.4g}%"


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"


def _ops_text(ops: HeaderOpsInfo) -> str:
    parts = [f"set {k}: {v}" for k, v in ops.set.items()]
    parts += [f"add {k}: {v}" for k, v in ops.add.items()]
    parts += [f"remove {k}" for k in ops.remove]
    return "; ".join(parts)


def _endpoint_lines(dest: DestinationInfo, indent: str) -> list[str]:
    if dest.original_dst:
        return [f"{indent}endpoint: the request's own destination (original destination)"]
    if not dest.endpoints:
        what = f"subset {dest.subset}" if dest.subset else "the service"
        return [f"{indent}no endpoint: {what} selects none; requests here fail with 503 UH"]
    return [f"{indent}endpoint {e.address}:{e.port} {_labels(e.labels)}" for e in dest.endpoints]


def _rule_lines(check: RuleCheck) -> list[str]:
    if not check.blocks:
        return [f"  {check.label}: matched (no match conditions)"]
    if check.matched:
        block = check.blocks[-1]
        label = f"match[{block.index}]" + (f" ({block.name})" if block.name else "")
        conditions = ", ".join(block.conditions) or "no conditions"
        return [f"  {check.label}: matched by {label}: {conditions}"]
    lines = [f"  {check.label}: no match"]
    for block in check.blocks:
        label = f"match[{block.index}]" + (f" ({block.name})" if block.name else "")
        lines.append(f"    {label}: {block.failed} did not match")
    return lines


def to_text(expl: Explanation) -> str:
    """The explanation for a person, one fact per line."""
    port = f", port {expl.port}" if expl.port is not None else ""
    lines = [f"{expl.method} {expl.scheme}://{expl.authority}{expl.path}"]
    lines.append(f"host {expl.host}{port}")
    if expl.virtual_service is not None:
        hosts = ", ".join(expl.virtual_service_hosts)
        lines.append(f"VirtualService {expl.virtual_service} (hosts: {hosts})")
        lines.extend(line for check in expl.rules for line in _rule_lines(check))
    outcome = expl.outcome
    if outcome is Outcome.FORWARD and expl.rule is not None:
        lines.append(f"route: {expl.rule.label} of VirtualService {expl.virtual_service}")
    elif outcome is Outcome.REDIRECT and expl.rule is not None:
        lines.append(
            f"redirect: {expl.status} to {expl.redirect_location} ({expl.rule.label} of "
            f"VirtualService {expl.virtual_service})"
        )
    elif outcome is Outcome.DIRECT_RESPONSE and expl.rule is not None:
        body = f" body {expl.direct_body!r}" if expl.direct_body else ""
        lines.append(
            f"direct response: {expl.status}{body} ({expl.rule.label} of VirtualService "
            f"{expl.virtual_service})"
        )
    elif outcome is Outcome.NO_ROUTE:
        lines.append("no route: 404 NR")
    elif outcome is Outcome.SERVICE:
        lines.append(f"no VirtualService: cluster {expl.destinations[0].cluster}")
    elif outcome is Outcome.PASSTHROUGH:
        lines.append(f"passthrough (ALLOW_ANY): {PASSTHROUGH_NAME} to {expl.host}:{expl.port}")
    elif outcome is Outcome.BLACKHOLE:
        lines.append("blackhole (REGISTRY_ONLY): 502")
    if expl.destinations and outcome is not Outcome.PASSTHROUGH:
        lines.append("destinations:")
        for d in expl.destinations:
            subset = f" subset {d.subset}" if d.subset else ""
            lines.append(
                f"  {_percent(d.share)} {d.host}{subset} port {d.port} (weight {d.weight})"
            )
            lines.append(f"      cluster {d.cluster}, lb {d.lb}")
            lines.extend(_endpoint_lines(d, "      "))
            if d.request_headers is not None:
                lines.append(f"      request headers: {_ops_text(d.request_headers)}")
            if d.response_headers is not None:
                lines.append(f"      response headers: {_ops_text(d.response_headers)}")
    if outcome in (Outcome.FORWARD, Outcome.SERVICE, Outcome.PASSTHROUGH):
        timeout = _seconds(expl.timeout) if expl.timeout is not None else "none"
        lines.append(f"timeout: {timeout} ({expl.timeout_source})" if expl.timeout_source else "")
        retries = expl.retries
        if retries is None:
            lines.append("retries: none (the rule injects faults)")
        else:
            per_try = (
                f", per try {_seconds(retries.per_try_timeout)}"
                if retries.per_try_timeout is not None
                else ""
            )
            on = f" on {retries.retry_on}" if retries.retry_on else ""
            default = " (Istio's default)" if retries.istio_default else ""
            lines.append(f"retries: {retries.attempts}{on}{per_try}{default}")
    if expl.fault is not None:
        lines.append(f"fault: {_fault_text(expl.fault)}")
    if expl.rewrite is not None:
        rw = expl.rewrite
        parts = []
        if rw.uri is not None:
            parts.append(f"uri {rw.uri!r}")
        if rw.regex is not None:
            parts.append(f"uriRegexRewrite {rw.regex!r} -> {rw.substitution!r}")
        if parts:
            parts.append(f"upstream path {rw.path}")
        if rw.authority is not None:
            parts.append(f"authority {rw.authority}")
        lines.append("rewrite: " + ", ".join(parts))
    if expl.request_headers is not None:
        lines.append(f"request headers: {_ops_text(expl.request_headers)}")
    if expl.response_headers is not None:
        lines.append(f"response headers: {_ops_text(expl.response_headers)}")
    for m in expl.mirrors:
        lines.append(
            f"mirror: {_percent(m.percent)} to {m.host} (cluster {m.cluster}, "
            f"Host {m.shadow_authority}), not awaited"
        )
        if not m.endpoints:
            lines.append("    no endpoint: the copies are dropped")
        lines.extend(f"    endpoint {e.address}:{e.port} {_labels(e.labels)}" for e in m.endpoints)
    lines.extend(f"note: {note}" for note in expl.notes)
    return "\n".join(line for line in lines if line) + "\n"


def _fault_text(fault: FaultInfo) -> str:
    parts = []
    if fault.delay is not None:
        when = _percent(fault.delay_percent) if fault.delay_percent else "no request"
        parts.append(f"delay {_seconds(fault.delay)} for {when} (flag DI)")
    if fault.abort_status is not None or fault.abort_grpc:
        what = f"grpc {fault.abort_grpc}" if fault.abort_grpc else f"{fault.abort_status}"
        when = _percent(fault.abort_percent) if fault.abort_percent else "no request"
        parts.append(f"abort {what} for {when} (flag FI)")
    return "; ".join(parts) or "none"


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def to_json(expl: Explanation) -> dict[str, object]:
    """The explanation as JSON-ready data: the dataclass fields, enums as their values."""
    out = _jsonable(expl)
    assert isinstance(out, dict)
    if expl.rule is not None:
        rule = _jsonable(expl.rule)
        assert isinstance(rule, dict)
        out["rule"] = {"label": expl.rule.label, **rule}
    return out


# ---------------------------------------------------------------------------------------------
# lint


def lint(config: MeshConfig, hosts: HostTable, routes: RouteTable) -> list[str]:
    """Warnings about what Istio accepts but cannot work as written; each names its location."""
    namespace = config.bootstrap.metadata.namespace
    out: list[str] = []
    by_name = {_vs_name(vs, namespace): vs for vs in config.virtual_services}
    for host, winner, loser in routes.shadowed:
        vs = by_name.get(loser)
        where = "spec.hosts"
        if vs is not None:
            ns = vs.metadata.namespace or namespace
            for i, h in enumerate(vs.spec.hosts):
                if fqdn(h, ns) == host:
                    where = f"spec.hosts[{i}]"  # the first listing: the one another one shadows
                    break
        if winner == loser:
            out.append(f"VirtualService {loser}: {where}: host {host} is listed more than once")
        else:
            out.append(
                f"VirtualService {loser}: {where}: host {host} is already claimed by "
                f"VirtualService {winner}; this one is ignored for it"
            )
    for vs in config.virtual_services:
        name = _vs_name(vs, namespace)
        out.extend(f"VirtualService {name}: {w}" for w in _shadowed_rules(vs))
        out.extend(
            f"VirtualService {name}: {w}"
            for w in _empty_subsets(vs, vs.metadata.namespace or namespace, hosts)
        )
    return out


def _vs_name(vs: VirtualService, namespace: str) -> str:
    return f"{vs.metadata.name}.{vs.metadata.namespace or namespace}"


_EVERYTHING = HTTPMatchRequest()  # a rule without match blocks matches as one empty block does


def _shadowed_rules(vs: VirtualService) -> list[str]:
    out: list[str] = []
    rules = vs.spec.http
    for j, later in enumerate(rules):
        blocks = later.match or (_EVERYTHING,)
        cover: list[str] = []
        for b_index, b in enumerate(blocks):
            by = _earlier_cover(vs, rules[:j], b)
            if by is None:
                break
            cover.append(by if not later.match else f"match[{b_index}] by {by}")
        else:
            if len(cover) == 1 and not later.match:
                reason = f"{cover[0]} takes every request first"
            elif len(cover) == 1:
                reason = f"every request it matches is taken first: {cover[0]}"
            else:
                reason = "every request it matches is taken first: " + "; ".join(cover)
            out.append(f"spec.http[{j}]: rule{_name(later)} can never match: {reason}")
    return out


def _name(rule: HTTPRoute) -> str:
    return f' "{rule.name}"' if rule.name else ""


def _earlier_cover(
    vs: VirtualService, earlier: Sequence[HTTPRoute], b: HTTPMatchRequest
) -> str | None:
    """An earlier rule (or one of its blocks) that accepts every request ``b`` accepts, or None."""
    for i, rule in enumerate(earlier):
        if not rule.match:
            if _block_covers(vs, _EVERYTHING, b):
                return f"http[{i}]{_name(rule)} (no match conditions)"
            continue
        for k, a in enumerate(rule.match):
            if _block_covers(vs, a, b):
                return f"http[{i}]{_name(rule)} match[{k}]"
    return None


def _gateways(vs: VirtualService, m: HTTPMatchRequest) -> frozenset[str]:
    return frozenset(m.gateways or vs.spec.gateways or ("mesh",))


_PSEUDO_HEADERS = frozenset({"uri", "scheme", "method", "authority"})  # ignored in `headers`


def _block_covers(vs: VirtualService, a: HTTPMatchRequest, b: HTTPMatchRequest) -> bool:
    """Whether every request block ``b`` accepts, on every proxy it applies to, ``a`` accepts.

    Sound, not complete: each condition of ``a`` must have one in ``b`` on the same field that is
    at least as strict. ``gateways``, ``sourceLabels`` and ``sourceNamespace`` select proxies, so
    ``a`` must apply wherever ``b`` does.
    """
    if not _gateways(vs, b) <= _gateways(vs, a):
        return False
    if a.source_namespace and a.source_namespace != b.source_namespace:
        return False
    if any(b.source_labels.get(k) != v for k, v in a.source_labels.items()):
        return False
    if a.port is not None and a.port != b.port:
        return False
    if a.uri is not None:
        if b.uri is None:
            if not _presence(a.uri):
                return False
        elif not _covers(
            a.uri,
            b.uri,
            a_ic=a.ignore_uri_case and a.uri.regex is None,
            b_ic=b.ignore_uri_case and b.uri.regex is None,
        ):
            return False
    for fname in ("scheme", "method", "authority"):
        sa: StringMatch | None = getattr(a, fname)
        sb: StringMatch | None = getattr(b, fname)
        if sa is None:
            continue
        if sb is None:
            # Every request has a scheme, method and authority: only a presence test covers.
            if not _presence(sa):
                return False
        elif not _covers(sa, sb):
            return False
    for group in ("headers", "query_params"):
        ga: Mapping[str, StringMatch] = getattr(a, group)
        gb: Mapping[str, StringMatch] = getattr(b, group)
        for key, sa in ga.items():
            if group == "headers" and key in _PSEUDO_HEADERS:
                continue
            sb2 = gb.get(key)
            if sb2 is None or not _covers(sa, sb2):
                return False
    for key, sa in a.without_headers.items():
        # ``a`` rejects what ``sa`` accepts; ``b`` must reject at least that much.
        sb3 = b.without_headers.get(key)
        if sb3 is None or not _covers(sb3, sa):
            return False
    return True


def _presence(sm: StringMatch) -> bool:
    return (sm.exact is None and sm.prefix is None and sm.regex is None) or sm.regex == "*"


def _covers(a: StringMatch, b: StringMatch, *, a_ic: bool = False, b_ic: bool = False) -> bool:
    """Whether every value ``b`` accepts, ``a`` accepts too (``*_ic``: case-insensitive)."""
    if _presence(a):
        return True
    if _presence(b):
        return False
    if a.regex is not None:
        if b.regex is not None:
            return b.regex == a.regex
        if b.exact is not None and not b_ic:
            try:
                return re.fullmatch(a.regex, b.exact) is not None
            except re.error:
                return False
        return False
    if b.regex is not None:
        return False
    value = b.exact if b.exact is not None else b.prefix
    assert value is not None
    want = a.exact if a.exact is not None else a.prefix
    assert want is not None
    if (a_ic or b_ic) and not (value.isascii() and want.isascii()):
        return False  # str.lower() is not a per-character map outside ASCII: stay certain
    if a.exact is not None:
        if b.exact is None:
            return False
        if a_ic:
            return b.exact.lower() == want.lower()
        return not b_ic and b.exact == want
    if a_ic:
        return value.lower().startswith(want.lower())
    return not b_ic and value.startswith(want)


def _empty_subsets(vs: VirtualService, ns: str, hosts: HostTable) -> list[str]:
    out: list[str] = []
    for i, rule in enumerate(vs.spec.http):
        single = len(rule.route) == 1
        total = sum(d.weight or 0 for d in rule.route) if not single else 100
        for j, dest in enumerate(rule.route):
            weight = dest.weight if dest.weight is not None else (100 if single else 0)
            if weight <= 0 and not single:
                continue  # weight 0 receives nothing
            d = dest.destination
            what = _no_endpoint(hosts, d.host, d.subset, d.port.number if d.port else None, ns)
            if what is None:
                continue
            share = "every request" if single else f"its {_percent(weight * 100.0 / total)} share"
            out.append(f"spec.http[{i}].route[{j}]: {what}; {share} will fail with 503 UH")
        mirrors = [(f"spec.http[{i}].mirror", rule.mirror)] if rule.mirror is not None else []
        mirrors += [
            (f"spec.http[{i}].mirrors[{j}].destination", m.destination)
            for j, m in enumerate(rule.mirrors)
        ]
        for path, dest2 in mirrors:
            what = _no_endpoint(
                hosts, dest2.host, dest2.subset, dest2.port.number if dest2.port else None, ns
            )
            if what is not None:
                out.append(f"{path}: {what}; mirrored copies are dropped")
    return out


def _no_endpoint(hosts: HostTable, host: str, subset: str, port: int | None, ns: str) -> str | None:
    if not subset:
        return None
    service = hosts.service(fqdn(host, ns))
    cluster = service.cluster(port, subset) if service is not None else None
    if cluster is None or cluster.kind is not ClusterKind.SERVICE or cluster.endpoints:
        return None
    return f"subset {subset} of {service.name if service else host} selects no endpoint"
