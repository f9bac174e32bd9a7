"""The inbound stack: the mesh's calls into the local app, step by step.

Owns the order of the per-request steps for traffic arriving on ``spec.inbound``: every request goes
to the one local app endpoint (Istio's ``inbound|<port>||`` cluster). mTLS termination and
authorization will sit in front of the headers step.

Rules: no socket work here; steps raise ``ProxyError`` to answer locally.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from meshproxy.core.http1 import RequestHead, ResponseHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routing import Cluster
from meshproxy.io.handler import Forward
from meshproxy.io.pool import EndpointPool, PoolManager
from meshproxy.layers.headers import plan_request, response_head, timeout_seconds
from meshproxy.layers.tracing import TracingStep
from meshproxy.telemetry.sinks import RecordSink


class InboundStack:
    __slots__ = ("_cluster", "_pool", "_rng", "_sinks", "_tracing")

    def __init__(
        self,
        cluster: Cluster,
        pools: PoolManager,
        rng: random.Random,
        sinks: Sequence[RecordSink] = (),
        tracing: TracingStep | None = None,
    ) -> None:
        self._tracing = tracing
        self._cluster = cluster
        self._pool = pools.pools(cluster)[0]
        self._rng = rng
        self._sinks = tuple(sinks)

    @property
    def direction(self) -> Direction:
        return Direction.INBOUND

    def on_request(self, head: RequestHead, record: RequestRecord) -> Forward:
        # 1. Headers: hop-by-hop removal, request id, x-forwarded-proto; Host is the app's concern.
        plan = plan_request(head, record, self._rng)
        head = plan.head
        # 2. Trace: the caller's context and sampling decision; a sampled request's SERVER span
        #    becomes the parent the app sees.
        if self._tracing is not None:
            head, _ = self._tracing.on_request(head, record)
        # 3. Route: inbound traffic has one destination, the local app.
        record.cluster = self._cluster.name
        # 4. Deadline: none by default (Istio); Envoy's request header may set one.
        timeout = timeout_seconds(plan.timeout_ms)
        return Forward(
            head=head,
            pool=self._pool,
            timeout=timeout,
            websocket=plan.websocket,
            expect_continue=plan.expect_continue,
            replayable=not plan.has_body,
        )

    def reselect(
        self, forward: Forward, record: RequestRecord, previous: EndpointPool
    ) -> EndpointPool:
        return self._pool

    def on_response(
        self, head: ResponseHead, forward: Forward, record: RequestRecord, close: bool
    ) -> ResponseHead:
        service_ms = int((record.upstream_service_time or 0.0) * 1000)
        return response_head(head, service_ms, close, forward.websocket)

    def on_complete(self, record: RequestRecord) -> None:
        # Telemetry reads the finished record once: access log, metrics, spans.
        for sink in self._sinks:
            sink(record)
