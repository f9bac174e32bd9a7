"""mTLS interoperability with TLS stacks that are not Python's: curl and ``openssl s_client`` as
mesh clients of a STRICT inbound listener, ``openssl s_server`` as an external upstream the
proxy originates TLS to (DestinationRule ``tls`` SIMPLE and MUTUAL).

The tools are the real binaries (Debian's ``curl`` and ``openssl``, installed by ``.ci/run``),
each bound to or aimed at 127.0.0.1. ``s_server`` binds port 0 itself and prints the port it got
(``ACCEPT 127.0.0.1:<port>``), which is read back: no port is guessed, no readiness is slept for.
Every process is killed and reaped in a ``finally``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshproxy.core.record import RequestRecord
from tests.helpers import RawClient, RunningProxy, bootstrap, join, proxy, upstream
from tests.pki import ExternalFiles, Pki, peer_authentication, sidecar_bootstrap, tls_block

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(
    CURL is None or OPENSSL is None,
    reason="needs the curl and openssl binaries (Debian packages curl, openssl; .ci/run)",
)
TOOL_TIMEOUT = 20.0
SERVED = b"hello from openssl s_server\n"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


# --------------------------------------------------------------------------------------------
# Running the tools


async def run_tool(*args: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    """Run a tool to completion (bounded); its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), TOOL_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


class SServer:
    """A running ``openssl s_server -WWW``: its port and everything it printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.output = bytearray()

    async def drain(self) -> None:
        """Keep reading its output (a full pipe would stall it) until it exits."""
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(4096):
            self.output += chunk

    def served(self, name: str) -> int:
        """How many times it served file ``name`` (``-WWW`` prints ``FILE:<name>`` for each)."""
        return self.output.count(f"FILE:{name}".encode())


@contextlib.asynccontextmanager
async def s_server(root: Path, files: ExternalFiles, *extra: str) -> AsyncIterator[SServer]:
    """``openssl s_server -WWW`` on 127.0.0.1:<ephemeral> serving ``hello.txt`` from ``root``:
    it answers ``GET /hello.txt`` with ``HTTP/1.0 200 ok`` and the file, then closes."""
    assert OPENSSL is not None
    docroot = root / "www"
    docroot.mkdir(exist_ok=True)
    (docroot / "hello.txt").write_bytes(SERVED)
    proc = await asyncio.create_subprocess_exec(
        OPENSSL,
        "s_server",
        "-accept",
        "127.0.0.1:0",
        "-cert",
        str(files.cert),
        "-key",
        str(files.key),
        "-WWW",
        *extra,
        cwd=docroot,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    drain: asyncio.Task[None] | None = None
    try:
        assert proc.stdout is not None
        seen = bytearray()
        port = 0
        async with asyncio.timeout(TOOL_TIMEOUT):  # it prints the port once it listens
            while not port:
                line = await proc.stdout.readline()
                assert line, f"s_server exited before listening: {bytes(seen)!r}"
                seen += line
                if line.startswith(b"ACCEPT "):
                    port = int(line.split(b":")[-1])
        server = SServer(proc, port)
        server.output += seen
        drain = asyncio.get_running_loop().create_task(server.drain(), name="s_server-drain")
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            await asyncio.gather(drain, return_exceptions=True)


def spki_pin(cert_pem: Path) -> str:
    """curl's ``--pinnedpubkey`` form of a certificate's key: ``sha256//`` + base64(SHA-256 of
    the DER SubjectPublicKeyInfo)."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


# --------------------------------------------------------------------------------------------
# Tools as clients of a STRICT inbound listener


@contextlib.asynccontextmanager
async def strict_sidecar(pki: Pki, app_port: int) -> AsyncIterator[tuple[RunningProxy, Path]]:
    """The ``reviews`` sidecar, inbound STRICT; yields it and its certificate file."""
    files = pki.issue("reviews")
    text = join(
        sidecar_bootstrap("reviews", tls_block(files), inbound_app=app_port),
        peer_authentication("STRICT"),
    )
    async with proxy(text) as running:
        yield running, files.cert


def curl_args(port: int, server_cert: Path, pki: Pki, *extra: str) -> list[str]:
    """curl aimed at the STRICT port.

    A mesh workload certificate names its workload in a URI SAN only (no DNS name), and curl
    (7.88, OpenSSL backend) checks host names against DNS/IP SANs only and has no command-line
    switch that turns off the host-name check alone (``-k`` turns off chain and host checks
    together; libcurl's separate ``CURLOPT_SSL_VERIFYHOST`` is not exposed). So the server is
    authenticated by pinning its public key instead, which curl enforces even under ``-k``: a
    stricter check than the chain, since only the holder of that one key passes. (``--cacert``
    names the mesh bundle, but under ``-k`` curl does not use it; the chain check against the
    bundle is what the ``openssl s_client -verify_return_error`` test below does.)
    ``--resolve`` gives the mesh name an address.
    """
    assert CURL is not None
    host = "reviews.default.svc.cluster.local"
    return [
        CURL,
        "--silent",
        "--show-error",
        "--http1.1",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "--resolve",
        f"{host}:{port}:127.0.0.1",
        "--cacert",
        str(pki.bundle),
        "-k",
        "--pinnedpubkey",
        spki_pin(server_cert),
        "--write-out",
        "\n%{http_code}",
        *extra,
        f"https://{host}:{port}/from-curl",
    ]


# Both handshakes: TLS 1.3 (the client finishes first, the server checks its certificate
# after) and TLS 1.2 (the server checks it inside the handshake).
TLS_VERSIONS = pytest.mark.parametrize("tls_max", ["1.2", "1.3"])


@TLS_VERSIONS
async def test_curl_with_a_workload_certificate_passes_strict_and_app_sees_its_identity(
    pki: Pki, tls_max: str
) -> None:
    client = pki.issue("curl")
    async with upstream() as app, strict_sidecar(pki, app.port) as (server, server_cert):
        rc, out, err = await run_tool(
            *curl_args(
                server.inbound_port,
                server_cert,
                pki,
                "--cert",
                str(client.cert),
                "--key",
                str(client.key),
                "--tls-max",
                tls_max,
            )
        )
    assert rc == 0, err.decode()
    body, status = out.rsplit(b"\n", 1)
    assert status == b"200"
    assert body == b"GET /from-curl"
    [seen] = app.requests
    xfcc = seen.header("x-forwarded-client-cert")
    assert xfcc is not None
    # Envoy's XFCC: By= the server's own identity, Hash= SHA-256 of curl's certificate (DER),
    # URI= curl's SPIFFE ID.
    assert xfcc == (
        f'By={pki.uri("reviews")};Hash={client.info.sha256};Subject="";URI={pki.uri("curl")}'
    )
    # The proxy terminated TLS: the app is told so (Envoy sets x-forwarded-proto from the
    # downstream connection).
    assert seen.header("x-forwarded-proto") == "https"


async def test_curl_with_a_wrong_pin_does_not_trust_the_server(pki: Pki) -> None:
    """The pin is a real check: another workload's key fails curl before any request."""
    other = pki.issue("other")
    client = pki.issue("curl")
    async with upstream() as app, strict_sidecar(pki, app.port) as (server, _):
        rc, _, err = await run_tool(
            *curl_args(
                server.inbound_port,
                other.cert,
                pki,
                "--cert",
                str(client.cert),
                "--key",
                str(client.key),
            )
        )
    assert rc == 90, err.decode()  # CURLE_SSL_PINNEDPUBKEYNOTMATCH
    assert app.requests == []


@TLS_VERSIONS
async def test_curl_without_a_client_certificate_is_refused(pki: Pki, tls_max: str) -> None:
    async with upstream() as app, strict_sidecar(pki, app.port) as (server, server_cert):
        rc, out, err = await run_tool(
            *curl_args(server.inbound_port, server_cert, pki, "--tls-max", tls_max)
        )
        listener = server.app.listeners["inbound"]
        async with asyncio.timeout(5):  # counted when the server's handshake task ends
            while not listener.tls_failures:
                await asyncio.sleep(0.01)
        failures = dict(listener.tls_failures)
    # TLS 1.2: the handshake itself fails (CURLE_SSL_CONNECT_ERROR 35). TLS 1.3: curl's
    # handshake ends before the server checks for a certificate, so curl has sent its request
    # when the server gives up: it sees the connection end without a reply (CURLE_GOT_NOTHING
    # 52) or an error on a read (CURLE_RECV_ERROR 56). Never an HTTP answer.
    assert rc in ((35,) if tls_max == "1.2" else (35, 52, 56)), (rc, out, err)
    assert not out.strip(b"\n0")  # "%{http_code}" prints 000 when no response came
    assert app.requests == []
    assert sum(failures.values()) == 1
    assert set(failures) <= {"bad_certificate", "handshake_failed"}


async def test_openssl_s_client_sends_a_raw_request_through_strict(pki: Pki) -> None:
    assert OPENSSL is not None
    client = pki.issue("s-client")
    request = (
        b"GET /from-s-client HTTP/1.1\r\n"
        b"host: reviews.default.svc.cluster.local\r\n"
        b"connection: close\r\n\r\n"
    )
    async with upstream() as app, strict_sidecar(pki, app.port) as (server, _):
        rc, out, err = await run_tool(
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{server.inbound_port}",
            "-cert",
            str(client.cert),
            "-key",
            str(client.key),
            "-CAfile",
            str(pki.bundle),
            # The chain is checked against the mesh bundle and a failure ends the handshake
            # (s_client's default only reports it); no host check: the server is a URI SAN.
            "-verify_return_error",
            "-alpn",
            "http/1.1",
            # -quiet: no session dump, and keep reading after stdin's end (-ign_eof) until the
            # server closes after its answer.
            "-quiet",
            stdin=request,
        )
    assert rc == 0, err.decode()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), out[:200]
    assert body == b"GET /from-s-client"
    [seen] = app.requests
    xfcc = seen.header("x-forwarded-client-cert")
    assert xfcc is not None and xfcc.endswith(f"URI={pki.uri('s-client')}")


async def test_openssl_s_client_trusting_another_ca_fails_the_handshake(
    pki: Pki, tmp_path: Path
) -> None:
    """``-verify_return_error`` is in force: a client that does not trust the mesh CA stops."""
    assert OPENSSL is not None
    client = pki.issue("s-client")
    outsider = ExternalFiles(tmp_path / "outsider", "outsider.example")
    async with upstream() as app, strict_sidecar(pki, app.port) as (server, _):
        rc, out, _ = await run_tool(
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{server.inbound_port}",
            "-cert",
            str(client.cert),
            "-key",
            str(client.key),
            "-CAfile",
            str(outsider.ca),
            "-verify_return_error",
            "-quiet",
            stdin=b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n",
        )
    assert rc != 0
    assert b"HTTP/" not in out
    assert app.requests == []


# --------------------------------------------------------------------------------------------
# openssl s_server as an external upstream (DestinationRule tls SIMPLE / MUTUAL)

# The external service as the mesh names it; the certificate names ext.example, which the
# DestinationRule's `sni` sends and the host-name check verifies (Istio checks the SNI name
# when `subjectAltNames` is empty: VERIFY_CERTIFICATE_AT_CLIENT).
EXTERNAL_HOST = "payments.external"
TLS_NAME = "ext.example"


def external_mesh(port: int, tls: str) -> str:
    """A client sidecar config: a MESH_EXTERNAL ServiceEntry for the app's plain HTTP port 80
    whose endpoint is ``s_server``'s TLS port, and a DestinationRule that originates TLS
    (Istio's "egress TLS origination" pattern)."""
    entry = (
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        "metadata: {name: payments, namespace: default}\n"
        "spec:\n"
        f"  hosts: [{EXTERNAL_HOST}]\n"
        "  location: MESH_EXTERNAL\n"
        "  resolution: STATIC\n"
        "  ports: [{number: 80, name: http, protocol: HTTP}]\n"
        "  endpoints:\n"
        f"  - address: 127.0.0.1\n    ports: {{http: {port}}}\n"
    )
    rule = (
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        "metadata: {name: payments, namespace: default}\n"
        "spec:\n"
        f"  host: {EXTERNAL_HOST}\n"
        "  trafficPolicy:\n"
        f"    tls: {tls}\n"
    )
    return join(bootstrap(), entry, rule)


def sni_checked(files: ExternalFiles) -> tuple[str, ...]:
    """s_server options that serve the certificate only to a client sending SNI ``ext.example``
    and end any other handshake with a fatal alert: proof that the proxy sent ``sni``."""
    return (
        "-servername",
        TLS_NAME,
        "-cert2",
        str(files.cert),
        "-key2",
        str(files.key),
        "-servername_fatal",
    )


async def get_external(running: RunningProxy) -> tuple[int, bytes]:
    client = await RawClient.connect(running.port)
    try:
        resp = await client.request("GET", "/hello.txt", [("host", EXTERNAL_HOST)], timeout=10)
    finally:
        await client.close()
    return resp.status, resp.body


async def test_simple_tls_origination_to_openssl_s_server(tmp_path: Path) -> None:
    external = ExternalFiles(tmp_path / "ext", TLS_NAME)
    records: list[RequestRecord] = []
    async with s_server(tmp_path, external, *sni_checked(external)) as server:
        tls = f"{{mode: SIMPLE, caCertificates: {external.ca}, sni: {TLS_NAME}}}"
        async with proxy(external_mesh(server.port, tls), record_sinks=[records.append]) as px:
            status, body = await get_external(px)
    assert (status, body) == (200, SERVED)
    assert server.served("hello.txt") == 1
    assert records[-1].flags == []


async def test_simple_tls_origination_with_the_wrong_ca_fails_with_uf(tmp_path: Path) -> None:
    external = ExternalFiles(tmp_path / "ext", TLS_NAME)
    stranger = ExternalFiles(tmp_path / "stranger", TLS_NAME)  # another CA, same name
    records: list[RequestRecord] = []
    async with s_server(tmp_path, external) as server:
        tls = f"{{mode: SIMPLE, caCertificates: {stranger.ca}, sni: {TLS_NAME}}}"
        async with proxy(external_mesh(server.port, tls), record_sinks=[records.append]) as px:
            status, body = await get_external(px)
    assert status == 503
    assert body.endswith(b"remote connection failure")
    assert "UF" in records[-1].flags
    assert server.served("hello.txt") == 0


async def test_simple_tls_origination_checks_the_host_name(tmp_path: Path) -> None:
    """The chain is good but the certificate names another host than ``sni``: refused (UF)."""
    external = ExternalFiles(tmp_path / "ext", "elsewhere.example")
    records: list[RequestRecord] = []
    async with s_server(tmp_path, external) as server:
        tls = f"{{mode: SIMPLE, caCertificates: {external.ca}, sni: {TLS_NAME}}}"
        async with proxy(external_mesh(server.port, tls), record_sinks=[records.append]) as px:
            status, _ = await get_external(px)
    assert status == 503
    assert "UF" in records[-1].flags
    assert server.served("hello.txt") == 0


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
async def test_mutual_tls_origination_to_openssl_s_server_requiring_a_client_cert(
    tmp_path: Path, version: str
) -> None:
    external = ExternalFiles(tmp_path / "ext", TLS_NAME)
    client = ExternalFiles(tmp_path / "client", "client.example")
    records: list[RequestRecord] = []
    # -Verify 1: a client certificate is required and must chain to -CAfile (the client's CA).
    require = ("-Verify", "1", "-CAfile", str(client.ca), "-verify_return_error", version)
    async with s_server(tmp_path, external, *require, *sni_checked(external)) as server:
        tls = (
            f"{{mode: MUTUAL, caCertificates: {external.ca}, sni: {TLS_NAME}, "
            f"clientCertificate: {client.cert}, privateKey: {client.key}}}"
        )
        async with proxy(external_mesh(server.port, tls), record_sinks=[records.append]) as px:
            status, body = await get_external(px)
    assert (status, body) == (200, SERVED)
    assert server.served("hello.txt") == 1
    assert records[-1].flags == []


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
async def test_simple_origination_to_a_server_requiring_a_client_cert_is_refused(
    tmp_path: Path, version: str
) -> None:
    """The same s_server with SIMPLE (no client certificate): the server refuses, 503.

    TLS 1.2: the server refuses inside the handshake, a connect failure (UF, retried as one:
    Istio's default retryOn has connect-failure). TLS 1.3: the proxy's handshake completes
    first and the server's alert ends the connection after the request went out, an upstream
    reset (UC, "connection termination"), as Envoy reports it for TLS 1.3."""
    external = ExternalFiles(tmp_path / "ext", TLS_NAME)
    client = ExternalFiles(tmp_path / "client", "client.example")
    require = ("-Verify", "1", "-CAfile", str(client.ca), "-verify_return_error", version)
    records: list[RequestRecord] = []
    async with s_server(tmp_path, external, *require) as server:
        tls = f"{{mode: SIMPLE, caCertificates: {external.ca}, sni: {TLS_NAME}}}"
        async with proxy(external_mesh(server.port, tls), record_sinks=[records.append]) as px:
            status, _ = await get_external(px)
    assert status == 503
    assert ("UF" if version == "-tls1_2" else "UC") in records[-1].flags
    assert server.served("hello.txt") == 0
