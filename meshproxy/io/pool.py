"""Upstream connections and their keep-alive pools.

Owns the client side of the proxy: one ``UpstreamConnection`` (an asyncio Protocol driving an h11
client codec) per TCP connection to an endpoint, one ``EndpointPool`` per endpoint holding the idle
ones (most recently used first, so idle ones past the timeout age out), and the ``PoolManager`` that
maps clusters to endpoint pools. A pooled connection the upstream closed is noticed by its
``connection_lost`` and leaves the pool before anyone can pick it; the race where it closes just as a
request is written is handled by the caller, which retries once on a fresh connection when the
request is replayable (``io/downstream.py``).

Rules: pool bookkeeping is synchronous; the only await is the TCP connect, bounded by the cluster's
connect timeout; foreign errors become ``meshproxy.errors`` here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import typing
from collections.abc import Iterable
from typing import Protocol

from meshproxy.core.h11codec import H11ClientCodec
from meshproxy.core.http1 import (
    Body,
    EndOfMessage,
    Informational,
    ResponseHead,
    Signal,
)
from meshproxy.core.routing import Cluster, Endpoint
from meshproxy.errors import ConnectFailure, ProxyError, UpstreamProtocolError, UpstreamReset

log = logging.getLogger(__name__)

# Write-buffer watermarks: pause the other side's reading above HIGH, resume below LOW. Together
# with one socket read (uvloop reads up to 256 KiB) this bounds the memory a stream can hold.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
_PASSTHROUGH_POOLS_MAX = 256


class ResponseSink(Protocol):
    """What an upstream connection reports to the request it is serving."""

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_informational(self, head: ResponseHead) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_upstream_error(self, error: ProxyError) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def on_tunnel_closed(self) -> None: ...
    def pause_request_body(self) -> None: ...
    def resume_request_body(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "codec",
        "eof",
        "got_response_bytes",
        "idle_since",
        "lost",
        "pool",
        "requests",
        "sink",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.codec = H11ClientCodec()
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.requests = 0  # requests started on this connection
        self.idle_since = 0.0
        self.lost = False
        self.tunnel = False
        self.got_response_bytes = False
        self.eof = False

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = typing.cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes from an idle upstream are not a response to anything: drop the connection.
            self.close()
            return
        if self.tunnel:
            sink.on_tunnel_data(data)
            return
        self.got_response_bytes = True
        self.codec.feed(data)
        self._process(sink)
        sink.flush()

    def _process(self, sink: ResponseSink) -> None:
        codec = self.codec
        try:
            while True:
                event = codec.next_event()
                if type(event) is Body:
                    sink.on_response_body(event.data)
                elif type(event) is ResponseHead:
                    sink.on_response_head(event)
                elif type(event) is EndOfMessage:
                    self.sink = None
                    sink.on_response_end()
                    return
                elif type(event) is Informational:
                    sink.on_informational(event.head)
                    if event.head.status == 101:
                        self.tunnel = True
                        rest = codec.trailing_data()
                        if rest:
                            sink.on_tunnel_data(rest)
                        return
                elif event is Signal.NEED_DATA:
                    return
                else:  # PAUSED or CLOSED mid-response: the upstream broke the exchange
                    self._fail(UpstreamReset("upstream closed mid-response"))
                    return
        except UpstreamProtocolError as exc:
            self._fail(UpstreamReset(str(exc)) if self.eof else exc)

    def _fail(self, error: ProxyError) -> None:
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.on_upstream_error(error)

    def eof_received(self) -> bool | None:
        sink = self.sink
        if sink is not None and not self.tunnel:
            # A response delimited by the end of the connection ends here; any other ending is
            # the upstream resetting the exchange (Envoy: UC), not a protocol error.
            self.eof = True
            self.codec.feed_eof()
            self._process(sink)
            sink.flush()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            if self.tunnel:
                sink.on_tunnel_closed()
            else:
                sink.on_upstream_error(UpstreamReset(f"upstream connection lost: {exc}"))

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_request_body()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_request_body()

    # -- used by the request ----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        if self.transport is not None:
            self.transport.writelines(chunks)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (the request it carried was cancelled)."""
        self.sink = None
        if self.transport is not None and not self.lost:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()


class EndpointPool:
    """The connections to one endpoint: idle ones ready for reuse, and counters for /clusters."""

    __slots__ = (
        "active_requests",
        "cluster",
        "connect_failures",
        "connections",
        "endpoint",
        "host",
        "idle",
        "port",
        "total_connections",
        "total_requests",
    )

    def __init__(self, cluster: Cluster, endpoint: Endpoint) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.host = endpoint.address
        self.port = endpoint.port
        self.idle: collections.deque[UpstreamConnection] = collections.deque()
        self.connections: set[UpstreamConnection] = set()
        self.active_requests = 0
        self.total_requests = 0
        self.total_connections = 0
        self.connect_failures = 0

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()  # most recently used: warmest, least likely closed by the peer
            if conn.usable:
                return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        limit = self.cluster.max_requests_per_connection
        if (
            conn.usable
            and conn.codec.start_next_cycle()
            and not conn.codec.trailing_data()  # bytes after the response: not a clean stream
            and not (limit and conn.requests >= limit)
        ):
            conn.idle_since = now
            conn.got_response_bytes = False
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    async def connect(self) -> UpstreamConnection:
        """Open a new connection, bounded by the cluster's connect timeout."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.cluster.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port
                )
        except TimeoutError as exc:
            self.connect_failures += 1
            raise ConnectFailure(f"connect to {self.endpoint.key} timed out") from exc
        except OSError as exc:
            self.connect_failures += 1
            raise ConnectFailure(f"connect to {self.endpoint.key}: {exc}") from exc
        self.connections.add(protocol)
        self.total_connections += 1
        return protocol

    def expire_idle(self, now: float) -> None:
        timeout = self.cluster.idle_timeout
        idle = self.idle
        # Oldest first: the deque is ordered by release time.
        while idle and now - idle[0].idle_since >= timeout:
            idle.popleft().close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()
        self.idle.clear()

    def snapshot(self) -> dict[str, object]:
        return {
            "address": self.endpoint.key,
            "active_connections": len(self.connections),
            "idle_connections": len(self.idle),
            "active_requests": self.active_requests,
            "total_requests": self.total_requests,
            "total_connections": self.total_connections,
            "connect_failures": self.connect_failures,
        }


class PoolManager:
    """Endpoint pools per cluster; passthrough destinations get pools on demand (bounded LRU)."""

    __slots__ = ("_by_cluster", "_passthrough")

    def __init__(self, clusters: Iterable[Cluster]) -> None:
        self._by_cluster: dict[str, tuple[EndpointPool, ...]] = {
            c.name: tuple(EndpointPool(c, ep) for ep in c.endpoints) for c in clusters
        }
        self._passthrough: collections.OrderedDict[tuple[str, int], EndpointPool] = (
            collections.OrderedDict()
        )

    def pools(self, cluster: Cluster) -> tuple[EndpointPool, ...]:
        found = self._by_cluster.get(cluster.name)
        if found is None:
            found = tuple(EndpointPool(cluster, ep) for ep in cluster.endpoints)
            self._by_cluster[cluster.name] = found
        return found

    def passthrough_pool(self, cluster: Cluster, host: str, port: int) -> EndpointPool:
        key = (host, port)
        pool = self._passthrough.get(key)
        if pool is not None:
            self._passthrough.move_to_end(key)
            return pool
        pool = EndpointPool(cluster, Endpoint(address=host, port=port))
        self._passthrough[key] = pool
        while len(self._passthrough) > _PASSTHROUGH_POOLS_MAX:
            _, old = self._passthrough.popitem(last=False)
            old.close_all()
        return pool

    def all_pools(self) -> list[tuple[str, EndpointPool]]:
        out = [(name, p) for name, pools in self._by_cluster.items() for p in pools]
        out.extend((p.cluster.name, p) for p in self._passthrough.values())
        return out

    def expire_idle(self, now: float) -> None:
        for _, pool in self.all_pools():
            if pool.idle:
                pool.expire_idle(now)

    def close_all(self) -> None:
        for _, pool in self.all_pools():
            pool.close_all()
