"""A development certificate authority and the checks a workload's certificate files must pass.

Owns the dev CA directory (``ca.pem``: the root certificate, ``ca-key.pem``: its private key),
issuing workload certificates from it (to files or in memory), reading a certificate's identity
(SPIFFE ID, serial, validity, XFCC hash), and validating a certificate/key/bundle triple before a
proxy uses it (``load_pair``, ``load_pair_files``: what a rotation runs so a half-written or
mismatched pair is refused and the old one stays).

What it issues follows Istio's CA (``security/pkg/pki/util/generate_cert.go``, ``san.go``):

* Root: ECDSA P-256, 10 years (Istio's self-signed root, 3650 d), ``basicConstraints`` CA:true
  (critical), ``keyUsage`` keyCertSign + cRLSign (critical), SKI/AKI, subject
  ``O=meshproxy dev CA`` and a URI SAN ``spiffe://<trust domain>`` so the trust domain can be read
  back from the root. ``pathlen:0``: this CA signs workload certificates directly and never an
  intermediate, so verifiers (OpenSSL, BoringSSL) refuse any chain that puts a CA below it.
  Istio's self-signed root leaves pathlen unset because istiod can be plugged under a shared root;
  a dev CA has no such use, and the tighter root is the safer default.
* Workload: ECDSA P-256 (Istio's ``ECC_SIGNATURE_ALGORITHM=ECDSA``; its default is RSA 2048), an
  empty subject and one URI SAN ``spiffe://<td>/ns/<ns>/sa/<sa>`` marked critical (RFC 5280
  §4.2.1.6 requires that when the subject is empty; Istio's ``BuildSANExtension`` does the same),
  EKU serverAuth + clientAuth, ``keyUsage`` digitalSignature + keyEncipherment (Istio's, for
  every key type), SKI and AKI, notBefore 2 minutes in the past (Istio's
  ``ClockSkewGracePeriod``), notAfter = now + TTL (Istio: ``SECRET_TTL`` 24 h, at most
  ``MAX_WORKLOAD_CERT_TTL`` 90 d), never past the root's own notAfter.

Files are written the way a watcher needs: each one through a temporary file in the same
directory and ``os.replace`` (a reader sees the old file or the new one, never half of one); a
private key's temporary file is created 0600 before any byte is written; for a workload the key
and the bundle are written before the certificate, so a watcher woken by the new certificate finds
its key. File names default to spiffe-helper's and cert-manager csi-driver-spiffe's (``cert.pem``,
``key.pem``, ``ca.pem``).

Times are timezone-aware UTC ``datetime`` values. ``now`` parameters exist so tests (and a caller
with its own clock) can issue and check at a chosen instant; by default they read the wall clock.

Rules: no sockets, no ssl, no asyncio; blocking file I/O only (a caller on an event loop runs these
in a thread); never logs a key. Every rejection is a ``CertificateError`` naming the check.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.errors import CertCheck, CertificateError

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca-key.pem"
ORGANIZATION: Final = "meshproxy dev CA"
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
# Istio's self-signed root lifetime (security/pkg/cmd/constants.go: 10 years).
ROOT_TTL: Final = dt.timedelta(days=3650)
# Istio's SECRET_TTL and MAX_WORKLOAD_CERT_TTL (reference §4).
DEFAULT_TTL: Final = 24 * 3600.0
MAX_TTL: Final = 90 * 24 * 3600.0
# Istio's ClockSkewGracePeriod (security/pkg/pki/util/generate_cert.go): a certificate is valid
# from a little before its creation, so a peer whose clock is behind accepts it.
CLOCK_SKEW: Final = dt.timedelta(minutes=2)
# Istio's SECRET_GRACE_PERIOD_RATIO: re-issue when half the lifetime is left.
ROTATION_RATIO: Final = 0.5

_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
_DIR_MODE: Final = 0o700
# Kubernetes names: a namespace is a DNS-1123 label, a service account a DNS-1123 subdomain.
_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
# SPIFFE ID spec §2.1: a trust domain is lower-case letters, digits, dots, dashes, underscores.
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9._-]+")
_SPIFFE: Final = "spiffe://"
_CERT_BEGIN: Final = b"-----BEGIN CERTIFICATE-----"
_CERT_END: Final = b"-----END CERTIFICATE-----"


# ---------------------------------------------------------------------------------------------
# Identities


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """Istio's workload identity ``spiffe://<td>/ns/<ns>/sa/<sa>``; ValueError on a bad part."""
    _check_trust_domain(trust_domain)
    check_namespace(namespace)
    check_service_account(service_account)
    return f"{_SPIFFE}{trust_domain}/ns/{namespace}/sa/{service_account}"


def check_namespace(name: str) -> None:
    """A Kubernetes namespace name: a DNS-1123 label (at most 63 characters)."""
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise ValueError(
            f"invalid namespace {name!r}: a DNS-1123 label (lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )


def check_service_account(name: str) -> None:
    """A Kubernetes service account name: a DNS-1123 subdomain (at most 253 characters)."""
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise ValueError(
            f"invalid service account {name!r}: a DNS-1123 subdomain (lower-case letters, "
            "digits, '-' and '.', each part starting and ending with a letter or digit)"
        )


def _check_trust_domain(name: str) -> None:
    if len(name) > 255 or not _TRUST_DOMAIN.fullmatch(name):
        raise ValueError(
            f"invalid trust domain {name!r}: lower-case letters, digits, '.', '-' and '_' "
            "(SPIFFE ID spec §2.1), e.g. cluster.local"
        )


def check_ttl(ttl: float) -> None:
    """A workload certificate lifetime: positive and at most Istio's MAX_WORKLOAD_CERT_TTL (90 d)."""
    if not ttl > 0:
        raise ValueError(f"invalid ttl {ttl!r}: it must be more than 0 seconds")
    if ttl > MAX_TTL:
        raise ValueError(
            f"invalid ttl {ttl:g}s: more than the 90 days Istio allows (MAX_WORKLOAD_CERT_TTL)"
        )


# ---------------------------------------------------------------------------------------------
# Reading certificates


@dataclass(frozen=True, slots=True, kw_only=True)
class CertInfo:
    """What a proxy needs to know about one certificate."""

    spiffe_id: str  # the first URI SAN starting with spiffe://, or ""
    serial: str  # lower-case hex, no prefix
    not_before: dt.datetime  # aware, UTC
    not_after: dt.datetime  # aware, UTC
    subject: str  # RFC 4514 (empty for an Istio-style workload certificate)
    issuer: str  # RFC 4514
    sha256: str  # hex SHA-256 of the DER: Envoy's XFCC ``Hash=``


def xfcc_hash(der: bytes) -> str:
    """Envoy's XFCC ``Hash=`` element: the lower-case hex SHA-256 of the client certificate's DER
    (``ssl.SSLSocket.getpeercert(binary_form=True)`` gives the DER)."""
    return hashlib.sha256(der).hexdigest()


def cert_info(data: bytes) -> CertInfo:
    """The first certificate of ``data`` (PEM, or DER as ``getpeercert(binary_form=True)`` gives).

    CertificateError(PEM) if it does not parse.
    """
    if b"-----BEGIN" in data:  # PEM may follow explanatory text (openssl's "Bag Attributes")
        cert = _load_certs(data, "certificate")[0]
    else:
        try:
            cert = x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise CertificateError(
                CertCheck.PEM, f"certificate: not a PEM or DER certificate ({exc})"
            ) from exc
    return _info(cert)


def rotation_due(info: CertInfo, ratio: float = ROTATION_RATIO) -> dt.datetime:
    """When to re-issue: once ``ratio`` of the lifetime is left (Istio's grace period ratio 0.5:
    istio-agent ``secretcache.go rotateTime``, without its ±1% jitter, which a caller may add)."""
    lifetime = info.not_after - info.not_before
    return info.not_after - lifetime * ratio


def _info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        spiffe_id=_spiffe_uri(cert),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sha256=xfcc_hash(cert.public_bytes(serialization.Encoding.DER)),
    )


def _spiffe_uri(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    except ValueError as exc:  # a malformed extension is parsed lazily
        raise CertificateError(CertCheck.PEM, f"certificate: bad extension ({exc})") from exc
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(_SPIFFE):
            return uri
    return ""


def _load_certs(data: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM file, refusing a truncated one.

    ``load_pem_x509_certificates`` silently drops a trailing block that lost its END line (a file
    caught half-written), so the markers are counted first.
    """
    begins, ends = data.count(_CERT_BEGIN), data.count(_CERT_END)
    if begins == 0:
        raise CertificateError(CertCheck.PEM, f"{what}: no PEM certificate in it")
    tail = data[data.rfind(_CERT_END) + len(_CERT_END) :] if ends else data
    if begins != ends or tail.strip():
        raise CertificateError(
            CertCheck.PEM,
            f"{what}: truncated PEM ({begins} BEGIN CERTIFICATE, {ends} END CERTIFICATE"
            f"{', data after the last END' if tail.strip() and begins == ends else ''})",
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(
            CertCheck.PEM, f"{what}: not a valid PEM certificate ({exc})"
        ) from exc
    if len(certs) != begins:
        raise CertificateError(
            CertCheck.PEM, f"{what}: {begins} PEM blocks but {len(certs)} certificates parsed"
        )
    return certs


def _load_key(data: bytes, what: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise CertificateError(
            CertCheck.PEM, f"{what}: not a usable PEM private key ({exc})"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(
            CertCheck.PEM, f"{what}: {type(key).__name__} keys are not supported (ECDSA or RSA)"
        )
    return key


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


# ---------------------------------------------------------------------------------------------
# Validating a certificate, its key and a trust bundle


def load_pair(
    cert_pem: bytes,
    key_pem: bytes,
    root_pem: bytes,
    *,
    now: dt.datetime | None = None,
    require_spiffe_id: bool = True,
) -> CertInfo:
    """Check a certificate chain (leaf first), its private key and a trust bundle; the leaf's info.

    In order: every file is complete PEM (PEM), the key is the leaf's (KEY_MISMATCH), the leaf
    chains through the chain's intermediates to a root of the bundle, each link a CA whose
    signature verifies and whose pathlen allows it (CHAIN), every certificate of that path is
    valid at ``now`` (EXPIRED, NOT_YET_VALID), and the leaf has a SPIFFE ID (NO_SPIFFE_ID) unless
    ``require_spiffe_id`` is off. Raises CertificateError naming the failed check.
    """
    chain = _load_certs(cert_pem, "certificate")
    key = _load_key(key_pem, "private key")
    roots = _load_certs(root_pem, "trust bundle")
    leaf = chain[0]
    if not _same_key(leaf, key):
        raise CertificateError(
            CertCheck.KEY_MISMATCH,
            "the private key does not belong to the certificate (different public key)",
        )
    now = now or dt.datetime.now(dt.UTC)
    for cert in _path_to_root(chain, roots):
        _check_validity(cert, now, "certificate" if cert is leaf else f"CA {_name(cert)}")
    info = _info(leaf)
    if require_spiffe_id and not info.spiffe_id:
        raise CertificateError(
            CertCheck.NO_SPIFFE_ID, "the certificate has no spiffe:// URI subject alternative name"
        )
    return info


class LoadedPair(NamedTuple):
    """A validated certificate chain, key and bundle: the leaf's info and the exact bytes checked
    (load those, not the files again, which may have changed since)."""

    info: CertInfo
    cert: bytes
    key: bytes
    root: bytes


def load_pair_files(
    cert: Path,
    key: Path,
    root: Path,
    *,
    now: dt.datetime | None = None,
    require_spiffe_id: bool = True,
) -> LoadedPair:
    """Read the three files and ``load_pair`` them; CertificateError(FILE) if one cannot be read
    (missing while cert-manager or SPIRE's helper rewrites it, a directory, no permission)."""
    data: list[bytes] = []
    for path in (cert, key, root):
        try:
            data.append(path.read_bytes())
        except OSError as exc:
            raise CertificateError(CertCheck.FILE, f"cannot read {path}: {exc.strerror}") from exc
    info = load_pair(*data, now=now, require_spiffe_id=require_spiffe_id)
    return LoadedPair(info=info, cert=data[0], key=data[1], root=data[2])


def _name(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string())


def _path_to_root(
    chain: list[x509.Certificate], roots: list[x509.Certificate]
) -> list[x509.Certificate]:
    """The leaf, the intermediates used and the root, or CertificateError(CHAIN)."""
    path = [chain[0]]
    unused = list(chain[1:])
    # Each step consumes one intermediate, so the walk ends after at most len(chain) steps.
    for _ in range(len(chain)):
        current = path[-1]
        below = len(path) - 1  # intermediates under the next issuer
        root = next((r for r in roots if _issued_by(current, r, below)), None)
        if root is not None:
            path.append(root)
            return path
        parent = next((c for c in unused if _issued_by(current, c, below)), None)
        if parent is None:
            break
        unused.remove(parent)
        path.append(parent)
    current = path[-1]
    raise CertificateError(
        CertCheck.CHAIN,
        f"{'the certificate' if len(path) == 1 else 'intermediate ' + _name(current)} "
        f"(issuer {current.issuer.rfc4514_string()!r}) is not signed by any of the "
        f"{len(roots)} root(s) in the trust bundle"
        + (f" or the {len(chain) - 1} intermediate(s) in the chain" if len(chain) > 1 else ""),
    )


def _issued_by(child: x509.Certificate, issuer: x509.Certificate, below: int) -> bool:
    """``issuer`` is a CA allowed ``below`` intermediates under it, and signed ``child``."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    if not bc.ca or (bc.path_length is not None and below > bc.path_length):
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        # ValueError: names differ or unsupported signature; TypeError: unsupported key type.
        return False
    return True


def _check_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            CertCheck.NOT_YET_VALID,
            f"{what} is not valid before {cert.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()})",
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            CertCheck.EXPIRED,
            f"{what} expired at {cert.not_valid_after_utc.isoformat()} (now {now.isoformat()})",
        )


# ---------------------------------------------------------------------------------------------
# Writing files


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never a part.

    The temporary file sits in the same directory (``os.replace`` is atomic within a file system)
    and is created 0600 by ``mkstemp`` before any byte is written; it gets ``mode`` before the
    rename, and is removed if anything fails.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory is synced (after a crash, not for
    # readers: they see the new name at once).
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 ("BEGIN PRIVATE KEY"): what spiffe-helper writes and every TLS stack reads.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------------------------
# The CA


def init_ca(
    directory: Path,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
) -> Path:
    """Create a root CA in ``directory`` (made 0700 if missing); the path of its ``ca.pem``.

    Refuses (CertificateError(CA)) when the directory already holds a CA, unless ``force``;
    ValueError for a bad trust domain.
    """
    _check_trust_domain(trust_domain)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    existing = [p.name for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise CertificateError(
            CertCheck.CA,
            f"{directory} already holds a CA ({', '.join(existing)}); pass --force to replace it "
            "(certificates issued from the old one stop being trusted)",
        )
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(_SPIFFE + trust_domain)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    # The key first: a reader that sees the new root finds the key that signs with it.
    write_file_atomic(key_path, _key_pem(key), _KEY_MODE)
    write_file_atomic(cert_path, _cert_pem(cert), _CERT_MODE)
    return cert_path


class _CA(NamedTuple):
    cert: x509.Certificate  # the signing root: the first certificate of ca.pem
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    bundle: bytes  # all of ca.pem: what peers verify against
    trust_domain: str


def trust_domain(ca_dir: Path) -> str:
    """The trust domain of the CA in ``ca_dir`` (its root's ``spiffe://`` URI SAN)."""
    return _load_ca(ca_dir, dt.datetime.now(dt.UTC)).trust_domain


def _load_ca(ca_dir: Path, now: dt.datetime) -> _CA:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    try:
        bundle = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(
            CertCheck.CA,
            f"no CA in {ca_dir}: {Path(exc.filename).name} is missing "
            f"(create one with: meshproxy ca init --dir {ca_dir})",
        ) from exc
    except OSError as exc:
        raise CertificateError(CertCheck.CA, f"cannot read the CA in {ca_dir}: {exc}") from exc
    cert = _load_certs(bundle, str(cert_path))[0]
    key = _load_key(key_pem, str(key_path))
    if not _same_key(cert, key):
        raise CertificateError(
            CertCheck.KEY_MISMATCH,
            f"{key_path} is not the key of the first certificate in {cert_path}",
        )
    _check_validity(cert, now, f"the CA certificate {cert_path}")
    td = _spiffe_uri(cert).removeprefix(_SPIFFE).rstrip("/")
    if not td or "/" in td:
        raise CertificateError(
            CertCheck.CA,
            f"{cert_path} carries no spiffe://<trust domain> URI SAN (not a meshproxy dev CA)",
        )
    return _CA(cert=cert, key=key, bundle=bundle, trust_domain=td)


class IssuedPEM(NamedTuple):
    """A workload certificate, its private key and the trust bundle, PEM-encoded."""

    cert: bytes
    key: bytes
    root: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedFiles:
    """Where ``issue`` wrote the certificate, key and bundle, and what the certificate says."""

    cert: Path
    key: Path
    ca: Path
    info: CertInfo


def issue_in_memory(
    ca_dir: Path,
    identity: str | tuple[str, str],
    ttl: float = DEFAULT_TTL,
    *,
    now: dt.datetime | None = None,
) -> IssuedPEM:
    """Issue a workload certificate from the CA in ``ca_dir`` without writing a file.

    ``identity`` is a SPIFFE ID in the CA's trust domain or a ``(namespace, service account)``
    pair. What a proxy calls at start for ``spec.tls.ca`` and again when ``rotation_due`` passes.
    CertificateError for a missing, expired or broken CA; ValueError for a bad identity or TTL.
    """
    check_ttl(ttl)
    now = now or dt.datetime.now(dt.UTC)
    ca = _load_ca(ca_dir, now)
    if isinstance(identity, tuple):
        uri = spiffe_id(ca.trust_domain, *identity)
    else:
        uri = identity
        prefix = f"{_SPIFFE}{ca.trust_domain}/"
        if not uri.startswith(prefix) or len(uri) == len(prefix):
            raise ValueError(
                f"invalid identity {uri!r}: a SPIFFE ID in the CA's trust domain ({prefix}...)"
            )
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    not_after = min(now + dt.timedelta(seconds=ttl), ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))  # Istio: empty subject, the identity is the URI SAN
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
        # Critical because the subject is empty (RFC 5280 §4.2.1.6; Istio's san.go).
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedPEM(cert=_cert_pem(cert), key=_key_pem(key), root=ca.bundle)


def issue(
    ca_dir: Path,
    namespace: str,
    service_account: str,
    *,
    out: Path,
    ttl: float = DEFAULT_TTL,
    cert_name: str = "cert.pem",
    key_name: str = "key.pem",
    ca_name: str = "ca.pem",
    now: dt.datetime | None = None,
) -> IssuedFiles:
    """Issue ``spiffe://<td>/ns/<namespace>/sa/<service account>`` into ``out`` (created if
    missing): the key (0600), then the bundle, then the certificate, each replaced atomically."""
    names = (cert_name, key_name, ca_name)
    for name in names:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise ValueError(
                f"invalid file name {name!r}: a plain name inside the output directory"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"the certificate, key and CA file names must differ: {names}")
    pem = issue_in_memory(ca_dir, (namespace, service_account), ttl, now=now)
    out.mkdir(parents=True, exist_ok=True)
    files = IssuedFiles(
        cert=out / cert_name, key=out / key_name, ca=out / ca_name, info=cert_info(pem.cert)
    )
    write_file_atomic(files.key, pem.key, _KEY_MODE)
    write_file_atomic(files.ca, pem.root, _CERT_MODE)
    write_file_atomic(files.cert, pem.cert, _CERT_MODE)
    return files
