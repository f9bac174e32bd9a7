"""The outbound stack: the local app's calls into the mesh, step by step.

Owns the order of the per-request steps for traffic from the app through ``spec.outbound``. Each
step is a plain call at a fixed point of the request; the edge (``io/downstream.py``) moves the
bytes. Read ``on_request`` top to bottom to know what happens to a request, and why in that order.

Rules: no socket work here; steps raise ``ProxyError`` to answer locally.
"""

from __future__ import annotations

import random

from meshproxy.core.http1 import RequestHead, ResponseHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routing import ClusterKind, HostTable, Target
from meshproxy.io.handler import Forward
from meshproxy.io.pool import EndpointPool, PoolManager
from meshproxy.layers.balance import balance_layer
from meshproxy.layers.headers import plan_request, response_head
from meshproxy.layers.route import route_layer
from meshproxy.telemetry.access_log import AccessLog


class OutboundStack:
    __slots__ = ("_access_log", "_balance", "_pools", "_rng", "_route")

    def __init__(
        self,
        table: HostTable,
        pools: PoolManager,
        rng: random.Random,
        access_log: AccessLog | None = None,
    ) -> None:
        self._pools = pools
        self._rng = rng
        self._route = route_layer(table)
        self._balance = balance_layer(rng)
        self._access_log = access_log

    @property
    def direction(self) -> Direction:
        return Direction.OUTBOUND

    def on_request(self, head: RequestHead, record: RequestRecord) -> Forward:
        # 1. Headers first: the absolute-form target, hop-by-hop removal and the request id give
        #    the authority that routing reads and the head that goes upstream.
        plan = plan_request(head, record, self._rng)
        # 2. Route: authority -> cluster, or a local 404/502 before any upstream work.
        target = self._route(plan.authority)
        record.cluster = target.cluster.name
        # 3. Balance: cluster -> endpoint (503 UH when it has none), after routing fixed the cluster.
        pool = self._endpoint(target, -1)
        # 4. Deadline: Istio sets no route timeout; Envoy's request header may set one.
        timeout = plan.timeout_ms / 1000.0 if plan.timeout_ms else None
        return Forward(
            head=plan.head,
            pool=pool,
            timeout=timeout,
            websocket=plan.websocket,
            expect_continue=plan.expect_continue,
            replayable=not plan.has_body,
        )

    def _endpoint(self, target: Target, exclude: int) -> EndpointPool:
        cluster = target.cluster
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return self._pools.passthrough_pool(cluster, target.host, target.port)
        pools = self._pools.pools(cluster)
        return self._balance.pick(pools, exclude)

    def reselect(self, forward: Forward, record: RequestRecord) -> EndpointPool:
        # A stale pooled connection is the endpoint's keep-alive race, not its health: same pool.
        return forward.pool

    def on_response(
        self, head: ResponseHead, forward: Forward, record: RequestRecord, close: bool
    ) -> ResponseHead:
        service_ms = int((record.upstream_service_time or 0.0) * 1000)
        return response_head(head, service_ms, close, forward.websocket)

    def on_complete(self, record: RequestRecord) -> None:
        if self._access_log is not None:
            self._access_log.write(record)
