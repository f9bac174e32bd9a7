"""``meshproxy ca init`` and ``ca issue`` as a user runs them, checked by real peers.

The CLI runs as a subprocess (every run has a timeout); OpenSSL's command line verifies the
certificates it wrote, and Python's ``ssl`` runs real mutual-TLS handshakes with them over a
loopback socket: both sides present an issued certificate and require the other's, and each reads
the other's SPIFFE ID from the handshake. A client certificate from another CA (trustme) is refused.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
from helpers import free_env

from meshproxy.io import ca

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0


def meshproxy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = free_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "ca", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=env,
        check=False,
    )


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def usage_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def issue(ca_dir: Path, out: Path, namespace: str = "default", account: str = "web") -> Path:
    ok(
        meshproxy(
            "issue", "--dir", ca_dir, "--namespace", namespace, "--service-account", account,
            "--out", out,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA for the module (each CLI run costs a Python start); tests only read it."""
    d = tmp_path_factory.mktemp("shared") / "ca"
    out = ok(meshproxy("init", "--dir", d))
    assert "created CA" in out and "cluster.local" in out
    return d


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- files ---------------------------------------------------------------------------------------


def test_init_and_issue_write_the_files_with_safe_modes(ca_dir: Path, tmp_path: Path) -> None:
    assert mode(ca_dir / "ca-key.pem") == 0o600
    assert (ca_dir / "ca.pem").is_file()
    out = tmp_path / "certs"
    result = ok(
        meshproxy(
            "issue", "--dir", ca_dir, "--namespace", "shop", "--service-account", "cart",
            "--ttl", "90m", "--out", out,
        )
    )  # fmt: skip
    assert "spiffe://cluster.local/ns/shop/sa/cart" in result
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert mode(out / "key.pem") == 0o600
    assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    info = ca.load_pair(*(out.joinpath(n).read_bytes() for n in ("cert.pem", "key.pem", "ca.pem")))
    assert (info.not_after - info.not_before).total_seconds() == 90 * 60 + 120


def test_issue_uses_the_file_names_asked_for(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tls"
    ok(
        meshproxy(
            "issue", "--dir", ca_dir, "--namespace", "default", "--service-account", "web",
            "--out", out, "--cert-name", "tls.crt", "--key-name", "tls.key", "--ca-name", "ca.crt",
        )
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert mode(out / "tls.key") == 0o600


def test_openssl_verifies_the_certificate_and_sees_the_spiffe_id(
    ca_dir: Path, tmp_path: Path
) -> None:
    out = issue(ca_dir, tmp_path / "w", "bookinfo", "reviews")
    cert, root = out / "cert.pem", out / "ca.pem"
    assert ok(openssl("verify", "-CAfile", root, cert)).strip() == f"{cert}: OK"
    # X.509 strict mode (what Python 3.13's default context sets) and both TLS purposes.
    for purpose in ("sslserver", "sslclient"):
        ok(openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", root, cert))
    san = ok(openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName"))
    assert "critical" in san
    assert "URI:spiffe://cluster.local/ns/bookinfo/sa/reviews" in san
    # The key file holds the certificate's key.
    pub_of_key = ok(openssl("pkey", "-in", out / "key.pem", "-pubout"))
    assert pub_of_key == ok(openssl("x509", "-in", cert, "-noout", "-pubkey"))
    root_text = ok(openssl("x509", "-in", root, "-noout", "-text"))
    assert "CA:TRUE, pathlen:0" in root_text
    assert "URI:spiffe://cluster.local" in root_text


def test_openssl_refuses_a_certificate_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    ok(meshproxy("init", "--dir", tmp_path / "other", "--trust-domain", "other.example"))
    out = issue(tmp_path / "other", tmp_path / "w")
    assert "spiffe://other.example/ns/default/sa/web" in ok(
        openssl("x509", "-in", out / "cert.pem", "-noout", "-ext", "subjectAltName")
    )
    result = openssl("verify", "-CAfile", ca_dir / "ca.pem", out / "cert.pem")
    assert result.returncode != 0
    # Same issuer name, but the key identifiers differ: OpenSSL finds no issuer for it.
    assert "unable to get local issuer certificate" in result.stderr


# -- real TLS handshakes -------------------------------------------------------------------------


def context(side: ssl._SSLMethod, certs: Path, *, trust: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.check_hostname = False  # mesh peers are checked by SPIFFE ID, not host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    ctx.load_verify_locations(trust)
    return ctx


def uri_sans(peercert: dict[str, Any]) -> list[str]:
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Run one handshake and a one-byte echo on a loopback socket; (server result, client result)
    as callables that return the peer's certificate (dict, DER) or raise what that side raised."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> tuple[dict[str, Any], bytes]:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(TIMEOUT)
                peer = tls.getpeercert()
                der = tls.getpeercert(binary_form=True)
                tls.sendall(tls.recv(1))
                assert peer is not None and der is not None
                return peer, der

        def connect() -> tuple[dict[str, Any], bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                with client_ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"x")
                    # TLS 1.3: a refused client certificate shows up on the first read.
                    assert tls.recv(1) == b"x"
                    peer = tls.getpeercert()
                    der = tls.getpeercert(binary_form=True)
                    assert peer is not None and der is not None
                    return peer, der

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tls-server") as pool:
            server = pool.submit(serve)
            try:
                client_result: Any = connect()
                client_error: BaseException | None = None
            except (ssl.SSLError, OSError) as exc:
                client_result, client_error = None, exc
            try:
                server_result: Any = server.result(timeout=TIMEOUT)
                server_error: BaseException | None = None
            except (ssl.SSLError, OSError) as exc:
                server_result, server_error = None, exc

    def outcome(result: Any, error: BaseException | None) -> Callable[[], Any]:
        def get() -> Any:
            if error is not None:
                raise error
            return result

        return get

    return outcome(server_result, server_error), outcome(client_result, client_error)


def test_mutual_tls_between_two_issued_workloads(ca_dir: Path, tmp_path: Path) -> None:
    server_certs = issue(ca_dir, tmp_path / "server", "default", "reviews")
    client_certs = issue(ca_dir, tmp_path / "client", "default", "productpage")
    trust = ca_dir / "ca.pem"
    server, client = handshake(
        context(ssl.PROTOCOL_TLS_SERVER, server_certs, trust=trust),
        context(ssl.PROTOCOL_TLS_CLIENT, client_certs, trust=trust),
    )
    seen_by_server, client_der = server()
    seen_by_client, server_der = client()
    assert uri_sans(seen_by_server) == ["spiffe://cluster.local/ns/default/sa/productpage"]
    assert uri_sans(seen_by_client) == ["spiffe://cluster.local/ns/default/sa/reviews"]
    # The XFCC Hash= the server would add is the hash of the client's certificate file.
    assert ca.xfcc_hash(client_der) == ca.cert_info((client_certs / "cert.pem").read_bytes()).sha256
    assert ca.cert_info(server_der).spiffe_id == "spiffe://cluster.local/ns/default/sa/reviews"


def test_a_client_certificate_from_another_ca_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    server_certs = issue(ca_dir, tmp_path / "server")
    foreign = trustme.CA()
    client_dir = tmp_path / "foreign"
    client_dir.mkdir()
    foreign.issue_cert("client.example.com").private_key_and_cert_chain_pem.write_to_path(
        str(client_dir / "both.pem")
    )
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_cert_chain(client_dir / "both.pem")
    client_ctx.load_verify_locations(ca_dir / "ca.pem")  # the client itself trusts our server
    server, client = handshake(
        context(ssl.PROTOCOL_TLS_SERVER, server_certs, trust=ca_dir / "ca.pem"), client_ctx
    )
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        server()
    assert "unable to get local issuer certificate" in str(refused.value)
    with pytest.raises((ssl.SSLError, OSError)):
        client()


def test_a_server_from_another_ca_is_refused_by_the_client(ca_dir: Path, tmp_path: Path) -> None:
    ok(meshproxy("init", "--dir", tmp_path / "other"))
    server_certs = issue(tmp_path / "other", tmp_path / "server")
    client_certs = issue(ca_dir, tmp_path / "client")
    server, client = handshake(
        context(ssl.PROTOCOL_TLS_SERVER, server_certs, trust=tmp_path / "other" / "ca.pem"),
        context(ssl.PROTOCOL_TLS_CLIENT, client_certs, trust=ca_dir / "ca.pem"),
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        client()
    with pytest.raises((ssl.SSLError, OSError)):
        server()


# -- errors --------------------------------------------------------------------------------------


def test_init_refuses_an_existing_ca_without_force(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ok(meshproxy("init", "--dir", ca_dir))
    before = (ca_dir / "ca-key.pem").read_bytes()
    usage_error(meshproxy("init", "--dir", ca_dir), "already holds a CA")
    assert (ca_dir / "ca-key.pem").read_bytes() == before
    ok(meshproxy("init", "--dir", ca_dir, "--force"))
    assert (ca_dir / "ca-key.pem").read_bytes() != before


def test_init_rejects_a_bad_trust_domain(tmp_path: Path) -> None:
    usage_error(
        meshproxy("init", "--dir", tmp_path / "ca", "--trust-domain", "Bad/Domain"),
        "invalid trust domain 'Bad/Domain'",
    )


def test_issue_without_a_ca(tmp_path: Path) -> None:
    usage_error(
        meshproxy(
            "issue", "--dir", tmp_path / "none", "--namespace", "default",
            "--service-account", "web", "--out", tmp_path / "o",
        ),
        "no CA in",
    )  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("ttl", "message"),
    [("1y", "invalid duration '1y'"), ("0s", "more than 0"), ("2200h", "90 days"), ("", "invalid")],
)
def test_issue_rejects_a_bad_ttl(ca_dir: Path, tmp_path: Path, ttl: str, message: str) -> None:
    usage_error(
        meshproxy(
            "issue", "--dir", ca_dir, "--namespace", "default", "--service-account", "web",
            "--ttl", ttl, "--out", tmp_path / "o",
        ),
        message,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("namespace", "account", "message"),
    [
        ("Default", "web", "invalid namespace 'Default'"),
        ("my_ns", "web", "invalid namespace 'my_ns'"),
        ("default", "web-", "invalid service account 'web-'"),
        ("default", "WEB", "invalid service account 'WEB'"),
    ],
)
def test_issue_rejects_bad_names(
    ca_dir: Path, tmp_path: Path, namespace: str, account: str, message: str
) -> None:
    usage_error(
        meshproxy(
            "issue", "--dir", ca_dir, "--namespace", namespace, "--service-account", account,
            "--out", tmp_path / "o",
        ),
        message,
    )  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_issue_into_a_path_that_is_a_file(ca_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    usage_error(
        meshproxy(
            "issue", "--dir", ca_dir, "--namespace", "default", "--service-account", "web",
            "--out", tmp_path / "file",
        ),
        "meshproxy ca issue:",
    )  # fmt: skip


def test_ca_needs_a_subcommand() -> None:
    result = meshproxy()
    assert result.returncode == 2
    assert "init" in result.stderr and "issue" in result.stderr
