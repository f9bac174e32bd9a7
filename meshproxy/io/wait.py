"""Waiting for a proxy to be ready: ``GET /ready`` on its admin address until it answers 200.

Owns the client side of ``meshproxy wait`` (a postStart hook or a container entrypoint holds the
app until its sidecar is ready, as ``pilot-agent wait`` does for Istio's
``holdApplicationUntilProxyStarts``; reference §6 #1). It polls with a bounded exponential backoff
(50 ms doubling to 500 ms), each try bounded too, until the deadline, and remembers what it last
saw so that a timeout can say why: connection refused, no answer, or ``503 STARTING``.

Rules: one short HTTP/1.1 exchange per try (h11, ``connection: close``); never retries past the
deadline; foreign errors become a one-line description, never a traceback.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11

from meshproxy.config.model import HostPort

FIRST_DELAY = 0.05
MAX_DELAY = 0.5
_TRY_TIMEOUT = 2.0  # one probe; the admin server answers in microseconds when it is up
_MAX_RESPONSE = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitResult:
    ready: bool
    last: str  # what the last try saw: "200 LIVE", "503 STARTING", "connection refused", ...
    tries: int


async def probe(address: HostPort, path: str = "/ready") -> tuple[int, str]:
    """One ``GET path``: the status and the body's first line."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE)
        host = str(address).encode()
        headers = [(b"host", host), (b"connection", b"close"), (b"user-agent", b"meshproxy-wait")]
        writer.write(conn.send(h11.Request(method="GET", target=path, headers=headers)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_RESPONSE:
                    break
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        text = bytes(body).decode("utf-8", "replace").strip().splitlines()
        return status, text[0] if text else ""
    finally:
        writer.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {_TRY_TIMEOUT:g}s"
    if isinstance(exc, h11.ProtocolError):
        return f"not an HTTP answer ({exc})"
    return str(exc) or type(exc).__name__


async def wait_ready(address: HostPort, timeout: float) -> WaitResult:
    """Poll ``GET /ready`` until 200 or ``timeout`` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = FIRST_DELAY
    last = "nothing yet"
    tries = 0
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return WaitResult(ready=False, last=last, tries=tries)
        tries += 1
        try:
            async with asyncio.timeout(min(remaining, _TRY_TIMEOUT)):
                status, line = await probe(address)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            last = _describe(exc)
        else:
            last = f"{status} {line}".strip()
            if status == 200:
                return WaitResult(ready=True, last=last, tries=tries)
        pause = min(delay, deadline - loop.time())
        if pause > 0:
            await asyncio.sleep(pause)  # the backoff between probes (bounded by the deadline)
        delay = min(delay * 2, MAX_DELAY)
