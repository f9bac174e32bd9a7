"""Traces over real sockets, checked by a real OTLP/HTTP receiver.

The receiver is an HTTP/1.1 server on loopback that accepts ``POST /v1/traces`` and decodes each
body as ``ExportTraceServiceRequest`` with ``opentelemetry-proto``, as the OpenTelemetry Collector,
Jaeger and Tempo do. Semantics: reference §3.2; issue #6 §2. Spans reach it from each proxy's batch
processor, at the latest when the proxy closes (``App.close`` flushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import typing
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import h11
import pytest
from helpers import RawClient, SeenRequest, bootstrap, join, proxy, service_entry, upstream
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meshproxy.core.record import RequestRecord

# --------------------------------------------------------------------------------------------
# An OTLP/HTTP receiver


@dataclass
class Received:
    """One span as the collector decoded it, with its resource's attributes."""

    span: Span
    resource: dict[str, object]

    @property
    def attributes(self) -> dict[str, object]:
        return {kv.key: _value(kv.value) for kv in self.span.attributes}

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.span.trace_id, "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.span.span_id, "big")

    @property
    def parent_id(self) -> int:
        return int.from_bytes(self.span.parent_span_id, "big") if self.span.parent_span_id else 0


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Collector:
    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.exports = 0
        self.content_types: set[str] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.arrived = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def accept(self, path: str, content_type: str, body: bytes) -> tuple[int, bytes]:
        if path != "/v1/traces":
            return 404, b""
        self.content_types.add(content_type)
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                self.spans.extend(Received(span, resource) for span in ss.spans)
        self.exports += 1
        self.arrived.set()
        return 200, ExportTraceServiceResponse().SerializeToString()

    def trace(self, trace_id: int) -> list[Received]:
        return [s for s in self.spans if s.trace_id == trace_id]


class _CollectorProtocol(asyncio.Protocol):
    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self.request is not None
                headers = dict(self.request.headers)
                status, body = self.collector.accept(
                    self.request.target.decode(),
                    headers.get(b"content-type", b"").decode(),
                    bytes(self.body),
                )
                out = self.conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            ("content-type", "application/x-protobuf"),
                            ("content-length", str(len(body))),
                        ],
                    )
                )
                self.transport.writelines(
                    [
                        out or b"",
                        self.conn.send(h11.Data(data=body)) or b"",
                        self.conn.send(h11.EndOfMessage()) or b"",
                    ]
                )
                self.conn.start_next_cycle()
            else:
                return


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    loop = asyncio.get_running_loop()
    c.server = await loop.create_server(lambda: _CollectorProtocol(c), "127.0.0.1", 0)
    c.port = c.server.sockets[0].getsockname()[1]
    try:
        yield c
    finally:
        c.server.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


class _Silent(asyncio.Protocol):
    def __init__(self, open_: set[asyncio.BaseTransport]) -> None:
        self.open = open_

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.open.add(transport)


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[int]:
    """A collector that accepts connections, reads, and never answers."""
    loop = asyncio.get_running_loop()
    accepted: set[asyncio.BaseTransport] = set()
    server = await loop.create_server(lambda: _Silent(accepted), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for transport in accepted:
            transport.close()


# --------------------------------------------------------------------------------------------
# Configuration


def sidecar(name: str, app: str, endpoint: str, inbound_app: int | None = None) -> str:
    """A bootstrap named ``name`` (labels app/version) exporting spans to ``endpoint``."""
    extra = f"telemetry:\n  tracing: {{exporter: otlp, endpoint: '{endpoint}'}}\n"
    return bootstrap(inbound_app=inbound_app, extra=extra).replace(
        "metadata: {name: app-v1, namespace: default}",
        f"metadata: {{name: {name}, namespace: default, labels: {{app: {app}, version: v1}}}}",
    )


def sampling(percentage: float, namespace: str = "istio-system") -> str:
    return (
        "apiVersion: telemetry.istio.io/v1\n"
        "kind: Telemetry\n"
        f"metadata: {{name: mesh-default, namespace: {namespace}}}\n"
        "spec:\n"
        "  tracing:\n"
        f"  - randomSamplingPercentage: {percentage}\n"
        "    customTags:\n"
        "      team: {literal: {value: payments}}\n"
        "      tenant: {header: {name: x-tenant, defaultValue: none}}\n"
    )


SERVICE = "svc.default.svc.cluster.local:9080"
OPERATION = f"{SERVICE}/*"


def header(req: SeenRequest, name: str) -> str:
    value = req.header(name)
    assert value is not None, name
    return value


# --------------------------------------------------------------------------------------------
# Two sidecars, one trace


async def test_two_sidecar_call_with_a_retry_is_one_trace_with_a_client_span_per_try() -> None:
    """app client -> sidecar A (outbound) -> [refused endpoint, then] sidecar B (inbound) -> app.

    The client's request carries B3 ids without a decision, so the Telemetry's 100% samples it.
    """
    async with collector() as col, upstream() as app:
        with refusing_port() as dead:
            b_config = join(
                sidecar("svc-v1", "svc", col.endpoint, inbound_app=app.port), sampling(100)
            )
            async with proxy(b_config) as b:
                a_config = join(
                    sidecar("client-v1", "client", col.endpoint),
                    service_entry("svc", [dead, b.inbound_port]),
                    sampling(100),
                )
                records: list[RequestRecord] = []
                async with proxy(a_config, record_sinks=[records.append]) as a:
                    client = await RawClient.connect(a.port)
                    retried: tuple[int, int, str] | None = None
                    # Istio's default policy retries a refused connection on the other endpoint;
                    # the balancer picks the refusing one first for some of these requests.
                    for n in range(1, 17):
                        trace_id, app_span, rid = 0xC0FFEE00 + n, 0xA0 + n, f"rid-{n}"
                        resp = await client.request(
                            "GET",
                            f"/items/{n}?q=1",
                            [
                                ("host", "svc:9080"),
                                ("x-b3-traceid", f"{trace_id:032x}"),
                                ("x-b3-spanid", f"{app_span:016x}"),
                                ("x-request-id", rid),
                                ("x-tenant", "acme"),
                            ],
                        )
                        assert resp.status == 200
                        if len(records[-1].tries) == 2:
                            retried = (trace_id, app_span, rid)
                            break
                    await client.close()
                    assert retried is not None, "no request tried the refusing endpoint first"
                    seen = app.requests[-1]
        # Both proxies are closed: their spans are flushed.
    trace_id, app_span, rid = retried
    spans = col.trace(trace_id)
    assert "application/x-protobuf" in col.content_types
    client_spans = sorted(
        (s for s in spans if s.span.kind == Span.SPAN_KIND_CLIENT),
        key=lambda s: s.span.start_time_unix_nano,
    )
    server_spans = [s for s in spans if s.span.kind == Span.SPAN_KIND_SERVER]
    assert len(spans) == 3 and len(client_spans) == 2 and len(server_spans) == 1

    # A: one CLIENT span per try, both children of the span the app's request carried.
    first, second = client_spans
    server = server_spans[0]
    for s in client_spans:
        assert s.parent_id == app_span
        assert s.span.name == OPERATION
        assert s.resource["service.name"] == "client.default"
        attrs = s.attributes
        assert attrs["istio.canonical_service"] == "client"
        assert attrs["istio.canonical_revision"] == "v1"
        assert attrs["istio.namespace"] == "default"
        assert attrs["istio.mesh_id"] == "cluster.local"
        assert attrs["upstream_cluster"] == "outbound|9080||svc.default.svc.cluster.local"
        assert attrs["http.request.method"] == "GET"
        assert attrs["url.path"].startswith("/items/")
        assert attrs["guid:x-request-id"] == rid
        assert attrs["team"] == "payments" and attrs["tenant"] == "acme"
    a1, a2 = first.attributes, second.attributes
    assert a1["upstream_address"] == f"127.0.0.1:{dead}"
    assert a1["error"] is True and a1["error.type"] == "connect-failure"
    assert a1["response_flags"] == "UF"
    assert first.span.status.code == Status.STATUS_CODE_ERROR
    assert a2["upstream_address"] == f"127.0.0.1:{b.inbound_port}"
    assert a2["http.response.status_code"] == 200 and "error" not in a2
    assert a2["http.request.resend_count"] == 1
    assert first.span.end_time_unix_nano <= second.span.start_time_unix_nano

    # B: the SERVER span is the child of A's second CLIENT span (the one the upstream saw),
    # named after A's route operation, which A propagated.
    assert server.parent_id == second.span_id
    assert server.span.name == OPERATION
    assert server.resource["service.name"] == "svc.default"
    assert server.attributes["istio.canonical_service"] == "svc"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["upstream_address"] == f"127.0.0.1:{app.port}"
    tolerance = 2_000_000  # both proxies convert the same monotonic clock to epoch time
    assert server.span.start_time_unix_nano >= second.span.start_time_unix_nano - tolerance
    assert server.span.end_time_unix_nano <= second.span.end_time_unix_nano + tolerance

    # The app behind B sees B's SERVER span as its parent, in W3C and in the B3 form it used.
    assert header(seen, "traceparent") == f"00-{trace_id:032x}-{server.span_id:016x}-01"
    assert header(seen, "x-b3-traceid") == f"{trace_id:032x}"
    assert header(seen, "x-b3-spanid") == f"{server.span_id:016x}"
    assert header(seen, "x-b3-parentspanid") == f"{second.span_id:016x}"
    assert header(seen, "x-b3-sampled") == "1"
    assert header(seen, "x-request-id") == rid


async def test_unsampled_requests_export_nothing() -> None:
    """0%: no span for a request without context, nor for one whose parent said no; a parent's
    yes is still honoured (the control that shows the collector would have seen spans)."""
    async with collector() as col, upstream() as app:
        config = join(
            sidecar("client-v1", "client", col.endpoint),
            service_entry("svc", [app.port]),
            sampling(0),
        )
        async with proxy(config) as a:
            client = await RawClient.connect(a.port)
            for _ in range(20):
                resp = await client.request("GET", "/", [("host", "svc:9080")])
                assert resp.status == 200
            no = f"00-{0xBAD:032x}-{0x1:016x}-00"
            resp = await client.request("GET", "/", [("host", "svc:9080"), ("traceparent", no)])
            assert resp.status == 200
            yes = f"00-{0x600D:032x}-{0x2:016x}-01"
            resp = await client.request("GET", "/", [("host", "svc:9080"), ("traceparent", yes)])
            assert resp.status == 200
            await client.close()
    # Propagation only: a fresh not-sampled context, or the caller's unchanged.
    fresh = [header(r, "traceparent") for r in app.requests[:20]]
    assert all(tp.endswith("-00") for tp in fresh) and len(set(fresh)) == 20
    assert header(app.requests[20], "traceparent") == no
    assert [s.trace_id for s in col.spans] == [0x600D]


# --------------------------------------------------------------------------------------------
# A dead collector


@contextlib.asynccontextmanager
async def dead_collector(kind: str) -> AsyncIterator[str]:
    if kind == "refused":
        with refusing_port() as port:
            yield f"http://127.0.0.1:{port}/v1/traces"
    else:
        async with black_hole() as port:
            yield f"http://127.0.0.1:{port}/v1/traces"


@pytest.mark.parametrize("kind", ["refused", "black-hole"])
async def test_a_dead_collector_never_slows_or_fails_requests(kind: str) -> None:
    async with dead_collector(kind) as endpoint, upstream() as app:
        config = join(
            sidecar("client-v1", "client", endpoint),
            service_entry("svc", [app.port]),
            sampling(100),
        )
        latencies: list[float] = []
        async with proxy(config) as a:
            client = await RawClient.connect(a.port)
            started = time.perf_counter()
            # Long enough for the batch processor to try (and fail) exports meanwhile.
            while time.perf_counter() - started < 2.5:
                t0 = time.perf_counter()
                resp = await client.request("GET", "/", [("host", "svc:9080")])
                latencies.append(time.perf_counter() - t0)
                assert resp.status == 200
            await client.close()
            closing = time.perf_counter()
        closed_in = time.perf_counter() - closing
    latencies.sort()
    assert len(latencies) > 100
    assert latencies[len(latencies) * 99 // 100] < 0.1, latencies[-5:]
    assert latencies[-1] < 0.5, latencies[-5:]
    # Shutdown waits for the last export only so long (FLUSH_TIMEOUT), never for the collector.
    assert closed_in < 4.0
