"""The admin server: a small HTTP/1.1 server on a loopback address for operators and probes.

Owns the admin listener and its request loop (h11 over asyncio streams: not a hot path). The
endpoints themselves are callables supplied by the composition root (``app.py``), keyed by method
and path, so this module knows nothing of config or pools. Most take no argument; one wrapped in
``WithRequest`` is given the parsed request (its query string), e.g. ``GET /route?url=...``.

Rules: bounded request size; one request per connection is enough; never serves a private key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import parse_qs

import h11

from meshproxy.config.model import HostPort

log = logging.getLogger(__name__)

_MAX_REQUEST = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminResponse:
    status: int
    body: bytes
    content_type: bytes = b"text/plain"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminRequest:
    """What a ``WithRequest`` route reads: the method, the path and the decoded query string."""

    method: str
    path: str
    query: Mapping[str, tuple[str, ...]]

    def param(self, name: str) -> str | None:
        """The first value of a query parameter, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def params(self, name: str) -> tuple[str, ...]:
        """Every value of a repeated query parameter, in order."""
        return self.query.get(name, ())


@dataclass(frozen=True, slots=True)
class WithRequest:
    """An admin route that reads the request; plain routes are called with no argument."""

    handler: Callable[[AdminRequest], AdminResponse]


@dataclass(frozen=True, slots=True)
class Deferred:
    """An admin route that must wait for something (the supervisor asking its workers)."""

    handler: Callable[[AdminRequest], Awaitable[AdminResponse]]


AdminRoute = Callable[[], AdminResponse] | WithRequest | Deferred


class AdminServer:
    def __init__(self, address: HostPort, routes: Mapping[tuple[str, str], AdminRoute]) -> None:
        self.address = address
        self.routes = routes
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, self.address.host, self.address.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _dispatch(self, method: str, target: str) -> AdminResponse:
        path, _, query = target.partition("?")
        route = self.routes.get((method, path))
        if isinstance(route, Deferred):
            parsed = parse_qs(query, keep_blank_values=True)
            return await route.handler(
                AdminRequest(
                    method=method,
                    path=path,
                    query=MappingProxyType({k: tuple(v) for k, v in parsed.items()}),
                )
            )
        if isinstance(route, WithRequest):
            parsed = parse_qs(query, keep_blank_values=True)
            request = AdminRequest(
                method=method,
                path=path,
                query=MappingProxyType({k: tuple(v) for k, v in parsed.items()}),
            )
            return route.handler(request)
        if route is not None:
            return route()
        if any(p == path for _, p in self.routes):
            return AdminResponse(status=405, body=b"method not allowed\n")
        listing = "\n".join(sorted(f"{m} {p}" for m, p in self.routes)) + "\n"
        return AdminResponse(status=404, body=listing.encode())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            request: h11.Request | None = None
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), timeout=10)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    continue
                if isinstance(event, h11.EndOfMessage) or not isinstance(event, h11.Data):
                    break
            if request is None:
                return
            response = await self._dispatch(request.method.decode(), request.target.decode())
            headers: list[tuple[bytes, bytes]] = [
                (b"content-type", response.content_type),
                (b"content-length", b"%d" % len(response.body)),
                (b"connection", b"close"),
            ]
            writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
            writer.write(conn.send(h11.Data(data=response.body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (h11.ProtocolError, OSError, TimeoutError) as exc:
            log.debug("admin connection error: %s", exc)
        finally:
            writer.close()
