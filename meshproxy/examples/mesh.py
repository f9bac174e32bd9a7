"""The demo mesh: bookinfo's five workloads, each an app behind its own meshproxy sidecar.

Owns starting and stopping the local mesh of ``meshproxy demo`` in one process, from the plain
Istio YAML shipped in ``bookinfo/``: ``mesh/<service>.yaml`` holds each service's ServiceEntry,
DestinationRule and (for reviews) VirtualService; ``sidecars/<workload>.yaml`` holds each sidecar's
MeshProxy bootstrap. A workload is an app (``services.py``) and an in-process ``meshproxy.app.App``:
its inbound listener in front of the app, its outbound listener for the app's calls.

Ports. The YAML names fixed loopback ports, four per workload (app, sidecar inbound, sidecar
outbound, admin: 19080-19083 for productpage-v1, and so on; examples/README.md lists them), so that
the curl lines printed by the demo and the YAML read by hand agree. ``Ports.AUTO`` lets the kernel
pick free ports instead and rewrites the YAML's port numbers in memory before loading it; it is what
tests use, and what ``Ports.FIXED`` falls back to when a fixed port is taken.

Rules: a sidecar starts only once the endpoints it routes to are listening (callees first), and it
loads only the mesh files of the services its app calls, as an Istio ``Sidecar`` resource's egress
hosts would scope it; so no port has to be known before it is bound, and no port is probed first.
Everything started is closed by ``close()``, callers first, even after a failed start.
"""

from __future__ import annotations

import enum
import errno
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from meshproxy.app import App
from meshproxy.config.load import load_texts
from meshproxy.config.model import HostPort, MeshConfig
from meshproxy.examples.services import BookinfoApp

BOOKINFO = Path(__file__).parent / "bookinfo"
MESH_DIR = BOOKINFO / "mesh"
SIDECARS_DIR = BOOKINFO / "sidecars"
# Binding a fixed port can fail for these reasons, each a cue to use free ports instead.
_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


class Ports(enum.Enum):
    FIXED = "fixed"  # the ports written in the YAML; free ones instead if one of them is taken
    AUTO = "auto"  # free ports picked by the kernel; the YAML is rewritten in memory to match


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    service: str
    version: str
    calls: tuple[str, ...] = ()  # the services its app calls through its sidecar

    @property
    def name(self) -> str:
        return f"{self.service}-{self.version}"

    @property
    def bootstrap(self) -> Path:
        return SIDECARS_DIR / f"{self.name}.yaml"

    @property
    def files(self) -> tuple[Path, ...]:
        """The config its sidecar loads: its bootstrap and the mesh files of what it calls."""
        return (self.bootstrap, *(MESH_DIR / f"{service}.yaml" for service in self.calls))


# Callees before callers: a sidecar starts once the endpoints it routes to are listening.
WORKLOADS: tuple[Workload, ...] = (
    Workload(service="ratings", version="v1"),
    Workload(service="reviews", version="v1"),
    Workload(service="reviews", version="v2", calls=("ratings",)),
    Workload(service="reviews", version="v3", calls=("ratings",)),
    Workload(service="productpage", version="v1", calls=("reviews",)),
)


def rewrite_ports(text: str, ports: Mapping[int, int]) -> str:
    """``text`` with each whole number that is a key of ``ports`` replaced by its value."""
    if not ports:
        return text
    pattern = re.compile(r"(?<!\d)(" + "|".join(str(p) for p in ports) + r")(?!\d)")
    return pattern.sub(lambda m: str(ports[int(m.group(1))]), text)


class _AccessLogSink(io.StringIO):
    """One sidecar's access log: each line prefixed with the workload, written to a shared stream.

    A ``StringIO`` only to be the ``TextIO`` that ``App`` takes; it keeps nothing.
    """

    def __init__(self, out: TextIO, prefix: str, mesh: Mesh) -> None:
        super().__init__()
        self._out = out
        self._prefix = prefix
        self._mesh = mesh

    def write(self, s: str, /) -> int:
        if self._mesh.access_log_enabled:
            self._out.write(self._prefix + s)
        return len(s)

    def flush(self) -> None:
        if self._mesh.access_log_enabled:
            self._out.flush()


@dataclass(slots=True, kw_only=True)
class Running:
    """A started workload: its app, its sidecar and the config that sidecar runs."""

    workload: Workload
    documented: MeshConfig  # the sidecar's config as shipped, with the YAML's fixed ports
    app: BookinfoApp
    sidecar: App | None = None

    @property
    def config(self) -> MeshConfig:
        assert self.sidecar is not None
        return self.sidecar.config

    def _listener(self, name: str) -> HostPort:
        assert self.sidecar is not None
        listener = self.sidecar.listeners[name]
        return HostPort(host=listener.address.host, port=listener.port)

    @property
    def app_address(self) -> HostPort:
        inbound = self.config.bootstrap.spec.inbound
        assert inbound is not None
        return HostPort(host=inbound.app.host, port=self.app.port)

    @property
    def inbound(self) -> HostPort:
        return self._listener("inbound")

    @property
    def outbound(self) -> HostPort:
        return self._listener("outbound")

    @property
    def admin(self) -> HostPort:
        assert self.sidecar is not None and self.sidecar.admin is not None
        return HostPort(host=self.sidecar.admin.address.host, port=self.sidecar.admin.port)


class Mesh:
    """The five workloads of the demo, started and closed together."""

    def __init__(self, ports: Ports = Ports.FIXED, *, access_log: TextIO | None = None) -> None:
        self.ports = ports
        self.running: dict[str, Running] = {}
        # Why the fixed ports were not used (FIXED only): the error that binding one of them gave.
        self.fallback: str | None = None
        # The sidecars' access logs go to ``access_log`` while this is true.
        self.access_log_enabled = False
        self._access_log = access_log

    def __getitem__(self, name: str) -> Running:
        return self.running[name]

    def __iter__(self) -> Iterator[Running]:
        return iter(self.running.values())

    @property
    def fixed(self) -> bool:
        """Whether the mesh runs on the ports written in the YAML."""
        return self.ports is Ports.FIXED and self.fallback is None

    async def start(self) -> None:
        if self.ports is Ports.FIXED:
            try:
                await self._start(auto=False)
                return
            except OSError as exc:
                if exc.errno not in _BIND_ERRORS:
                    raise
                self.fallback = str(exc)
        await self._start(auto=True)

    async def _start(self, *, auto: bool) -> None:
        # documented port of a sidecar inbound listener -> the port it is bound to
        inbound_ports: dict[int, int] = {}
        try:
            for workload in WORKLOADS:
                sources = [(str(p), p.read_text(encoding="utf-8")) for p in workload.files]
                documented = load_texts(sources)
                spec = documented.bootstrap.spec
                if spec.inbound is None or spec.outbound is None:
                    raise RuntimeError(
                        f"{workload.bootstrap}: a demo sidecar needs inbound and outbound listeners"
                    )
                app = BookinfoApp(workload.service, workload.version)
                running = Running(workload=workload, documented=documented, app=app)
                self.running[workload.name] = running
                app_port = spec.inbound.app.port
                await app.start(spec.inbound.app.host, 0 if auto else app_port)
                config = documented
                if auto:
                    ports = {
                        **inbound_ports,
                        app_port: app.port,
                        spec.inbound.address.port: 0,
                        spec.outbound.address.port: 0,
                        spec.admin.port: 0,
                    }
                    config = load_texts([(f, rewrite_ports(t, ports)) for f, t in sources])
                _check_endpoints(workload, config, set(inbound_ports.values()))
                running.sidecar = App(config, access_log=self._sink(workload))
                await running.sidecar.start()
                outbound = running.outbound
                app.sidecar = (outbound.host, outbound.port)
                inbound_ports[spec.inbound.address.port] = running.inbound.port
        except BaseException:
            await self.close()
            raise

    def _sink(self, workload: Workload) -> TextIO | None:
        if self._access_log is None:
            return None
        width = max(len(w.name) for w in WORKLOADS)
        return _AccessLogSink(self._access_log, f"{workload.name:<{width}} | ", self)

    async def close(self) -> None:
        """Close every sidecar and app started, the callers first; safe to call again."""
        while self.running:
            _, running = self.running.popitem()
            try:
                if running.sidecar is not None:
                    await running.sidecar.close()
            finally:
                await running.app.close()


def _check_endpoints(workload: Workload, config: MeshConfig, started: set[int]) -> None:
    """Every endpoint a sidecar may route to must be a sidecar inbound listener already started."""
    for entry in config.service_entries:
        for endpoint in entry.spec.endpoints:
            for port in endpoint.ports.values():
                if port not in started:
                    raise RuntimeError(
                        f"{workload.name}: ServiceEntry {entry.metadata.name} has an endpoint on "
                        f"port {port}, which is not the inbound listener of a workload started "
                        "before it (see WORKLOADS)"
                    )
