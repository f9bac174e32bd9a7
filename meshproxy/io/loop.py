"""The event loop factory: uvloop, handed to ``asyncio.Runner`` (never installed globally).

Owns the choice of event loop. uvloop is a hard dependency; the factory falls back to the standard
loop only where uvloop cannot run (it does not support Windows).

Rules: no global event-loop policy; callers pass ``loop_factory`` to ``asyncio.Runner``.
"""

from __future__ import annotations

import asyncio


def loop_factory() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
