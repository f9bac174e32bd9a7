"""The outbound stack: the local app's calls into the mesh, step by step.

Owns the order of the per-request steps for traffic from the app through ``spec.outbound``. Each
step is a plain call at a fixed point of the request; the edge (``io/downstream.py``) moves the
bytes. Read ``on_request`` top to bottom to know what happens to a request, and why in that order.

Rules: no socket work here; steps raise ``ProxyError`` to answer locally.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from meshproxy.core.clock import Clock
from meshproxy.core.http1 import RequestHead, ResponseHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.retry import RetryState, with_headers
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import ClusterKind, HostTable, Target, split_authority
from meshproxy.io.handler import Forward
from meshproxy.io.pool import EndpointPool, PoolManager
from meshproxy.layers.balance import NO_KEY, EndpointPicker, HashKey, balance_layer
from meshproxy.layers.headers import plan_request, response_head, timeout_seconds
from meshproxy.layers.route import Router
from meshproxy.layers.tracing import TracingStep, route_operation
from meshproxy.telemetry.sinks import RecordSink


class OutboundStack:
    __slots__ = ("_balance", "_clock", "_hosts", "_pools", "_rng", "_sinks", "_tracing", "router")

    def __init__(
        self,
        hosts: HostTable,
        routes: RouteTable,
        pools: PoolManager,
        rng: random.Random,
        clock: Clock,
        sinks: Sequence[RecordSink] = (),
        tracing: TracingStep | None = None,
    ) -> None:
        self._pools = pools
        self._hosts = hosts
        self._tracing = tracing
        self._rng = rng
        self._clock = clock
        self.router = Router(hosts, routes, rng)
        self._balance: EndpointPicker = balance_layer(rng)
        self._balance.prepare(list(hosts.clusters.values()))
        self._sinks = tuple(sinks)

    @property
    def direction(self) -> Direction:
        return Direction.OUTBOUND

    def on_request(self, head: RequestHead, record: RequestRecord) -> Forward:
        # 1. Headers first: the absolute-form target, hop-by-hop removal and the request id give
        #    the authority that routing reads and the head that goes upstream.
        plan = plan_request(head, record, self._rng)
        head = plan.head
        # 1b. Trace: read the app's context and decide sampling before routing, so local replies
        #     (NR, faults, UH) are traced too and mirrors carry the context; a sampled request's
        #     tries each get their own CLIENT span id as the edge builds their heads.
        trace = None
        if self._tracing is not None:
            head, trace = self._tracing.on_request(head, record)
        # 2. Route: the VirtualService rule (or the host's own cluster) picks the destination and
        #    rewrites the head; redirects, direct responses, CORS preflights and fault aborts end
        #    the request here, before any upstream work.
        #    A transparently captured connection (iptables REDIRECT) whose Host names no
        #    registered host is routed by its original destination: the ServiceEntry whose
        #    addresses and port it is (as Envoy picks the listener by address and port).
        service = ""
        original_dst = record.original_dst
        if original_dst:
            service = self._captured_service(plan.authority, original_dst)
        decision = self.router.route(head, plan.authority, record, service)
        target = decision.target
        if original_dst and target.cluster.kind is ClusterKind.ORIGINAL_DST:
            # Istio's PassthroughCluster (and a resolution-NONE service) is an ORIGINAL_DST
            # cluster: it connects to where the app connected, not to what its Host header says.
            ip, _, port = original_dst.rpartition(":")
            target = Target(cluster=target.cluster, host=ip.strip("[]"), port=int(port))
        record.cluster = target.cluster.name
        if trace is not None:  # spans are named as Istio names the route (sampled only)
            view = None
            if decision.route is not None and len(decision.route.blocks) > 1:
                view = self.router.view(head, plan.authority, target.port)
            trace.operation = route_operation(decision, view)
        # 3. Balance: cluster -> endpoint under the DestinationRule's loadBalancer, after routing
        #    fixed the cluster (503 UH when the cluster, or its subset, has no endpoint).
        key = self._hash_key(target, decision.head, record)
        pool = self._endpoint(target, key, -1)
        response_headers = decision.response_headers
        if key.set_cookie is not None:
            response_headers = (*response_headers, key.set_cookie)
        # 4. Deadline: the route's timeout (none by default, as Istio); Envoy's request header
        #    x-envoy-upstream-rq-timeout-ms overrides it.
        timeout = timeout_seconds(plan.timeout_ms) or decision.timeout
        # 5. Retries: the route's policy (Istio's default when it sets none), refined by Envoy's
        #    x-envoy-retry-* request headers; the edge runs the tries, this state decides them.
        policy = decision.retry_policy
        if plan.retry_headers is not None:
            policy = with_headers(policy, plan.retry_headers)
        # x-envoy-max-retries: 0 keeps the policy's state with no retry left, so URX is set.
        retry = RetryState(policy, self._rng) if policy.retry_on else None
        # 6. Mirrors: copies go to their own endpoints, chosen now, sent once the request is read.
        mirrors = tuple(
            (self._endpoint(Target(cluster=c, host=target.host, port=c.port), NO_KEY, -1), h)
            for c, h in decision.mirrors
            if c.endpoints
        )
        return Forward(
            head=decision.head,
            pool=pool,
            timeout=timeout,
            websocket=plan.websocket,
            expect_continue=plan.expect_continue,
            replayable=not plan.has_body,
            delay=decision.delay,
            response_ops=decision.response_ops,
            response_headers=response_headers,
            mirrors=mirrors,
            abort=decision.abort,
            retry=retry,
            head_for_try=trace.head_for_try if trace is not None else None,
        )

    def _captured_service(self, authority: str, original_dst: str) -> str:
        """``host:port`` of the ServiceEntry a captured connection's original destination belongs
        to, when the Host header itself names no registered host or VirtualService; else ""."""
        host, _ = split_authority(authority, None)
        table = self.router.table
        if self._hosts.knows(host) or (table is not None and table.lookup(host) is not None):
            return ""
        found = self._hosts.by_address(original_dst)
        return f"{found.host}:{found.port}" if found is not None else ""

    def _hash_key(self, target: Target, head: RequestHead, record: RequestRecord) -> HashKey:
        if target.cluster.lb.hash is None:
            return NO_KEY
        source_ip = record.downstream_remote.rpartition(":")[0].strip("[]")
        return self._balance.hash_key(target.cluster, head, source_ip)

    def _endpoint(self, target: Target, key: HashKey, exclude: int) -> EndpointPool:
        cluster = target.cluster
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return self._pools.passthrough_pool(cluster, target.host, target.port)
        # Only endpoints outlier detection has not ejected (all of them in panic mode).
        endpoints = self._pools.state(cluster).eligible(self._clock())
        return self._balance.pick(cluster, endpoints, key, exclude)

    def reselect(
        self, forward: Forward, record: RequestRecord, previous: EndpointPool
    ) -> EndpointPool:
        cluster = previous.cluster
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return previous
        endpoints = self._pools.state(cluster).eligible(self._clock())
        exclude = -1
        retry = forward.retry
        if retry is not None and retry.policy.ignore_previous_hosts:
            # Envoy's previous_hosts retry predicate: another endpoint when there is one.
            for i, pool in enumerate(endpoints):
                if pool is previous:
                    exclude = i
                    break
        key = self._hash_key(
            Target(cluster=cluster, host="", port=cluster.port), forward.head, record
        )
        return self._balance.pick(cluster, endpoints, key, exclude)

    def on_response(
        self, head: ResponseHead, forward: Forward, record: RequestRecord, close: bool
    ) -> ResponseHead:
        service_ms = int((record.upstream_service_time or 0.0) * 1000)
        out = response_head(head, service_ms, close, forward.websocket, record.attempts)
        if forward.response_headers or not forward.response_ops.empty:
            headers = list(out.headers)
            if not forward.response_ops.empty:
                headers = forward.response_ops.apply(headers)
            headers.extend(forward.response_headers)
            out = ResponseHead(status=out.status, headers=headers, reason=out.reason)
        return out

    def on_complete(self, record: RequestRecord) -> None:
        # Telemetry reads the finished record once: access log, metrics, spans.
        for sink in self._sinks:
            sink(record)
