"""Listeners: bound sockets, the connections they accepted, their timers and their drain.

Owns one listening socket per direction, the set of live ``DownstreamConnection``s, the tasks those
connections start (each tracked, each named), and a sweeper that enforces idle and request-header
timeouts for all of them. A periodic sweep instead of one timer per request keeps the hot path free
of timer churn; its period is a quarter of the shortest timeout, at most one second.

A listener with mTLS (``InboundTLS``, the inbound side under a PeerAuthentication STRICT or
PERMISSIVE) accepts connections itself: it waits for the client's first byte, peeks at it (0x16
opens a TLS record, anything else is plaintext: Envoy's ``tls_inspector``), refuses plaintext on a
STRICT port, and hands the socket to the loop with the server context of the moment, so a rotated
certificate serves the next handshake. A handshake is bounded by ``handshakeTimeout`` and the
number of handshakes in flight is bounded too; every refusal is counted by reason
(``tls_failures``) and logged once, with the reason.

Rules: every task has an owner; draining stops accepting, closes idle connections, and lets active
ones finish with ``connection: close``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshproxy.config.model import HostPort, MtlsMode
from meshproxy.core.h11codec import H11ServerCodec
from meshproxy.core.http1 import Header, HeaderList, ServerCodec
from meshproxy.io.downstream import DownstreamConnection
from meshproxy.io.handler import Handler
from meshproxy.io.tls import WorkloadCredentials, verify_failure_reason

log = logging.getLogger(__name__)

# TLS handshakes in flight per listener; beyond this a new connection is closed at once.
MAX_HANDSHAKES = 1024
_TLS_RECORD_HANDSHAKE = 0x16  # the first byte of a ClientHello's TLS record


@dataclass(frozen=True, slots=True)
class InboundTLS:
    """mTLS termination for a listener: the PeerAuthentication mode and this workload's
    credentials (the server context of the moment)."""

    mode: MtlsMode  # STRICT or PERMISSIVE (DISABLE listeners get no InboundTLS)
    credentials: WorkloadCredentials
    handshake_timeout: float


class DateCache:
    """The ``date`` header value, formatted once a second rather than once a request."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


class Listener:
    __slots__ = (
        "_accept_task",
        "_date",
        "_handshaking",
        "_lsock",
        "address",
        "connections",
        "draining",
        "handler",
        "idle_timeout",
        "loop",
        "name",
        "original_dst",
        "port",
        "request_headers_timeout",
        "retry_buffer",
        "reuse_port",
        "server",
        "server_codec",
        "tasks",
        "tls",
        "tls_failures",
    )

    def __init__(
        self,
        name: str,
        address: HostPort,
        handler: Handler,
        *,
        idle_timeout: float,
        request_headers_timeout: float,
        retry_buffer: int = 64 * 1024,
        tls: InboundTLS | None = None,
        reuse_port: bool = False,
        original_dst: bool = False,
        server_codec: Callable[[], ServerCodec] = H11ServerCodec,
    ) -> None:
        self.server_codec = server_codec  # spec.http1Codec (core/codecs.py)
        self.name = name
        # Read each connection's SO_ORIGINAL_DST (the outbound listener under iptables capture).
        self.original_dst = original_dst
        self.address = address
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self.request_headers_timeout = request_headers_timeout
        self.retry_buffer = retry_buffer
        self.connections: set[DownstreamConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._date = DateCache()
        self.tls = tls
        # Several worker processes listen on one port; the kernel spreads connections over them.
        self.reuse_port = reuse_port
        # Connections refused at the TLS layer, by reason (bounded set of names).
        self.tls_failures: dict[str, int] = {}
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshaking = 0

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind and listen, or take over ``sock``, a listening socket (``listening_socket``)
        of the listener this one replaces on the same address: the port cannot be bound
        twice while that one still listens."""
        if self.tls is not None:
            await self._start_tls(sock)
            return
        try:
            if sock is not None:
                self.server = await self.loop.create_server(
                    lambda: DownstreamConnection(self, self.handler), sock=sock, backlog=4096
                )
            else:
                self.server = await self.loop.create_server(
                    lambda: DownstreamConnection(self, self.handler),
                    self.address.host,
                    self.address.port,
                    backlog=4096,
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                )
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("listener %s on %s:%d", self.name, self.address.host, self.port)

    def listening_socket(self) -> socket.socket | None:
        """A new descriptor of this listener's bound, listening socket (for a successor on the
        same address); None when it no longer listens."""
        if self._lsock is not None:
            return self._lsock.dup() if self._lsock.fileno() >= 0 else None
        if self.server is not None and self.server.sockets:
            held = self.server.sockets[0]
            return socket.fromfd(held.fileno(), held.family, held.type)
        return None

    # -- mTLS accept path ------------------------------------------------------------------------
    async def _start_tls(self, adopted: socket.socket | None = None) -> None:
        if adopted is not None:
            sock = adopted
            sock.setblocking(False)
        else:
            infos = await self.loop.getaddrinfo(
                self.address.host,
                self.address.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(sockaddr)
                sock.listen(4096)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        self._lsock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = self.loop.create_task(self._accept(sock), name=f"{self.name}-accept")
        assert self.tls is not None
        log.info(
            "listener %s on %s:%d (mTLS %s)",
            self.name,
            self.address.host,
            self.port,
            self.tls.mode.value,
        )

    async def _accept(self, lsock: socket.socket) -> None:
        loop = self.loop
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                if self.draining or lsock.fileno() < 0:
                    return
                # EMFILE and friends: back off rather than spin (Envoy pauses accept too).
                log.warning("listener %s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            if self._handshaking >= MAX_HANDSHAKES:
                conn.close()
                self.refuse("too_many_handshakes", "-", f"{MAX_HANDSHAKES} handshakes in flight")
                continue
            self._handshaking += 1
            task = loop.create_task(self._handshake(conn), name=f"{self.name}-handshake")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        tls = self.tls
        assert tls is not None
        try:
            peer = _peer_text(conn)
        except OSError:
            self._handshaking -= 1
            conn.close()
            return
        loop = self.loop
        deadline = loop.time() + tls.handshake_timeout
        handed_over = False
        try:
            first = await self._first_byte(conn, tls.handshake_timeout)
            if first is None:
                self.refuse("handshake_timeout", peer, "no bytes before the handshake timeout")
                return
            if not first:
                return  # the client closed before sending anything: nothing to refuse
            is_tls = first[0] == _TLS_RECORD_HANDSHAKE
            if not is_tls and tls.mode is MtlsMode.STRICT:
                self.refuse("plaintext", peer, "plaintext on a STRICT mTLS port")
                return
            handed_over = True
            if not is_tls:
                await loop.connect_accepted_socket(
                    lambda: DownstreamConnection(self, self.handler), conn
                )
                return
            generation = tls.credentials.current
            assert generation is not None  # loaded before any listener starts
            try:
                await loop.connect_accepted_socket(
                    lambda: DownstreamConnection(self, self.handler),
                    conn,
                    ssl=generation.server,
                    ssl_handshake_timeout=max(0.001, deadline - loop.time()),
                )
            # ValueError: ssl's UnicodeDecodeError for a peer certificate name that is not
            # UTF-8, raised when the handshake completes; a refusal like any other, never an
            # exception that kills this task.
            except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
                reason = verify_failure_reason(exc)
                kind = (
                    "handshake_timeout"
                    if "timed out" in reason or "longer" in reason
                    else (
                        "bad_certificate" if "certificate" in reason.lower() else "handshake_failed"
                    )
                )
                self.refuse(kind, peer, reason)
                conn.close()
        finally:
            self._handshaking -= 1
            if not handed_over:
                conn.close()

    async def _first_byte(self, conn: socket.socket, timeout: float) -> bytes | None:
        """The connection's first byte, peeked (left for the handshake); b"" at EOF; None on
        timeout."""
        loop = self.loop
        ready = loop.create_future()
        fd = conn.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            async with asyncio.timeout(timeout):
                await ready
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(fd)
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except OSError:
            return b""

    def refuse(self, reason: str, peer: str, detail: str) -> None:
        """Count and log one connection refused at the TLS layer."""
        self.tls_failures[reason] = self.tls_failures.get(reason, 0) + 1
        log.warning("listener %s: refused connection from %s: %s", self.name, peer, detail)

    def local_reply_headers(self, body: bytes, close: bool, extra: HeaderList) -> list[Header]:
        headers: list[Header] = [(b"content-length", b"%d" % len(body))]
        if body:
            headers.append((b"content-type", b"text/plain"))
        headers.append((b"date", self._date.get()))
        headers.append((b"server", b"meshproxy"))
        headers.extend(extra)
        if close:
            headers.append((b"connection", b"close"))
        return headers

    def sweep(self, now: float) -> None:
        for conn in list(self.connections):
            conn.check_timeouts(now)

    def start_drain(self) -> None:
        """Stop accepting; close idle connections; active ones close after their response."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        self._stop_accepting()
        for conn in list(self.connections):
            conn.drain()

    @property
    def active(self) -> int:
        # Accepted connections still before or in their TLS handshake count too (as in Envoy's
        # downstream_cx_active): a drain must wait for them, not exit and cut them off.
        return len(self.connections) + self._handshaking

    def _stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._lsock is not None:
            self._lsock.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self._stop_accepting()
        if self._accept_task is not None:
            await asyncio.gather(self._accept_task, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _peer_text(conn: socket.socket) -> str:
    peer = conn.getpeername()
    if isinstance(peer, tuple):
        return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
    return str(peer)


class Sweeper:
    """Calls ``tick(now)`` every ``period`` seconds until stopped (one timer for all timeouts)."""

    __slots__ = ("_handle", "_loop", "_period", "_tick")

    def __init__(self, period: float, tick: Callable[[float], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._period = period
        self._tick = tick
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = self._loop.call_later(self._period, self._run)

    def _run(self) -> None:
        try:
            self._tick(self._loop.time())
        finally:
            self._handle = self._loop.call_later(self._period, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
