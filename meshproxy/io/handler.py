"""The seam between the edge and a stack: what a listener asks at each fixed point of a request.

Owns the ``Handler`` protocol that ``stacks/outbound.py`` and ``stacks/inbound.py`` implement, and
the ``Forward`` decision a handler returns for a request head. The edge calls ``on_request`` once the
head is parsed, ``on_response`` when the upstream's head arrives and ``on_complete`` when the
exchange is over (successfully or not); everything else (bytes, backpressure, timers) is the edge's.

Rules: plain synchronous calls; a handler raises ``ProxyError`` to answer with a local reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meshproxy.core.http1 import Header, RequestHead, ResponseHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.retry import RetryState
from meshproxy.core.routetable import NO_OPS, HeaderOps
from meshproxy.errors import ProxyError
from meshproxy.io.pool import EndpointPool


@dataclass(slots=True)
class Forward:
    """Send ``head`` to an endpoint of ``pools`` (the handler already chose ``pool``)."""

    head: RequestHead
    pool: EndpointPool
    timeout: float | None  # seconds from the end of the request to the start of the response
    websocket: bool
    expect_continue: bool
    replayable: bool  # no request body: safe to resend on a fresh connection
    delay: float | None = None  # fault injection: wait this long before forwarding
    response_ops: HeaderOps = NO_OPS  # the route's response header operations
    response_headers: tuple[Header, ...] = ()  # added to the response (CORS, set-cookie)
    mirrors: tuple[tuple[EndpointPool, RequestHead], ...] = ()  # shadow copies to send
    abort: ProxyError | None = None  # fault injection: answer this once the delay is over
    retry: RetryState | None = None  # this request's retries (None: the policy allows none)
    # The head for try N (0-based, the try's index in record.tries): a sampled request's trace
    # context names each try's own CLIENT span as the upstream's parent. None: ``head`` as is.
    head_for_try: Callable[[RequestHead, int], RequestHead] | None = None


class Handler(Protocol):
    @property
    def direction(self) -> Direction: ...

    def on_request(self, head: RequestHead, record: RequestRecord) -> Forward: ...

    def reselect(
        self, forward: Forward, record: RequestRecord, previous: EndpointPool
    ) -> EndpointPool:
        """The endpoint for a retry: another than ``previous`` when the policy says so and one
        exists (Envoy's previous_hosts predicate), among those not ejected."""

    def on_response(
        self, head: ResponseHead, forward: Forward, record: RequestRecord, close: bool
    ) -> ResponseHead: ...

    def on_complete(self, record: RequestRecord) -> None: ...
