"""The development CA (``meshproxy/io/ca.py``): what it issues, what it reads back, and every way
``load_pair`` refuses a certificate, key or bundle.

Real keys and certificates throughout (cryptography and trustme); instants are passed as ``now``
so expiry is tested without waiting.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.errors import CertCheck, CertificateError, MeshProxyError
from meshproxy.io import ca

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    ca.init_ca(d, now=NOW)
    return d


def expect(check: CertCheck, *args: bytes, **kwargs: object) -> CertificateError:
    with pytest.raises(CertificateError) as info:
        ca.load_pair(*args, **kwargs)  # type: ignore[arg-type]
    assert info.value.check is check
    assert str(info.value).startswith(check.value + ": ")
    return info.value


# -- the root ------------------------------------------------------------------------------------


def test_init_writes_a_root_and_a_0600_key(tmp_path: Path) -> None:
    d = tmp_path / "new" / "ca"
    path = ca.init_ca(d, "example.org", now=NOW)
    assert path == d / "ca.pem"
    assert mode(d) == 0o700
    assert mode(d / "ca-key.pem") == 0o600
    assert mode(d / "ca.pem") == 0o644
    assert sorted(p.name for p in d.iterdir()) == ["ca-key.pem", "ca.pem"]  # no temp files left
    root = load((d / "ca.pem").read_bytes())
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "meshproxy dev CA"
    )
    assert root.issuer == root.subject
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    assert root.not_valid_after_utc - NOW == dt.timedelta(days=3650)
    assert ca.cert_info((d / "ca.pem").read_bytes()).spiffe_id == "spiffe://example.org"
    root.verify_directly_issued_by(root)  # self-signed


def test_the_trust_domain_reads_back_from_the_root(tmp_path: Path) -> None:
    ca.init_ca(tmp_path, "prod.example.com")
    assert ca.trust_domain(tmp_path) == "prod.example.com"


def test_init_refuses_to_overwrite_unless_forced(ca_dir: Path) -> None:
    before = (ca_dir / "ca-key.pem").read_bytes()
    with pytest.raises(CertificateError, match="already holds a CA") as info:
        ca.init_ca(ca_dir)
    assert info.value.check is CertCheck.CA
    assert (ca_dir / "ca-key.pem").read_bytes() == before
    ca.init_ca(ca_dir, force=True)
    assert (ca_dir / "ca-key.pem").read_bytes() != before
    assert mode(ca_dir / "ca-key.pem") == 0o600


def test_init_refuses_when_only_the_key_is_left(tmp_path: Path) -> None:
    ca.init_ca(tmp_path)
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(CertificateError, match=r"ca-key\.pem"):
        ca.init_ca(tmp_path)


@pytest.mark.parametrize("td", ["", "Cluster.Local", "a/b", "spiffe://x", "a b"])
def test_init_rejects_a_bad_trust_domain(tmp_path: Path, td: str) -> None:
    with pytest.raises(ValueError, match="invalid trust domain"):
        ca.init_ca(tmp_path / "ca", td)
    assert not (tmp_path / "ca").exists()


# -- issuing -------------------------------------------------------------------------------------


def test_issue_writes_an_istio_style_workload_certificate(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = ca.issue(ca_dir, "default", "reviews", out=out, ttl=3600, now=NOW)
    assert (files.cert, files.key, files.ca) == (out / "cert.pem", out / "key.pem", out / "ca.pem")
    assert mode(files.key) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert files.ca.read_bytes() == (ca_dir / "ca.pem").read_bytes()

    cert = load(files.cert.read_bytes())
    root = load(files.ca.read_bytes())
    cert.verify_directly_issued_by(root)
    assert len(cert.subject) == 0  # Istio: empty subject, the identity is the URI SAN
    assert cert.issuer == root.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # required with an empty subject (RFC 5280 §4.2.1.6)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/reviews"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    info = files.info
    assert info == ca.cert_info(files.cert.read_bytes())
    assert info.spiffe_id == "spiffe://cluster.local/ns/default/sa/reviews"
    assert info.not_before == NOW - dt.timedelta(minutes=2)  # Istio's ClockSkewGracePeriod
    assert info.not_after == NOW + HOUR
    assert info.subject == ""
    assert info.issuer == "O=meshproxy dev CA"
    assert info.serial == format(cert.serial_number, "x")
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert (
        ca.load_pair(
            files.cert.read_bytes(), files.key.read_bytes(), files.ca.read_bytes(), now=NOW
        )
        == info
    )


def test_issue_uses_the_given_file_names_and_replaces_old_files(
    ca_dir: Path, tmp_path: Path
) -> None:
    names = {"cert_name": "tls.crt", "key_name": "tls.key", "ca_name": "ca.crt"}
    first = ca.issue(ca_dir, "shop", "cart", out=tmp_path / "o", now=NOW, **names)
    assert (
        first.cert.name == "tls.crt" and first.key.name == "tls.key" and first.ca.name == "ca.crt"
    )
    old_key = first.key.read_bytes()
    second = ca.issue(ca_dir, "shop", "cart", out=tmp_path / "o", now=NOW, **names)
    assert second.key.read_bytes() != old_key
    assert second.info.serial != first.info.serial
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


def test_a_dotted_service_account_is_a_valid_subdomain(ca_dir: Path) -> None:
    pem = ca.issue_in_memory(ca_dir, ("kube-system", "system.node-1"), now=NOW)
    assert (
        ca.cert_info(pem.cert).spiffe_id == "spiffe://cluster.local/ns/kube-system/sa/system.node-1"
    )


@pytest.mark.parametrize(
    ("namespace", "account", "message"),
    [
        ("Default", "web", "invalid namespace"),
        ("-ns", "web", "invalid namespace"),
        ("a" * 64, "web", "invalid namespace"),
        ("a.b", "web", "invalid namespace"),
        ("", "web", "invalid namespace"),
        ("default", "Web", "invalid service account"),
        ("default", "web/x", "invalid service account"),
        ("default", "web.", "invalid service account"),
        ("default", "", "invalid service account"),
    ],
)
def test_issue_rejects_bad_kubernetes_names(
    ca_dir: Path, tmp_path: Path, namespace: str, account: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ca.issue(ca_dir, namespace, account, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("ttl", "message"),
    [(0.0, "more than 0"), (-5.0, "more than 0"), (91 * 86400.0, "90 days"), (float("nan"), "0")],
)
def test_issue_rejects_a_bad_ttl(ca_dir: Path, tmp_path: Path, ttl: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ca.issue(ca_dir, "default", "web", out=tmp_path / "o", ttl=ttl)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ({"cert_name": "a/cert.pem"}, "invalid file name"),
        ({"key_name": ".."}, "invalid file name"),
        ({"ca_name": ""}, "invalid file name"),
        ({"key_name": "cert.pem"}, "must differ"),
    ],
)
def test_issue_rejects_bad_file_names(
    ca_dir: Path, tmp_path: Path, names: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ca.issue(ca_dir, "default", "web", out=tmp_path / "o", **names)


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"no CA in .*ca init --dir") as info:
        ca.issue(tmp_path / "missing", "default", "web", out=tmp_path / "o")
    assert info.value.check is CertCheck.CA
    assert isinstance(info.value, MeshProxyError)


def test_issue_in_memory_takes_a_spiffe_id_of_the_ca_trust_domain(ca_dir: Path) -> None:
    uri = "spiffe://cluster.local/ns/default/sa/productpage"
    pem = ca.issue_in_memory(ca_dir, uri, 600, now=NOW)
    info = ca.load_pair(pem.cert, pem.key, pem.root, now=NOW)
    assert info.spiffe_id == uri
    assert info.not_after == NOW + dt.timedelta(seconds=600)
    assert pem.root == (ca_dir / "ca.pem").read_bytes()
    cert, key, root = pem  # unpacks like the tuple it is
    assert (cert, key, root) == (pem.cert, pem.key, pem.root)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://other.domain/ns/default/sa/web",
        "spiffe://cluster.local/",
        "https://cluster.local/x",
    ],
)
def test_issue_in_memory_rejects_an_identity_outside_the_trust_domain(
    ca_dir: Path, uri: str
) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        ca.issue_in_memory(ca_dir, uri)


def test_a_workload_certificate_never_outlives_its_root(tmp_path: Path) -> None:
    # A root with one hour left: a 24 h certificate ends with the root.
    ca.init_ca(tmp_path, now=NOW - dt.timedelta(days=3650) + HOUR)
    root = load((tmp_path / "ca.pem").read_bytes())
    pem = ca.issue_in_memory(tmp_path, ("default", "web"), 86400, now=NOW)
    assert ca.cert_info(pem.cert).not_after == root.not_valid_after_utc == NOW + HOUR


def test_an_expired_ca_issues_nothing(ca_dir: Path) -> None:
    with pytest.raises(CertificateError, match=r"the CA certificate .* expired") as info:
        ca.issue_in_memory(ca_dir, ("default", "web"), now=NOW + dt.timedelta(days=3651))
    assert info.value.check is CertCheck.EXPIRED


def test_a_ca_whose_key_is_not_its_root_issues_nothing(ca_dir: Path, tmp_path: Path) -> None:
    ca.init_ca(tmp_path / "other")
    (ca_dir / "ca-key.pem").write_bytes((tmp_path / "other" / "ca-key.pem").read_bytes())
    with pytest.raises(CertificateError, match="is not the key of") as info:
        ca.issue_in_memory(ca_dir, ("default", "web"), now=NOW)
    assert info.value.check is CertCheck.KEY_MISMATCH


def test_a_root_without_a_trust_domain_is_not_a_dev_ca(tmp_path: Path) -> None:
    other = trustme.CA()
    (tmp_path / "ca.pem").write_bytes(other.cert_pem.bytes())
    (tmp_path / "ca-key.pem").write_bytes(other.private_key_pem.bytes())
    with pytest.raises(CertificateError, match="no spiffe://<trust domain> URI SAN") as info:
        ca.issue_in_memory(tmp_path, ("default", "web"))
    assert info.value.check is CertCheck.CA


def test_a_garbage_ca_key_is_a_pem_error(ca_dir: Path) -> None:
    (ca_dir / "ca-key.pem").write_bytes(b"not a key\n")
    with pytest.raises(
        CertificateError, match=r"ca-key\.pem: not a usable PEM private key"
    ) as info:
        ca.issue_in_memory(ca_dir, ("default", "web"))
    assert info.value.check is CertCheck.PEM


# -- reading certificates ------------------------------------------------------------------------


def test_cert_info_reads_der_like_pem_and_hashes_the_der(ca_dir: Path) -> None:
    pem = ca.issue_in_memory(ca_dir, ("default", "web"), now=NOW)
    der = load(pem.cert).public_bytes(serialization.Encoding.DER)
    assert ca.cert_info(der) == ca.cert_info(pem.cert)
    assert ca.cert_info(pem.cert).sha256 == hashlib.sha256(der).hexdigest() == ca.xfcc_hash(der)
    assert len(ca.xfcc_hash(der)) == 64


def test_cert_info_of_a_certificate_without_a_spiffe_id() -> None:
    leaf = trustme.CA().issue_cert("web.example.com")
    info = ca.cert_info(leaf.cert_chain_pems[0].bytes())
    assert info.spiffe_id == ""
    assert info.not_before < info.not_after


def test_cert_info_reads_pem_after_explanatory_text(ca_dir: Path) -> None:
    pem = ca.issue_in_memory(ca_dir, ("default", "web"), now=NOW).cert
    assert ca.cert_info(b"Bag Attributes\n    localKeyID: 01\n" + pem) == ca.cert_info(pem)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x30\x03\x02\x01\x01"])
def test_cert_info_rejects_what_is_not_a_certificate(data: bytes) -> None:
    with pytest.raises(CertificateError) as info:
        ca.cert_info(data)
    assert info.value.check is CertCheck.PEM


def test_rotation_is_due_at_half_the_lifetime(ca_dir: Path) -> None:
    info = ca.cert_info(ca.issue_in_memory(ca_dir, ("default", "web"), 86400, now=NOW).cert)
    lifetime = dt.timedelta(days=1, minutes=2)  # notBefore is back-dated 2 minutes
    assert ca.rotation_due(info) == info.not_after - lifetime / 2
    assert ca.rotation_due(info, 0.25) == info.not_after - lifetime / 4


# -- load_pair: what a rotation refuses ----------------------------------------------------------


@pytest.fixture
def pair(ca_dir: Path) -> ca.IssuedPEM:
    return ca.issue_in_memory(ca_dir, ("default", "web"), 3600, now=NOW)


def test_a_good_pair_loads(pair: ca.IssuedPEM) -> None:
    info = ca.load_pair(pair.cert, pair.key, pair.root, now=NOW + dt.timedelta(minutes=30))
    assert info.spiffe_id == "spiffe://cluster.local/ns/default/sa/web"


def test_a_key_of_another_certificate_is_refused(ca_dir: Path, pair: ca.IssuedPEM) -> None:
    other = ca.issue_in_memory(ca_dir, ("default", "web"), 3600, now=NOW)
    err = expect(CertCheck.KEY_MISMATCH, pair.cert, other.key, pair.root, now=NOW)
    assert "does not belong to the certificate" in str(err)


def test_a_certificate_of_another_dev_ca_is_refused(tmp_path: Path, pair: ca.IssuedPEM) -> None:
    # Same issuer name, different key: only the signature check can tell.
    ca.init_ca(tmp_path / "other", now=NOW)
    other_root = (tmp_path / "other" / "ca.pem").read_bytes()
    err = expect(CertCheck.CHAIN, pair.cert, pair.key, other_root, now=NOW)
    assert "not signed by any of the 1 root(s)" in str(err)


def test_a_trustme_certificate_is_refused_by_our_bundle(pair: ca.IssuedPEM) -> None:
    foreign = trustme.CA().issue_cert("web.example.com")
    err = expect(
        CertCheck.CHAIN,
        foreign.cert_chain_pems[0].bytes(),
        foreign.private_key_pem.bytes(),
        pair.root,
        now=dt.datetime.now(dt.UTC),
    )
    assert "issuer" in str(err)


def test_a_bundle_of_several_roots_trusts_each(ca_dir: Path, tmp_path: Path) -> None:
    # Root rotation: the old and the new root side by side.
    ca.init_ca(tmp_path / "new", now=NOW)
    new = ca.issue_in_memory(tmp_path / "new", ("default", "web"), now=NOW)
    bundle = (ca_dir / "ca.pem").read_bytes() + new.root
    assert ca.load_pair(new.cert, new.key, bundle, now=NOW).spiffe_id.endswith("/sa/web")


def test_an_expired_certificate_is_refused(pair: ca.IssuedPEM) -> None:
    err = expect(CertCheck.EXPIRED, pair.cert, pair.key, pair.root, now=NOW + 2 * HOUR)
    assert "certificate expired at" in str(err)


def test_a_certificate_issued_in_the_future_is_not_yet_valid(ca_dir: Path) -> None:
    later = ca.issue_in_memory(ca_dir, ("default", "web"), 3600, now=NOW + HOUR)
    err = expect(CertCheck.NOT_YET_VALID, later.cert, later.key, later.root, now=NOW)
    assert "not valid before" in str(err)
    # Within the 2-minute clock-skew allowance it is already valid.
    ca.load_pair(later.cert, later.key, later.root, now=NOW + HOUR - dt.timedelta(minutes=1))


def test_an_expired_root_is_refused(ca_dir: Path, pair: ca.IssuedPEM) -> None:
    # A leaf made by hand to outlive its root, so only the root's validity fails.
    root = load(pair.root)
    key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    late = NOW + dt.timedelta(days=3651)
    leaf = _leaf(leaf_key, root.subject, key, late - HOUR, late + HOUR)
    err = expect(
        CertCheck.EXPIRED,
        leaf.public_bytes(serialization.Encoding.PEM),
        _pkcs8(leaf_key),
        pair.root,
        now=late,
    )
    assert "CA 'O=meshproxy dev CA' expired" in str(err)


def test_a_certificate_without_a_spiffe_id_is_refused_unless_allowed() -> None:
    other = trustme.CA()
    leaf = other.issue_cert("web.example.com")
    args = (leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes(), other.cert_pem.bytes())
    now = dt.datetime.now(dt.UTC)
    err = expect(CertCheck.NO_SPIFFE_ID, *args, now=now)
    assert "no spiffe:// URI" in str(err)
    assert ca.load_pair(*args, now=now, require_spiffe_id=False).spiffe_id == ""


def test_a_chain_through_an_intermediate_is_walked() -> None:
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("web.example.com")
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    key = leaf.private_key_pem.bytes()
    now = dt.datetime.now(dt.UTC)
    info = ca.load_pair(chain, key, root.cert_pem.bytes(), now=now, require_spiffe_id=False)
    assert info.sha256 == ca.cert_info(leaf.cert_chain_pems[0].bytes()).sha256
    # Without the intermediate the leaf does not reach the root.
    err = expect(
        CertCheck.CHAIN,
        leaf.cert_chain_pems[0].bytes(),
        key,
        root.cert_pem.bytes(),
        now=now,
        require_spiffe_id=False,
    )
    assert "the certificate (issuer" in str(err)


def test_our_root_signs_no_intermediate(ca_dir: Path, pair: ca.IssuedPEM) -> None:
    # pathlen 0: a CA made with the dev CA's key is not a valid link, as OpenSSL would say.
    root = load(pair.root)
    root_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")])
    mid = (
        _builder(mid_key, root.subject, NOW - HOUR, NOW + HOUR)
        .subject_name(mid_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _leaf(leaf_key, mid_name, mid_key, NOW - HOUR, NOW + HOUR)
    chain = leaf.public_bytes(serialization.Encoding.PEM) + mid.public_bytes(
        serialization.Encoding.PEM
    )
    err = expect(CertCheck.CHAIN, chain, _pkcs8(leaf_key), pair.root, now=NOW)
    assert "intermediate 'CN=intermediate'" in str(err)


def test_a_leaf_signed_by_a_non_ca_is_refused(pair: ca.IssuedPEM) -> None:
    # The workload's own key signs a certificate; putting the workload in the bundle must not
    # make it a CA.
    leaf_key = serialization.load_pem_private_key(pair.key, None)
    assert isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    child_key = ec.generate_private_key(ec.SECP256R1())
    child = _leaf(child_key, load(pair.cert).subject, leaf_key, NOW - HOUR, NOW + HOUR)
    expect(
        CertCheck.CHAIN,
        child.public_bytes(serialization.Encoding.PEM),
        _pkcs8(child_key),
        pair.cert,
        now=NOW,
    )


@pytest.mark.parametrize(
    ("which", "damage", "message"),
    [
        ("cert", lambda b: b"garbage", "certificate: no PEM certificate"),
        ("cert", lambda b: b"", "certificate: no PEM certificate"),
        ("cert", lambda b: b[: len(b) // 2], "certificate: truncated PEM"),
        ("cert", lambda b: b[:-30], "certificate: truncated PEM"),
        ("cert", lambda b: b + b"-----BEGIN CERT", "data after the last END"),
        ("cert", lambda b: b.replace(b"M", b"A", 5), "certificate: not a valid PEM certificate"),
        ("key", lambda b: b"", "private key: not a usable PEM private key"),
        ("key", lambda b: b[: len(b) // 2], "private key: not a usable PEM private key"),
        ("root", lambda b: b + b[: len(b) // 2], "trust bundle: truncated PEM"),
        ("root", lambda b: b"", "trust bundle: no PEM certificate"),
    ],
)
def test_a_broken_file_is_a_pem_error(
    pair: ca.IssuedPEM, which: str, damage: object, message: str
) -> None:
    files = {"cert": pair.cert, "key": pair.key, "root": pair.root}
    assert callable(damage)
    files[which] = damage(files[which])
    err = expect(CertCheck.PEM, files["cert"], files["key"], files["root"], now=NOW)
    assert message in str(err)


def test_a_chain_whose_second_certificate_is_cut_is_refused(pair: ca.IssuedPEM) -> None:
    # cryptography alone would drop the cut block and load the first certificate.
    chain = pair.cert + pair.root[:-40]
    err = expect(CertCheck.PEM, chain, pair.key, pair.root, now=NOW)
    assert "2 BEGIN CERTIFICATE, 1 END CERTIFICATE" in str(err)


def test_an_encrypted_key_is_refused(pair: ca.IssuedPEM) -> None:
    key = serialization.load_pem_private_key(pair.key, None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    err = expect(CertCheck.PEM, pair.cert, encrypted, pair.root, now=NOW)
    assert "encrypted" in str(err)


def test_load_pair_files_returns_the_bytes_it_checked(ca_dir: Path, tmp_path: Path) -> None:
    files = ca.issue(ca_dir, "default", "web", out=tmp_path / "o", now=NOW)
    loaded = ca.load_pair_files(files.cert, files.key, files.ca, now=NOW)
    assert loaded.info == files.info
    assert loaded.cert == files.cert.read_bytes()
    assert loaded.key == files.key.read_bytes()
    assert loaded.root == files.ca.read_bytes()


def test_load_pair_files_names_a_missing_file(ca_dir: Path, tmp_path: Path) -> None:
    files = ca.issue(ca_dir, "default", "web", out=tmp_path / "o", now=NOW)
    files.key.unlink()
    with pytest.raises(
        CertificateError, match=r"file: cannot read .*key\.pem: No such file"
    ) as info:
        ca.load_pair_files(files.cert, files.key, files.ca, now=NOW)
    assert info.value.check is CertCheck.FILE


def test_load_pair_files_checks_what_it_read(ca_dir: Path, tmp_path: Path) -> None:
    files = ca.issue(ca_dir, "default", "web", out=tmp_path / "o", now=NOW)
    other = ca.issue(ca_dir, "default", "web", out=tmp_path / "p", now=NOW)
    with pytest.raises(CertificateError) as info:
        ca.load_pair_files(files.cert, other.key, files.ca, now=NOW)
    assert info.value.check is CertCheck.KEY_MISMATCH


def test_an_unreadable_ca_is_a_ca_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").mkdir()
    (tmp_path / "ca-key.pem").write_bytes(b"")
    with pytest.raises(CertificateError, match="cannot read the CA in") as info:
        ca.trust_domain(tmp_path)
    assert info.value.check is CertCheck.CA


# -- writing files -------------------------------------------------------------------------------


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        ca.write_file_atomic(target, "not bytes", 0o600)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["key.pem"]


def test_an_atomic_write_sets_the_mode_exactly(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        ca.write_file_atomic(tmp_path / "cert.pem", b"x", 0o644)
    finally:
        os.umask(old)
    ca.write_file_atomic(tmp_path / "key.pem", b"y", 0o600)
    assert mode(tmp_path / "cert.pem") == 0o644
    assert mode(tmp_path / "key.pem") == 0o600


def test_a_watcher_never_reads_a_half_written_certificate(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = ca.issue(ca_dir, "default", "web", out=out)
    serials = {first.info.serial}
    done = threading.Event()
    seen: set[str] = set()
    errors: list[BaseException] = []

    def watch() -> None:
        # Bounded: stops when the writer is done, or after 20000 reads.
        for _ in range(20000):
            if done.is_set():
                return
            try:
                info = ca.cert_info(out.joinpath("cert.pem").read_bytes())
                seen.add(info.serial)
                # The key was written before this certificate: it is this one's or newer.
                key = serialization.load_pem_private_key(out.joinpath("key.pem").read_bytes(), None)
                assert isinstance(key, ec.EllipticCurvePrivateKey)
            except BaseException as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=watch, name="cert-watcher")
    reader.start()
    try:
        for _ in range(30):
            serials.add(ca.issue(ca_dir, "default", "web", out=out).info.serial)
    finally:
        done.set()
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert errors == []
    assert seen and seen <= serials
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]


# -- helpers -------------------------------------------------------------------------------------


def _builder(
    key: ec.EllipticCurvePrivateKey, issuer: x509.Name, start: dt.datetime, end: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _leaf(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.Certificate:
    uri = x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/hand")
    return (
        _builder(key, issuer, start, end)
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([uri]), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
