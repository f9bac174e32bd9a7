"""Envoy-style access log lines, read from the per-request record once the request is over.

Owns the text format of Envoy's default access log (reference §2.5), with missing values as ``-``
and response flags comma-joined, written to a file object the CLI opens. Off unless asked for.

Rules: reads the record, never changes it; one write per request; no logging-module formatting.
"""

from __future__ import annotations

import time
from typing import TextIO

from meshproxy.core.record import RequestRecord


def _q(value: str) -> str:
    return value if value else "-"


def format_line(record: RequestRecord, wall_start: float) -> str:
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall_start))
    millis = int((wall_start % 1) * 1000)
    ust = record.upstream_service_time
    service_time = str(int(ust * 1000)) if ust is not None else "-"
    return (
        f'[{start}.{millis:03d}Z] "{_q(record.method)} {_q(record.path)} HTTP/1.1" '
        f"{record.response_code} {record.flags_text} {record.bytes_received} {record.bytes_sent} "
        f"{int(record.duration * 1000)} {service_time} "
        f'"{_q(record.x_forwarded_for)}" "{_q(record.user_agent)}" "{_q(record.request_id)}" '
        f'"{_q(record.authority)}" "{_q(record.upstream_host)}" {_q(record.cluster)} '
        f"{record.direction.value}\n"
    )


class AccessLog:
    __slots__ = ("_offset", "_out")

    def __init__(self, out: TextIO, monotonic_now: float) -> None:
        self._out = out
        # Records carry loop-clock timestamps; this offset turns them into wall-clock time.
        self._offset = time.time() - monotonic_now

    def write(self, record: RequestRecord) -> None:
        self._out.write(format_line(record, record.start + self._offset))
        self._out.flush()
