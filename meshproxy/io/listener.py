"""Listeners: bound sockets, the connections they accepted, their timers and their drain.

Owns one listening socket per direction, the set of live ``DownstreamConnection``s, the tasks those
connections start (each tracked, each named), and a sweeper that enforces idle and request-header
timeouts for all of them. A periodic sweep instead of one timer per request keeps the hot path free
of timer churn; its period is a quarter of the shortest timeout, at most one second.

Rules: every task has an owner; draining stops accepting, closes idle connections, and lets active
ones finish with ``connection: close``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable

from meshproxy.config.model import HostPort
from meshproxy.core.h11codec import H11ServerCodec
from meshproxy.core.http1 import Header, HeaderList, ServerCodec
from meshproxy.io.downstream import DownstreamConnection
from meshproxy.io.handler import Handler

log = logging.getLogger(__name__)


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
        "_date",
        "address",
        "connections",
        "draining",
        "handler",
        "idle_timeout",
        "loop",
        "name",
        "port",
        "request_headers_timeout",
        "retry_buffer",
        "server",
        "server_codec",
        "tasks",
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
        server_codec: Callable[[], ServerCodec] = H11ServerCodec,
    ) -> None:
        self.server_codec = server_codec  # spec.http1Codec (core/codecs.py)
        self.name = name
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

    async def start(self) -> None:
        self.server = await self.loop.create_server(
            lambda: DownstreamConnection(self, self.handler),
            self.address.host,
            self.address.port,
            backlog=4096,
            reuse_address=True,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("listener %s on %s:%d", self.name, self.address.host, self.port)

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
        for conn in list(self.connections):
            conn.drain()

    @property
    def active(self) -> int:
        return len(self.connections)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


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
