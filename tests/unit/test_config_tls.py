"""Validation of the TLS settings: the bootstrap's ``spec.tls``, DestinationRule ``tls``, and
mTLS asked for without a workload certificate. Each error names file, line and field."""

from __future__ import annotations

import pytest

from meshproxy.config.load import load_texts
from tests.config_helpers import BOOT, doc, docs, line_of, located, only_issue

INBOUND_BOOT = BOOT.replace(
    "outbound: {address: 127.0.0.1:0}\n",
    "outbound: {address: 127.0.0.1:0}\n  inbound: {address: 127.0.0.1:0, app: 127.0.0.1:8080}\n",
)
SE = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      resolution: STATIC
      ports: [{number: 9080, name: http}]
      endpoints: [{address: 127.0.0.1}]
    """
)
FILES = "  tls: {certChain: /c/cert.pem, privateKey: /c/key.pem, rootCert: /c/ca.pem}\n"


def _dr(tls: str) -> str:
    return doc(
        f"""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: reviews}}
        spec:
          host: reviews
          trafficPolicy:
            tls: {tls}
        """
    )


def test_complete_tls_settings_load() -> None:
    text = docs(BOOT + FILES, SE, _dr("{mode: ISTIO_MUTUAL, sni: reviews.example}"))
    config = load_texts([("m.yaml", text)])
    tls = config.bootstrap.spec.tls
    assert tls is not None
    assert (tls.cert_chain, tls.private_key, tls.root_cert) == (
        "/c/cert.pem",
        "/c/key.pem",
        "/c/ca.pem",
    )
    assert tls.ttl == 24 * 3600  # Istio's workload certificate lifetime
    assert tls.handshake_timeout == 10.0


@pytest.mark.parametrize(
    ("tls", "needle", "path", "message"),
    [
        (
            "  tls: {certChain: /c/cert.pem, rootCert: /c/ca.pem}\n",
            "tls:",
            "spec.tls.privateKey",
            "required (or set spec.tls.ca for a dev CA)",
        ),
        (
            "  tls: {ca: /ca, certChain: /c/cert.pem}\n",
            "tls:",
            "spec.tls.certChain",
            "set either ca (self-issued) or the three files",
        ),
        ("  tls: {ca: /ca, ttl: 30s}\n", "tls:", "spec.tls.ttl", "must be at least 1m"),
        (
            "  tls: {ca: /ca, handshakeTimeout: 0s}\n",
            "tls:",
            "spec.tls.handshakeTimeout",
            "must be positive",
        ),
    ],
)
def test_bad_workload_tls(tls: str, needle: str, path: str, message: str) -> None:
    text = BOOT + tls
    issue = only_issue(("m.yaml", text))
    assert located(issue)[0] == "m.yaml"
    assert (issue.path, issue.message) == (path, message)


@pytest.mark.parametrize(
    ("tls", "path", "message"),
    [
        (
            "{mode: MUTUAL, credentialName: reviews-secret}",
            "spec.trafficPolicy.tls.credentialName",
            "Kubernetes secrets are not read by meshproxy: give clientCertificate, privateKey "
            "and caCertificates file paths",
        ),
        (
            "{mode: MUTUAL, clientCertificate: /c/cert.pem}",
            "spec.trafficPolicy.tls.privateKey",
            "required with MUTUAL",
        ),
        (
            "{mode: ISTIO_MUTUAL, caCertificates: /c/ca.pem}",
            "spec.trafficPolicy.tls.caCertificates",
            "must be empty with ISTIO_MUTUAL (the mesh's)",
        ),
        (
            "{mode: SIMPLE, privateKey: /c/key.pem}",
            "spec.trafficPolicy.tls.privateKey",
            "not used with SIMPLE",
        ),
    ],
)
def test_bad_destination_rule_tls(tls: str, path: str, message: str) -> None:
    text = docs(BOOT + FILES, SE, _dr(tls))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "tls: {mode"),
        "DestinationRule reviews",
        path,
    )
    assert issue.message == message


def test_istio_mutual_without_workload_certificate() -> None:
    text = docs(BOOT, SE, _dr("{mode: ISTIO_MUTUAL}"))
    issue = only_issue(("m.yaml", text))
    assert issue.path == "spec.trafficPolicy.tls.mode"
    assert issue.message == (
        "ISTIO_MUTUAL needs this workload's certificate: set spec.tls in the MeshProxy bootstrap"
    )


def test_strict_without_workload_certificate() -> None:
    pa = doc(
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default}
        spec:
          mtls: {mode: STRICT}
        """
    )
    text = docs(INBOUND_BOOT, pa)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "mtls: {mode: STRICT}"),
        "PeerAuthentication default",
        "spec.mtls.mode",
    )
    assert issue.message.startswith("STRICT needs this workload's certificate")


def test_strict_for_another_namespace_needs_no_certificate() -> None:
    pa = doc(
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: other}
        spec:
          mtls: {mode: STRICT}
        """
    )
    config = load_texts([("m.yaml", docs(INBOUND_BOOT, pa))])
    assert len(config.peer_authentications) == 1
