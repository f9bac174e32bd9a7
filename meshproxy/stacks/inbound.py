"""The inbound stack: the mesh's calls into the local app, step by step.

Owns the order of the per-request steps for traffic arriving on ``spec.inbound``: every request goes
to the one local app endpoint (Istio's ``inbound|<port>||`` cluster). mTLS is terminated by the
listener (``io/listener.py``), which puts the peer's SPIFFE ID on the record; here it becomes the
``x-forwarded-client-cert`` the app sees and the principal AuthorizationPolicy checks.

Rules: no socket work here; steps raise ``ProxyError`` to answer locally.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from meshproxy.core.authz import Authorizer, AuthzRequest
from meshproxy.core.http1 import Header, RequestHead, ResponseHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routing import Cluster
from meshproxy.errors import AccessDenied
from meshproxy.io.handler import Forward
from meshproxy.io.pool import EndpointPool, PoolManager
from meshproxy.layers.headers import plan_request, response_head, timeout_seconds
from meshproxy.layers.tracing import TracingStep
from meshproxy.telemetry.sinks import RecordSink

log = logging.getLogger(__name__)

_XFCC = b"x-forwarded-client-cert"
_SPIFFE = "spiffe://"


def _ip_of(remote: str) -> str:
    """The address part of ``ip:port`` / ``[v6]:port`` (the record's downstream remote)."""
    if remote.startswith("["):
        return remote[1 : remote.find("]")]
    return remote.rpartition(":")[0] or remote


class InboundStack:
    __slots__ = (
        "_authorizer",
        "_cluster",
        "_own_uri",
        "_pool",
        "_port",
        "_rng",
        "_sinks",
        "_tracing",
    )

    def __init__(
        self,
        cluster: Cluster,
        pools: PoolManager,
        rng: random.Random,
        sinks: Sequence[RecordSink] = (),
        tracing: TracingStep | None = None,
        *,
        authorizer: Authorizer | None = None,
        own_uri: str = "",
        app_port: int = 0,
    ) -> None:
        self._tracing = tracing
        # None or inactive (no AuthorizationPolicy applies): the step costs one attribute test.
        self._authorizer = (
            authorizer if authorizer is not None and not authorizer.inactive else None
        )
        self._own_uri = own_uri  # this workload's SPIFFE ID: XFCC's ``By``
        # Istio's AuthorizationPolicy ports are the workload's (container) ports.
        self._port = app_port
        self._cluster = cluster
        self._pool = pools.pools(cluster)[0]
        self._rng = rng
        self._sinks = tuple(sinks)

    @property
    def direction(self) -> Direction:
        return Direction.INBOUND

    def on_request(self, head: RequestHead, record: RequestRecord) -> Forward:
        # 1. Headers: hop-by-hop removal, request id, x-forwarded-proto (https over mTLS, as
        #    Envoy sets it from the connection); Host is the app's concern.
        plan = plan_request(head, record, self._rng, b"https" if record.tls else b"http")
        head = plan.head
        # 2. Authorization: before anything reaches the app, on what the caller proved (its
        #    SPIFFE ID) and asked for (Istio: DENY, then ALLOW; 403 "RBAC: access denied").
        if self._authorizer is not None:
            self._authorize(head, record)
        # 3. Client certificate: the app learns who called in x-forwarded-client-cert, in
        #    Envoy's format; whatever the client sent under that name is dropped (Envoy's
        #    SANITIZE_SET: a caller cannot claim an identity it did not prove).
        head = self._client_cert(head, record)
        # 4. Trace: the caller's context and sampling decision; a sampled request's SERVER span
        #    becomes the parent the app sees.
        if self._tracing is not None:
            head, _ = self._tracing.on_request(head, record)
        # 5. Route: inbound traffic has one destination, the local app.
        record.cluster = self._cluster.name
        # 6. Deadline: none by default (Istio); Envoy's request header may set one.
        timeout = timeout_seconds(plan.timeout_ms)
        return Forward(
            head=head,
            pool=self._pool,
            timeout=timeout,
            websocket=plan.websocket,
            expect_continue=plan.expect_continue,
            replayable=not plan.has_body,
        )

    def _authorize(self, head: RequestHead, record: RequestRecord) -> None:
        assert self._authorizer is not None
        uri = record.source_principal
        decision = self._authorizer.check(
            AuthzRequest(
                principal=uri[len(_SPIFFE) :] if uri.startswith(_SPIFFE) else uri,
                source_ip=_ip_of(record.downstream_remote),
                destination_port=self._port,
                destination_ip="",
                host=record.authority,
                method=record.method,
                path=record.path,
                headers=head.headers,
            )
        )
        if decision.audited:
            log.info(
                "AUDIT %s: %s %s from %s", decision.audited, record.method, record.path, uri or "-"
            )
        if not decision.allowed:
            log.info(
                "RBAC: access denied (%s): %s %s from %s",
                decision.policy or "no ALLOW policy matched",
                record.method,
                record.path,
                uri or record.downstream_remote,
            )
            raise AccessDenied(decision.policy or "none")

    def _client_cert(self, head: RequestHead, record: RequestRecord) -> RequestHead:
        headers = head.headers
        has_xfcc = any(h[0] == _XFCC for h in headers)
        if not record.source_principal and not has_xfcc:
            return head
        out: list[Header] = [h for h in headers if h[0] != _XFCC] if has_xfcc else list(headers)
        if record.source_principal:
            value = (
                f'By={self._own_uri};Hash={record.peer_cert_hash};Subject="";'
                f"URI={record.source_principal}"
            )
            out.append((_XFCC, value.encode("latin-1")))
        return RequestHead(method=head.method, target=head.target, headers=out)

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
