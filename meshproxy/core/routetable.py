"""VirtualServices compiled into route tables, and the decision "which rule serves this request".

Owns Istio's HTTP routing semantics for a sidecar (reference §1.1, §1.7): a VirtualService attaches
to the hosts it names (short names resolve against its namespace; exact names beat ``*.suffix``
wildcards; the first VirtualService defined for a host wins, the rest are reported by
``meshproxy validate``); its ``http[]`` rules are tried in order and the first whose match blocks
accept the request is used; no rule matching is a 404 ``NR``. A rule's action (weighted
destinations, redirect, direct response) and its modifiers (rewrite, header operations, fault,
timeout, retries, mirrors, CORS) are compiled here once, at config load, into frozen objects the
per-request steps read.

Rules: pure; built once per config; the hot path is a dict lookup, the rule's predicates and one
weighted draw from a passed-in ``random.Random``.
"""

from __future__ import annotations

import base64
import enum
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshproxy.config.istio import fqdn
from meshproxy.config.model import (
    CorsPolicy,
    Destination,
    HeaderOperations,
    HTTPRedirect,
    HTTPRetry,
    HTTPRoute,
    MeshConfig,
    StringMatch,
    UnmatchedPreflights,
    VirtualService,
)
from meshproxy.core.match import MatchBlock, RequestView, compile_block, string_test
from meshproxy.core.retry import NO_RETRY, RetryPolicy, istio_policy
from meshproxy.core.routing import Cluster, HostTable, host_aliases, split_authority

_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderOps:
    """Compiled ``HeaderOperations``: names lower-cased bytes, applied remove -> set -> add."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = self.remove | {name for name, _ in self.set}
        out = [h for h in headers if h[0] not in drop] if drop else headers
        if self.set:
            out.extend(self.set)
        for name, value in self.add:
            # Istio `add` appends to an existing header as a comma-separated list.
            for i, (n, v) in enumerate(out):
                if n == name:
                    out[i] = (n, v + b"," + value)
                    break
            else:
                out.append((name, value))
        return out

    def authority(self) -> str | None:
        """A ``set`` of host/:authority acts as an authority rewrite (reference §1.7)."""
        for name, value in self.set:
            if name in (b"host", b":authority"):
                return value.decode("latin-1")
        return None


NO_OPS = HeaderOps()


def compile_ops(ops: HeaderOperations | None) -> HeaderOps:
    if ops is None:
        return NO_OPS

    def enc(items: Mapping[str, str]) -> tuple[tuple[bytes, bytes], ...]:
        return tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items.items())

    return HeaderOps(
        set=enc(ops.set),
        add=enc(ops.add),
        remove=frozenset(n.lower().encode("latin-1") for n in ops.remove),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightedCluster:
    destination: Destination
    service: str  # FQDN
    cluster: Cluster
    weight: int
    request_ops: HeaderOps = NO_OPS
    response_ops: HeaderOps = NO_OPS


@dataclass(frozen=True, slots=True, kw_only=True)
class Rewrite:
    uri: str | None = None  # replaces the matched prefix (or the whole path)
    regex: re.Pattern[str] | None = None
    regex_substitution: str = ""
    authority: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    delay: float | None = None
    delay_percent: float = 0.0  # 0..100; unset percentage: no request is delayed
    abort_status: int | None = None
    abort_grpc: str = ""
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirror:
    service: str
    cluster: Cluster
    percent: float  # 0..100


@dataclass(frozen=True, slots=True, kw_only=True)
class Cors:
    origins: tuple[tuple[str, object], ...]  # (description, test)
    allow_methods: bytes
    allow_headers: bytes
    expose_headers: bytes
    max_age: bytes
    allow_credentials: bool
    forward_unmatched: bool

    def allowed(self, origin: str) -> bool:
        return any(test(origin) for _, test in self.origins)  # type: ignore[operator]


class ActionKind(enum.Enum):
    FORWARD = "forward"
    REDIRECT = "redirect"
    DIRECT = "direct"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One compiled ``http[]`` rule of a VirtualService."""

    vs: str  # "name.namespace"
    index: int
    name: str
    blocks: tuple[MatchBlock, ...]  # empty: matches every request
    kind: ActionKind
    clusters: tuple[WeightedCluster, ...] = ()
    cumulative: tuple[int, ...] = ()  # running sums of the weights, for the draw
    total_weight: int = 0
    redirect: HTTPRedirect | None = None
    direct_status: int = 0
    direct_body: bytes = b""
    rewrite: Rewrite | None = None
    timeout: float | None = None
    retries: HTTPRetry | None = None
    retry_policy: RetryPolicy = NO_RETRY  # compiled from `retries` (Istio's default if unset)
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: Cors | None = None
    request_ops: HeaderOps = NO_OPS
    response_ops: HeaderOps = NO_OPS

    def match(self, req: RequestView) -> MatchBlock | bool | None:
        """The block that matched (None for a rule without blocks), or False."""
        if not self.blocks:
            return None
        for block in self.blocks:
            if block.matches(req):
                return block
        return False

    def pick(self, rng: random.Random) -> WeightedCluster:
        """A destination by weight (Istio: share = weight / sum; weight 0 gets nothing)."""
        if len(self.clusters) == 1:
            return self.clusters[0]
        draw = rng.randrange(self.total_weight)
        for wc, bound in zip(self.clusters, self.cumulative, strict=True):
            if draw < bound:
                return wc
        return self.clusters[-1]  # unreachable: draw < total


# Below this many rules a linear scan is cheaper than consulting the index.
_INDEX_FROM = 8


class RuleIndex:
    """Which rules can possibly match a path, so a long ``http[]`` list is not scanned whole.

    A rule whose every match block requires a case-sensitive exact URI or URI prefix can only
    match paths equal to / starting with one of those; the others are always candidates. The
    candidates are then tried in rule order, so the first-match-wins semantics are unchanged.
    """

    __slots__ = ("_always", "_exact", "_lengths", "_prefix")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._always: list[int] = []
        self._exact: dict[str, list[int]] = {}
        self._prefix: dict[str, list[int]] = {}
        for i, route in enumerate(routes):
            keys: list[tuple[str, str]] = []
            for block in route.blocks:
                if block.uri_exact is not None:
                    keys.append(("e", block.uri_exact))
                elif block.uri_required_prefix is not None:
                    keys.append(("p", block.uri_required_prefix))
                else:
                    keys = []
                    break
            if not keys:
                self._always.append(i)
                continue
            for kind, key in dict.fromkeys(keys):
                table = self._exact if kind == "e" else self._prefix
                table.setdefault(key, []).append(i)
        self._lengths = sorted({len(p) for p in self._prefix})

    def candidates(self, path: str) -> list[int]:
        found = list(self._always)
        exact = self._exact.get(path)
        if exact is not None:
            found.extend(exact)
        prefix = self._prefix
        size = len(path)
        for n in self._lengths:
            if n > size:
                break
            hit = prefix.get(path[:n])
            if hit is not None:
                found.extend(hit)
        found.sort()
        return found


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledVirtualService:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    routes: tuple[Route, ...]
    index: RuleIndex | None = None

    def route(self, req: RequestView) -> tuple[Route, MatchBlock | None] | None:
        routes = self.routes
        if self.index is None:
            for route in routes:
                block = route.match(req)
                if block is not False:
                    return route, block  # type: ignore[return-value]
            return None
        last = -1
        for i in self.index.candidates(req.path_only):
            if i == last:
                continue  # a rule listed under two of its blocks' keys
            last = i
            block = routes[i].match(req)
            if block is not False:
                return routes[i], block  # type: ignore[return-value]
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleVerdict:
    route: Route
    matched: bool
    reason: str  # the first failing condition of each block, or the matching block


def explain(vs: CompiledVirtualService, req: RequestView) -> list[RuleVerdict]:
    """Each rule up to the first match, with why it did (not) match."""
    out: list[RuleVerdict] = []
    for route in vs.routes:
        if not route.blocks:
            out.append(RuleVerdict(route=route, matched=True, reason="no match conditions"))
            return out
        reasons = []
        for block in route.blocks:
            failed = block.first_failure(req)
            label = f"match[{block.index}]" + (f" ({block.name})" if block.name else "")
            if failed is None:
                text = ", ".join(c.description for c in block.conditions) or "empty"
                out.append(RuleVerdict(route=route, matched=True, reason=f"{label}: {text}"))
                return out
            reasons.append(f"{label}: {failed.description} did not match")
        out.append(RuleVerdict(route=route, matched=False, reason="; ".join(reasons)))
    return out


@dataclass(slots=True)
class VirtualHost:
    """What a request's authority selects: a VirtualService, and the service it names."""

    vs: CompiledVirtualService | None
    host: str  # lower-case, without port
    port: int | None  # from the authority
    extra: dict[str, object] = field(default_factory=dict)


class RouteTable:
    """VirtualServices by host, compiled against the clusters of a ``HostTable``."""

    __slots__ = ("_cache", "_exact", "_wildcards", "hosts", "shadowed", "virtual_services")

    def __init__(self, config: MeshConfig, hosts: HostTable) -> None:
        self.hosts = hosts
        namespace = config.bootstrap.metadata.namespace
        labels = config.bootstrap.metadata.labels
        self._exact: dict[str, CompiledVirtualService] = {}
        self._wildcards: list[tuple[str, CompiledVirtualService]] = []
        self.virtual_services: list[CompiledVirtualService] = []
        # Hosts claimed by more than one VirtualService: (host, winner, loser).
        self.shadowed: list[tuple[str, str, str]] = []
        owner: dict[str, str] = {}
        for vs in config.virtual_services:
            if not _applies_to_sidecar(vs.spec.gateways):
                continue
            compiled = compile_virtual_service(vs, hosts, namespace, labels)
            self.virtual_services.append(compiled)
            for host in compiled.hosts:
                if host in owner:
                    self.shadowed.append((host, owner[host], compiled.name))
                    continue
                owner[host] = compiled.name
                if host.startswith("*"):
                    self._wildcards.append((host[1:], compiled))
                else:
                    for alias in host_aliases(host, namespace):
                        self._exact.setdefault(alias, compiled)
        self._wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        self._cache: dict[str, CompiledVirtualService | None] = {}

    def lookup(self, host: str) -> CompiledVirtualService | None:
        """The VirtualService for a host (lower-case, no port): exact alias, then wildcards."""
        try:
            return self._cache[host]
        except KeyError:
            pass
        found = self._exact.get(host)
        if found is None:
            for suffix, vs in self._wildcards:
                if host.endswith(suffix):
                    found = vs
                    break
        if len(host) <= 256:  # bounded in bytes as well as entries
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[host] = found
        return found

    def virtual_host(self, authority: str) -> VirtualHost:
        host, port = split_authority(authority, None)
        return VirtualHost(
            vs=self.lookup(host) if self._exact or self._wildcards else None, host=host, port=port
        )


def _applies_to_sidecar(gateways: Sequence[str]) -> bool:
    # No gateways means "mesh"; otherwise the reserved name `mesh` selects sidecars.
    return not gateways or "mesh" in gateways


def _percent(value: float | None, legacy: int | None = None) -> float:
    if value is not None:
        return value
    return float(legacy) if legacy is not None else 0.0


def compile_virtual_service(
    vs: VirtualService,
    hosts: HostTable,
    namespace: str,
    workload_labels: Mapping[str, str],
) -> CompiledVirtualService:
    ns = vs.metadata.namespace or namespace
    routes = []
    for index, rule in enumerate(vs.spec.http):
        blocks = tuple(
            compile_block(m, k)
            for k, m in enumerate(rule.match)
            if _block_applies(
                m.gateways, m.source_labels, m.source_namespace, workload_labels, namespace
            )
        )
        if rule.match and not blocks:
            continue  # every block is for other workloads or gateways: the rule is not ours
        routes.append(_compile_route(vs, ns, index, rule, blocks, hosts))
    return CompiledVirtualService(
        name=f"{vs.metadata.name}.{ns}",
        namespace=ns,
        hosts=tuple(fqdn(h, ns) for h in vs.spec.hosts),
        routes=tuple(routes),
        index=RuleIndex(routes) if len(routes) >= _INDEX_FROM else None,
    )


def _block_applies(
    gateways: Sequence[str],
    source_labels: Mapping[str, str],
    source_namespace: str,
    workload_labels: Mapping[str, str],
    namespace: str,
) -> bool:
    """``gateways``, ``sourceLabels`` and ``sourceNamespace`` select proxies, not requests."""
    if gateways and "mesh" not in gateways:
        return False
    if source_namespace and source_namespace != namespace:
        return False
    return all(workload_labels.get(k) == v for k, v in source_labels.items())


def _resolve(hosts: HostTable, dest: Destination, ns: str) -> tuple[str, Cluster]:
    service_name = fqdn(dest.host, ns)
    service = hosts.service(service_name)
    if service is None:  # validation guarantees it; keep the error readable if not
        raise ValueError(f"destination host {dest.host!r} is not a known service")
    port = dest.port.number if dest.port is not None else None
    cluster = service.cluster(port, dest.subset)
    if cluster is None:
        raise ValueError(f"destination {dest.host} port {port} subset {dest.subset!r} is unknown")
    return service_name, cluster


def _compile_route(
    vs: VirtualService,
    ns: str,
    index: int,
    rule: HTTPRoute,
    blocks: tuple[MatchBlock, ...],
    hosts: HostTable,
) -> Route:
    common: dict[str, object] = {
        "vs": f"{vs.metadata.name}.{ns}",
        "index": index,
        "name": rule.name,
        "blocks": blocks,
        "timeout": rule.timeout,
        "retries": rule.retries,
        # Istio: "timeouts or retries will not be enabled when faults are enabled".
        "retry_policy": NO_RETRY if rule.fault is not None else istio_policy(rule.retries),
        "request_ops": compile_ops(rule.headers.request if rule.headers else None),
        "response_ops": compile_ops(rule.headers.response if rule.headers else None),
        "cors": _compile_cors(rule.cors_policy) if rule.cors_policy else None,
    }
    if rule.redirect is not None:
        return Route(kind=ActionKind.REDIRECT, redirect=rule.redirect, **common)  # type: ignore[arg-type]
    if rule.direct_response is not None:
        body = b""
        if rule.direct_response.body is not None:
            if rule.direct_response.body.string is not None:
                body = rule.direct_response.body.string.encode()
            elif rule.direct_response.body.bytes_ is not None:
                body = base64.b64decode(rule.direct_response.body.bytes_)
        return Route(
            kind=ActionKind.DIRECT,
            direct_status=rule.direct_response.status,
            direct_body=body,
            **common,  # type: ignore[arg-type]
        )
    clusters = []
    single = len(rule.route) == 1
    for dest in rule.route:
        weight = dest.weight if dest.weight is not None else (100 if single else 0)
        if weight <= 0 and not single:
            continue  # weight 0 receives nothing
        service, cluster = _resolve(hosts, dest.destination, ns)
        clusters.append(
            WeightedCluster(
                destination=dest.destination,
                service=service,
                cluster=cluster,
                weight=max(weight, 1),
                request_ops=compile_ops(dest.headers.request if dest.headers else None),
                response_ops=compile_ops(dest.headers.response if dest.headers else None),
            )
        )
    cumulative = []
    total = 0
    for wc in clusters:
        total += wc.weight
        cumulative.append(total)
    rewrite = None
    if rule.rewrite is not None:
        rr = rule.rewrite.uri_regex_rewrite
        rewrite = Rewrite(
            uri=rule.rewrite.uri or None,
            regex=re.compile(rr.match) if rr is not None else None,
            regex_substitution=rr.rewrite if rr is not None else "",
            authority=rule.rewrite.authority or None,
        )
    fault = None
    if rule.fault is not None:
        d, a = rule.fault.delay, rule.fault.abort
        fault = Fault(
            delay=d.fixed_delay if d is not None else None,
            delay_percent=_percent(
                d.percentage.value if d and d.percentage else None, d.percent if d else None
            ),
            abort_status=a.http_status if a is not None else None,
            abort_grpc=a.grpc_status if a is not None else "",
            abort_percent=_percent(a.percentage.value if a and a.percentage else None),
        )
    mirrors = []
    if rule.mirror is not None:
        service, cluster = _resolve(hosts, rule.mirror, ns)
        # mirrorPercentage absent means 100% (reference §1.7).
        percent = _percent(
            rule.mirror_percentage.value if rule.mirror_percentage else None, rule.mirror_percent
        )
        if rule.mirror_percentage is None and rule.mirror_percent is None:
            percent = 100.0
        mirrors.append(Mirror(service=service, cluster=cluster, percent=percent))
    for mp in rule.mirrors:
        service, cluster = _resolve(hosts, mp.destination, ns)
        percent = mp.percentage.value if mp.percentage is not None else 100.0
        mirrors.append(Mirror(service=service, cluster=cluster, percent=percent))
    return Route(
        kind=ActionKind.FORWARD,
        clusters=tuple(clusters),
        cumulative=tuple(cumulative),
        total_weight=total,
        rewrite=rewrite,
        fault=fault,
        mirrors=tuple(mirrors),
        **common,  # type: ignore[arg-type]
    )


def _compile_cors(policy: CorsPolicy) -> Cors:
    origins: list[tuple[str, object]] = [string_test(sm) for sm in policy.allow_origins]
    origins.extend(string_test(StringMatch(exact=o)) for o in policy.allow_origin)
    max_age = b""
    if policy.max_age is not None:
        max_age = b"%d" % int(policy.max_age)
    return Cors(
        origins=tuple(origins),
        allow_methods=",".join(policy.allow_methods).encode(),
        allow_headers=",".join(policy.allow_headers).encode(),
        expose_headers=",".join(policy.expose_headers).encode(),
        max_age=max_age,
        allow_credentials=bool(policy.allow_credentials),
        forward_unmatched=policy.unmatched_preflights is not UnmatchedPreflights.IGNORE,
    )


# ---------------------------------------------------------------------------------------------
# What a rule does to a request: pure functions shared by the route step and the explainer.


def rewrite_target(route: Route, block: MatchBlock | None, target: str) -> str:
    """The upstream request target after the rule's ``rewrite`` (query string kept).

    ``rewrite.uri`` replaces the matched prefix when the matching block had a prefix URI match
    (Istio's ``prefix_rewrite``; a rule without match blocks matched the prefix ``/``), and the
    whole path otherwise; ``uriRegexRewrite`` substitutes every match of its pattern in the path.
    """
    rewrite = route.rewrite
    if rewrite is None:
        return target
    path, sep, query = target.partition("?")
    new_path = path
    if rewrite.uri is not None:
        prefix = block.uri_prefix if block is not None else "/"
        if prefix is not None and (
            path.startswith(prefix)
            or (
                block is not None
                and block.ignore_uri_case
                and path.lower().startswith(prefix.lower())
            )
        ):
            new_path = rewrite.uri + path[len(prefix) :]
        else:
            new_path = rewrite.uri
    elif rewrite.regex is not None:
        new_path = rewrite.regex.sub(rewrite.regex_substitution, path)
    return new_path + sep + query


def shadow_authority(authority: str) -> str:
    """Envoy's shadow Host: ``-shadow`` appended to the host part (reference §1.7)."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] + "-shadow" + authority[end + 1 :]
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return f"{host}-shadow:{port}"
    return authority + "-shadow"


def redirect_location(redirect: HTTPRedirect, block: MatchBlock | None, view: RequestView) -> str:
    """Envoy's redirect ``Location``: an absolute URL, unchanged parts taken from the request."""
    path, sep, query = view.path.partition("?")
    if redirect.uri:
        new_path = redirect.uri
        if "?" in new_path:
            sep, query = "", ""
    elif redirect.prefix_rewrite is not None:
        prefix = (block.uri_prefix if block is not None else None) or "/"
        new_path = (
            redirect.prefix_rewrite + path[len(prefix) :] if path.startswith(prefix) else path
        )
    else:
        new_path = path
    scheme = redirect.scheme or view.scheme
    host, port = split_authority(view.authority, None)
    if redirect.authority:
        # Envoy host_redirect replaces the whole authority, its port included.
        host, port = split_authority(redirect.authority, None)
    elif scheme != view.scheme and port == (443 if view.scheme == "https" else 80):
        port = None  # the old scheme's default port does not carry over (processRequestHost)
    if redirect.port is not None:
        port = redirect.port
    elif redirect.derive_port == "FROM_PROTOCOL_DEFAULT":
        port = 443 if scheme == "https" else 80
    elif redirect.derive_port == "FROM_REQUEST_PORT":
        port = view.port
    default_port = 443 if scheme == "https" else 80
    netloc = host if port is None or port == default_port else f"{host}:{port}"
    return f"{scheme}://{netloc}{new_path}{sep}{query}"
