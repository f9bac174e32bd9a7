"""Record sinks: the one way telemetry learns about a finished request.

Owns the ``RecordSink`` type: a callable that receives each ``RequestRecord`` once, when the request
is over. The access log, metrics and spans are sinks; the stacks call them in order.

Rules: a sink reads the record and never changes it; it must not block the event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from meshproxy.core.record import RequestRecord

RecordSink = Callable[[RequestRecord], None]
