"""Envoy-style access logs, read from the per-request record once the request is over.

Owns three things:

* **The format.** Envoy's default text format (reference §2.5), byte for byte, with missing values
  as ``-`` and response flags comma-joined, followed by two fields of ours: the upstream cluster
  (Istio's ``%UPSTREAM_CLUSTER_RAW%``, which Istio's own text format also carries) and the
  direction (``outbound``/``inbound``). We keep Envoy's default rather than Istio's longer text
  format because it is what ``kubectl logs`` users of a plain Envoy grep for, and Istio's extra
  fields (response code details, transport failure reason, local addresses, SNI) have no value
  in this proxy yet. ``json`` writes the same fields as one JSON object per line, under the key
  names of Istio's JSON format (``start_time``, ``response_flags``, ``upstream_cluster``, ...),
  plus ``route_name``; a missing value is ``null`` there, as Envoy's JSON formatter writes it.
* **When logs are on** (``access_log_plan``): as in Istio, off by default. A ``Telemetry``
  resource's ``accessLogging`` turns them on (any provider name: ``envoy`` is Istio's built-in
  one) or off (``disabled: true``), the most specific resource winning (workload selector, then
  the proxy's namespace, then the root namespace ``istio-system``); ``match.mode`` CLIENT/SERVER
  limits them to outbound/inbound; ``filter.expression`` understands the CEL subset
  ``response.code <op> <int>`` joined by ``&&``/``||``. Without a Telemetry resource, the
  bootstrap's ``spec.telemetry.accessLog`` turns them on; an explicit output (``meshproxy run
  --access-log``, ``App(access_log=...)``) always does.
* **The write path** (``AccessLog``): the record sink copies a handful of fields into a tuple and
  appends it to a bounded deque; one writer thread formats and writes whole batches, then
  flushes. The event loop never waits on a file or a pipe. When the queue is full a line is
  dropped and counted (``dropped``), as Envoy's buffered access log does rather than stall
  requests. ``close`` drains, flushes and joins the thread. An ``io.StringIO`` (an in-memory
  buffer, which cannot block: what tests and the demo hand to ``App``) is written inline instead,
  so a line is there as soon as the request is over.

Rules: reads the record, never changes it; never logs bodies, cookies, credentials or any header
other than the five of Envoy's format (user-agent, x-forwarded-for, x-request-id, :authority,
x-envoy-upstream-service-time); no ``logging``-module formatting per request.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import operator
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

from meshproxy.config.istio import applicable_telemetries
from meshproxy.config.model import (
    AccessLogFormat,
    AccessLogging,
    MeshConfig,
)
from meshproxy.core.record import Direction, RequestRecord

log = logging.getLogger(__name__)

# Istio's root configuration namespace (meshConfig.rootNamespace default): a Telemetry there
# without a selector applies to the whole mesh.
# Istio's built-in access log provider writes to the proxy's stdout (MeshConfig accessLogFile).
DEFAULT_PATH = "/dev/stdout"
# Lines waiting for the writer thread; beyond this a line is dropped and counted.
DEFAULT_QUEUE_LINES = 8192
# Lines formatted per write() call, so a long backlog still reaches the file in pieces.
_BATCH = 256

# What the sink copies off the record (the writer thread never touches the record itself):
# wall start, method, path, status, flags, bytes received, bytes sent, duration ms,
# upstream service time ms, x-forwarded-for, user-agent, x-request-id, authority, upstream host,
# cluster, direction, route name.
Fields = tuple[
    float, str, str, int, str, int, int, int, int | None, str, str, str, str, str, str, str, str
]


def fields_of(record: RequestRecord, wall_offset: float) -> Fields:
    """The record's loggable fields; ``wall_offset`` turns loop time into wall-clock time."""
    ust = record.upstream_service_time
    return (
        record.start + wall_offset,
        record.method,
        record.path,
        record.response_code,
        record.flags_text,
        record.bytes_received,
        record.bytes_sent,
        int(record.duration * 1000),
        int(ust * 1000) if ust is not None else None,
        record.x_forwarded_for,
        record.user_agent,
        record.request_id,
        record.authority,
        record.upstream_host,
        record.cluster,
        record.direction.value,
        record.route_name,
    )


# -- formats ------------------------------------------------------------------------------------


def _q(value: str) -> str:
    return value if value else "-"


def _or_none(value: str) -> str | None:
    return value if value else None


class _Stamp:
    """``%START_TIME%`` (``2026-11-26T00:46:23.707Z``), the seconds part cached: one thread each."""

    __slots__ = ("_head", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._head = ""

    def __call__(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall))
        return f"{self._head}.{int((wall % 1) * 1000):03d}Z"


def format_text(f: Fields, stamp: Callable[[float], str] | None = None) -> str:
    """Envoy's default format (reference §2.5), then our cluster and direction fields."""
    start = (stamp or _Stamp())(f[0])
    service_time = str(f[8]) if f[8] is not None else "-"
    return (
        f'[{start}] "{_q(f[1])} {_q(f[2])} HTTP/1.1" '
        f"{f[3]} {f[4]} {f[5]} {f[6]} {f[7]} {service_time} "
        f'"{_q(f[9])}" "{_q(f[10])}" "{_q(f[11])}" "{_q(f[12])}" "{_q(f[13])}" {_q(f[14])} '
        f"{f[15]}\n"
    )


def format_json(f: Fields, stamp: Callable[[float], str] | None = None) -> str:
    """The same fields as one JSON object, under Istio's JSON access log key names."""
    return (
        json.dumps(
            {
                "start_time": (stamp or _Stamp())(f[0]),
                "method": _or_none(f[1]),
                "path": _or_none(f[2]),
                "protocol": "HTTP/1.1",
                "response_code": f[3],
                "response_flags": f[4],
                "bytes_received": f[5],
                "bytes_sent": f[6],
                "duration": f[7],
                "upstream_service_time": f[8],
                "x_forwarded_for": _or_none(f[9]),
                "user_agent": _or_none(f[10]),
                "request_id": _or_none(f[11]),
                "authority": _or_none(f[12]),
                "upstream_host": _or_none(f[13]),
                "upstream_cluster": _or_none(f[14]),
                "direction": f[15],
                "route_name": _or_none(f[16]),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        + "\n"
    )


def format_line(record: RequestRecord, wall_start: float) -> str:
    """One text line for ``record``, whose start is ``wall_start`` in wall-clock seconds."""
    return format_text(fields_of(record, wall_start - record.start))


_FORMATTERS: Mapping[AccessLogFormat, Callable[[Fields, Callable[[float], str] | None], str]] = {
    AccessLogFormat.TEXT: format_text,
    AccessLogFormat.JSON: format_json,
}


# -- filter (a CEL subset) ----------------------------------------------------------------------

RecordFilter = Callable[[RequestRecord], bool]

_COMPARISON = re.compile(r"\s*response\.code\s*(>=|<=|==|!=|>|<)\s*(\d{1,3})\s*")
_OPS: Mapping[str, Callable[[int, int], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}


def compile_filter(expression: str) -> RecordFilter:
    """A predicate for Istio's ``accessLogging[].filter.expression`` (CEL), in the subset
    ``response.code <op> <int>`` joined by ``&&`` and ``||`` (``&&`` binding tighter), e.g.
    Istio's documented ``response.code >= 400``. Anything else raises ``ValueError``."""
    alternatives: list[tuple[tuple[Callable[[int, int], bool], int], ...]] = []
    for alternative in expression.split("||"):
        terms = []
        for term in alternative.split("&&"):
            m = _COMPARISON.fullmatch(term)
            if m is None:
                raise ValueError(
                    f"unsupported access log filter {expression!r}: only "
                    "'response.code <op> <number>' joined by && and || is understood"
                )
            terms.append((_OPS[m.group(1)], int(m.group(2))))
        alternatives.append(tuple(terms))
    any_of = tuple(alternatives)

    def matches(record: RequestRecord) -> bool:
        code = record.response_code
        return any(all(op(code, value) for op, value in terms) for terms in any_of)

    return matches


# -- when logs are on ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogPlan:
    """Whether, where and how this proxy writes access logs, decided once from the config."""

    path: str = DEFAULT_PATH  # '-' or /dev/stdout: the process's stdout
    format: AccessLogFormat = AccessLogFormat.TEXT
    directions: frozenset[Direction] = frozenset(Direction)
    # CEL filter expression per direction; a direction absent here logs every request.
    filters: Mapping[Direction, str] | None = None


def _covers(entry: AccessLogging, direction: Direction) -> bool:
    # Istio's WorkloadMode: CLIENT is the outbound side, SERVER the inbound one.
    mode = (entry.match.mode.upper() if entry.match is not None else "") or "CLIENT_AND_SERVER"
    if mode == "CLIENT":
        return direction is Direction.OUTBOUND
    if mode == "SERVER":
        return direction is Direction.INBOUND
    return True


def access_log_plan(config: MeshConfig, *, forced: bool = False) -> AccessLogPlan | None:
    """Access logging for this proxy, or None when off (Istio's default).

    ``forced``: the operator named an output (``--access-log``), which logs both directions
    whatever the Telemetry resources say."""
    settings = config.bootstrap.spec.telemetry.access_log
    base = AccessLogPlan(
        path=settings.path if settings is not None else DEFAULT_PATH,
        format=settings.format if settings is not None else AccessLogFormat.TEXT,
    )
    if forced:
        return base
    entries: tuple[AccessLogging, ...] | None = None
    for tm in applicable_telemetries(config):
        if tm.spec.access_logging:  # the most specific resource that says anything decides
            entries = tm.spec.access_logging
            break
    if entries is None:
        return base if settings is not None else None
    directions: set[Direction] = set()
    filters: dict[Direction, str] = {}
    for direction in Direction:
        matching = [e for e in entries if _covers(e, direction)]
        # An entry with ``disabled: true`` turns its direction off, whatever else is listed.
        if not matching or any(e.disabled for e in matching):
            continue
        directions.add(direction)
        for e in matching:
            if e.filter is not None and e.filter.expression.strip():
                filters[direction] = e.filter.expression
                break
    if not directions:
        return None
    return AccessLogPlan(
        path=base.path,
        format=base.format,
        directions=frozenset(directions),
        filters=filters or None,
    )


# -- the write path -----------------------------------------------------------------------------


class AccessLog:
    """The access log sink (``write``) and its writer thread.

    ``write`` runs on the event loop for every finished request: a direction check, the optional
    filter, one tuple and a deque append. The writer thread is woken only when the deque goes from
    empty to non-empty, and drains it completely each time it wakes.
    """

    __slots__ = (
        "_close_out",
        "_closed",
        "_directions",
        "_filter",
        "_format",
        "_max_lines",
        "_offset",
        "_out",
        "_pending",
        "_stamp",
        "_thread",
        "_wake",
        "dropped",
        "errors",
        "written",
    )

    def __init__(
        self,
        out: TextIO,
        monotonic_now: float,
        *,
        format: AccessLogFormat = AccessLogFormat.TEXT,
        directions: Iterable[Direction] = Direction,
        record_filter: RecordFilter | None = None,
        max_lines: int = DEFAULT_QUEUE_LINES,
        threaded: bool | None = None,
        close_out: bool = False,
    ) -> None:
        self._out = out
        # Records carry loop-clock timestamps; this offset turns them into wall-clock time.
        self._offset = time.time() - monotonic_now
        self._format = _FORMATTERS[format]
        self._stamp = _Stamp()
        self._directions = frozenset(directions)
        self._filter = record_filter
        self._max_lines = max(1, max_lines)
        self._close_out = close_out
        self._pending: collections.deque[Fields] = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self.dropped = 0  # lines lost to a full queue (or written after close)
        self.written = 0  # lines handed to the output
        self.errors = 0  # failed writes (the lines of that batch are lost)
        if threaded is None:
            # An in-memory buffer cannot block the loop: write it inline, in order, at once. (The
            # demo's StringIO subclass that prefixes and forwards lines is written inline too, so
            # its last lines are out before it stops forwarding.)
            threaded = not isinstance(out, io.StringIO)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(
                target=self._run, name="meshproxy-access-log", daemon=True
            )
            self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- event loop side ---------------------------------------------------------------------
    def write(self, record: RequestRecord) -> None:
        """The record sink."""
        if record.direction not in self._directions:
            return
        if self._filter is not None and not self._filter(record):
            return
        if self._thread is None:
            if self._closed:
                self.dropped += 1
                return
            self._out.write(self._format(fields_of(record, self._offset), self._stamp))
            self.written += 1
            return
        pending = self._pending
        if self._closed or len(pending) >= self._max_lines:
            self.dropped += 1
            return
        pending.append(fields_of(record, self._offset))
        # Appended first, checked second: the one producer can never leave a line unsignalled.
        if len(pending) == 1:
            self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, flush, stop the writer thread; close the output if ours.
        Blocking: call it from a thread (``asyncio.to_thread``) when a loop is running."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                log.warning("access log writer did not finish within %.1fs", timeout)
                return  # it still owns the output; leave it open
        try:
            if self._close_out:
                self._out.close()
            else:
                self._out.flush()
        except (OSError, ValueError) as exc:
            log.warning("access log: closing the output failed: %s", exc)

    # -- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        pending = self._pending
        fmt = self._format
        stamp = self._stamp
        while True:
            self._wake.wait()
            self._wake.clear()
            batch: list[str] = []
            while pending:
                batch.append(fmt(pending.popleft(), stamp))
                if len(batch) >= _BATCH:
                    self._emit(batch, flush=False)
                    batch = []
            self._emit(batch, flush=True)
            if self._closed and not pending:
                return

    def _emit(self, batch: list[str], *, flush: bool) -> None:
        try:
            if batch:
                self._out.write("".join(batch))
                self.written += len(batch)
            if flush:
                self._out.flush()
        except (OSError, ValueError) as exc:  # a full disk, a closed pipe: lose lines, not requests
            self.errors += 1
            if self.errors == 1:
                log.warning("access log write failed (further failures not logged): %s", exc)


def open_output(path: str) -> tuple[TextIO, bool]:
    """The stream for ``path`` and whether the caller must close it. ``-``, ``/dev/stdout`` and
    ``/dev/stderr`` are the process's own streams (so redirections of ``sys.stdout`` apply)."""
    if path in ("-", "/dev/stdout"):
        return sys.stdout, False
    if path == "/dev/stderr":
        return sys.stderr, False
    # AccessLog.close closes it (close_out=True).
    return open(path, "a", encoding="utf-8"), True


def build_access_log(
    config: MeshConfig,
    monotonic_now: float,
    *,
    out: TextIO | None = None,
    format: AccessLogFormat | None = None,
) -> AccessLog | None:
    """The access log this proxy's config asks for, or None when logs are off.

    ``out``: an output the caller opened and owns (it forces logs on); otherwise the plan's path
    is opened here (``OSError`` if it cannot be). ``format`` overrides the bootstrap's."""
    plan = access_log_plan(config, forced=out is not None)
    if plan is None:
        return None
    predicates: dict[Direction, RecordFilter] = {}
    for direction, expression in (plan.filters or {}).items():
        try:
            predicates[direction] = compile_filter(expression)
        except ValueError as exc:
            log.warning("%s; logging every %s request", exc, direction.value)
    record_filter: RecordFilter | None = None
    if predicates:

        def record_filter(record: RequestRecord) -> bool:
            predicate = predicates.get(record.direction)
            return predicate is None or predicate(record)

    close_out = False
    if out is None:
        out, close_out = open_output(plan.path)
    return AccessLog(
        out,
        monotonic_now,
        format=format or plan.format,
        directions=plan.directions,
        record_filter=record_filter,
        close_out=close_out,
    )
