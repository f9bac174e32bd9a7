"""The clock seam: decisions take ``now`` from a callable the edge supplies.

Owns the ``Clock`` type. Pure code never reads time itself; the edge passes the event loop's
monotonic clock, and tests pass a fake one.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
