"""Traffic mirroring: fire-and-forget copies of a request to a shadow destination.

Owns sending one shadow copy (VirtualService ``mirror`` / ``mirrors``) and throwing its response
away. The copy is sent only once the original request has been read whole, and only when its body
fits the mirror buffer (64 KiB): a mirror never holds up, slows or fails the primary request, and
never buffers without bound. Each copy has an absolute deadline so a slow shadow cannot pin a
connection for long.

Rules: runs as a task owned by the listener; every failure is swallowed and logged at debug level.
"""

from __future__ import annotations

import asyncio
import logging

from meshproxy.core.http1 import RequestHead, ResponseHead
from meshproxy.errors import ProxyError
from meshproxy.io.pool import EndpointPool

log = logging.getLogger(__name__)

MIRROR_BODY_MAX = 64 * 1024
MIRROR_DEADLINE = 30.0


class _Discard:
    """A ResponseSink that reads a response to its end and keeps nothing."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def _finish(self, ok: bool) -> None:
        if not self.done.done():
            self.done.set_result(ok)

    def on_response_head(self, head: ResponseHead) -> None:
        pass

    def on_informational(self, head: ResponseHead) -> None:
        pass

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_end(self) -> None:
        self._finish(True)

    def on_upstream_error(self, error: ProxyError) -> None:
        self._finish(False)

    def on_tunnel_data(self, data: bytes) -> None:
        pass

    def on_tunnel_closed(self) -> None:
        self._finish(False)

    def flush(self) -> None:
        pass

    def pause_request_body(self) -> None:
        pass

    def resume_request_body(self) -> None:
        pass


async def shadow(pool: EndpointPool, head: RequestHead, body: bytes) -> None:
    """Send one mirrored request and discard the answer."""
    if not pool.begin_request():
        return  # the cluster is at its request limit: the copy is dropped, never queued
    conn = None
    ok = False
    try:
        async with asyncio.timeout(MIRROR_DEADLINE):
            conn = pool.take_idle() or await pool.connect()
            sink = _Discard()
            conn.sink = sink
            conn.requests += 1
            codec = conn.codec
            chunks = [codec.send_head(head)]
            if body:
                chunks.extend(codec.send_body(body))
            chunks.append(codec.send_end())
            conn.writelines(chunks)
            ok = await sink.done
    except (ProxyError, TimeoutError, OSError) as exc:
        log.debug("mirror to %s failed: %s", pool.endpoint.key, exc)
    finally:
        pool.end_request()
        if conn is not None:
            if ok:
                pool.release(conn, asyncio.get_running_loop().time())
            else:
                conn.abort()
