"""Spans: the proxy's own OpenTelemetry TracerProvider, fed from finished request records.

Owns span reporting (issue #6 §2; reference §3.2). Once a sampled request is over, its record
becomes spans: a SERVER span for an inbound request, a CLIENT span for every outbound try (retries
visible), or one CLIENT span for an outbound request answered locally before any try. Spans are
created at completion with explicit start and end times (loop time converted to epoch
nanoseconds), under the ids the trace step (``layers/tracing.py``) allocated and propagated, so
the next hop's parent is the span reported here; a preset ``IdGenerator`` hands the SDK those ids.

Names and attributes follow Istio/Envoy: the span name is the route's decorator operation
(``<host>:<port><path>``); attributes are OpenTelemetry's HTTP semantic conventions plus Envoy's
tags (``upstream_cluster``, ``upstream_address``, ``response_flags``, ``guid:x-request-id``,
``error=true`` on 5xx), Istio's ``istio.canonical_service``, ``istio.canonical_revision``,
``istio.namespace``, ``istio.mesh_id`` from the bootstrap, and the Telemetry's custom tags.

Export never touches the event loop: a ``BatchSpanProcessor`` queues spans (bounded; the oldest
are dropped when full) and a worker thread exports them, with a short timeout, over OTLP/HTTP
protobuf, to the console, or nowhere. A dead collector costs export attempts in that thread, never
a request's latency. ``aclose`` flushes on shutdown, bounded, without blocking the loop.

Rules: never the global TracerProvider; never imports io, layers or stacks (the record's trace is
read through the ``TracedRequest`` protocol); unsampled records cost one attribute read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from typing import Protocol, assert_never, cast

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from meshproxy import __version__
from meshproxy.config.model import MeshConfig, MeshProxy, TracingExporter, TracingSettings
from meshproxy.core.classify import Failure
from meshproxy.core.record import Direction, RequestRecord

log = logging.getLogger(__name__)

# Envoy truncates the path in span tags (proxy.proto max_path_tag_length).
MAX_PATH_TAG = 256
# One export call may take this long before the worker gives up on it (the OTLP exporter
# retries within it): short, so a dead collector is noticed fast and shutdown stays quick.
EXPORT_TIMEOUT = 1.0
# Spans waiting for export; past this the oldest are dropped (OpenTelemetry's default).
MAX_QUEUE = 2048
BATCH_SIZE = 512
SCHEDULE_DELAY_MS = 1000.0
# How long App.close waits for the last spans to be exported.
FLUSH_TIMEOUT = 2.0

# The response flag each failed try gets on its own span (errors.py, core/classify.py).
_TRY_FLAGS = {
    Failure.CONNECT_FAILURE.value: "UF",
    Failure.RESET.value: "UC",
    Failure.TIMEOUT.value: "UT",
    Failure.PROTOCOL_ERROR.value: "UPE",
    Failure.OVERFLOW.value: "UO",
}


class TracedRequest(Protocol):
    """What the reporter reads of a sampled request's trace (``layers/tracing.RequestTrace``)."""

    trace_id: int
    parent_id: int  # 0: a root span
    tracestate: str
    server_id: int
    operation: str
    tags: tuple[tuple[str, str], ...]

    def span_id(self, index: int) -> int: ...


class PresetIds(IdGenerator):
    """Hands the SDK the ids the trace step already propagated (set just before each span)."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id

    def is_trace_id_random(self) -> bool:
        return True


# -- the workload's identity -----------------------------------------------------------------


def canonical_service(bootstrap: MeshProxy) -> str:
    """Istio's canonical service: its label, else ``app.kubernetes.io/name``, ``app``, the name."""
    labels = bootstrap.metadata.labels
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return bootstrap.metadata.name


def canonical_revision(bootstrap: MeshProxy) -> str:
    labels = bootstrap.metadata.labels
    for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
        if labels.get(key):
            return labels[key]
    return "latest"  # Istio's default revision


def istio_tags(bootstrap: MeshProxy) -> dict[str, str]:
    """The ``istio.*`` span tags Istio adds to every span of this proxy (tracing.go)."""
    return {
        "istio.canonical_service": canonical_service(bootstrap),
        "istio.canonical_revision": canonical_revision(bootstrap),
        "istio.namespace": bootstrap.metadata.namespace,
        # Istio's meshID defaults to the trust domain.
        "istio.mesh_id": bootstrap.spec.trust_domain,
    }


def workload_resource(bootstrap: MeshProxy) -> Resource:
    """The resource naming this proxy: Istio's service name is ``<canonical service>.<ns>``."""
    meta = bootstrap.metadata
    return Resource.create(
        {
            "service.name": f"{canonical_service(bootstrap)}.{meta.namespace}",
            "service.version": canonical_revision(bootstrap),
            "service.instance.id": meta.name,
            "k8s.namespace.name": meta.namespace,
            "k8s.pod.name": meta.name,
            "meshproxy.version": __version__,
        }
    )


def make_exporter(settings: TracingSettings) -> SpanExporter | None:
    match settings.exporter:
        case TracingExporter.NONE:
            return None
        case TracingExporter.CONSOLE:
            return ConsoleSpanExporter(out=sys.stdout)
        case TracingExporter.OTLP:
            # Imported here: requests and protobuf load only when OTLP is configured.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=settings.endpoint, timeout=EXPORT_TIMEOUT)
        case unreachable:
            assert_never(unreachable)


# -- the reporter -----------------------------------------------------------------------------


class SpanReporter:
    """A record sink: each sampled record becomes its spans, handed to the batch processor."""

    __slots__ = ("_closed", "_ids", "_istio", "_offset_ns", "_processor", "_provider", "_tracer")

    def __init__(
        self,
        bootstrap: MeshProxy,
        exporter: SpanExporter,
        *,
        epoch_offset_ns: int | None = None,
        max_queue: int = MAX_QUEUE,
        schedule_delay_ms: float = SCHEDULE_DELAY_MS,
    ) -> None:
        self._ids = PresetIds()
        self._processor = BatchSpanProcessor(
            exporter,
            max_queue_size=max_queue,
            schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=min(BATCH_SIZE, max_queue),
            export_timeout_millis=EXPORT_TIMEOUT * 1000,
        )
        # Our own provider (never the global one), sampling everything it is asked to create:
        # the decision was made per request by the trace step; no atexit hook, App.close flushes.
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,
            resource=workload_resource(bootstrap),
            shutdown_on_exit=False,
            id_generator=self._ids,
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("meshproxy", __version__)
        self._istio: dict[str, AttributeValue] = dict(istio_tags(bootstrap))
        self._istio["component"] = "proxy"
        # Records carry loop time: time.monotonic() for asyncio, CLOCK_MONOTONIC in milliseconds
        # for uvloop (cached per loop iteration, so not read here); this offset makes it epoch ns.
        if epoch_offset_ns is None:
            epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        self._offset_ns = epoch_offset_ns
        self._closed = False

    @property
    def provider(self) -> TracerProvider:
        return self._provider

    def _ns(self, loop_time: float) -> int:
        return int(loop_time * 1e9) + self._offset_ns

    def write(self, record: RequestRecord) -> None:
        if record.trace is None or self._closed:
            return
        trace = cast(TracedRequest, record.trace)
        try:
            if record.direction is Direction.INBOUND:
                self._server_span(record, trace)
            else:
                self._client_spans(record, trace)
        except Exception:  # a span must never fail the request that produced it
            log.exception("could not report the spans of a request")

    def _parent(self, trace: TracedRequest) -> Context:
        if not trace.parent_id:
            return Context()  # a root span: no parent, and not the ambient context
        state = trace_api.TraceState.from_header([trace.tracestate]) if trace.tracestate else None
        parent = trace_api.SpanContext(
            trace.trace_id,
            trace.parent_id,
            is_remote=True,
            trace_flags=trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED),
            trace_state=state,
        )
        return trace_api.set_span_in_context(trace_api.NonRecordingSpan(parent), Context())

    def _attributes(self, record: RequestRecord, trace: TracedRequest) -> dict[str, AttributeValue]:
        path = record.path[:MAX_PATH_TAG]
        authority = record.authority
        host, _, port = (
            authority.rpartition(":") if authority[-1:].isdigit() else (authority, "", "")
        )
        attrs: dict[str, AttributeValue] = {
            # OpenTelemetry HTTP semantic conventions (v1.26+ names).
            "http.request.method": record.method,
            "url.path": path.partition("?")[0],
            "url.full": f"http://{authority}{path}"[:MAX_PATH_TAG],
            "network.protocol.version": "1.1",
            "server.address": host or authority,
            "http.request.body.size": record.bytes_received,
            "http.response.body.size": record.bytes_sent,
            # Envoy's own tags (docs: tracing "Envoy span tags").
            "upstream_cluster": record.cluster,
            "guid:x-request-id": record.request_id,
        }
        if port:
            attrs["server.port"] = int(port)
        query = path.partition("?")[2]
        if query:
            attrs["url.query"] = query
        if record.user_agent:
            attrs["user_agent.original"] = record.user_agent
        attrs.update(self._istio)
        for key, value in trace.tags:
            attrs[key] = value
        return attrs

    def _server_span(self, record: RequestRecord, trace: TracedRequest) -> None:
        attrs = self._attributes(record, trace)
        peer, _, peer_port = record.downstream_remote.rpartition(":")
        if peer:
            attrs["client.address"] = peer.strip("[]")
            attrs["network.peer.address"] = peer.strip("[]")
            if peer_port.isdigit():
                attrs["network.peer.port"] = int(peer_port)
        if record.upstream_host:
            attrs["upstream_address"] = record.upstream_host
        code = record.response_code
        self._finish(
            trace.operation,
            SpanKind.SERVER,
            trace,
            trace.server_id,
            attrs,
            code,
            "",
            record.flags_text,
            record.start,
            record.end or record.start,
        )

    def _client_spans(self, record: RequestRecord, trace: TracedRequest) -> None:
        base = self._attributes(record, trace)
        tries = record.tries
        if not tries:
            # Answered locally before any try (NR, UH, a fault, overflow): one span for it.
            self._finish(
                trace.operation,
                SpanKind.CLIENT,
                trace,
                trace.span_id(0),
                base,
                record.response_code,
                "",
                record.flags_text,
                record.start,
                record.end or record.start,
            )
            return
        last = len(tries) - 1
        for i, (endpoint, outcome, start, seconds) in enumerate(tries):
            attrs = dict(base)
            attrs["upstream_address"] = endpoint
            address, _, port = endpoint.rpartition(":")
            attrs["network.peer.address"] = address.strip("[]")
            if port.isdigit():
                attrs["network.peer.port"] = int(port)
            if i:
                attrs["http.request.resend_count"] = i
            code = int(outcome) if outcome.isdigit() else 0
            if i == last:
                flags = record.flags_text
                if not code and record.response_code:
                    code = record.response_code  # the local reply the client got
            else:
                flags = _TRY_FLAGS.get(outcome, "-")
            failure = "" if outcome.isdigit() else outcome
            self._finish(
                trace.operation,
                SpanKind.CLIENT,
                trace,
                trace.span_id(i),
                attrs,
                code,
                failure,
                flags,
                start,
                start + seconds,
            )

    def _finish(
        self,
        name: str,
        kind: SpanKind,
        trace: TracedRequest,
        span_id: int,
        attrs: dict[str, AttributeValue],
        code: int,
        failure: str,
        flags: str,
        start: float,
        end: float,
    ) -> None:
        attrs["response_flags"] = flags
        if code:
            attrs["http.response.status_code"] = code
        error = code >= 500 or bool(failure) or not code
        if failure:
            attrs["error.type"] = failure
        elif code >= 500:
            attrs["error.type"] = str(code)
        if error:
            attrs["error"] = True  # Envoy's tag on 5xx and failed tries
        ids = self._ids
        ids.trace_id = trace.trace_id
        ids.span_id = span_id
        span = self._tracer.start_span(
            name,
            context=self._parent(trace),
            kind=kind,
            attributes=attrs,
            start_time=self._ns(start),
        )
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=self._ns(end))

    # -- lifetime ---------------------------------------------------------------------------------
    def force_flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Export what is queued now (blocking: for tests and tools, not the event loop)."""
        return self._provider.force_flush(int(timeout * 1000))

    async def aclose(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flush and shut down in a thread, waiting at most ``timeout`` without blocking the loop.

        The SDK's shutdown joins the export worker, which may be stuck on a dead collector for up
        to the export timeout; past ``timeout`` the (daemon) thread is left to finish alone.
        """
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                self._provider.shutdown()
            except Exception:
                log.exception("span exporter shutdown failed")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=shutdown, name="meshproxy-trace-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            log.warning("spans not flushed within %.1fs; dropping the rest", timeout)


def span_reporter(config: MeshConfig) -> SpanReporter | None:
    """The reporter the bootstrap asks for, or None when tracing is off (exporter ``none``)."""
    exporter = make_exporter(config.bootstrap.spec.telemetry.tracing)
    if exporter is None:
        return None
    return SpanReporter(config.bootstrap, exporter)
