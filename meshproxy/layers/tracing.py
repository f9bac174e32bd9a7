"""The trace step: read the caller's trace context, decide sampling, write the context upstream.

Owns trace propagation and the sampling decision as an Istio sidecar's Envoy makes them (reference
§3.2). Incoming context is read from W3C ``traceparent``/``tracestate`` (preferred) or B3, in its
multi-header (``x-b3-*``) or single-header (``b3``) form. The decision, in Envoy's order
(``source/extensions/tracers/opentelemetry/tracer.cc``: a propagated parent's flag is kept):

1. the incoming context carries one (W3C flags, ``x-b3-sampled``, ``x-b3-flags: 1``, ``b3``'s
   ``0``/``1``/``d``): honoured;
2. ``x-client-trace-id`` or ``x-envoy-force-trace`` is present: sampled (Istio sets
   ``client_sampling`` 100; every sidecar request counts as internal);
3. otherwise ``randomSamplingPercentage`` of the ``Telemetry`` resource that applies (default 1%).

A sampled request gets a ``RequestTrace`` in ``record.trace``: the ids of the spans this proxy will
report (``telemetry/tracing.py`` builds them once the request is over). Inbound, the app sees the
SERVER span as its parent; outbound, every try carries its own CLIENT span id, so ``head_for_try``
rewrites the context per try. W3C ``traceparent`` is always written; B3 headers are rewritten in
the form(s) the request arrived with, so an app that forwards only B3 keeps its trace. An unsampled
request creates no span object: an incoming context is forwarded unchanged, and a request without
one gets a fresh not-sampled ``traceparent`` so every later hop keeps the same decision.

Which ``Telemetry`` applies is ``config/istio.py``'s precedence (mesh-wide in the root namespace
``istio-system``, then the proxy's namespace, then a ``selector`` matching the bootstrap's labels);
from the least specific to the most, the first ``tracing`` entry whose ``match.mode`` covers the
direction overrides the fields it sets (sampling percentage, span reporting, custom tags).

Tracing is off (no step in the stacks, headers untouched, as Envoy without a tracer) when the
bootstrap's ``spec.telemetry.tracing.exporter`` is ``none``; ``x-request-id`` is the header step's.

Rules: synchronous; the random source is injected; span objects never created here; header names
are already lower-case.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from meshproxy.config.istio import applicable_telemetries
from meshproxy.config.model import MeshConfig, Tracing
from meshproxy.core.http1 import Header, HeaderList, RequestHead
from meshproxy.core.match import RequestView
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routing import split_authority
from meshproxy.layers.route import Decision

# Istio's default randomSamplingPercentage (PILOT_TRACE_SAMPLING, reference §1.6 and §3.2).
DEFAULT_SAMPLING = 1.0

_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
_B3 = b"b3"
_B3_TRACE = b"x-b3-traceid"
_B3_SPAN = b"x-b3-spanid"
_B3_PARENT = b"x-b3-parentspanid"
_B3_SAMPLED = b"x-b3-sampled"
_B3_FLAGS = b"x-b3-flags"
_CLIENT_TRACE = b"x-client-trace-id"
_FORCE = b"x-envoy-force-trace"
_DECORATOR = b"x-envoy-decorator-operation"
_READ = frozenset(
    {
        _TRACEPARENT,
        _TRACESTATE,
        _B3,
        _B3_TRACE,
        _B3_SPAN,
        _B3_PARENT,
        _B3_SAMPLED,
        _B3_FLAGS,
        _CLIENT_TRACE,
        _FORCE,
        _DECORATOR,
    }
)
# Rewritten when this proxy injects its own span: the whole propagated context but tracestate,
# which travels unchanged (W3C Trace Context §3.3: a vendor without state there keeps it as is).
_REWRITTEN = frozenset({_TRACEPARENT, _B3, _B3_TRACE, _B3_SPAN, _B3_PARENT, _B3_SAMPLED, _B3_FLAGS})

# W3C Trace Context §3.2: version-traceid-parentid-flags, lower-case hex; version ff is invalid;
# a later version may append fields after a dash.
_W3C = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_HEX = frozenset(b"0123456789abcdef")

B3_MULTI = 1
B3_SINGLE = 2


class Context(NamedTuple):
    """A propagated trace context as read from a request (a tuple: cheap to build)."""

    trace_id: int = 0  # 0: none (a decision without ids, e.g. `b3: 1` or `x-b3-sampled: 0`)
    span_id: int = 0  # the caller's span: the parent of ours
    sampled: bool | None = None  # None: the caller left the decision to us
    tracestate: str = ""
    b3: int = 0  # B3_MULTI | B3_SINGLE: the B3 forms the request used


_EMPTY = Context()


def _hex_id(value: bytes, lengths: tuple[int, ...]) -> int:
    """A non-zero lower-hex id of one of ``lengths`` digits, or 0."""
    if len(value) not in lengths or not _HEX.issuperset(value):
        return 0
    return int(value, 16)


def _w3c(value: bytes) -> tuple[int, int, bool] | None:
    m = _W3C.fullmatch(value.strip())
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def parse_traceparent(value: bytes) -> Context | None:
    ids = _w3c(value)
    return None if ids is None else Context(ids[0], ids[1], ids[2])


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def _b3_sampled(value: bytes) -> bool | None:
    value = value.strip().lower()
    if value in (b"1", b"true", b"d"):
        return True
    if value in (b"0", b"false"):
        return False
    return None


def parse_b3_single(value: bytes) -> Context | None:
    """``b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`` or ``b3: {sampled}`` (B3 spec)."""
    parts = value.strip().lower().split(b"-")
    if len(parts) == 1:
        sampled = _b3_sampled(parts[0])
        return None if sampled is None else Context(sampled=sampled, b3=B3_SINGLE)
    if len(parts) > 4:
        return None
    trace_id = _hex_id(parts[0], (16, 32))
    span_id = _hex_id(parts[1], (16,))
    if not trace_id or not span_id:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    if len(parts) > 2 and sampled is None:
        return None
    return Context(trace_id=trace_id, span_id=span_id, sampled=sampled, b3=B3_SINGLE)


def parse_b3_multi(
    trace: bytes | None, span: bytes | None, sampled: bytes | None, flags: bytes | None
) -> Context | None:
    decision = _b3_sampled(sampled) if sampled is not None else None
    if flags is not None and flags.strip() == b"1":
        decision = True  # the debug flag implies sampling (B3 spec)
    if trace is None or span is None:
        return None if decision is None else Context(sampled=decision, b3=B3_MULTI)
    trace_id = _hex_id(trace.strip().lower(), (16, 32))
    span_id = _hex_id(span.strip().lower(), (16,))
    if not trace_id or not span_id:
        return None if decision is None else Context(sampled=decision, b3=B3_MULTI)
    return Context(trace_id=trace_id, span_id=span_id, sampled=decision, b3=B3_MULTI)


class Extracted(NamedTuple):
    """What the trace step read from a request's headers in its one pass."""

    context: Context
    forced: bool = False
    operation: str = ""  # x-envoy-decorator-operation
    seen: bool = False  # some propagation header was present (valid or not)


def extract(headers: HeaderList) -> Extracted:
    """Read the trace context from ``headers``: W3C first, then B3 (both forms).

    Several ``traceparent`` headers make it invalid (W3C §3.2), as does a malformed one; B3 is
    then read instead. ``tracestate`` is kept only with a valid ``traceparent``.
    """
    traceparent: bytes | None = None
    tp_count = 0
    tracestate: list[bytes] = []
    single: bytes | None = None
    b3_trace = b3_span = b3_sampled = b3_flags = None
    forced = False
    operation = ""
    for name, value in headers:
        if name not in _READ:
            continue
        if name == _TRACEPARENT:
            traceparent = value
            tp_count += 1
        elif name == _TRACESTATE:
            tracestate.append(value)
        elif name == _B3:
            single = value
        elif name == _B3_TRACE:
            b3_trace = value
        elif name == _B3_SPAN:
            b3_span = value
        elif name == _B3_SAMPLED:
            b3_sampled = value
        elif name == _B3_FLAGS:
            b3_flags = value
        elif name == _DECORATOR:
            operation = value.decode("latin-1")
        else:  # x-client-trace-id, x-envoy-force-trace
            forced = True
    b3_form = (B3_SINGLE if single is not None else 0) | (
        B3_MULTI if b3_trace is not None or b3_span is not None or b3_sampled is not None else 0
    )
    seen = traceparent is not None or b3_form != 0
    if traceparent is not None and tp_count == 1:
        ids = _w3c(traceparent)
        if ids is not None:
            state = b",".join(tracestate).decode("latin-1") if tracestate else ""
            return Extracted(Context(*ids, state, b3_form), forced, operation, seen)
    context: Context | None = None
    if single is not None:
        context = parse_b3_single(single)
    if context is None and b3_form & B3_MULTI:
        context = parse_b3_multi(b3_trace, b3_span, b3_sampled, b3_flags)
    if context is None:
        return Extracted(_EMPTY, forced, operation, seen)
    if context.b3 != b3_form:
        context = Context(context.trace_id, context.span_id, context.sampled, "", b3_form)
    return Extracted(context, forced, operation, seen)


_NOTHING = Extracted(_EMPTY)
_MASK64 = (1 << 64) - 1
# One bit set in each of a fresh trace id and span id: never all-zero, and still 127/63 random bits.
_NONZERO = 1 | (1 << 64)


def _new_id(rng: random.Random, bits: int) -> int:
    return rng.getrandbits(bits) or 1  # an all-zero id is invalid (W3C §3.2.2.3)


class RequestTrace:
    """A sampled request's trace: its ids, name and tags, for the span reporter.

    ``span_id(i)`` is the CLIENT span id of try ``i`` (allocated on first use, so the id a try's
    head carried is the id its span gets); ``server_id`` is the inbound SERVER span's.
    """

    __slots__ = (
        "_ids",
        "_rng",
        "b3",
        "operation",
        "parent_id",
        "server_id",
        "tags",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        rng: random.Random,
        trace_id: int,
        parent_id: int,
        tracestate: str,
        b3: int,
        operation: str,
        tags: tuple[tuple[str, str], ...],
    ) -> None:
        self._rng = rng
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.tracestate = tracestate
        self.b3 = b3
        self.operation = operation
        self.tags = tags
        self.server_id = 0
        self._ids: list[int] = []

    def span_id(self, index: int) -> int:
        ids = self._ids
        while len(ids) <= index:
            ids.append(_new_id(self._rng, 64))
        return ids[index]

    def headers_for(self, headers: HeaderList, span_id: int, decorate: bool) -> list[Header]:
        """``headers`` carrying this trace with ``span_id`` as the parent the next hop sees."""
        out: list[Header] = [
            h for h in headers if h[0] not in _REWRITTEN and (not decorate or h[0] != _DECORATOR)
        ]
        trace_id = self.trace_id
        out.append((_TRACEPARENT, format_traceparent(trace_id, span_id, True)))
        if self.b3 & B3_MULTI:
            out.append((_B3_TRACE, b"%032x" % trace_id))
            out.append((_B3_SPAN, b"%016x" % span_id))
            if self.parent_id:
                out.append((_B3_PARENT, b"%016x" % self.parent_id))
            out.append((_B3_SAMPLED, b"1"))
        if self.b3 & B3_SINGLE:
            parent = b"-%016x" % self.parent_id if self.parent_id else b""
            out.append((_B3, b"%032x-%016x-1%s" % (trace_id, span_id, parent)))
        if decorate and self.operation:
            # Envoy propagates the client's operation so the server span can take its name.
            out.append((_DECORATOR, self.operation.encode("latin-1")))
        return out

    def head_for_try(self, head: RequestHead, index: int) -> RequestHead:
        """The head for try ``index`` (0-based): its own CLIENT span is the upstream's parent."""
        return RequestHead(
            method=head.method,
            target=head.target,
            headers=self.headers_for(head.headers, self.span_id(index), True),
            http_version=head.http_version,
        )


# -- which Telemetry applies ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingPolicy:
    """The tracing settings for one direction of this workload, resolved at config load."""

    percentage: float = DEFAULT_SAMPLING
    report: bool = True  # disableSpanReporting: decide and propagate, report nothing
    tags: tuple[tuple[str, str], ...] = ()  # literal and environment custom tags, resolved
    header_tags: tuple[tuple[str, bytes, str], ...] = ()  # (tag, request header, default)


def _covers(entry: Tracing, mode: str) -> bool:
    m = entry.match.mode.upper() if entry.match is not None else ""
    return m in ("", "CLIENT_AND_SERVER", mode)


def tracing_policy(
    config: MeshConfig, direction: Direction, environ: Mapping[str, str]
) -> TracingPolicy:
    """The effective tracing settings: the applicable Telemetry resources (config/istio.py's
    precedence) from the least specific to the most, each one's first entry for this direction
    overriding the fields it sets (within a level the first in file order wins)."""
    mode = "CLIENT" if direction is Direction.OUTBOUND else "SERVER"
    percentage = DEFAULT_SAMPLING
    report = True
    custom = None
    for tm in reversed(applicable_telemetries(config)):
        entry = next((e for e in tm.spec.tracing if _covers(e, mode)), None)
        if entry is None:
            continue
        if entry.random_sampling_percentage is not None:
            percentage = entry.random_sampling_percentage
        if entry.disable_span_reporting is not None:
            report = not entry.disable_span_reporting
        if entry.custom_tags:
            custom = entry.custom_tags
    tags: list[tuple[str, str]] = []
    header_tags: list[tuple[str, bytes, str]] = []
    for name, tag in (custom or {}).items():
        if tag.literal is not None:
            tags.append((name, tag.literal.value))
        elif tag.environment is not None:
            env = tag.environment
            tags.append((name, environ.get(env.name, env.default_value)))
        elif tag.header is not None:
            hdr = tag.header
            header_tags.append((name, hdr.name.lower().encode("latin-1"), hdr.default_value))
    return TracingPolicy(
        percentage=percentage, report=report, tags=tuple(tags), header_tags=tuple(header_tags)
    )


# -- the step ---------------------------------------------------------------------------------


class TracingStep:
    """Per request: read the context, decide, and either start a ``RequestTrace`` or propagate."""

    __slots__ = ("_default_port", "_policy", "_report", "_rng", "_server", "percentage")

    def __init__(
        self,
        policy: TracingPolicy,
        direction: Direction,
        rng: random.Random,
        default_port: int = 80,
    ) -> None:
        self._policy = policy
        self._report = policy.report
        self._rng = rng
        self._server = direction is Direction.INBOUND
        self._default_port = default_port
        self.percentage = policy.percentage

    def sampled(self, extracted: Extracted) -> bool:
        decision = extracted.context.sampled
        if decision is not None:
            return decision
        if extracted.forced:
            return True
        pct = self.percentage
        return pct >= 100.0 or (pct > 0.0 and self._rng.random() * 100.0 < pct)

    def on_request(
        self, head: RequestHead, record: RequestRecord
    ) -> tuple[RequestHead, RequestTrace | None]:
        """The head to route and forward, and the request's trace when it is sampled.

        ``head`` is the header step's own copy (``plan_request`` built its header list): a fresh
        not-sampled context is appended to that list in place, the cheapest way on the path
        nearly every request takes. Outbound, a sampled request's head is returned unchanged:
        each try's head gets its own CLIENT span id through ``RequestTrace.head_for_try``.
        """
        headers = head.headers
        for h in headers:
            if h[0] in _READ:
                extracted = extract(headers)
                return self._with_context(head, record, extracted, self.sampled(extracted))
        # Most requests: no context, nothing forced; only the random draw decides.
        pct = self.percentage
        rng = self._rng
        sampled = pct >= 100.0 or (pct > 0.0 and rng.random() * 100.0 < pct)
        if sampled and self._report:
            return self._with_context(head, record, _NOTHING, True)
        # Start a context so every later hop keeps this decision (Envoy injects its own span's
        # context, sampled or not): appended to the header step's own list.
        bits = rng.getrandbits(192) | _NONZERO
        fresh = (
            _TRACEPARENT,
            b"00-%032x-%016x-%s" % (bits >> 64, bits & _MASK64, b"01" if sampled else b"00"),
        )
        if isinstance(headers, list):
            headers.append(fresh)
            return head, None
        return _with_headers(head, [*headers, fresh]), None

    def _with_context(
        self, head: RequestHead, record: RequestRecord, extracted: Extracted, sampled: bool
    ) -> tuple[RequestHead, RequestTrace | None]:
        context = extracted.context
        policy = self._policy
        if not (sampled and policy.report):
            if context.trace_id:
                return head, None  # propagate the caller's context as it came
            # A bare B3 decision (or an invalid context) is replaced by a fresh W3C one.
            bits = self._rng.getrandbits(192) | _NONZERO
            out = [h for h in head.headers if h[0] not in _REWRITTEN]
            out.append((_TRACEPARENT, format_traceparent(bits >> 64, bits & _MASK64, sampled)))
            return _with_headers(head, out), None
        trace = RequestTrace(
            self._rng,
            context.trace_id or _new_id(self._rng, 128),
            context.span_id,
            context.tracestate,
            context.b3,
            self._authority_operation(record.authority),
            policy.tags + self._header_tags(head.headers) if policy.header_tags else policy.tags,
        )
        record.trace = trace
        if not self._server:
            return head, trace  # the outbound stack names it after routing
        trace.server_id = _new_id(self._rng, 64)
        if extracted.operation:
            trace.operation = extracted.operation
        headers = trace.headers_for(head.headers, trace.server_id, False)
        return _with_headers(head, headers), trace

    def _authority_operation(self, authority: str) -> str:
        # Istio names the inbound route `<service host>:<port>/*`; the authority names the
        # service the caller asked for (outbound, the name until routing gives a better one).
        host, port = split_authority(authority, self._default_port)
        return f"{host or '-'}:{port}/*"

    def _header_tags(self, headers: HeaderList) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        for tag, name, default in self._policy.header_tags:
            value = next((v for n, v in headers if n == name), None)
            out.append((tag, value.decode("latin-1") if value is not None else default))
        return tuple(out)


def _with_headers(head: RequestHead, headers: list[Header]) -> RequestHead:
    return RequestHead(
        method=head.method, target=head.target, headers=headers, http_version=head.http_version
    )


def route_operation(decision: Decision, view: RequestView | None) -> str:
    """Istio's route decorator operation (``route.go GetRouteOperation``), the span's name.

    ``<service host>:<port><path>`` for a route to one destination, ``<VirtualService
    name>:<port><path>`` for a weighted split; the path is the matched block's URI: an exact
    path, a prefix followed by ``*``, or ``/*`` when the block has no URI condition (a regex URI
    is named ``/*`` here). ``view`` is the request as routing saw it, to find which of several
    match blocks matched.
    """
    target = decision.target
    route = decision.route
    path = "/*"
    host = target.cluster.service or target.host
    port = target.port
    if route is not None:
        blocks = route.blocks
        block = blocks[0] if len(blocks) == 1 else None
        if block is None and blocks and view is not None:
            block = next((b for b in blocks if b.matches(view)), None)
        if block is not None:
            if block.uri_exact is not None:
                path = block.uri_exact
            elif block.uri_required_prefix is not None:
                path = block.uri_required_prefix + "*"
        if len(route.clusters) > 1:
            host = route.vs.rsplit(".", 1)[0]
    return f"{host}:{port}{path}"
