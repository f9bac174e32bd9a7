"""The downstream side of the edge: one asyncio Protocol per client connection.

Owns a client connection from accept to close: bytes in go through the server codec; at the fixed
points of a request (head parsed, upstream attached, response head, response end) it calls the
stack's ``Handler`` and moves body chunks straight between itself and the ``UpstreamConnection``,
pausing whichever side reads faster than the other can write (watermarks in ``io/pool.py``). It
writes Envoy's local replies for ``ProxyError``s, tunnels WebSocket bytes after a 101, retries a
replayable request once on a fresh connection when a pooled one turns out to be dead, and honours
drain (``connection: close`` on the last response).

Rules: callbacks only, except the connect, which runs as an owned, named task; no exception is
used for flow on the hot path; per-request state is reset, not reallocated, between requests.
"""

from __future__ import annotations

import asyncio
import enum
import http
import logging
import socket
import typing
from typing import TYPE_CHECKING

from meshproxy.core.classify import Failure, Outcome, failed, response
from meshproxy.core.http1 import (
    Body,
    EndOfMessage,
    Header,
    RequestHead,
    ResponseHead,
    ServerCodec,
    Signal,
)
from meshproxy.core.limits import ClusterLimits
from meshproxy.core.record import RequestRecord
from meshproxy.core.retry import Verdict
from meshproxy.errors import (
    BadRequest,
    ConnectFailure,
    ProxyError,
    RequestTimeout,
    UpstreamOverflow,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from meshproxy.io.capture import original_destination
from meshproxy.io.handler import Forward, Handler
from meshproxy.io.mirror import MIRROR_BODY_MAX, shadow
from meshproxy.io.pool import HIGH_WATER, LOW_WATER, EndpointPool, UpstreamConnection
from meshproxy.io.tls import PeerIdentity, peer_identity

if TYPE_CHECKING:
    from meshproxy.io.listener import Listener

log = logging.getLogger(__name__)


class Phase(enum.IntEnum):
    IDLE = 0  # keep-alive, waiting for the first byte of a request
    HEAD = 1  # some bytes of a request head received
    ACTIVE = 2  # a request is being proxied
    TUNNEL = 3  # after a 101: raw bytes both ways
    CLOSED = 4


# Reasons to stop reading from the client; reading resumes when none is left.
_PAUSE_CONNECTING = 1  # no upstream yet to write the body to
_PAUSE_UPSTREAM_FULL = 2  # the upstream's write buffer is over the high watermark
_PAUSE_PIPELINE = 4  # the next request must wait for this response

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
# The classifier's name for each way a try can fail (core/classify.py).
_FAILURES: dict[type[ProxyError], Failure] = {
    ConnectFailure: Failure.CONNECT_FAILURE,
    UpstreamReset: Failure.RESET,
    UpstreamTimeout: Failure.TIMEOUT,
    UpstreamProtocolError: Failure.PROTOCOL_ERROR,
    UpstreamOverflow: Failure.OVERFLOW,
}


def _with_attempt_count(head: RequestHead, attempt: int) -> RequestHead:
    """The head for try N: ``x-envoy-attempt-count: N`` (Istio sets include_request_attempt_count)."""
    value = b"%d" % attempt
    headers: list[Header] = [
        (n, value) if n == b"x-envoy-attempt-count" else (n, v) for n, v in head.headers
    ]
    return RequestHead(method=head.method, target=head.target, headers=headers)


_CONTINUE = ResponseHead(status=100, headers=(), reason=b"Continue")


class DownstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_backoff",
        "_deadline",
        "_mirror_body",
        "_out",
        "_pause",
        "_pending_body",
        "_processing",
        "_replay",
        "_replay_size",
        "_retry_slot",
        "_reused",
        "_timer",
        "_try_outcome",
        "_try_start",
        "_try_timer",
        "_waiting",
        "bodyless",
        "codec",
        "forward",
        "handler",
        "identity",
        "listener",
        "loop",
        "original_dst",
        "peer",
        "phase",
        "pool",
        "record",
        "replayed",
        "replied",
        "request_done",
        "response_started",
        "since",
        "transport",
        "up_out",
        "upstream",
        "write_paused",
    )

    def __init__(self, listener: Listener, handler: Handler) -> None:
        self.listener = listener
        self.handler = handler
        self.loop = listener.loop
        self.codec: ServerCodec = listener.server_codec()
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        # The mTLS peer's proof of identity (None: plaintext; a TLS peer without one is refused).
        self.identity: PeerIdentity | None = None
        # Where the app connected before an iptables REDIRECT ("ip:port"; "" if not redirected).
        self.original_dst = ""
        self.phase = Phase.IDLE
        self.since = self.loop.time()
        self._pause = 0
        self._processing = False
        self._timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        # Bytes for the client and for the upstream, collected while one read is processed and
        # written with one writelines (one syscall) at its end, not one write per event.
        self._out: list[bytes] = []
        self.up_out: list[bytes] = []
        self._reset()

    def _reset(self) -> None:
        self.record: RequestRecord | None = None
        self.forward: Forward | None = None
        self.pool: EndpointPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.request_done = False
        self.response_started = False
        self.replied = False
        self.replayed = False
        self.bodyless = True
        self._pending_body: list[bytes] = []
        self._reused = False
        self._mirror_body: list[bytes] | None = None
        self._replay: list[bytes] | None = None  # the body kept for replays, while it fits
        self._replay_size = 0
        self._waiting = False  # queued on self.pool for a connection
        self._try_timer: asyncio.TimerHandle | None = None
        self._backoff: asyncio.TimerHandle | None = None  # a retry (or fault delay) pending
        self._deadline: float | None = None  # the route deadline, loop time
        self._retry_slot: ClusterLimits | None = None  # held by the current try if a retry
        self._try_start = 0.0
        self._try_outcome = ""

    # -- connection lifecycle -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.listener.original_dst:
                # One getsockopt per connection (the outbound listener only), as Envoy's
                # original_dst listener filter: where the app connected before a REDIRECT.
                self.original_dst = original_destination(sock)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.identity = identity = peer_identity(ssl_object)
            # mTLS means a SPIFFE identity: a certificate that chains to the bundle but names
            # no workload cannot be authorized or reported, so it is refused (issue #5 §4).
            if identity is None or not identity.uri:
                self.phase = Phase.CLOSED
                self.listener.refuse(
                    "no_spiffe_id", self.peer, "client certificate has no SPIFFE URI SAN"
                )
                transport.abort()
                return
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.phase
        self.phase = Phase.CLOSED
        self.listener.connections.discard(self)
        self._cancel_timer()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            # The client went away mid-exchange: cancel the upstream request, free its connection.
            upstream.abort()
        self._end_attempt()  # also leaves a connection queue it may be waiting in
        if was == Phase.ACTIVE and self.record is not None:
            self.record.add_flag("DC")
            self._complete()
        elif was == Phase.TUNNEL:
            self._complete()

    def eof_received(self) -> bool | None:
        if self.phase == Phase.TUNNEL:
            up = self.upstream
            if up is not None and up.transport is not None and up.transport.can_write_eof():
                up.transport.write_eof()
            return True
        # Envoy treats a client's FIN on HTTP/1.1 as a disconnect: returning False closes the
        # transport, and connection_lost cancels the upstream request (flag DC).
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    def close(self) -> None:
        if self.transport is not None and self.phase != Phase.CLOSED:
            self.phase = Phase.CLOSED
            self.transport.close()

    # -- reading requests ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == Phase.TUNNEL:
            if self.record is not None:
                self.record.bytes_received += len(data)
            if self.upstream is not None:
                self.upstream.write(data)
            return
        if phase == Phase.IDLE:
            self.phase = Phase.HEAD
            self.since = self.loop.time()
        elif phase == Phase.CLOSED:
            return
        self.codec.feed(data)
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            codec = self.codec
            while self.phase != Phase.CLOSED and self.phase != Phase.TUNNEL:
                try:
                    event = codec.next_event()
                except BadRequest as exc:
                    self._reject(exc)
                    return
                kind = type(event)
                if kind is Body:
                    self._on_body(event.data)  # type: ignore[union-attr]
                elif kind is RequestHead:
                    self._on_head(event)  # type: ignore[arg-type]
                elif kind is EndOfMessage:
                    self._on_request_end()
                elif event is Signal.NEED_DATA:
                    return
                elif event is Signal.PAUSED:
                    # Pipelined bytes (or an upgrade in progress): wait for the response to finish.
                    self._pause_reading(_PAUSE_PIPELINE)
                    return
                else:  # the client closed cleanly between requests
                    self.close()
                    return
        finally:
            self._processing = False
            self._flush_upstream()

    def _new_record(self, now: float) -> RequestRecord:
        """A request's record with this connection's facts: its peer's identity (mTLS) and the
        address the app connected to before a REDIRECT."""
        record = RequestRecord(self.handler.direction, now, self.peer)
        identity = self.identity
        if identity is not None:
            record.tls = True
            record.source_principal = identity.uri
            record.peer_cert_hash = identity.cert_hash
        record.original_dst = self.original_dst
        return record

    def _on_head(self, head: RequestHead) -> None:
        self.phase = Phase.ACTIVE
        now = self.loop.time()
        # The listener's handler as of this request: a config reload swaps it, and new requests
        # on kept-alive connections take the new one while this one finishes on its own.
        handler = self.handler = self.listener.handler
        record = self.record = self._new_record(now)
        try:
            forward = handler.on_request(head, record)
        except ProxyError as exc:
            self.bodyless = not any(
                n in (b"content-length", b"transfer-encoding") for n, _ in head.headers
            )
            self._local_reply(exc)
            return
        self.forward = forward
        self.bodyless = forward.replayable
        if forward.retry is not None and not forward.replayable:
            # Keep the body as it streams, up to the bound, so an attempt can be replayed.
            self._replay = []
        if forward.expect_continue and self.transport is not None:
            # Envoy (proxy_100_continue off) answers 100-continue itself and strips Expect.
            self._out.append(self.codec.send_informational(_CONTINUE))
            self.flush()
        if forward.mirrors:
            self._mirror_body = []
        if forward.delay:
            # Fault injection: hold the request (and its body) back, then forward it.
            self._hold_body()
            self._backoff = self.loop.call_later(forward.delay, self._after_delay)
            return
        self._start_attempt(forward.pool, reuse=True)

    def _after_delay(self) -> None:
        self._backoff = None
        forward = self.forward
        if self.phase == Phase.ACTIVE and forward is not None and not self.replied:
            if forward.abort is not None:
                self._resume_reading(_PAUSE_CONNECTING)  # read (and drop) the rest of the body
                self._local_reply(forward.abort)
                return
            self._start_attempt(forward.pool, reuse=True)

    # -- attempts -----------------------------------------------------------------------------
    def _start_attempt(self, pool: EndpointPool, reuse: bool) -> None:
        """Begin one try on ``pool``: count it, then take a pooled connection or wait for one."""
        self.up_out = []  # anything meant for a previous attempt's connection is void
        record = self.record
        assert record is not None
        if not pool.begin_request():
            self._release_retry_slot()
            self._attempt_failed(UpstreamOverflow("max requests"))
            return
        self.pool = pool
        record.upstream_host = pool.endpoint.key
        record.attempts += 1  # every try counts, even one that never gets a connection (Envoy)
        self._try_start = self.loop.time()
        self._try_outcome = ""
        try:
            conn = pool.take_idle() if reuse else None
            if conn is None:
                conn = pool.acquire(self, reuse=reuse)
        except UpstreamOverflow as exc:
            self._attempt_failed(exc)  # ends the try (or schedules the next one)
            return
        if conn is not None:
            self._attach(conn, reused=True)
            return
        self._waiting = True
        self._hold_body()

    def on_connection(self, conn: UpstreamConnection) -> None:
        """A connection for the request waiting on ``self.pool`` (Waiter)."""
        if not self._waiting or self.phase != Phase.ACTIVE or self.pool is not conn.pool:
            conn.pool.give_back(conn)  # the request went away meanwhile: keep it for others
            return
        self._waiting = False
        self._attach(conn, reused=conn.requests > 0)

    def on_connection_error(self, error: ProxyError) -> None:
        """No connection came: connect failure, or none came free in time (Waiter)."""
        if not self._waiting or self.phase != Phase.ACTIVE:
            return
        self._waiting = False
        self._attempt_failed(error)  # ends the try (or schedules the next one)

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        forward = self.forward
        record = self.record
        assert forward is not None and record is not None and self.pool is not None
        self.upstream = conn
        conn.sink = self
        conn.requests += 1
        self._reused = reused
        self.pool.state.connected(self.pool)
        head = forward.head
        if record.attempts > 1:
            head = _with_attempt_count(head, record.attempts)
        if forward.head_for_try is not None:  # this try's trace context (its CLIENT span)
            head = forward.head_for_try(head, len(record.tries))
        codec = conn.codec
        try:
            chunks = [codec.send_head(head)]
        except ProxyError as exc:  # a head h11 refuses to frame (e.g. a header rewrite made it so)
            self.upstream = None
            conn.sink = None
            conn.close()
            self._end_attempt()
            self._resume_reading(_PAUSE_CONNECTING)
            self._local_reply(exc)
            return
        pending = self._pending_body
        if pending:
            for data in pending:
                chunks.extend(codec.send_body(data))
            self._pending_body = []
        if self.request_done:
            chunks.append(codec.send_end())
            self._arm_try_timeout()
        self.up_out.extend(chunks)
        if not self._processing:
            self._flush_upstream()
        if self.write_paused:
            conn.pause_reading()
        self._resume_reading(_PAUSE_CONNECTING)

    def _end_attempt(self) -> None:
        """The current try is over (whatever its outcome): give back what it held."""
        self._cancel_try_timer()
        pool = self.pool
        if pool is not None:
            record = self.record
            if record is not None:
                elapsed = self.loop.time() - self._try_start
                # No outcome: the client left, or the route deadline cut the try short.
                record.tries.append(
                    (pool.endpoint.key, self._try_outcome or "cancelled", self._try_start, elapsed)
                )
            if self._waiting:
                pool.cancel(self)
                self._waiting = False
            pool.end_request()
            self.pool = None
        self._release_retry_slot()

    def _release_retry_slot(self) -> None:
        if self._retry_slot is not None:
            self._retry_slot.release_retry()
            self._retry_slot = None

    def _attempt_failed(self, error: ProxyError) -> None:
        """A try ended without a response: retry it, or answer with the error."""
        outcome = failed(_FAILURES.get(type(error), Failure.RESET))
        if self._maybe_retry(outcome):
            return
        self._fail_before_response(error)

    def _maybe_retry(self, outcome: Outcome) -> bool:
        """Record the outcome; schedule the next try if the policy, the body and the limits allow.

        Returns False when the outcome stands (the caller forwards or answers it).
        """
        forward, record = self.forward, self.record
        assert forward is not None and record is not None
        pool = self.pool
        now = self.loop.time()
        self._try_outcome = (
            str(outcome.status) if outcome.failure is None else outcome.failure.value
        )
        if pool is not None:
            pool.state.record(pool, outcome, now)
        retry = forward.retry
        if retry is None:
            return False
        verdict = retry.decide(outcome)
        if verdict is Verdict.DONE:
            return False
        if verdict is Verdict.EXHAUSTED:
            record.add_flag("URX")
            return False
        if not (forward.replayable or self._replay is not None):
            return False  # the body went past the replay buffer: it cannot be sent again
        if self._deadline is not None and self._deadline <= now:
            return False
        state = (pool or forward.pool).state
        if not state.limits.try_retry():
            # Envoy upstream_rq_retry_overflow: the answer stands, flagged UpstreamOverflow.
            state.retry_overflows += 1
            record.add_flag("UO")
            return False
        state.retries += 1
        previous = pool or forward.pool
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()  # its response (if any) is discarded with it
        self._end_attempt()
        self._retry_slot = state.limits
        delay = retry.backoff()  # before counting the try: retry N waits in [0, (2^N-1) x base)
        retry.next_attempt()
        if not forward.replayable and self._replay is not None:
            self._pending_body = list(self._replay)
        self._hold_body()
        self._backoff = self.loop.call_later(delay, self._retry_now, previous)
        return True

    def _retry_now(self, previous: EndpointPool) -> None:
        self._backoff = None
        forward, record = self.forward, self.record
        if self.phase != Phase.ACTIVE or forward is None or record is None or self.replied:
            self._release_retry_slot()
            return
        try:
            pool = self.handler.reselect(forward, record, previous)
        except ProxyError as exc:  # no endpoint left (all ejected)
            self._release_retry_slot()
            self._fail_before_response(exc)
            return
        self._start_attempt(pool, reuse=True)

    def _send_mirrors(self, forward: Forward, body: bytes) -> None:
        self._mirror_body = None
        tasks = self.listener.tasks
        for pool, head in forward.mirrors:
            task = self.loop.create_task(
                shadow(pool, head, body), name=f"mirror {pool.endpoint.key}"
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _on_body(self, data: bytes) -> None:
        record = self.record
        if record is not None:
            record.bytes_received += len(data)
        if self.replied:
            return  # answered locally already: the rest of the body is read and dropped
        mirror = self._mirror_body
        if mirror is not None:
            mirror.append(data)
            if sum(map(len, mirror)) > MIRROR_BODY_MAX:
                self._mirror_body = None  # too big to copy: the mirror is skipped
        replay = self._replay
        if replay is not None:
            self._replay_size += len(data)
            if self._replay_size > self.listener.retry_buffer:
                self._replay = None  # past the bound: forwarded, but no longer retried
            else:
                replay.append(data)
        upstream = self.upstream
        if upstream is not None:
            self.up_out.extend(upstream.codec.send_body(data))
        else:
            self._pending_body.append(data)

    def _on_request_end(self) -> None:
        self.request_done = True
        self._resume_reading(_PAUSE_CONNECTING)
        if self.replied:
            self._finish()
            return
        forward = self.forward
        if self._mirror_body is not None and forward is not None:
            self._send_mirrors(forward, b"".join(self._mirror_body))
        # The route timeout starts once the whole request is read and covers every try (Envoy).
        if forward is not None and forward.timeout:
            self._deadline = self.loop.time() + forward.timeout
            self._timer = self.loop.call_later(forward.timeout, self._on_route_timeout)
        upstream = self.upstream
        if upstream is not None:
            self.up_out.append(upstream.codec.send_end())
            self._arm_try_timeout()

    # -- the response (ResponseSink) ------------------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        record, forward, transport = self.record, self.forward, self.transport
        if self.phase != Phase.ACTIVE or record is None or forward is None or transport is None:
            return
        self._cancel_try_timer()
        if forward.retry is not None and self._maybe_retry(response(head.status, head.headers)):
            return
        self._try_outcome = str(head.status)
        if forward.retry is None and self.pool is not None:
            self.pool.state.record(self.pool, response(head.status), self.loop.time())
        self._cancel_timer()
        now = self.loop.time()
        record.response_code = head.status
        record.upstream_service_time = now - record.start
        close = self.listener.draining or not self.request_done
        out = self.handler.on_response(head, forward, record, close)
        try:
            data = self.codec.send_head(out)
        except ProxyError as exc:
            self.on_upstream_error(exc)
            return
        self.response_started = True
        self._out.append(data)

    def on_informational(self, head: ResponseHead) -> None:
        record, forward, transport = self.record, self.forward, self.transport
        if self.phase != Phase.ACTIVE or forward is None or record is None or transport is None:
            return
        if head.status != 101 or not forward.websocket:
            return  # 100 Continue was answered already; other 1xx are not forwarded
        self._cancel_timer()
        self._cancel_try_timer()
        record.response_code = 101
        out = self.handler.on_response(head, forward, record, False)
        self._out.append(self.codec.send_informational(out))
        self.flush()
        self.response_started = True
        self.phase = Phase.TUNNEL
        rest = self.codec.trailing_data()
        if rest and self.upstream is not None:
            self.upstream.write(rest)
        self._pause = 0
        transport.resume_reading()

    def on_response_body(self, data: bytes) -> None:
        transport, record = self.transport, self.record
        if transport is None or record is None or self.phase != Phase.ACTIVE:
            return
        if not self.response_started:
            return  # the body of a response that was not forwarded (its try is being retried)
        record.bytes_sent += len(data)
        self._out.extend(self.codec.send_body(data))

    def on_response_end(self) -> None:
        transport = self.transport
        if transport is None or self.phase != Phase.ACTIVE:
            return
        self._out.append(self.codec.send_end())
        self.flush()
        conn, pool = self.upstream, self.pool
        self.upstream = None
        if conn is not None and pool is not None:
            if self.request_done:
                pool.release(conn, self.loop.time())
            else:
                conn.close()  # the request was not fully sent: that connection is unusable
        self._end_attempt()
        if self.request_done:
            self._finish()
        else:
            # The upstream answered before the request body was done (its response went out
            # with `connection: close`): stop reading a body nobody will use.
            self._complete()
            self.close()

    def flush(self) -> None:
        """Write what the response side collected (called once per upstream read)."""
        out = self._out
        if out:
            self._out = []
            if self.transport is not None and self.phase != Phase.CLOSED:
                self.transport.writelines(out)

    def _flush_upstream(self) -> None:
        out = self.up_out
        if out:
            self.up_out = []
            if self.upstream is not None:
                self.upstream.writelines(out)

    def on_upstream_error(self, error: ProxyError) -> None:
        conn = self.upstream
        self.upstream = None
        if self.phase != Phase.ACTIVE or self.record is None:
            return
        if self.response_started:
            # Too late for a local reply: reset the client connection, as Envoy does.
            self._try_outcome = "reset-after-headers"
            self._end_attempt()
            self.record.add_flag(error.flag)
            self._complete()
            self.phase = Phase.CLOSED
            if self.transport is not None:
                self.transport.abort()
            return
        forward = self.forward
        if (
            isinstance(error, UpstreamReset)
            and self._reused
            and conn is not None
            and not conn.got_response_bytes
            and forward is not None
            and forward.replayable
            and not self.replayed
        ):
            # A pooled connection the upstream had already closed: the keep-alive race, not the
            # request's fault or the endpoint's: once, on a fresh connection, outside the policy.
            self.replayed = True
            pool = self.pool
            self._end_attempt()
            if pool is not None:
                self._start_attempt(pool, reuse=False)
            return
        self._attempt_failed(error)

    def on_tunnel_data(self, data: bytes) -> None:
        if self.transport is not None and self.phase == Phase.TUNNEL:
            self.record_bytes_sent(len(data))
            self.transport.write(data)

    def record_bytes_sent(self, n: int) -> None:
        if self.record is not None:
            self.record.bytes_sent += n

    def on_tunnel_closed(self) -> None:
        self.upstream = None
        if self.phase == Phase.TUNNEL:
            self._end_attempt()
            self._complete()
            self.close()

    def pause_request_body(self) -> None:
        self._pause_reading(_PAUSE_UPSTREAM_FULL)

    def resume_request_body(self) -> None:
        self._resume_reading(_PAUSE_UPSTREAM_FULL)

    # -- endings ------------------------------------------------------------------------------
    def _fail_before_response(self, error: ProxyError) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.abort()
        if self.pool is not None:
            self._end_attempt()
        self._local_reply(error)

    def _local_reply(self, error: ProxyError) -> None:
        transport = self.transport
        if transport is None or self.phase == Phase.CLOSED:
            return
        record = self.record
        if record is None:
            record = self.record = self._new_record(self.loop.time())
        record.add_flag(error.flag)
        record.response_code = error.status_hint
        close = error.close or self.listener.draining or not (self.request_done or self.bodyless)
        body = error.body
        extra = error.headers
        if error.flag == "UO":
            extra = (*extra, (b"x-envoy-overloaded", b"true"))
        if record.attempts:
            # The router's own replies say how many tries were made, as its responses do.
            extra = (*extra, (b"x-envoy-attempt-count", b"%d" % record.attempts))
        head = ResponseHead(
            status=error.status_hint,
            headers=self.listener.local_reply_headers(body, close, extra),
            reason=_REASONS.get(error.status_hint, b""),
        )
        codec = self.codec
        if isinstance(error, BadRequest):
            data = [codec.send_error_head(head), body]
        else:
            data = [codec.send_head(head), *codec.send_body(body), codec.send_end()]
        record.bytes_sent += len(body)
        self.response_started = True
        self.replied = True
        self._cancel_timer()
        self._cancel_try_timer()
        self._resume_reading(_PAUSE_CONNECTING)
        self.flush()
        transport.writelines(data)
        if close:
            self._complete()
            self.close()
        elif self.request_done:
            self._finish()

    def _reject(self, error: BadRequest) -> None:
        """Malformed input: answer it, then close (the stream's framing can't be trusted)."""
        self._local_reply(error)
        self.close()

    def _complete(self) -> None:
        record = self.record
        if record is not None and not record.end:
            record.end = self.loop.time()
            self.handler.on_complete(record)

    def _finish(self) -> None:
        """The exchange is over: report it and get ready for the next request, or close."""
        self._cancel_timer()
        self._complete()
        self._reset()
        if self.listener.draining or not self.codec.start_next_cycle():
            self.close()
            return
        self.phase = Phase.IDLE
        self.since = self.loop.time()
        if self._pause & _PAUSE_PIPELINE:
            self._resume_reading(_PAUSE_PIPELINE)
            if self.codec.trailing_data():
                self.phase = Phase.HEAD  # a pipelined request is already here
            self._process()

    # -- timers and flow control ----------------------------------------------------------------
    def _arm_try_timeout(self) -> None:
        """The per-try timeout runs from when a try's request is fully sent (Envoy)."""
        forward = self.forward
        retry = forward.retry if forward is not None else None
        if retry is not None and retry.policy.per_try_timeout and self._try_timer is None:
            self._try_timer = self.loop.call_later(
                retry.policy.per_try_timeout, self._on_try_timeout
            )

    def _cancel_try_timer(self) -> None:
        if self._try_timer is not None:
            self._try_timer.cancel()
            self._try_timer = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
            self._release_retry_slot()

    def _on_try_timeout(self) -> None:
        self._try_timer = None
        if self.phase != Phase.ACTIVE or self.response_started:
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        if self.pool is not None:
            self.pool.state.timeouts += 1
        self._attempt_failed(UpstreamTimeout("per-try timeout"))

    def _on_route_timeout(self) -> None:
        """The route deadline: it covers every try and every backoff; 504 UT."""
        self._timer = None
        if self.phase != Phase.ACTIVE or self.response_started:
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.abort()
        pool = self.pool or (self.forward.pool if self.forward is not None else None)
        if pool is not None:
            pool.state.timeouts += 1
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        self._end_attempt()
        self._local_reply(UpstreamTimeout("route timeout"))

    def check_timeouts(self, now: float) -> None:
        """Called by the listener's sweeper: idle and slow-head connections are closed."""
        phase = self.phase
        if phase == Phase.IDLE:
            if now - self.since >= self.listener.idle_timeout:
                self.close()
        elif phase == Phase.HEAD and now - self.since >= self.listener.request_headers_timeout:
            self._reject(RequestTimeout("request headers not received in time"))

    def drain(self) -> None:
        """Stop after the current exchange; close now if between requests."""
        if self.phase == Phase.IDLE:
            self.close()

    def _hold_body(self) -> None:
        """No upstream to write the body to yet: stop reading it (bounded memory). Once the
        request is read whole there is nothing to hold back, and reading on lets a client that
        leaves (FIN or RST) be noticed and its slots given back."""
        if not self.request_done:
            self._pause_reading(_PAUSE_CONNECTING)

    def _pause_reading(self, reason: int) -> None:
        if not self._pause and self.transport is not None:
            self.transport.pause_reading()
        self._pause |= reason

    def _resume_reading(self, reason: int) -> None:
        if self._pause & reason:
            self._pause &= ~reason
            if not self._pause and self.transport is not None and self.phase != Phase.CLOSED:
                self.transport.resume_reading()
