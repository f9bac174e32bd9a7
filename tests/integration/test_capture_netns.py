"""Transparent capture for real: network namespaces, a veth pair, iptables, meshproxy as uid 1337.

Namespace A is the pod: ``meshproxy iptables --apply`` writes Istio's nat rules there, meshproxy
runs there as uid/gid 1337 (Istio's proxy user), and an unmodified client (curl, as root) calls a
service's address. Namespace B is the service: plain HTTP servers that echo what they received.
The two are joined by a veth pair with addresses from 10.254.0.0/30, which exist only on the
interfaces this test creates; nothing leaves the namespaces, and the fixture removes them (and the
processes in them) even when a test fails. Names carry the pid, so parallel runs do not collide.

What it shows: the app's connection to the ServiceEntry's address is redirected to the outbound
listener (the proxy's own upstream connection is not, or it would loop), the proxy recovers the
original destination, routes by the ServiceEntry whose ``addresses`` hold it, and applies its
VirtualService (subset v2 on another port, a response header); an address no ServiceEntry has is
passed through to that original address whatever the Host header says; and a connection from B to
the app's port in A is redirected to the inbound listener. A second pair of namespaces does the
outbound part over IPv6 (fd00:254::/64, ``--ipv6``: ip6tables and ``IP6T_SO_ORIGINAL_DST``).

Skips only where the kernel refuses network namespaces (``ip netns add`` fails with EPERM);
CI runs as root, where it must pass. Needs ``ip`` (iproute2), ``iptables`` and ``curl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from helpers import free_env

PID = os.getpid()
PROXY_UID = 1337
REPO = Path(__file__).resolve().parents[2]

ECHO_SERVER = """\
import http.server, json, socket, sys, threading

class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({
            "port": self.server.server_address[1],
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET

servers = [Server((sys.argv[1], int(p)), Echo) for p in sys.argv[2:]]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # serve until the test closes our stdin
"""


def mesh_config(svc_ip: str, any_ip: str) -> str:
    return f"""\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {{name: app, namespace: default}}
spec:
  admin: 127.0.0.1:15000
  # Istio's ports: the REDIRECT targets (run as `meshproxy iptables --apply` wrote them).
  outbound: {{address: "{any_ip}:15001"}}
  inbound: {{address: "{any_ip}:15006", app: 127.0.0.1:8000}}
  outboundTrafficPolicy: ALLOW_ANY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc, namespace: default}}
spec:
  hosts: [svc.capture.test]
  addresses: ["{svc_ip}"]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: "{svc_ip}", ports: {{http: 8080}}, labels: {{version: v1}}}}
  - {{address: "{svc_ip}", ports: {{http: 8081}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc, namespace: default}}
spec:
  host: svc.capture.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc, namespace: default}}
spec:
  hosts: [svc.capture.test]
  http:
  - name: canary
    route: [{{destination: {{host: svc.capture.test, subset: v2}}}}]
    headers: {{response: {{set: {{x-mesh-route: v2}}}}}}
"""


def as_user(uid: int) -> list[str]:
    """``setpriv`` to run as ``uid``/``gid``. The interpreter may live under a directory only
    root can enter (pyenv in /root), so the process keeps CAP_DAC_READ_SEARCH (read any file) and
    nothing else; netfilter's ``-m owner`` matches the uid, whatever the capabilities."""
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    ]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


def _must(*args: str) -> None:
    done = _ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


class Lines:
    """A process's stdout lines, read by a thread, awaited with a timeout (never slept for)."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        for line in self.seen:
            if needle in line:
                return line
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line with {needle!r} in {timeout}s: {self.seen}"
                ) from None
            if line is None:
                raise AssertionError(f"stream ended before {needle!r}: {self.seen}")
            self.seen.append(line)
            if needle in line:
                return line


@dataclass
class Pod:
    """The two namespaces and what runs in them."""

    tmp: Path
    ns_app: str  # the pod: app, sidecar, capture rules
    ns_svc: str  # the service
    app_ip: str
    svc_ip: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    proxy: subprocess.Popen[str] | None = None
    proxy_out: Lines | None = None

    def start(self, ns: str, *argv: str, user: int | None = None) -> subprocess.Popen[str]:
        prefix = ["ip", "netns", "exec", ns]
        if user is not None:
            prefix += as_user(user)
        env = free_env()
        env["PYTHONPATH"] = str(REPO)
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        return proc

    def echo(self, ns: str, bind: str, *ports: int) -> None:
        proc = self.start(ns, sys.executable, str(self.tmp / "echo.py"), bind, *map(str, ports))
        assert proc.stdout is not None
        Lines(proc.stdout).wait_for("ready")

    def curl(self, ns: str, url: str, *extra: str) -> tuple[dict[str, str], dict[str, object]]:
        """An unmodified client in ``ns`` (root): response headers and the echoed JSON body."""
        curl = ["curl", "-sS", "-g", "--noproxy", "*", "-m", "5", "-D", "-", *extra, url]
        done = subprocess.run(
            ["ip", "netns", "exec", ns, *curl],
            capture_output=True,
            text=True,
            timeout=15,
            env=free_env(),
            check=False,
        )
        assert done.returncode == 0, f"curl {url}: {done.stderr.strip()}"
        head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
        lines = head.splitlines()
        assert lines[0].split()[1] == "200", done.stdout
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        return headers, json.loads(body)

    def meshproxy(
        self, ns: str, *args: str, user: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = free_env()
        env["PYTHONPATH"] = str(REPO)
        prefix = ["ip", "netns", "exec", ns, *(as_user(user) if user is not None else [])]
        return subprocess.run(
            [*prefix, sys.executable, "-m", "meshproxy", *args],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            check=False,
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


@contextlib.contextmanager
def running_pod(tag: str, app_ip: str, svc_ip: str, prefix_len: int) -> Iterator[Pod]:
    """Namespaces A (pod) and B (service) joined by a veth pair; capture applied in A (with
    ``--ipv6`` for IPv6 addresses); the echo servers and meshproxy running. All removed after."""
    v6 = ":" in svc_ip
    ns_app, ns_svc = f"mpcap{tag}A{PID}", f"mpcap{tag}B{PID}"
    veth_app, veth_svc = f"mp{tag}a{PID}"[:15], f"mp{tag}b{PID}"[:15]
    probe = _ip("netns", "add", ns_app)
    if probe.returncode != 0 and (
        "Operation not permitted" in probe.stderr or "Permission denied" in probe.stderr
    ):
        reason = f"the kernel refuses network namespaces here: {probe.stderr.strip()}"
        # CI runs as root with namespaces available and sets MESHPROXY_REQUIRE_PEERS=1: a
        # refusal there is a failure, not a skip.
        if os.environ.get("MESHPROXY_REQUIRE_PEERS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    assert probe.returncode == 0, f"ip netns add: {probe.stderr.strip()}"
    tmp = Path(tempfile.mkdtemp(prefix="meshproxy-capture-"))
    pod = Pod(tmp, ns_app=ns_app, ns_svc=ns_svc, app_ip=app_ip, svc_ip=svc_ip)
    try:
        _must("netns", "add", ns_svc)
        _must("link", "add", veth_app, "type", "veth", "peer", "name", veth_svc)
        _must("link", "set", veth_app, "netns", ns_app)
        _must("link", "set", veth_svc, "netns", ns_svc)
        for ns, dev, addr in ((ns_app, veth_app, app_ip), (ns_svc, veth_svc, svc_ip)):
            # nodad: an IPv6 address is usable at once, not after duplicate address detection.
            extra = ["nodad"] if v6 else []
            _must("-n", ns, "addr", "add", f"{addr}/{prefix_len}", "dev", dev, *extra)
            _must("-n", ns, "link", "set", dev, "up")
            _must("-n", ns, "link", "set", "lo", "up")
        # The proxy runs as uid 1337 and must read its config (mkdtemp makes the dir 0700).
        tmp.chmod(0o755)
        (tmp / "echo.py").write_text(ECHO_SERVER)
        (tmp / "mesh.yaml").write_text(mesh_config(svc_ip, "[::]" if v6 else "0.0.0.0"))
        # The service: v1 on 8080, v2 on 8081, and 9090 that no ServiceEntry declares.
        pod.echo(ns_svc, "::" if v6 else "0.0.0.0", 8080, 8081, 9090)
        # The app's own server in the pod, for inbound capture (reached through 15006).
        pod.echo(ns_app, "127.0.0.1", 8000)
        applied = pod.meshproxy(ns_app, "iptables", "--apply", *(["--ipv6"] if v6 else []))
        assert applied.returncode == 0, applied.stderr
        proxy = pod.start(
            ns_app,
            sys.executable,
            "-m",
            "meshproxy",
            "--log-level",
            "warning",
            "run",
            "-c",
            str(tmp / "mesh.yaml"),
            "--access-log",
            "-",
            user=PROXY_UID,
        )
        assert proxy.stdout is not None
        pod.proxy, pod.proxy_out = proxy, Lines(proxy.stdout)
        try:
            pod.proxy_out.wait_for("meshproxy ready:", timeout=15)
        except AssertionError:
            proxy.kill()
            err = proxy.stderr.read() if proxy.stderr is not None else ""
            raise AssertionError(f"meshproxy did not start: {err}") from None
        yield pod
    finally:
        pod.close()
        _ip("netns", "del", ns_app)
        _ip("netns", "del", ns_svc)  # deleting B's end's namespace removes the veth pair
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    # Addresses only on the veth pair this test creates (a private /30).
    with running_pod("4", "10.254.0.1", "10.254.0.2", 30) as running:
        yield running


@pytest.fixture(scope="module")
def pod6() -> Iterator[Pod]:
    # A unique local (fd00::/8) /64 on the veth pair, for ip6tables and IP6T_SO_ORIGINAL_DST.
    with running_pod("6", "fd00:254::1", "fd00:254::2", 64) as running:
        yield running


def _proxy_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_capture_rules_are_in_the_pods_namespace(pod: Pod) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", pod.ns_app, "iptables", "-t", "nat", "-S"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" in done.stdout
    assert "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN" in done.stdout
    assert "--to-ports 15001" in done.stdout
    assert pod.proxy is not None and _proxy_uid(pod.proxy.pid) == PROXY_UID


def test_app_call_to_a_service_address_gets_its_virtual_service(pod: Pod) -> None:
    headers, body = pod.curl(pod.ns_app, f"http://{pod.svc_ip}:8080/hello")
    # The VirtualService applied: subset v2 (port 8081) answered, with the rule's header.
    assert body["port"] == 8081
    assert headers["x-mesh-route"] == "v2"
    assert body["path"] == "/hello"
    seen = body["headers"]
    assert isinstance(seen, dict)
    assert seen["host"] == f"{pod.svc_ip}:8080"  # the app's Host header travels unchanged
    assert "x-request-id" in seen  # added by the proxy; curl sends none
    assert pod.proxy_out is not None
    line = pod.proxy_out.wait_for('"GET /hello HTTP/1.1" 200')
    assert f'"{pod.svc_ip}:8081" outbound|8080|v2|svc.capture.test outbound' in line


def test_unknown_address_passes_through_to_the_original_destination(pod: Pod) -> None:
    # No ServiceEntry has port 9090; the Host header names a host that does not resolve.
    # ALLOW_ANY passes it through to where the app connected (PassthroughCluster is ORIGINAL_DST).
    headers, body = pod.curl(
        pod.ns_app, f"http://{pod.svc_ip}:9090/through", "-H", "Host: nowhere.invalid"
    )
    assert body["port"] == 9090
    seen = body["headers"]
    assert isinstance(seen, dict) and seen["host"] == "nowhere.invalid"
    assert "x-mesh-route" not in headers
    assert pod.proxy_out is not None
    line = pod.proxy_out.wait_for('"GET /through HTTP/1.1" 200')
    assert f'"{pod.svc_ip}:9090" PassthroughCluster outbound' in line


def test_inbound_connection_is_redirected_to_the_inbound_listener(pod: Pod) -> None:
    # From the service's namespace to the app's port in the pod: PREROUTING -> 15006 -> app.
    _, body = pod.curl(pod.ns_svc, f"http://{pod.app_ip}:8000/in")
    assert body["port"] == 8000
    assert body["path"] == "/in"
    seen = body["headers"]
    assert isinstance(seen, dict) and "x-request-id" in seen  # the inbound listener added it
    assert pod.proxy_out is not None
    line = pod.proxy_out.wait_for('"GET /in HTTP/1.1" 200')
    assert line.endswith(" inbound")


def test_applying_twice_is_refused_with_a_clear_error(pod: Pod) -> None:
    again = pod.meshproxy(pod.ns_app, "iptables", "--apply")
    assert again.returncode == 4
    assert "iptables-restore refused the rules" in again.stderr
    assert "capture was applied before" in again.stderr


def test_applying_without_root_is_refused_with_a_clear_error(pod: Pod) -> None:
    # As the proxy's user (no CAP_NET_ADMIN), iptables-restore itself refuses.
    done = pod.meshproxy(pod.ns_app, "iptables", "--apply", user=PROXY_UID)
    assert done.returncode == 4
    assert "iptables-restore refused the rules" in done.stderr
    assert "needs root or CAP_NET_ADMIN" in done.stderr


def url(ip: str, port: int, path: str) -> str:
    return f"http://[{ip}]:{port}{path}" if ":" in ip else f"http://{ip}:{port}{path}"


def test_ipv6_app_call_gets_its_virtual_service_and_passthrough(pod6: Pod) -> None:
    headers, body = pod6.curl(pod6.ns_app, url(pod6.svc_ip, 8080, "/six"))
    assert body["port"] == 8081
    assert headers["x-mesh-route"] == "v2"
    assert pod6.proxy_out is not None
    line = pod6.proxy_out.wait_for('"GET /six HTTP/1.1" 200')
    assert f'"[{pod6.svc_ip}]:8081" outbound|8080|v2|svc.capture.test outbound' in line
    _, body = pod6.curl(
        pod6.ns_app, url(pod6.svc_ip, 9090, "/six-through"), "-H", "Host: nowhere.invalid"
    )
    assert body["port"] == 9090
    line = pod6.proxy_out.wait_for('"GET /six-through HTTP/1.1" 200')
    assert f'"[{pod6.svc_ip}]:9090" PassthroughCluster outbound' in line
