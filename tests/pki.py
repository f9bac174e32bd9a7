"""Test certificates from our own dev CA (meshproxy.io.ca) and from trustme, plus the Istio YAML
that mTLS tests share (bootstrap ``tls`` block, PeerAuthentication, AuthorizationPolicy)."""

from __future__ import annotations

import datetime as dt
import ssl
import textwrap
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.io.ca import CA_CERT, CA_KEY, IssuedFiles, init_ca, issue

TRUST_DOMAIN = "cluster.local"


class Pki:
    """A dev CA in a temporary directory and the workload certificates issued from it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_dir = root / "ca"
        # Dated a day back, so tests can issue certificates that have already expired.
        init_ca(self.ca_dir, TRUST_DOMAIN, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        self._count = 0

    @property
    def bundle(self) -> Path:
        return self.ca_dir / CA_CERT

    def issue(
        self,
        service_account: str,
        namespace: str = "default",
        *,
        ttl: float = 3600.0,
        now: dt.datetime | None = None,
        out: Path | None = None,
    ) -> IssuedFiles:
        self._count += 1
        out = out or self.root / f"{service_account}-{self._count}"
        return issue(self.ca_dir, namespace, service_account, out=out, ttl=ttl, now=now)

    def uri(self, service_account: str, namespace: str = "default") -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"

    def without_spiffe(self, name: str = "no-spiffe") -> tuple[Path, Path]:
        """A certificate our CA signed that names a DNS host, not a workload."""
        ca_cert = x509.load_pem_x509_certificate((self.ca_dir / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((self.ca_dir / CA_KEY).read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out = self.root / name
        out.mkdir(exist_ok=True)
        (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return out / "cert.pem", out / "key.pem"

    def client_context(self, files: IssuedFiles | None = None) -> ssl.SSLContext:
        """A TLS client as a mesh peer: our bundle, optionally a workload certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(self.bundle))
        if files is not None:
            ctx.load_cert_chain(str(files.cert), str(files.key))
        return ctx


def foreign_client(root: Path, pki: Pki) -> ssl.SSLContext:
    """A client whose certificate comes from another CA (trustme) but which trusts ours."""
    other = trustme.CA()
    leaf = other.issue_cert("intruder.example")
    ctx = pki.client_context()
    leaf.configure_cert(ctx)
    return ctx


def tls_block(files: IssuedFiles, *, handshake_timeout: str = "5s") -> str:
    """The bootstrap's ``tls:`` block for issued files (for ``bootstrap(extra=...)``)."""
    return (
        "tls:\n"
        f"  certChain: {files.cert}\n"
        f"  privateKey: {files.key}\n"
        f"  rootCert: {files.ca}\n"
        f"  handshakeTimeout: {handshake_timeout}\n"
    )


def peer_authentication(mode: str, name: str = "default", namespace: str = "default") -> str:
    return (
        "apiVersion: security.istio.io/v1\n"
        "kind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  mtls: {{mode: {mode}}}\n"
    )


def authorization_policy(name: str, action: str, rules: str, namespace: str = "default") -> str:
    return (
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n"
        f"  action: {action}\n"
        f"{textwrap.indent(rules, '  ')}"
    )
