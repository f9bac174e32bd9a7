"""Tracing without sockets: propagation, sampling, Telemetry selection, span names and spans.

Semantics: reference §3.2 (Istio/Envoy tracing), W3C Trace Context (``traceparent`` §3.2,
``tracestate`` §3.3), B3 propagation (multi-header ``x-b3-*`` and single ``b3``). Spans are
checked with the SDK's in-memory exporter behind the real ``SpanReporter``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from helpers import bootstrap, join, service_entry
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshproxy.config.load import load_texts
from meshproxy.config.model import MeshConfig
from meshproxy.core.http1 import Header, RequestHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import HostTable
from meshproxy.layers.headers import plan_request
from meshproxy.layers.route import Router
from meshproxy.layers.tracing import (
    B3_MULTI,
    B3_SINGLE,
    Context,
    RequestTrace,
    TracingPolicy,
    TracingStep,
    extract,
    format_traceparent,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    route_operation,
    tracing_policy,
)
from meshproxy.telemetry.tracing import SpanReporter

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP_UNSAMPLED = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def head(*headers: Header, target: bytes = b"/p") -> RequestHead:
    return RequestHead(method=b"GET", target=target, headers=[(b"host", b"svc:9080"), *headers])


def values(h: RequestHead, name: bytes) -> list[bytes]:
    return [v for n, v in h.headers if n == name]


def one(h: RequestHead, name: bytes) -> bytes:
    found = values(h, name)
    assert len(found) == 1, (name, found)
    return found[0]


def record(direction: Direction = Direction.OUTBOUND) -> RequestRecord:
    rec = RequestRecord(direction, 100.0, "10.0.0.9:5555")
    rec.authority = "svc:9080"
    return rec


def step(
    direction: Direction = Direction.OUTBOUND, percentage: float = 1.0, seed: int = 7, **kw: object
) -> TracingStep:
    policy = TracingPolicy(percentage=percentage, **kw)  # type: ignore[arg-type]
    return TracingStep(policy, direction, random.Random(seed), 9080)


# ---------------------------------------------------------------------------------------------
# W3C traceparent


def test_traceparent_parses_and_formats_round_trip() -> None:
    ctx = parse_traceparent(TP)
    assert ctx == Context(trace_id=TRACE, span_id=SPAN, sampled=True)
    assert format_traceparent(TRACE, SPAN, True) == TP
    assert format_traceparent(TRACE, SPAN, False) == TP_UNSAMPLED
    unsampled = parse_traceparent(TP_UNSAMPLED)
    assert unsampled is not None and unsampled.sampled is False


def test_traceparent_flags_other_than_sampled_are_ignored() -> None:
    ctx = parse_traceparent(TP[:-2] + b"03")  # sampled + random-trace-id (Trace Context 2)
    assert ctx is not None and ctx.sampled is True
    ctx = parse_traceparent(TP[:-2] + b"02")
    assert ctx is not None and ctx.sampled is False


def test_future_versions_may_append_fields() -> None:
    ctx = parse_traceparent(b"01" + TP[2:] + b"-what-ever")
    assert ctx is not None and ctx.trace_id == TRACE


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        TP.upper(),  # lower-case hex only
        b"ff" + TP[2:],  # version ff is invalid
        TP + b"-extra",  # version 00 has exactly four fields
        b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",  # all-zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01",  # all-zero span id
        TP[:-1],  # short flags
        b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
    ],
)
def test_invalid_traceparent_is_ignored(value: bytes) -> None:
    assert parse_traceparent(value) is None


# ---------------------------------------------------------------------------------------------
# B3


def test_b3_single_header_forms() -> None:
    full = b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-0000000000000001"
    assert parse_b3_single(full) == Context(
        trace_id=TRACE, span_id=SPAN, sampled=True, b3=B3_SINGLE
    )
    ids_only = parse_b3_single(b"a3ce929d0e0e4736-00f067aa0ba902b7")
    assert ids_only == Context(trace_id=0xA3CE929D0E0E4736, span_id=SPAN, b3=B3_SINGLE)
    debug = parse_b3_single(b"a3ce929d0e0e4736-00f067aa0ba902b7-d")
    assert debug is not None and debug.sampled is True
    assert parse_b3_single(b"0") == Context(sampled=False, b3=B3_SINGLE)
    assert parse_b3_single(b"1") == Context(sampled=True, b3=B3_SINGLE)
    assert parse_b3_single(b"d") == Context(sampled=True, b3=B3_SINGLE)


@pytest.mark.parametrize(
    "value",
    [
        b"x",
        b"a3ce929d0e0e4736",  # a trace id alone
        b"a3ce929d0e0e4736-zzzzzzzzzzzzzzzz",
        b"a3ce929d0e0e47-00f067aa0ba902b7",  # 14 digits
        b"a3ce929d0e0e4736-00f067aa0ba902b7-2",  # unknown sampling state
        b"a-b-c-d-e",
    ],
)
def test_invalid_b3_single_is_ignored(value: bytes) -> None:
    assert parse_b3_single(value) is None


def test_b3_multi_header_forms() -> None:
    ctx = parse_b3_multi(b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", b"1", None)
    assert ctx == Context(trace_id=TRACE, span_id=SPAN, sampled=True, b3=B3_MULTI)
    ctx = parse_b3_multi(b"A3CE929D0E0E4736", b"00F067AA0BA902B7", b"0", None)
    assert ctx == Context(trace_id=0xA3CE929D0E0E4736, span_id=SPAN, sampled=False, b3=B3_MULTI)
    # The debug flag samples; "true" is the legacy spelling.
    ctx = parse_b3_multi(b"a3ce929d0e0e4736", b"00f067aa0ba902b7", None, b"1")
    assert ctx is not None and ctx.sampled is True
    ctx = parse_b3_multi(b"a3ce929d0e0e4736", b"00f067aa0ba902b7", b"true", None)
    assert ctx is not None and ctx.sampled is True
    # A decision without ids; ids without a decision.
    assert parse_b3_multi(None, None, b"0", None) == Context(sampled=False, b3=B3_MULTI)
    ctx = parse_b3_multi(b"a3ce929d0e0e4736", b"00f067aa0ba902b7", None, None)
    assert ctx is not None and ctx.sampled is None
    assert parse_b3_multi(b"nothex", b"00f067aa0ba902b7", None, None) is None


def test_extract_prefers_w3c_and_keeps_tracestate() -> None:
    got = extract(
        [
            (b"traceparent", TP),
            (b"tracestate", b"congo=t61rcWkgMzE"),
            (b"tracestate", b"rojo=00f067aa0ba902b7"),
            (b"x-b3-traceid", b"a3ce929d0e0e4736"),
            (b"x-b3-spanid", b"0000000000000009"),
        ]
    )
    assert got.context.trace_id == TRACE and got.context.span_id == SPAN
    assert got.context.tracestate == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert got.context.b3 == B3_MULTI  # written back in that form too
    assert not got.forced


def test_extract_falls_back_to_b3_when_traceparent_is_invalid_or_repeated() -> None:
    b3 = (b"b3", b"a3ce929d0e0e4736-00f067aa0ba902b7-1")
    got = extract([(b"traceparent", b"bogus"), b3])
    assert got.context.trace_id == 0xA3CE929D0E0E4736 and got.context.b3 == B3_SINGLE
    got = extract([(b"traceparent", TP), (b"traceparent", TP), b3])
    assert got.context.trace_id == 0xA3CE929D0E0E4736
    got = extract([(b"traceparent", TP), (b"traceparent", TP)])
    assert got.context == Context() and got.seen


def test_extract_force_headers_and_decorator() -> None:
    assert extract([(b"x-client-trace-id", b"abc")]).forced
    assert extract([(b"x-envoy-force-trace", b"true")]).forced
    got = extract([(b"x-envoy-decorator-operation", b"reviews:9080/*")])
    assert got.operation == "reviews:9080/*" and not got.seen


# ---------------------------------------------------------------------------------------------
# Sampling


def decide(s: TracingStep, *headers: Header) -> bool:
    return s.sampled(extract(list(headers)))


def test_parent_decision_is_honoured_whatever_the_percentage() -> None:
    assert decide(step(percentage=0.0), (b"traceparent", TP))
    assert not decide(step(percentage=100.0), (b"traceparent", TP_UNSAMPLED))
    assert decide(step(percentage=0.0), (b"x-b3-sampled", b"1"))
    assert not decide(step(percentage=100.0), (b"b3", b"0"))


def test_force_headers_sample_without_a_parent_decision() -> None:
    s = step(percentage=0.0)
    assert decide(s, (b"x-client-trace-id", b"abc"))
    assert decide(s, (b"x-envoy-force-trace", b"1"))
    # Envoy's OpenTelemetry tracer keeps a propagated parent's flag even then.
    assert not decide(s, (b"x-envoy-force-trace", b"1"), (b"traceparent", TP_UNSAMPLED))
    # A context without a decision (B3 ids only) is still decided here.
    ids_only = (b"b3", b"a3ce929d0e0e4736-00f067aa0ba902b7")
    assert decide(s, (b"x-envoy-force-trace", b"1"), ids_only)
    assert not decide(s, ids_only)


@pytest.mark.parametrize("percentage", [0.0, 1.0, 25.0, 100.0])
def test_random_sampling_percentage(percentage: float) -> None:
    s = step(percentage=percentage, seed=3)
    n = 20_000
    hits = sum(decide(s) for _ in range(n))
    expected = n * percentage / 100
    assert abs(hits - expected) <= max(4 * (expected * (1 - percentage / 100)) ** 0.5, 0.5)


@pytest.mark.parametrize("percentage", [0.0, 1.0, 25.0, 100.0])
@pytest.mark.parametrize("direction", [Direction.OUTBOUND, Direction.INBOUND])
def test_the_step_traces_the_sampled_share_of_requests(
    percentage: float, direction: Direction
) -> None:
    """Once decided, a request is traced: the draw happens once per request."""
    s = step(direction, percentage=percentage, seed=11)
    n = 20_000
    traced = sum(s.on_request(head(), record(direction))[1] is not None for _ in range(n))
    expected = n * percentage / 100
    assert abs(traced - expected) <= max(4 * (expected * (1 - percentage / 100)) ** 0.5, 0.5)


# ---------------------------------------------------------------------------------------------
# The step: what goes upstream, and when a trace is started


def test_unsampled_with_context_forwards_the_head_unchanged() -> None:
    h = head((b"traceparent", TP_UNSAMPLED), (b"tracestate", b"a=b"))
    rec = record()
    out, trace = step(percentage=100.0).on_request(h, rec)
    assert out is h and trace is None and rec.trace is None


def test_unsampled_without_context_gets_a_fresh_unsampled_traceparent() -> None:
    rec = record()
    out, trace = step(percentage=0.0).on_request(head(), rec)
    assert trace is None and rec.trace is None
    ctx = parse_traceparent(one(out, b"traceparent"))
    assert ctx is not None and ctx.sampled is False
    # A bare B3 "no" is replaced by the W3C context carrying the same decision.
    out, _ = step(percentage=0.0).on_request(head((b"b3", b"0")), record())
    assert values(out, b"b3") == [] and one(out, b"traceparent").endswith(b"-00")


def test_sampled_outbound_gives_each_try_its_own_client_span() -> None:
    h = head((b"traceparent", TP), (b"tracestate", b"a=b"))
    rec = record()
    out, trace = step().on_request(h, rec)
    assert out is h and trace is not None and rec.trace is trace
    assert trace.trace_id == TRACE and trace.parent_id == SPAN and trace.tracestate == "a=b"
    trace.operation = "svc.default.svc.cluster.local:9080/*"
    first, second = trace.head_for_try(out, 0), trace.head_for_try(out, 1)
    p1, p2 = (
        parse_traceparent(one(first, b"traceparent")),
        parse_traceparent(one(second, b"traceparent")),
    )
    assert p1 is not None and p2 is not None
    assert p1.trace_id == p2.trace_id == TRACE and p1.sampled and p2.sampled
    assert p1.span_id == trace.span_id(0) and p2.span_id == trace.span_id(1)
    assert p1.span_id != p2.span_id and SPAN not in (p1.span_id, p2.span_id)
    assert trace.head_for_try(out, 1).headers == second.headers  # stable per try
    assert one(first, b"tracestate") == b"a=b"
    assert one(first, b"x-envoy-decorator-operation") == b"svc.default.svc.cluster.local:9080/*"


def test_sampled_root_outbound_starts_a_trace() -> None:
    rec = record()
    _, trace = step(percentage=100.0).on_request(head(), rec)
    assert trace is not None and trace.parent_id == 0 and trace.trace_id != 0
    assert trace.operation == "svc:9080/*"  # until routing names it


def test_sampled_inbound_makes_the_server_span_the_apps_parent() -> None:
    h = head(
        (b"x-b3-traceid", b"4bf92f3577b34da6a3ce929d0e0e4736"),
        (b"x-b3-spanid", b"00f067aa0ba902b7"),
        (b"x-b3-sampled", b"1"),
        (b"x-b3-flags", b"1"),
        (b"b3", b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"),
    )
    rec = record(Direction.INBOUND)
    out, trace = step(Direction.INBOUND, percentage=0.0).on_request(h, rec)
    assert trace is not None and trace.server_id and trace.parent_id == SPAN
    server = b"%016x" % trace.server_id
    assert one(out, b"traceparent") == b"00-%032x-%s-01" % (TRACE, server)
    assert one(out, b"x-b3-traceid") == b"%032x" % TRACE
    assert one(out, b"x-b3-spanid") == server
    assert one(out, b"x-b3-parentspanid") == b"00f067aa0ba902b7"
    assert one(out, b"x-b3-sampled") == b"1"
    assert values(out, b"x-b3-flags") == []
    assert one(out, b"b3") == b"%032x-%s-1-00f067aa0ba902b7" % (TRACE, server)
    assert trace.operation == "svc:9080/*"


def test_inbound_span_takes_the_callers_decorator_operation() -> None:
    h = head((b"traceparent", TP), (b"x-envoy-decorator-operation", b"reviews:9080/api*"))
    _, trace = step(Direction.INBOUND).on_request(h, record(Direction.INBOUND))
    assert trace is not None and trace.operation == "reviews:9080/api*"


def test_disabled_span_reporting_propagates_the_decision_without_a_trace() -> None:
    s = step(percentage=100.0, report=False)
    rec = record()
    out, trace = s.on_request(head(), rec)
    assert trace is None and rec.trace is None
    assert one(out, b"traceparent").endswith(b"-01")
    h = head((b"traceparent", TP))
    assert s.on_request(h, record())[0] is h


def test_header_custom_tags_are_read_from_the_request() -> None:
    policy = TracingPolicy(
        percentage=100.0,
        tags=(("team", "payments"),),
        header_tags=(("ua", b"user-agent", "none"), ("tenant", b"x-tenant", "unknown")),
    )
    s = TracingStep(policy, Direction.OUTBOUND, random.Random(1))
    _, trace = s.on_request(head((b"user-agent", b"curl/8")), record())
    assert trace is not None
    assert trace.tags == (("team", "payments"), ("ua", "curl/8"), ("tenant", "unknown"))


# ---------------------------------------------------------------------------------------------
# Which Telemetry applies


def telemetry(name: str, namespace: str, tracing: str, selector: str = "") -> str:
    sel = f"  selector: {{matchLabels: {selector}}}\n" if selector else ""
    return (
        "apiVersion: telemetry.istio.io/v1\n"
        "kind: Telemetry\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n"
        f"{sel}"
        f"  tracing:\n{tracing}"
    )


def config(*docs: str, labels: str = "{app: reviews, version: v2}") -> MeshConfig:
    boot = bootstrap().replace(
        "metadata: {name: app-v1, namespace: default}",
        f"metadata: {{name: app-v1, namespace: default, labels: {labels}}}",
    )
    return load_texts([("mesh.yaml", join(boot, *docs))])


def test_default_policy_is_one_percent() -> None:
    policy = tracing_policy(config(), Direction.OUTBOUND, {})
    assert policy == TracingPolicy(percentage=1.0)


def test_more_specific_telemetry_overrides_the_fields_it_sets() -> None:
    cfg = config(
        telemetry(
            "mesh",
            "istio-system",
            "  - randomSamplingPercentage: 10\n"
            "    customTags:\n"
            "      team: {literal: {value: core}}\n"
            "      zone: {environment: {name: ZONE, defaultValue: z0}}\n"
            "      tenant: {header: {name: X-Tenant, defaultValue: none}}\n",
        ),
        telemetry("ns", "default", "  - disableSpanReporting: true\n"),
        telemetry("reviews", "default", "  - randomSamplingPercentage: 50\n", "{app: reviews}"),
        telemetry("other", "default", "  - randomSamplingPercentage: 99\n", "{app: ratings}"),
        telemetry("elsewhere", "prod", "  - randomSamplingPercentage: 77\n"),
    )
    policy = tracing_policy(cfg, Direction.INBOUND, {"ZONE": "eu-1"})
    assert policy.percentage == 50.0
    assert policy.report is False
    assert policy.tags == (("team", "core"), ("zone", "eu-1"))
    assert policy.header_tags == (("tenant", b"x-tenant", "none"),)
    assert tracing_policy(cfg, Direction.INBOUND, {}).tags[1] == ("zone", "z0")


def test_match_mode_picks_the_direction() -> None:
    cfg = config(
        telemetry(
            "mesh",
            "istio-system",
            "  - match: {mode: CLIENT}\n"
            "    randomSamplingPercentage: 5\n"
            "  - match: {mode: SERVER}\n"
            "    randomSamplingPercentage: 70\n",
        )
    )
    assert tracing_policy(cfg, Direction.OUTBOUND, {}).percentage == 5.0
    assert tracing_policy(cfg, Direction.INBOUND, {}).percentage == 70.0


# ---------------------------------------------------------------------------------------------
# Span names: Istio's route operation


def vs(http: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata: {name: svc-routes, namespace: default}\n"
        "spec:\n"
        "  hosts: [svc]\n"
        f"  http:\n{http}"
    )


def operation(cfg: MeshConfig, target: bytes) -> str:
    hosts = HostTable(cfg)
    router = Router(hosts, RouteTable(cfg, hosts), random.Random(1))
    rec = record()
    plan = plan_request(head(target=target), rec, random.Random(1))
    decision = router.route(plan.head, plan.authority, rec)
    view = router.view(plan.head, plan.authority, decision.target.port)
    return route_operation(decision, view)


def test_span_name_of_a_service_without_a_virtual_service() -> None:
    cfg = config(service_entry("svc", [9001]))
    assert operation(cfg, b"/anything") == "svc.default.svc.cluster.local:9080/*"


def test_span_names_follow_the_matched_uri() -> None:
    cfg = config(
        service_entry("svc", [9001]),
        service_entry("other", [9002]),
        vs(
            "  - match: [{uri: {exact: /health}}, {uri: {prefix: /api}}]\n"
            "    route: [{destination: {host: svc}}]\n"
            "  - match: [{uri: {regex: '/r[0-9]+'}}]\n"
            "    route: [{destination: {host: svc}}]\n"
            "  - match: [{uri: {prefix: /split}}]\n"
            "    route:\n"
            "    - {destination: {host: svc}, weight: 50}\n"
            "    - {destination: {host: other}, weight: 50}\n"
            "  - route: [{destination: {host: other}}]\n"
        ),
    )
    fqdn = "svc.default.svc.cluster.local:9080"
    assert operation(cfg, b"/health") == f"{fqdn}/health"
    assert operation(cfg, b"/api/v1") == f"{fqdn}/api*"
    assert operation(cfg, b"/r12") == f"{fqdn}/*"
    assert operation(cfg, b"/split/x") == "svc-routes:9080/split*"
    assert operation(cfg, b"/other") == "other.default.svc.cluster.local:9080/*"


# ---------------------------------------------------------------------------------------------
# Spans from records


@pytest.fixture
def reported() -> Iterator[tuple[SpanReporter, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    cfg = config()
    # Loop time 100.0 is "now" for this reporter.
    offset = time.time_ns() - 100_000_000_000
    reporter = SpanReporter(cfg.bootstrap, exporter, epoch_offset_ns=offset)
    yield reporter, exporter
    reporter.provider.shutdown()


def finished(reporter: SpanReporter, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert reporter.force_flush()
    return list(exporter.get_finished_spans())


def test_client_spans_one_per_try_with_the_injected_ids(
    reported: tuple[SpanReporter, InMemorySpanExporter],
) -> None:
    reporter, exporter = reported
    rec = record()
    rec.method, rec.path, rec.request_id = "GET", "/p?q=1", "rid-1"
    rec.cluster = "outbound|9080||svc.default.svc.cluster.local"
    rec.user_agent = "curl/8"
    trace = RequestTrace(random.Random(5), TRACE, SPAN, "a=b", 0, "svc:9080/*", (("team", "x"),))
    injected = [trace.span_id(0), trace.span_id(1)]
    rec.trace = trace
    rec.tries = [
        ("127.0.0.1:1", "connect-failure", 100.0, 0.01),
        ("127.0.0.1:2", "200", 100.04, 0.1),
    ]
    rec.response_code, rec.end = 200, 100.2
    rec.add_flag("URX")
    before = time.time_ns()
    reporter.write(rec)
    spans = finished(reporter, exporter)
    assert len(spans) == 2
    first, second = spans
    for span, span_id in zip((first, second), injected, strict=True):
        assert span.kind is SpanKind.CLIENT
        assert span.name == "svc:9080/*"
        assert span.context.trace_id == TRACE and span.context.span_id == span_id
        assert span.parent.span_id == SPAN and span.parent.is_remote
        assert span.context.trace_state.to_header() == "a=b"
        assert span.attributes["http.request.method"] == "GET"
        assert span.attributes["url.path"] == "/p"
        assert span.attributes["url.query"] == "q=1"
        assert span.attributes["upstream_cluster"] == rec.cluster
        assert span.attributes["guid:x-request-id"] == "rid-1"
        assert span.attributes["user_agent.original"] == "curl/8"
        assert span.attributes["istio.canonical_service"] == "reviews"
        assert span.attributes["istio.canonical_revision"] == "v2"
        assert span.attributes["istio.namespace"] == "default"
        assert span.attributes["istio.mesh_id"] == "cluster.local"
        assert span.attributes["team"] == "x"
    assert first.attributes["upstream_address"] == "127.0.0.1:1"
    assert first.attributes["error"] is True and first.attributes["error.type"] == "connect-failure"
    assert first.attributes["response_flags"] == "UF"
    assert first.status.status_code is StatusCode.ERROR
    assert "http.response.status_code" not in first.attributes
    assert second.attributes["upstream_address"] == "127.0.0.1:2"
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["response_flags"] == "URX"
    assert "error" not in second.attributes and second.status.status_code is StatusCode.UNSET
    # Explicit times: loop time 100.0 is "now" for this reporter; the try lasted 10 ms.
    assert abs(first.start_time - before) < 1e9
    assert first.end_time - first.start_time == pytest.approx(10_000_000, abs=1000)
    assert second.start_time - first.start_time == pytest.approx(40_000_000, abs=1000)
    resource = first.resource.attributes
    assert resource["service.name"] == "reviews.default"
    assert resource["service.version"] == "v2"


def test_server_span_and_5xx_error(reported: tuple[SpanReporter, InMemorySpanExporter]) -> None:
    reporter, exporter = reported
    rec = record(Direction.INBOUND)
    rec.method, rec.path = "POST", "/" + "x" * 400
    trace = RequestTrace(random.Random(5), TRACE, 0, "", 0, "svc:9080/*", ())
    trace.server_id = 0xABC
    rec.trace = trace
    rec.tries = [("127.0.0.1:8080", "503", 100.001, 0.002)]
    rec.response_code, rec.end, rec.upstream_host = 503, 100.01, "127.0.0.1:8080"
    reporter.write(rec)
    (span,) = finished(reporter, exporter)
    assert span.kind is SpanKind.SERVER
    assert span.context.span_id == 0xABC and span.parent is None
    attrs = span.attributes
    assert attrs["http.response.status_code"] == 503 and attrs["error"] is True
    assert attrs["client.address"] == "10.0.0.9" and attrs["network.peer.port"] == 5555
    assert attrs["upstream_address"] == "127.0.0.1:8080"
    assert len(attrs["url.path"]) == 256 and attrs["url.full"].startswith("http://svc:9080/x")


def test_local_reply_gets_one_client_span_and_unsampled_records_none(
    reported: tuple[SpanReporter, InMemorySpanExporter],
) -> None:
    reporter, exporter = reported
    reporter.write(record())  # unsampled: no trace, no span
    rec = record()
    trace = RequestTrace(random.Random(5), TRACE, SPAN, "", 0, "svc:9080/*", ())
    rec.trace = trace
    rec.response_code, rec.end = 404, 100.001
    rec.add_flag("NR")
    reporter.write(rec)
    (span,) = finished(reporter, exporter)
    assert span.context.span_id == trace.span_id(0)
    assert span.attributes["response_flags"] == "NR"
    assert span.attributes["http.response.status_code"] == 404
    assert "error" not in span.attributes


class Stuck(SpanExporter):
    """An exporter whose collector never answers, until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_a_stuck_exporter_never_blocks_the_reporter_and_the_queue_is_bounded() -> None:
    exporter = Stuck()
    reporter = SpanReporter(config().bootstrap, exporter, max_queue=16, schedule_delay_ms=1)
    try:
        started = time.perf_counter()
        for n in range(2000):
            rec = record(Direction.INBOUND)
            trace = RequestTrace(random.Random(n), TRACE, SPAN, "", 0, "svc:9080/*", ())
            trace.server_id = n + 1
            rec.trace = trace
            rec.response_code, rec.end = 200, 100.001
            reporter.write(rec)
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0  # ~tens of microseconds a span, never an export's wait
        exporter.release.set()
    finally:
        reporter.provider.shutdown()
    # What was queued (at most 16) plus the batch already being exported: the rest was dropped.
    assert 0 < exporter.exported <= 32
