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
import ssl
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from meshproxy.core.classify import Failure, Outcome
from meshproxy.core.h11codec import H11ClientCodec
from meshproxy.core.http1 import (
    Body,
    ClientCodec,
    EndOfMessage,
    Informational,
    ResponseHead,
    Signal,
)
from meshproxy.core.limits import ClusterLimits, LimitSettings
from meshproxy.core.origination import Origination, origination
from meshproxy.core.outlier import OutlierDetector, outlier_settings
from meshproxy.core.routing import Cluster, Endpoint
from meshproxy.errors import (
    CertCheck,
    CertificateError,
    ConnectFailure,
    ProxyError,
    UpstreamOverflow,
    UpstreamProtocolError,
    UpstreamReset,
)
from meshproxy.io.tls import ClientContexts, check_server_identity, verify_failure_reason

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
        "born",
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
        self.codec: ClientCodec = pool.state.client_codec()
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.requests = 0  # requests started on this connection
        self.idle_since = 0.0
        self.lost = False
        self.tunnel = False
        self.got_response_bytes = False
        self.eof = False
        self.born = 0.0

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = typing.cast(asyncio.Transport, transport)
        self.born = asyncio.get_running_loop().time()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive = self.pool.state.keepalive
            if keepalive is not None:
                # connectionPool.tcp.tcpKeepalive: SO_KEEPALIVE, with the OS default for each
                # value Istio leaves unset.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                probes, idle, interval = keepalive
                if probes is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
                if idle is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
                if interval is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(interval)))
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
            while self.sink is sink:  # the request may let go of us (a retry) mid-read
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


class Waiter(Protocol):
    """A request waiting for a connection of an endpoint pool."""

    def on_connection(self, conn: UpstreamConnection) -> None: ...
    def on_connection_error(self, error: ProxyError) -> None: ...


class ClusterState:
    """One cluster's shared runtime state: its endpoint pools, concurrency limits (Envoy's
    "circuit breakers"), outlier detector and counters, used by every listener."""

    __slots__ = (
        "_next_tick",
        "client_codec",
        "cluster",
        "contexts",
        "keepalive",
        "limits",
        "max_duration",
        "outlier",
        "pools",
        "retries",
        "retry_overflows",
        "timeouts",
    )

    def __init__(
        self,
        cluster: Cluster,
        endpoints: Sequence[Endpoint],
        tasks: set[asyncio.Task[None]],
        contexts: ClientContexts | None = None,
        workers: int = 1,
        *,
        client_codec: Callable[[], ClientCodec] = H11ClientCodec,
    ) -> None:
        self.client_codec = client_codec  # spec.http1Codec (core/codecs.py)
        self.cluster = cluster
        self.contexts = contexts  # outbound TLS contexts (None: this proxy originates no TLS)
        # With several worker processes each holds its share of the cluster's limits.
        self.limits = ClusterLimits(LimitSettings.from_policy(cluster.policy).shared_by(workers))
        od = cluster.policy.outlier_detection if cluster.policy is not None else None
        # Istio configures outlier detection only when the DestinationRule has the block.
        self.outlier = (
            OutlierDetector(len(endpoints), outlier_settings(od))
            if od is not None and endpoints
            else None
        )
        self.pools = tuple(EndpointPool(self, ep, i, tasks) for i, ep in enumerate(endpoints))
        self.retries = 0
        self.retry_overflows = 0
        self.timeouts = 0
        self._next_tick = 0.0
        pool = cluster.policy.connection_pool if cluster.policy is not None else None
        tcp = pool.tcp if pool is not None else None
        ka = tcp.tcp_keepalive if tcp is not None else None
        self.keepalive: tuple[int | None, float | None, float | None] | None = (
            (ka.probes, ka.time, ka.interval) if ka is not None else None
        )
        # connectionPool.tcp.maxConnectionDuration: a connection is not reused past this age.
        self.max_duration = tcp.max_connection_duration if tcp is not None else None

    def eligible(self, now: float) -> Sequence[EndpointPool]:
        """The endpoints a request may go to: all, or the ones outlier detection has not ejected
        (all of them again in panic, below minHealthPercent)."""
        outlier = self.outlier
        if outlier is None:
            return self.pools
        chosen = outlier.eligible(now)
        if len(chosen) == len(self.pools):
            return self.pools
        return [self.pools[i] for i in chosen]

    def connected(self, pool: EndpointPool) -> None:
        """A try got its connection: in split mode this clears the local-origin count (Envoy
        reports connect success from onPoolReady)."""
        outlier = self.outlier
        if outlier is not None and outlier.settings.split_external_local_origin_errors:
            now = asyncio.get_running_loop().time()
            outlier.record(pool.index, status=None, local_origin_failure=False, now=now)

    def record(self, pool: EndpointPool, outcome: Outcome, now: float) -> None:
        if self.outlier is not None and outcome.failure is not Failure.OVERFLOW:
            self.outlier.record(
                pool.index,
                status=outcome.status,
                local_origin_failure=outcome.local_origin,
                now=now,
            )

    def tick(self, now: float) -> None:
        outlier = self.outlier
        if outlier is not None and now >= self._next_tick:
            self._next_tick = now + outlier.settings.interval
            outlier.tick(now)

    def close_idle(self) -> bool:
        """Close the idle connections of a retired state; True once nothing is left in use
        (no connection, no queued request), so the caller can forget it."""
        done = True
        for pool in self.pools:
            while pool.idle:
                pool.idle.popleft().close()
            if pool.connections or pool.waiters or pool.active_requests:
                done = False
        return done

    def snapshot(self, now: float) -> dict[str, object]:
        endpoints = []
        for pool in self.pools:
            entry = pool.snapshot()
            if self.outlier is not None:
                until = self.outlier.returns_at(pool.index)
                healthy = self.outlier.healthy(pool.index, now)
                entry["health"] = "healthy" if healthy else "ejected"
                entry["returns_in_seconds"] = (
                    round(until - now, 3) if until and not healthy else None
                )
            else:
                entry["health"] = "healthy"
            endpoints.append(entry)
        out: dict[str, object] = {
            "name": self.cluster.name,
            "limits": self.limits.snapshot(),
            "retries": self.retries,
            "retry_overflows": self.retry_overflows,
            "timeouts": self.timeouts,
            "endpoints": endpoints,
        }
        if self.outlier is not None:
            out["outlier_detection"] = self.outlier.snapshot(now)
        return out


class EndpointPool:
    """The connections to one endpoint: idle ones ready for reuse, requests waiting for one, and
    counters for /clusters. Connections and waiting requests count against the cluster's limits."""

    __slots__ = (
        "_tasks",
        "active_requests",
        "cluster",
        "connect_failures",
        "connections",
        "endpoint",
        "host",
        "idle",
        "index",
        "origination",
        "port",
        "state",
        "total_connections",
        "total_requests",
        "waiters",
    )

    def __init__(
        self,
        state: ClusterState,
        endpoint: Endpoint,
        index: int,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self.state = state
        self.cluster = state.cluster
        self.endpoint = endpoint
        self.index = index  # position among the cluster's endpoints (outlier detection)
        self.host = endpoint.address
        self.port = endpoint.port
        self.idle: collections.deque[UpstreamConnection] = collections.deque()
        self.connections: set[UpstreamConnection] = set()
        self.waiters: collections.OrderedDict[Waiter, asyncio.TimerHandle | None] = (
            collections.OrderedDict()
        )
        self._tasks = tasks
        self.active_requests = 0
        self.total_requests = 0
        self.total_connections = 0
        self.connect_failures = 0
        self.origination = _origination_for(state, endpoint)

    # -- requests -------------------------------------------------------------------------------
    def begin_request(self) -> bool:
        """Count a request (attempt) against the cluster's max requests; False: overflow."""
        if not self.state.limits.try_request():
            return False
        self.active_requests += 1
        self.total_requests += 1
        return True

    def end_request(self) -> None:
        self.active_requests -= 1
        self.state.limits.release_request()

    def acquire(self, waiter: Waiter, reuse: bool = True) -> UpstreamConnection | None:
        """A pooled connection now, or None and the waiter is called back later.

        ``reuse=False`` asks for a fresh connection (a replay after a stale pooled one). Raises
        ``UpstreamOverflow`` when the cluster's pending-request limit is reached. A waiter
        queued behind ``maxConnections`` waits at most the connect timeout.
        """
        conn = self.take_idle() if reuse else None
        if conn is not None:
            return conn
        limits = self.state.limits
        if not limits.try_pending():
            raise UpstreamOverflow("pending requests limit")
        loop = asyncio.get_running_loop()
        if limits.try_connection():
            self.waiters[waiter] = None
            self._spawn_connect()
        else:
            handle = loop.call_later(self.cluster.connect_timeout, self._waiter_timeout, waiter)
            self.waiters[waiter] = handle
        return None

    def cancel(self, waiter: Waiter) -> None:
        """The request gave up waiting (its client left, or it was answered)."""
        if waiter in self.waiters:
            handle = self.waiters.pop(waiter)
            if handle is not None:
                handle.cancel()
            self.state.limits.release_pending()

    def _waiter_timeout(self, waiter: Waiter) -> None:
        if waiter in self.waiters:
            del self.waiters[waiter]
            self.state.limits.release_pending()
            waiter.on_connection_error(
                UpstreamOverflow("no connection became free within the connect timeout")
            )

    def _spawn_connect(self) -> None:
        task = asyncio.get_running_loop().create_task(
            self._connect_for_waiter(), name=f"connect {self.endpoint.key}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_for_waiter(self) -> None:
        try:
            conn = await self._open()
        except ConnectFailure as exc:
            self.state.limits.release_connection()
            waiter = self._pop_waiter()
            if waiter is not None:
                waiter.on_connection_error(exc)
            self._serve_queued()
            return
        self._hand_over(conn)

    def _pop_waiter(self) -> Waiter | None:
        if not self.waiters:
            return None
        waiter, handle = self.waiters.popitem(last=False)
        if handle is not None:
            handle.cancel()
        self.state.limits.release_pending()
        return waiter

    def give_back(self, conn: UpstreamConnection) -> None:
        """A connection its waiter no longer wants: to the next waiter, or idle."""
        self._hand_over(conn)

    def _hand_over(self, conn: UpstreamConnection) -> None:
        """Give a ready connection to the oldest waiter, or keep it idle."""
        waiter = self._pop_waiter()
        if waiter is None:
            conn.idle_since = asyncio.get_running_loop().time()
            self.idle.append(conn)
            return
        waiter.on_connection(conn)

    # -- connections ----------------------------------------------------------------------------
    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()  # most recently used: warmest, least likely closed by the peer
            if conn.usable:
                return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        limit = self.cluster.max_requests_per_connection
        max_age = self.state.max_duration
        if (
            conn.usable
            and conn.codec.start_next_cycle()
            and not conn.codec.trailing_data()  # bytes after the response: not a clean stream
            and not (limit and conn.requests >= limit)
            and not (max_age and now - conn.born >= max_age)
        ):
            conn.got_response_bytes = False
            # A slow client may have paused this connection's reading; pooled ones always read
            # (to hear the upstream's FIN, and to deliver the next response).
            conn.resume_reading()
            if self.waiters:
                self._hand_over(conn)
                return
            conn.idle_since = now
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.state.limits.release_connection()
        if conn in self.idle:
            self.idle.remove(conn)
        self._serve_queued()

    def _serve_queued(self) -> None:
        """A connection slot came free: a request queued behind maxConnections can have it
        (waiters with a timer are queued; the others already have a connect in flight)."""
        queued = any(handle is not None for handle in self.waiters.values())
        if queued and self.state.limits.try_connection():
            self._spawn_connect()

    async def connect(self) -> UpstreamConnection:
        """A new connection outside the waiter queue (mirrors), within maxConnections."""
        if not self.state.limits.try_connection():
            raise UpstreamOverflow("connections limit")
        try:
            return await self._open()
        except ConnectFailure:
            self.state.limits.release_connection()
            raise

    async def _open(self) -> UpstreamConnection:
        """Open a connection (its slot already granted), bounded by the connect timeout, which
        covers the TLS handshake when the endpoint is reached over TLS (``origination``)."""
        loop = asyncio.get_running_loop()
        key = self.endpoint.key
        tls = self.origination
        timeout = self.cluster.connect_timeout
        ctx: ssl.SSLContext | None = None
        if tls is not None:
            contexts = self.state.contexts
            try:
                if contexts is None:
                    raise CertificateError(CertCheck.PEM, "this proxy has no TLS contexts")
                ctx = contexts.context(tls)
            except CertificateError as exc:
                self.connect_failures += 1
                log.warning("TLS to %s (%s): %s", key, tls.mode.value, exc)
                raise ConnectFailure(f"TLS to {key}: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                if tls is None or ctx is None:
                    transport, protocol = await loop.create_connection(
                        lambda: UpstreamConnection(self), self.host, self.port
                    )
                else:
                    transport, protocol = await loop.create_connection(
                        lambda: UpstreamConnection(self),
                        self.host,
                        self.port,
                        ssl=ctx,
                        server_hostname=tls.server_name or None,
                        ssl_handshake_timeout=timeout,
                    )
        except TimeoutError as exc:
            self.connect_failures += 1
            raise ConnectFailure(f"connect to {key} timed out") from exc
        # ValueError: ssl's UnicodeDecodeError for a server certificate name that is not UTF-8,
        # raised as the handshake completes. Anything but ConnectFailure would kill the connect
        # task, leaving its waiter unanswered and its connection slot taken.
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self.connect_failures += 1
            reason = verify_failure_reason(exc)
            log.warning("TLS handshake with %s failed: %s", key, reason)
            raise ConnectFailure(f"TLS handshake with {key}: {reason}") from exc
        except OSError as exc:
            self.connect_failures += 1
            raise ConnectFailure(f"connect to {key}: {exc}") from exc
        if tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            mismatch = check_server_identity(tls, ssl_object) if ssl_object is not None else ""
            if mismatch:
                transport.abort()
                self.connect_failures += 1
                log.warning("TLS to %s refused: %s", key, mismatch)
                raise ConnectFailure(mismatch)
        self.connections.add(protocol)
        self.total_connections += 1
        return protocol

    def expire_idle(self, now: float) -> None:
        timeout = self.cluster.idle_timeout
        idle = self.idle
        # Oldest first: the deque is ordered by release time.
        while idle and now - idle[0].idle_since >= timeout:
            idle.popleft().close()
        max_age = self.state.max_duration
        if max_age:
            for conn in [c for c in idle if now - c.born >= max_age]:
                idle.remove(conn)
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()
        self.idle.clear()
        for waiter in list(self.waiters):
            self.cancel(waiter)
            waiter.on_connection_error(UpstreamOverflow("the endpoint's pool was closed"))

    def snapshot(self) -> dict[str, object]:
        return {
            "address": self.endpoint.key,
            "labels": dict(self.endpoint.labels),
            "active_connections": len(self.connections),
            "idle_connections": len(self.idle),
            "active_requests": self.active_requests,
            "waiting_requests": len(self.waiters),
            "total_requests": self.total_requests,
            "total_connections": self.total_connections,
            "connect_failures": self.connect_failures,
        }


def _origination_for(state: ClusterState, endpoint: Endpoint) -> Origination | None:
    """The TLS (if any) to originate to an endpoint: the DestinationRule's, else auto mTLS for
    a sidecar endpoint, which needs this workload's certificate (plaintext without one)."""
    cluster = state.cluster
    policy = cluster.policy
    found = origination(
        policy.tls if policy is not None else None,
        host=cluster.service,
        port=cluster.port,
        subset=cluster.subset,
        endpoint_labels=dict(endpoint.labels),
        service_sans=cluster.identities,
    )
    if found is not None and found.auto:
        contexts = state.contexts
        if contexts is None or not contexts.has_workload_certificate:
            return None
    return found


class PoolManager:
    """Cluster states by cluster name; passthrough destinations get one on demand (bounded LRU)."""

    __slots__ = ("_by_cluster", "_passthrough", "client_codec", "contexts", "tasks", "workers")

    def __init__(
        self,
        clusters: Iterable[Cluster],
        contexts: ClientContexts | None = None,
        workers: int = 1,
        *,
        carried: Iterable[ClusterState] = (),
        tasks: set[asyncio.Task[None]] | None = None,
        client_codec: Callable[[], ClientCodec] = H11ClientCodec,
    ) -> None:
        self.client_codec = client_codec  # spec.http1Codec (core/codecs.py)
        self.tasks: set[asyncio.Task[None]] = set() if tasks is None else tasks
        self.contexts = contexts
        self.workers = workers
        kept = {s.cluster.name: s for s in carried}
        self._by_cluster: dict[str, ClusterState] = {}
        for c in clusters:
            state = kept.get(c.name)
            if state is None or state.cluster != c:
                state = ClusterState(
                    c, c.endpoints, self.tasks, contexts, workers, client_codec=client_codec
                )
            self._by_cluster[c.name] = state
        self._passthrough: collections.OrderedDict[tuple[str, int], ClusterState] = (
            collections.OrderedDict()
        )

    def state(self, cluster: Cluster) -> ClusterState:
        found = self._by_cluster.get(cluster.name)
        if found is None:
            found = ClusterState(
                cluster,
                cluster.endpoints,
                self.tasks,
                self.contexts,
                self.workers,
                client_codec=self.client_codec,
            )
            self._by_cluster[cluster.name] = found
        return found

    def pools(self, cluster: Cluster) -> tuple[EndpointPool, ...]:
        return self.state(cluster).pools

    def passthrough_pool(self, cluster: Cluster, host: str, port: int) -> EndpointPool:
        key = (host, port)
        state = self._passthrough.get(key)
        if state is not None:
            self._passthrough.move_to_end(key)
            return state.pools[0]
        endpoint = Endpoint(address=host, port=port)
        state = ClusterState(cluster, (endpoint,), self.tasks, client_codec=self.client_codec)
        self._passthrough[key] = state
        while len(self._passthrough) > _PASSTHROUGH_POOLS_MAX:
            _, old = self._passthrough.popitem(last=False)
            for pool in old.pools:
                pool.close_all()
        return state.pools[0]

    def states(self) -> list[ClusterState]:
        return [*self._by_cluster.values(), *self._passthrough.values()]

    def successor(self, clusters: Iterable[Cluster]) -> tuple[PoolManager, list[ClusterState]]:
        """The pools for a reloaded config, and the states it no longer uses.

        A cluster whose definition is unchanged keeps its state (connections, limits, outlier
        ejections, counters), so a reload that touches routes leaves upstream connections
        alone (reference §6 #11). The others get fresh states; the retired ones are for the
        caller to close once idle (``ClusterState.close_idle``), never cutting a request in
        flight. Passthrough destinations are re-created on demand. Nothing here changes
        ``self``: a reload that fails later simply drops the successor.
        """
        # One owner for every connect task, the old pools' and the new ones'.
        nxt = PoolManager(
            clusters,
            self.contexts,
            self.workers,
            carried=self._by_cluster.values(),
            tasks=self.tasks,
            client_codec=self.client_codec,
        )
        used = {id(s) for s in nxt._by_cluster.values()}
        retired = [s for s in self.states() if id(s) not in used]
        return nxt, retired

    def all_pools(self) -> list[tuple[str, EndpointPool]]:
        return [(s.cluster.name, p) for s in self.states() for p in s.pools]

    def sweep(self, now: float) -> None:
        """Idle connections past their timeout close; outlier detectors run their interval."""
        for state in self.states():
            state.tick(now)
            for pool in state.pools:
                if pool.idle:
                    pool.expire_idle(now)

    def expire_idle(self, now: float) -> None:
        self.sweep(now)

    async def close(self) -> None:
        for _, pool in self.all_pools():
            pool.close_all()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def close_all(self) -> None:
        for _, pool in self.all_pools():
            pool.close_all()
        for task in list(self.tasks):
            task.cancel()
