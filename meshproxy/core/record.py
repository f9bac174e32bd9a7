"""The per-request record, in the spirit of Envoy's StreamInfo.

Owns the one object that collects what happened to a request as it runs: timings, route, cluster,
endpoint, attempts, response flags, bytes and peer identity. Metrics, spans and access logs read it
once, at the end; nothing reads it on the way to make a decision.

Rules: slotted, plain attribute writes on the hot path; timestamps come from the caller's clock.
"""

from __future__ import annotations

import enum


class Direction(enum.Enum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


class RequestRecord:
    __slots__ = (
        "attempts",
        "authority",
        "bytes_received",
        "bytes_sent",
        "cluster",
        "direction",
        "downstream_remote",
        "end",
        "flags",
        "method",
        "original_dst",
        "path",
        "peer_cert_hash",
        "request_id",
        "response_code",
        "route_name",
        "source_principal",
        "start",
        "tls",
        "trace",
        "tries",
        "upstream_host",
        "upstream_service_time",
        "user_agent",
        "x_forwarded_for",
    )

    def __init__(self, direction: Direction, start: float, downstream_remote: str) -> None:
        self.direction = direction
        self.start = start
        self.end = 0.0
        self.downstream_remote = downstream_remote
        self.method = ""
        self.path = ""
        self.authority = ""
        self.request_id = ""
        self.user_agent = ""
        self.x_forwarded_for = ""
        self.route_name = ""
        self.cluster = ""
        self.upstream_host = ""
        self.attempts = 0
        self.response_code = 0
        self.flags: list[str] = []
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_service_time: float | None = None
        # Every upstream try: (endpoint, outcome, start, seconds); the outcome is the response
        # status or the classifier's failure name (core/classify.py); start is loop time.
        self.tries: list[tuple[str, str, float, float]] = []
        # A sampled request's trace (layers/tracing.py RequestTrace): the ids its spans get.
        # None for an unsampled request, which gets no span.
        self.trace: object | None = None
        # The downstream connection's facts: its peer's SPIFFE ID when it came over mTLS (else
        # ""), whether it came over TLS at all, and the address it was sent to before an
        # iptables REDIRECT (``SO_ORIGINAL_DST``, "host:port"; "" when not redirected).
        self.source_principal = ""
        self.tls = False
        self.peer_cert_hash = ""  # hex SHA-256 of the peer certificate (XFCC ``Hash``)
        self.original_dst = ""

    def add_flag(self, flag: str) -> None:
        if flag and flag not in self.flags:
            self.flags.append(flag)

    @property
    def flags_text(self) -> str:
        return ",".join(self.flags) if self.flags else "-"

    @property
    def duration(self) -> float:
        return self.end - self.start if self.end else 0.0
