"""Shared test parts: real upstream servers, a running meshproxy, raw HTTP clients.

Everything here binds port 0 on loopback and reads the port back; readiness is awaited, never slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import h11

from meshproxy.app import App
from meshproxy.config.load import load_texts

# --------------------------------------------------------------------------------------------
# Upstream: a real HTTP/1.1 server (h11) whose behaviour each test chooses.


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection_id: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b"ok"


Handler = Callable[[SeenRequest], Awaitable[Reply] | Reply]


def _default_handler(req: SeenRequest) -> Reply:
    return Reply(body=f"{req.method} {req.target}".encode())


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.req: h11.Request | None = None
        self.body = bytearray()
        self.id = 0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.server.connections += 1
        self.id = self.server.connections
        self.server.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)
        self.server.closed += 1
        self.server.closed_event.set()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def _process(self) -> None:
        while not self.busy:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                assert self.transport is not None
                self.transport.close()
                return
            if isinstance(event, h11.Request):
                self.req = event
                self.body = bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self.req is not None
                seen = SeenRequest(
                    method=self.req.method.decode(),
                    target=self.req.target.decode(),
                    headers=[(k.decode(), v.decode()) for k, v in self.req.headers],
                    body=bytes(self.body),
                    connection_id=self.id,
                )
                self.server.requests.append(seen)
                self.busy = True
                task = asyncio.get_running_loop().create_task(self._respond(seen))
                self.server.tasks.add(task)
                task.add_done_callback(self.server.tasks.discard)
                return
            else:
                return

    async def _respond(self, seen: SeenRequest) -> None:
        assert self.transport is not None
        result = self.server.handler(seen)
        reply = await result if asyncio.iscoroutine(result) else result
        assert isinstance(reply, Reply)
        if self.transport.is_closing():
            return
        headers = list(reply.headers)
        if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
            headers.append(("content-length", str(len(reply.body))))
        try:
            out = [self.conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""]
            if reply.body and seen.method != "HEAD":
                out.append(self.conn.send(h11.Data(data=reply.body)) or b"")
            out.append(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            self.transport.close()
            return
        self.transport.writelines(out)
        if self.conn.our_state is h11.MUST_CLOSE or self.server.close_after_response:
            self.transport.close()
            return
        self.conn.start_next_cycle()
        self.busy = False
        self._process()


class Upstream:
    """A real HTTP/1.1 server on 127.0.0.1:<ephemeral> recording what it receives."""

    def __init__(self, handler: Handler = _default_handler) -> None:
        self.handler: Handler = handler
        self.requests: list[SeenRequest] = []
        self.connections = 0
        self.closed = 0
        self.open: set[_UpstreamProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.close_after_response = False
        self.closed_event = asyncio.Event()

    async def wait_closed(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` connections in all have been closed."""
        async with asyncio.timeout(timeout):
            while self.closed < count:
                self.closed_event.clear()
                await self.closed_event.wait()

    async def start(self) -> Upstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _UpstreamProtocol(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def drop_idle_connections(self) -> None:
        """Close every connection between requests, as an app with a short idle timeout does."""
        for proto in list(self.open):
            if proto.transport is not None and not proto.busy:
                proto.transport.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for proto in list(self.open):
            if proto.transport is not None:
                proto.transport.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def upstream(handler: Handler = _default_handler) -> AsyncIterator[Upstream]:
    server = await Upstream(handler).start()
    try:
        yield server
    finally:
        await server.stop()


# --------------------------------------------------------------------------------------------
# Config and a running proxy


# spec.http1Codec for bootstrap(): pytest --http1-codec=httptools runs the suite on the other codec.
HTTP1_CODEC = "h11"


def bootstrap(
    *,
    policy: str = "REGISTRY_ONLY",
    inbound_app: int | None = None,
    drain: str = "5s",
    extra: str = "",
) -> str:
    inbound = (
        f"  inbound:\n    address: 127.0.0.1:0\n    app: 127.0.0.1:{inbound_app}\n"
        if inbound_app
        else ""
    )
    return (
        "apiVersion: meshproxy.io/v1alpha1\n"
        "kind: MeshProxy\n"
        "metadata: {name: app-v1, namespace: default}\n"
        "spec:\n"
        "  serviceAccount: app\n"
        "  admin: 127.0.0.1:0\n"
        "  outbound:\n    address: 127.0.0.1:0\n"
        f"{inbound}"
        f"  outboundTrafficPolicy: {policy}\n"
        f"  drainDuration: {drain}\n"
        f"{'' if 'http1Codec' in extra else f'  http1Codec: {HTTP1_CODEC}{chr(10)}'}"
        f"{textwrap.indent(extra, '  ') if extra else ''}"
    )


def service_entry(
    name: str,
    ports: Sequence[int],
    *,
    port: int = 9080,
    host: str | None = None,
    namespace: str = "default",
    extra_spec: str = "",
) -> str:
    endpoints = "".join(
        f"  - address: 127.0.0.1\n    ports: {{http: {p}}}\n    labels: {{version: v{i + 1}}}\n"
        for i, p in enumerate(ports)
    )
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n"
        f"  hosts: [{host or name}]\n"
        f"  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n"
        "  resolution: STATIC\n"
        f"  endpoints:\n{endpoints}"
        f"{extra_spec}"
    )


def join(*docs: str) -> str:
    return "---\n".join(d if d.endswith("\n") else d + "\n" for d in docs)


@dataclass
class RunningProxy:
    app: App

    @property
    def port(self) -> int:
        return self.app.listeners["outbound"].port

    @property
    def inbound_port(self) -> int:
        return self.app.listeners["inbound"].port

    @property
    def admin_port(self) -> int:
        assert self.app.admin is not None
        return self.app.admin.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def proxy(config_text: str, **kwargs: typing.Any) -> AsyncIterator[RunningProxy]:
    app = App(load_texts([("test.yaml", config_text)]), seed=1, **kwargs)
    await app.start()
    try:
        yield RunningProxy(app)
    finally:
        await app.close()


# --------------------------------------------------------------------------------------------
# Raw clients


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes the connection (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=timeout)
    finally:
        writer.close()


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class RawClient:
    """A keep-alive HTTP/1.1 client over one TCP connection, parsing responses with h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        timeout: float = 5.0,
    ) -> RawResponse:
        hdrs = list(headers)
        if body and not any(k.lower() == "content-length" for k, _ in hdrs):
            hdrs.append(("content-length", str(len(body))))
        self.writer.write(self.conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        return await asyncio.wait_for(self._read_response(), timeout=timeout)

    async def _read_response(self) -> RawResponse:
        status = 0
        headers: list[tuple[str, str]] = []
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = [(k.decode(), v.decode()) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return RawResponse(status, headers, bytes(body))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# --------------------------------------------------------------------------------------------
# meshproxy as a separate process (for signals and memory measurements)


class ProxyProcess:
    def __init__(self, config_path: str, *args: str) -> None:
        self.config_path = config_path
        self.args = args  # more `meshproxy run` options
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    async def start(self, timeout: float = 20.0) -> ProxyProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshproxy",
                "--log-level",
                "warning",
                "run",
                "-c",
                self.config_path,
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(
            loop.run_in_executor(None, self.proc.stdout.readline), timeout
        )
        text = line.decode().strip()
        if not text.startswith("meshproxy ready:"):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            raise RuntimeError(f"meshproxy did not start: {text!r} {err.decode()}")
        for part in text.split(":", 1)[1].split():
            name, addr = part.split("=", 1)
            self.ports[name] = int(addr.rsplit(":", 1)[1])
        return self

    async def line(self, prefix: str, timeout: float = 10.0) -> str:
        """The next stdout line starting with ``prefix`` (e.g. ``meshproxy reloaded:``); other
        lines are skipped. Raises TimeoutError, or EOFError when the process closed stdout."""
        assert self.proc is not None and self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                raw = await loop.run_in_executor(None, self.proc.stdout.readline)
                if not raw:
                    raise EOFError(f"meshproxy closed stdout before a line {prefix!r}")
                text = raw.decode().strip()
                if text.startswith(prefix):
                    return text

    def parse_ports(self, line: str) -> dict[str, tuple[str, int]]:
        """``name=host:port`` pairs of a ready or reloaded line."""
        out: dict[str, tuple[str, int]] = {}
        for part in line.split():
            name, sep, addr = part.partition("=")
            if sep and ":" in addr and name != "version":
                host, _, port = addr.rpartition(":")
                out[name] = (host, int(port))
        return out

    def stderr_text(self) -> str:
        """Everything the process wrote on stderr (once it has exited)."""
        assert self.proc is not None and self.proc.stderr is not None
        assert self.proc.poll() is not None, "read stderr after the process exits"
        return self.proc.stderr.read().decode()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout)

    def rss_kib(self) -> int:
        return _status_field(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return _status_field(self.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def free_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    return env


def svc_destination_rule(traffic_policy: str) -> str:
    """A DestinationRule for host ``svc`` whose trafficPolicy is ``traffic_policy`` (YAML)."""
    policy = textwrap.indent(textwrap.dedent(traffic_policy).strip("\n"), "    ")
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        "metadata: {name: svc, namespace: default}\n"
        "spec:\n"
        "  host: svc\n"
        "  trafficPolicy:\n"
        f"{policy}\n"
    )


def svc_virtual_service(route: str) -> str:
    """A VirtualService for ``svc`` whose one HTTP route also carries ``route`` (YAML fields)."""
    fields = textwrap.indent(textwrap.dedent(route).strip("\n"), "    ")
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata: {name: svc, namespace: default}\n"
        "spec:\n"
        "  hosts: [svc]\n"
        "  http:\n"
        "  - route:\n"
        "    - destination: {host: svc}\n"
        f"{fields}\n"
    )
