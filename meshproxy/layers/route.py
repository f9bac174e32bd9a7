"""The route step: which rule serves a request, and what that rule does to it.

Owns the outbound decision from authority to cluster. A host with a VirtualService is routed by its
first matching ``http[]`` rule (``core/routetable.py``): weighted destinations, or a local answer
(redirect, directResponse, CORS preflight, fault abort); the rule's rewrite and header operations
are applied to the upstream head here, and its response-side work (response header operations, CORS
headers) is handed on in the decision. A host without a VirtualService goes to its ServiceEntry
cluster; an unknown host is passed through under ``ALLOW_ANY`` (Istio's PassthroughCluster) and
answered 502 under ``REGISTRY_ONLY`` (BlackHoleCluster).

Rules: synchronous and pure apart from the injected random source; raises ``ProxyError`` for a
local reply; never sees a socket.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meshproxy.core.http1 import Header, RequestHead
from meshproxy.core.match import RequestView
from meshproxy.core.record import RequestRecord
from meshproxy.core.retry import NO_RETRY, RetryPolicy, istio_policy
from meshproxy.core.routetable import (
    NO_OPS,
    ActionKind,
    HeaderOps,
    Route,
    RouteTable,
    WeightedCluster,
    redirect_location,
    rewrite_target,
    shadow_authority,
)
from meshproxy.core.routing import (
    Cluster,
    HostTable,
    Miss,
    Target,
    passthrough,
    split_authority,
)
from meshproxy.errors import BlackHole, DirectReply, NoRoute

_DEFAULT_RETRY = istio_policy(None)
# Envoy's fault filter abort body (envoy/source/extensions/filters/http/fault).
_FAULT_BODY = b"fault filter abort"
_GRPC_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


@dataclass(slots=True)
class Decision:
    """Where a request goes and what travels with it."""

    target: Target
    head: RequestHead  # rewritten, with header operations applied
    route: Route | None
    timeout: float | None
    delay: float | None  # fault delay before forwarding
    response_ops: HeaderOps
    response_headers: tuple[Header, ...]  # e.g. CORS headers for an allowed origin
    mirrors: tuple[tuple[Cluster, RequestHead], ...]
    abort: DirectReply | None = None  # a fault abort due when the fault delay ends
    retry_policy: RetryPolicy = NO_RETRY


def _abort(status: int | None, grpc_status: str) -> DirectReply:
    """Envoy's fault abort: the HTTP status with its body, or a gRPC status in the headers."""
    if grpc_status:
        code = _GRPC_CODES.get(grpc_status.upper(), 2)
        return DirectReply(
            200,
            headers=((b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code)),
            flag="FI",
        )
    return DirectReply(status or 503, _FAULT_BODY, flag="FI")


def _headers_map(head: RequestHead) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        out[key] = out[key] + "," + text if key in out else text
    return out


def _with_authority(headers: list[Header], authority: str) -> list[Header]:
    value = authority.encode("latin-1")
    return [(b"host", value) if n == b"host" else (n, v) for n, v in headers]


class Router:
    __slots__ = ("_hosts", "_rng", "_table")

    def __init__(self, hosts: HostTable, table: RouteTable | None, rng: random.Random) -> None:
        self._hosts = hosts
        self._table = table
        self._rng = rng

    @property
    def table(self) -> RouteTable | None:
        return self._table

    def view(self, head: RequestHead, authority: str, port: int) -> RequestView:
        return RequestView(
            method=head.method.decode("latin-1"),
            path=head.target.decode("latin-1"),
            authority=authority,
            scheme="http",
            port=port,
            headers=_headers_map(head),
        )

    def route(
        self, head: RequestHead, authority: str, record: RequestRecord, by: str = ""
    ) -> Decision:
        """``by``: the ``host:port`` to route by instead of the Host header (a captured
        connection's ServiceEntry, found by its original destination); matches still read the
        request's own authority."""
        if not authority:
            raise NoRoute("request without a host")
        host, port = split_authority(by or authority, None)
        table = self._table
        vs = table.lookup(host) if table is not None and table.virtual_services else None
        if vs is None:
            return self._default(head, by or authority, record)
        if port is None:
            service = self._hosts.service(vs.hosts[0]) if vs.hosts else None
            port = service.default.port if service is not None else 80
        view = self.view(head, authority, port)
        found = vs.route(view)
        if found is None:
            record.route_name = vs.name
            raise NoRoute(f"no rule of VirtualService {vs.name} matched")
        route, block = found
        record.route_name = route.name or f"{vs.name}#{route.index}"
        headers = list(head.headers)
        response_headers: tuple[Header, ...] = ()

        cors = route.cors
        origin = view.headers.get("origin")
        if cors is not None and origin is not None:
            preflight = view.method == "OPTIONS" and "access-control-request-method" in view.headers
            allowed = cors.allowed(origin)
            if preflight and allowed:
                raise DirectReply(200, headers=self._cors_preflight(route, origin))
            if preflight and not cors.forward_unmatched:
                raise DirectReply(200)
            if allowed:
                response_headers = self._cors_actual(route, origin)

        if route.kind is ActionKind.REDIRECT and route.redirect is not None:
            raise DirectReply(
                route.redirect.redirect_code,
                headers=(
                    (b"location", redirect_location(route.redirect, block, view).encode("latin-1")),
                ),
            )
        if route.kind is ActionKind.DIRECT:
            raise DirectReply(route.direct_status, route.direct_body)

        fault = route.fault
        delay = None
        abort: DirectReply | None = None
        if fault is not None:
            if (
                fault.delay is not None
                and fault.delay_percent > 0
                and self._rng.random() * 100 < fault.delay_percent
            ):
                delay = fault.delay
                record.add_flag("DI")
            if fault.abort_percent > 0 and self._rng.random() * 100 < fault.abort_percent:
                abort = _abort(fault.abort_status, fault.abort_grpc)
                if delay is None:
                    raise abort
                # Envoy's fault filter: "delays can be followed by aborts" - the abort is
                # answered when the delay ends (FaultFilter::postDelayInjection).

        wc = route.pick(self._rng)
        target = Target(cluster=wc.cluster, host=host, port=wc.cluster.port)
        new_target = head.target
        new_authority: str | None = None
        if route.rewrite is not None:
            rewritten = rewrite_target(route, block, head.target.decode("latin-1"))
            new_target = rewritten.encode("latin-1")
            new_authority = route.rewrite.authority
        path_rewritten = new_target != head.target
        if path_rewritten:
            headers.append((b"x-envoy-original-path", head.target))
        # Destination-level operations first, then the route's: the route-level `set` wins.
        for ops in (wc.request_ops, route.request_ops):
            if not ops.empty:
                headers = ops.apply(headers)
        # A header operation that sets the host acts as an authority rewrite (reference §1.7).
        op_authority = route.request_ops.authority() or wc.request_ops.authority()
        authority_override = op_authority or new_authority
        if authority_override is not None:
            headers = _with_authority(headers, authority_override)

        out = RequestHead(method=head.method, target=new_target, headers=headers)
        response_ops = _merge(wc.response_ops, route.response_ops)
        mirrors = self._mirrors(route, out, authority)
        # Istio: "timeouts or retries will not be enabled when faults are enabled" (proto comment).
        timeout = None if fault is not None else route.timeout
        return Decision(
            target=target,
            head=out,
            route=route,
            timeout=timeout,
            delay=delay,
            response_ops=response_ops,
            response_headers=response_headers,
            mirrors=mirrors,
            abort=abort,
            retry_policy=route.retry_policy,
        )

    def _default(self, head: RequestHead, authority: str, record: RequestRecord) -> Decision:
        found = self._hosts.resolve(authority)
        if type(found) is Target:
            target = found
        elif found is Miss.BLACKHOLE:
            record.cluster = "BlackHoleCluster"  # Istio's name, for logs and metrics
            raise BlackHole(f"{authority} is not in the registry (REGISTRY_ONLY)")
        else:
            host, port = split_authority(authority, 80)
            target = passthrough(host, port or 80)
        # A service's own route carries Istio's default retry policy; the passthrough one none.
        policy = _DEFAULT_RETRY if type(found) is Target else NO_RETRY
        return Decision(
            retry_policy=policy,
            target=target,
            head=head,
            route=None,
            timeout=None,
            delay=None,
            response_ops=NO_OPS,
            response_headers=(),
            mirrors=(),
        )

    def _mirrors(
        self, route: Route, head: RequestHead, authority: str
    ) -> tuple[tuple[Cluster, RequestHead], ...]:
        if not route.mirrors:
            return ()
        out = []
        shadow = shadow_authority(authority)
        for mirror in route.mirrors:
            if mirror.percent < 100 and self._rng.random() * 100 >= mirror.percent:
                continue
            headers = _with_authority(list(head.headers), shadow)
            out.append(
                (
                    mirror.cluster,
                    RequestHead(method=head.method, target=head.target, headers=headers),
                )
            )
        return tuple(out)

    @staticmethod
    def _cors_preflight(route: Route, origin: str) -> tuple[Header, ...]:
        cors = route.cors
        assert cors is not None
        out: list[Header] = [(b"access-control-allow-origin", origin.encode("latin-1"))]
        if cors.allow_methods:
            out.append((b"access-control-allow-methods", cors.allow_methods))
        if cors.allow_headers:
            out.append((b"access-control-allow-headers", cors.allow_headers))
        if cors.max_age:
            out.append((b"access-control-max-age", cors.max_age))
        if cors.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return tuple(out)

    @staticmethod
    def _cors_actual(route: Route, origin: str) -> tuple[Header, ...]:
        cors = route.cors
        assert cors is not None
        out: list[Header] = [(b"access-control-allow-origin", origin.encode("latin-1"))]
        if cors.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        if cors.expose_headers:
            out.append((b"access-control-expose-headers", cors.expose_headers))
        return tuple(out)


def _merge(first: HeaderOps, second: HeaderOps) -> HeaderOps:
    if first.empty:
        return second
    if second.empty:
        return first
    # Istio: route-level operations win over destination-level ones for the same header.
    overridden = {name for name, _ in second.set}
    return HeaderOps(
        set=tuple(h for h in first.set if h[0] not in overridden) + second.set,
        add=first.add + second.add,
        remove=first.remove | second.remove,
    )


__all__ = ["Decision", "Router", "WeightedCluster"]
