"""The one classifier: what happened to an upstream attempt, labelled once for everyone.

Owns the meaning of an attempt's outcome. Retries (``core/retry.py``), outlier ejection
(``core/outlier.py``) and telemetry all read the same ``Outcome`` and its properties, so they cannot
disagree about whether an attempt failed, whether the failure was the upstream's answer or a local
one (connect failure, reset, timeout), or whether it was a gateway error. Envoy's definitions are
the reference (router_filter.rst ``x-envoy-retry-on``; outlier detection docs): a local-origin
failure counts as a 5xx and as a gateway error unless the caller splits them out.

Rules: pure; frozen values; no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshproxy.core.http1 import HeaderList


class Failure(enum.Enum):
    CONNECT_FAILURE = "connect-failure"  # TCP connect refused or timed out (flag UF)
    RESET = "reset"  # closed or reset before a complete response head (flag UC)
    TIMEOUT = "timeout"  # the per-try timeout fired before the response head (flag UT)
    PROTOCOL_ERROR = "protocol-error"  # the upstream's answer was not HTTP/1.1 (flag UPE)
    OVERFLOW = "overflow"  # a local concurrency limit refused the attempt (flag UO)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result: a response status, or the failure that prevented one."""

    status: int | None = None
    failure: Failure | None = None
    headers: HeaderList = ()

    @property
    def local_origin(self) -> bool:
        """A failure of the connection rather than an answer from the upstream application."""
        return self.failure is not None and self.failure is not Failure.OVERFLOW

    @property
    def is_5xx(self) -> bool:
        status = self.status
        return self.local_origin or (status is not None and status >= 500)

    @property
    def is_gateway_error(self) -> bool:
        return self.local_origin or self.status in (502, 503, 504)

    @property
    def success(self) -> bool:
        return self.failure is None and self.status is not None and self.status < 500

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.header(b"grpc-status")
        if value is not None and value.isdigit() and len(value) < 4:
            return int(value)
        return None

    @property
    def overloaded(self) -> bool:
        """The upstream said it is overloaded (an answer like any other to retries since Envoy 1.15)."""
        return self.header(b"x-envoy-overloaded") is not None


def response(status: int, headers: HeaderList = ()) -> Outcome:
    return Outcome(status=status, headers=headers)


def failed(failure: Failure) -> Outcome:
    return Outcome(failure=failure)
