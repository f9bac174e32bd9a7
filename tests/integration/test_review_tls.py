"""Review findings on the mTLS accept path, each over real sockets and real handshakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.app import App
from meshproxy.config.load import load_texts
from meshproxy.io.ca import CA_CERT, CA_KEY
from tests.helpers import join, proxy, raw_exchange, upstream
from tests.integration.test_mtls import _boot, reviews_entry
from tests.pki import Pki, peer_authentication, tls_block


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """A bounded wait for listener state no event announces."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def _tls_get_on(sock: socket.socket, ctx: ssl.SSLContext) -> bytes:
    """Handshake on an already connected socket, one GET, read to EOF (blocking, in a thread)."""
    sock.settimeout(5)
    with ctx.wrap_socket(sock) as tls:
        tls.sendall(b"GET /late HTTP/1.1\r\nhost: reviews\r\n\r\n")
        data = bytearray()
        while chunk := tls.recv(65536):
            data += chunk
    return bytes(data)


async def test_drain_waits_for_a_handshake_accepted_before_it(pki: Pki) -> None:
    """SIGTERM with a client accepted but still before its handshake: the client is served (its
    response closes the connection) and only then does the proxy stop. It used to count only
    finished handshakes as connections, so the drain saw none, stopped at once and the close
    cut the accepted client off mid-handshake."""
    server_files = pki.issue("reviews")
    async with upstream() as app_server:
        text = join(
            _boot("reviews", inbound_app=app_server.port, extra=tls_block(server_files)),
            peer_authentication("STRICT"),
        )
        app = App(load_texts([("test.yaml", text)]), seed=1)
        await app.start()

        async def serve() -> None:  # as cli's _serve: stop, then close
            await app.wait_stopped()
            await app.close()

        serving = asyncio.create_task(serve())
        sock = socket.create_connection(("127.0.0.1", app.listeners["inbound"].port))
        try:
            listener = app.listeners["inbound"]
            await _until(lambda: len(listener.tasks) == 1)  # accepted, waiting for its hello
            assert listener.active == 1
            app.begin_drain()
            ctx = pki.client_context(pki.issue("sleep"))
            data = await asyncio.to_thread(_tls_get_on, sock, ctx)
            assert data.startswith(b"HTTP/1.1 200 "), data[:200]
            assert b"\r\nconnection: close\r\n" in data.lower()
            await asyncio.wait_for(serving, 10)  # and then the proxy stops
        finally:
            sock.close()
            if not serving.done():
                serving.cancel()
                await app.close()


def _cert_with_uri(pki: Pki, uri: str, out: Path) -> tuple[Path, Path]:
    """A client certificate the mesh CA signed whose one URI SAN is ``uri``, verbatim."""
    ca_cert = x509.load_pem_x509_certificate((pki.ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((pki.ca_dir / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir()
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out / "cert.pem", out / "key.pem"


def _tls_get(port: int, ctx: ssl.SSLContext) -> bytes:
    """One GET over TLS, read to EOF; b"" when the server refuses during or after the
    handshake (TLS 1.3: the client's side finishes first)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            ctx.wrap_socket(sock) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
            data = bytearray()
            while chunk := tls.recv(65536):
                data += chunk
            return bytes(data)
    except (ssl.SSLError, ConnectionError):
        return b""


SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"


@pytest.mark.parametrize("codec", ["h11", "httptools"])
@pytest.mark.parametrize(
    "uri",
    [
        pytest.param(f"{SLEEP};By=spiffe://cluster.local/ns/default/sa/admin", id="semicolon"),
        pytest.param(f"{SLEEP},By=spiffe://x/ns/a/sa/b;URI=spiffe://x/ns/a/sa/b", id="comma"),
        pytest.param(f'{SLEEP}";Subject="CN=admin', id="quote"),
        pytest.param(f"{SLEEP}\r\nx-injected: 1", id="crlf"),
        pytest.param("spiffe://cluster.local/ns/default/sa/sleep/../admin", id="dot-segments"),
    ],
)
async def test_client_uri_san_that_is_no_spiffe_id_is_refused(
    pki: Pki, tmp_path: Path, uri: str, codec: str
) -> None:
    """A certificate (signed by a CA in the bundle) whose URI SAN starts with spiffe:// but is
    not a SPIFFE ID: its text went verbatim into x-forwarded-client-cert (``URI=...``), where a
    ``;``, ``,`` or ``"`` adds fields or elements of the caller's choosing and CR LF adds a
    header line (the httptools codec writes values as they are), and into the principal that
    AuthorizationPolicy and the logs see. It names no workload: refused as ``no_spiffe_id``,
    as core/identity.py says such a peer must be treated."""
    server_files = pki.issue("reviews")
    cert, key = _cert_with_uri(pki, uri, tmp_path / "odd")
    ctx = pki.client_context()
    ctx.load_cert_chain(str(cert), str(key))
    extra = tls_block(server_files) + f"http1Codec: {codec}\n"
    async with upstream() as app_server:
        text = join(
            _boot("reviews", inbound_app=app_server.port, extra=extra),
            peer_authentication("STRICT"),
        )
        async with proxy(text) as server:
            data = await asyncio.to_thread(_tls_get, server.inbound_port, ctx)
            listener = server.app.listeners["inbound"]
            await _until(lambda: listener.active == 0)
            assert data == b"", data[:300]
            assert listener.tls_failures == {"no_spiffe_id": 1}
            assert app_server.requests == []
            # A proper workload certificate is still served.
            ok = await asyncio.to_thread(
                _tls_get, server.inbound_port, pki.client_context(pki.issue("sleep"))
            )
            assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]
            xfcc = app_server.requests[-1].header("x-forwarded-client-cert")
            assert xfcc is not None and xfcc.endswith(f"URI={SLEEP}")


OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(
    OPENSSL is None, reason="needs the openssl binary (Debian package openssl; .ci/run)"
)


def _non_utf8_cert(pki: Pki, out: Path) -> tuple[Path, Path]:
    """A certificate the mesh CA signed whose URI SAN holds a byte that is not UTF-8 (made
    with the openssl tool: cryptography refuses to write one)."""
    assert OPENSSL is not None
    out.mkdir()
    key, csr, ext, cert = (out / n for n in ("key.pem", "req.csr", "ext.cnf", "cert.pem"))
    ext.write_bytes(b"subjectAltName=critical,URI:spiffe://cluster.local/ns/default/sa/s\xffp\n")
    ca_cert, ca_key = str(pki.ca_dir / CA_CERT), str(pki.ca_dir / CA_KEY)
    sign = ["x509", "-req", "-in", str(csr), "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", "7"]
    for argv in (
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
        ["req", "-new", "-key", str(key), "-subj", "/O=odd", "-out", str(csr)],
        [*sign, "-days", "1", "-extfile", str(ext), "-out", str(cert)],
    ):
        subprocess.run([OPENSSL, *argv], check=True, capture_output=True, timeout=30)
    return cert, key


@needs_openssl
async def test_client_certificate_with_a_non_utf8_uri_san_is_refused_and_counted(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Python's ssl decodes URI SANs as UTF-8 when the handshake completes; a CA-signed client
    certificate with other bytes there makes that raise UnicodeDecodeError (a ValueError, not
    an SSLError) out of connect_accepted_socket. It escaped the handshake task (uncounted, no
    refusal line, a task that died with an exception); now it is a counted bad_certificate."""
    cert, key = _non_utf8_cert(pki, tmp_path / "odd")
    ctx = pki.client_context()
    ctx.load_cert_chain(str(cert), str(key))
    async with upstream() as app_server:
        text = join(
            _boot("reviews", inbound_app=app_server.port, extra=tls_block(pki.issue("reviews"))),
            peer_authentication("STRICT"),
        )
        async with proxy(text) as server:
            listener = server.app.listeners["inbound"]
            data = await asyncio.to_thread(_tls_get, server.inbound_port, ctx)
            assert data == b""
            await _until(lambda: listener.active == 0 and not listener.tasks)
            assert listener.tls_failures == {"bad_certificate": 1}
            assert "refused connection from 127.0.0.1:" in caplog.text
            assert app_server.requests == []


@needs_openssl
async def test_upstream_certificate_with_a_non_utf8_uri_san_is_a_connect_failure(
    pki: Pki, tmp_path: Path
) -> None:
    """The same certificate on an upstream reached with ISTIO_MUTUAL (auto mTLS): the
    UnicodeDecodeError escaped EndpointPool._open as no ConnectFailure, so the connect task died, the
    waiting request was never answered (it hung: no route timeout by default) and the
    connection slot was never given back. Now it is a connect failure: 503 UF at once."""
    cert, key = _non_utf8_cert(pki, tmp_path / "odd")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert), str(key))
    accepted = 0

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    tls_server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    port = tls_server.sockets[0].getsockname()[1]
    try:
        text = join(
            _boot("sleep", extra=tls_block(pki.issue("sleep"))),
            reviews_entry(port),
        )
        async with proxy(text) as client, httpx.AsyncClient(timeout=5) as http:
            resp = await http.get(f"{client.url}/", headers={"host": "reviews:9080"})
            assert resp.status_code == 503
            assert resp.text.endswith("remote connection failure"), resp.text
            states = client.app.pools
            assert states is not None
            pools = [p for _, p in states.all_pools() if p.port == port]
            assert pools and pools[0].connect_failures >= 1
            assert not pools[0].connections
    finally:
        tls_server.close()
        await tls_server.wait_closed()


async def _plain_get(port: int) -> bytes:
    """One plaintext GET, read to EOF; b"" when the connection is refused or reset."""
    try:
        return await raw_exchange(
            port, b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n"
        )
    except ConnectionError:
        return b""


async def test_peer_authentication_mode_change_reloads_on_the_same_port(pki: Pki) -> None:
    """Istio's usual migration (PERMISSIVE to STRICT, or back) on a fixed inbound port (15006):
    a new mTLS mode means a new listener on the same address, and binding that port while the
    old listener still listened failed, so the reload was rejected ("cannot listen: Address
    already in use") and the new mode never applied without a restart. The new listener now
    takes over the old one's socket; the old one drains."""
    holder = socket.socket()  # keeps the port for the proxy to bind (SO_REUSEADDR, no listen)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    files = pki.issue("reviews")
    tls_client = pki.client_context(pki.issue("sleep"))
    async with upstream() as app_server:

        def config(mode: str) -> str:
            boot = _boot("reviews", inbound_app=app_server.port, extra=tls_block(files))
            boot = boot.replace(
                "    address: 127.0.0.1:0\n    app:", f"    address: 127.0.0.1:{port}\n    app:"
            )
            return join(boot, peer_authentication(mode))

        try:
            async with proxy(config("STRICT")) as server:
                holder.close()
                assert server.inbound_port == port
                for mode in ("PERMISSIVE", "DISABLE", "STRICT"):
                    result = await server.app.reload(load_texts([("test.yaml", config(mode))]))
                    assert result.accepted, result.errors
                    assert server.inbound_port == port
                    # The old listener has drained and closed its descriptor of the socket.
                    await _until(lambda: not server.app.active_connections)
                    await _until(lambda: not server.app._retiring)
                    plain = await _plain_get(port)
                    if mode == "STRICT":
                        assert plain == b"", plain[:200]
                        assert server.app.listeners["inbound"].tls_failures == {"plaintext": 1}
                    else:
                        assert plain.startswith(b"HTTP/1.1 200 "), (mode, plain[:200])
                    if mode != "DISABLE":
                        data = await asyncio.to_thread(_tls_get, port, tls_client)
                        assert data.startswith(b"HTTP/1.1 200 "), (mode, data[:200])
        finally:
            holder.close()


async def test_trust_bundle_with_non_ascii_comments_is_loaded(pki: Pki, tmp_path: Path) -> None:
    """Bundles made from Mozilla's list (certifi's cacert.pem, trust-manager's defaults) carry
    ``# Issuer:`` comment lines in UTF-8 before each certificate. The checks accepted such a
    bundle, then the contexts were loaded from ``bundle.decode("ascii")``, which raised: the
    proxy refused to start ("the TLS library refused the credentials"). Only the certificate
    blocks go to the TLS library now."""
    server_files = pki.issue("reviews")
    bundle = tmp_path / "bundle-with-comments.pem"
    bundle.write_bytes(
        "# Issuer: CN=NetLock Arany (Class Gold) Főtanúsítvány\n".encode()
        + server_files.ca.read_bytes()
    )
    block = tls_block(server_files).replace(f"rootCert: {server_files.ca}", f"rootCert: {bundle}")
    assert str(bundle) in block
    async with upstream() as app_server:
        text = join(
            _boot("reviews", inbound_app=app_server.port, extra=block),
            peer_authentication("STRICT"),
        )
        async with proxy(text) as server:
            data = await asyncio.to_thread(
                _tls_get, server.inbound_port, pki.client_context(pki.issue("sleep"))
            )
            assert data.startswith(b"HTTP/1.1 200 "), data[:200]


async def test_reload_that_changes_spec_tls_is_rejected(pki: Pki) -> None:
    """The workload credentials are loaded once, at start; a reload kept them (or their
    absence) whatever its spec.tls said. Adding spec.tls with a STRICT PeerAuthentication was
    accepted, yet with no credentials loaded the inbound listener stayed plaintext: a config
    that says STRICT served plaintext, and reported success. Now a reload that changes spec.tls
    is rejected whole, naming it, and the running config stays."""
    files = pki.issue("reviews")
    async with upstream() as app_server:
        plain = _boot("reviews", inbound_app=app_server.port)
        strict = join(
            _boot("reviews", inbound_app=app_server.port, extra=tls_block(files)),
            peer_authentication("STRICT"),
        )
        async with proxy(plain) as server:
            result = await server.app.reload(load_texts([("test.yaml", strict)]))
            assert not result.accepted
            assert any("spec.tls" in error for error in result.errors), result.errors
            assert result.version == 1
            listener = server.app.listeners["inbound"]
            assert listener.tls is None  # still the running config's plaintext inbound
        async with proxy(strict) as server:
            moved = tls_block(pki.issue("reviews")).replace("5s", "7s")
            changed = join(
                _boot("reviews", inbound_app=app_server.port, extra=moved),
                peer_authentication("STRICT"),
            )
            result = await server.app.reload(load_texts([("test.yaml", changed)]))
            assert not result.accepted
            assert any("spec.tls" in error for error in result.errors), result.errors
            # An unchanged spec.tls reloads as before, and so does a new handshake timeout
            # (read per listener: a new listener on the same socket).
            result = await server.app.reload(load_texts([("test.yaml", strict)]))
            assert result.accepted, result.errors
            slower = join(
                _boot(
                    "reviews",
                    inbound_app=app_server.port,
                    extra=tls_block(files, handshake_timeout="7s"),
                ),
                peer_authentication("STRICT"),
            )
            result = await server.app.reload(load_texts([("test.yaml", slower)]))
            assert result.accepted, result.errors
            assert server.app.listeners["inbound"].tls is not None
            assert server.app.listeners["inbound"].tls.handshake_timeout == 7.0


async def test_istio_mutual_origination_after_the_private_copies_were_cleaned(
    pki: Pki,
) -> None:
    """The ISTIO_MUTUAL context (with its ALPN) was built on the first connection to a
    destination, from the private copies of the key and certificate; once a host's temporary
    file cleaner had removed them (systemd-tmpfiles, /tmp entries unused for 10 days: a
    long-lived certificate outlives that) the OSError escaped the connect task, and the request
    hung unanswered with its connection slot taken. The context is built with the generation
    now, so no file is read when connecting."""
    async with upstream() as app_server:
        server_text = join(
            _boot("reviews", inbound_app=app_server.port, extra=tls_block(pki.issue("reviews"))),
            peer_authentication("STRICT"),
        )
        async with proxy(server_text) as server:
            client_text = join(
                _boot("sleep", extra=tls_block(pki.issue("sleep"))),
                reviews_entry(server.inbound_port),
            )
            async with proxy(client_text) as client, httpx.AsyncClient(timeout=5) as http:
                creds = client.app.credentials
                assert creds is not None
                shutil.rmtree(creds._private)  # what the cleaner does
                resp = await http.get(f"{client.url}/", headers={"host": "reviews:9080"})
                assert resp.status_code == 200, resp.text
                assert app_server.requests[-1].header("x-forwarded-client-cert") is not None
