"""Outbound TLS origination: which TLS (if any) a connection to an endpoint uses, decided at load.

Owns the decision Istio's ``cluster_tls.go`` makes for each cluster and endpoint, as a frozen
``Origination`` the edge (``io/tls.py``) turns into an ``ssl.SSLContext``:

* ``DestinationRule.trafficPolicy.tls`` (after subset and port-level merging) wins: ``DISABLE`` is
  plaintext; ``SIMPLE`` verifies the server (``caCertificates``, else the system roots) and
  sends ``sni``; ``MUTUAL`` also presents ``clientCertificate``/``privateKey``; ``ISTIO_MUTUAL``
  presents this workload's certificate and verifies the server against the mesh trust bundle.
* No ``tls`` setting: Istio's auto mTLS (``enableAutoMtls``, on by default) gives an endpoint
  labelled ``security.istio.io/tlsMode: istio`` (a sidecar-injected workload) ``ISTIO_MUTUAL``
  and every other endpoint plaintext.
* ``ISTIO_MUTUAL`` sends the cluster name as SNI (``outbound_.<port>_.<subset>_.<host>``) and
  ALPN ``istio-http/1.1`` (Istio's ``istio.alpn`` filter) and checks the server's URI SAN against
  the destination's expected identities: the DestinationRule's ``subjectAltNames``, else the
  ServiceEntry's ``subjectAltNames``, else the endpoints' service accounts as SPIFFE IDs. When
  none is known, only the chain is checked (Istio does the same for a ServiceEntry without them).
* ``SIMPLE``/``MUTUAL`` check ``subjectAltNames`` when given (DNS or URI SAN, exact), else the
  host name (``sni``, else the service host) as a browser would (Istio's
  ``VERIFY_CERTIFICATE_AT_CLIENT``); ``insecureSkipVerify`` turns both checks off.

Rules: pure; built once per endpoint pool, never per request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshproxy.config.model import ClientTLSSettings, TLSMode

# The endpoint label Istio's injector sets on a workload with a sidecar (auto mTLS).
TLS_MODE_LABEL = "security.istio.io/tlsMode"
# ALPN Istio's client sidecar offers for HTTP/1.1 over mTLS (pilot/pkg/xds/filters/filters.go).
ISTIO_ALPN_HTTP11 = "istio-http/1.1"


class Verify(enum.Enum):
    """How the server's certificate is checked beyond the chain."""

    NONE = "none"  # insecureSkipVerify: not even the chain
    CHAIN = "chain"  # the chain only (no identity known)
    SAN = "san"  # the chain and one of ``expected`` among the server's SANs
    HOSTNAME = "hostname"  # the chain and the host name (``server_name``)


@dataclass(frozen=True, slots=True, kw_only=True)
class Origination:
    """How to originate TLS to one endpoint; hashable, so contexts can be cached by it."""

    mode: TLSMode  # SIMPLE, MUTUAL or ISTIO_MUTUAL (None stands for plaintext)
    server_name: str  # SNI ("" sends none)
    verify: Verify
    expected: tuple[str, ...] = ()  # SAN values, for Verify.SAN
    ca_certificates: str = ""  # a PEM file; "" = the mesh bundle (ISTIO_MUTUAL) or system roots
    client_certificate: str = ""  # MUTUAL
    private_key: str = ""  # MUTUAL
    alpn: tuple[str, ...] = ()
    auto: bool = False  # chosen by auto mTLS, not by a DestinationRule


def istio_sni(port: int, subset: str, host: str) -> str:
    """Istio's SNI for ISTIO_MUTUAL: the cluster name with ``_.`` separators."""
    return f"outbound_.{port}_.{subset}_.{host}"


def origination(
    tls: ClientTLSSettings | None,
    *,
    host: str,
    port: int,
    subset: str,
    endpoint_labels: dict[str, str] | None = None,
    service_sans: tuple[str, ...] = (),
    account_sans: tuple[str, ...] = (),
) -> Origination | None:
    """The TLS to originate to an endpoint of ``host:port`` (``subset``), or None: plaintext.

    ``tls`` is the effective ``trafficPolicy.tls``; ``service_sans`` the ServiceEntry's
    ``subjectAltNames``; ``account_sans`` the SPIFFE IDs of the endpoints' service accounts.
    """
    if tls is None:
        labels = endpoint_labels or {}
        if labels.get(TLS_MODE_LABEL) != "istio":
            return None
        return _istio_mutual(
            ClientTLSSettings(), host, port, subset, service_sans, account_sans, True
        )
    mode = tls.mode
    if mode is TLSMode.DISABLE:
        return None
    if mode is TLSMode.ISTIO_MUTUAL:
        return _istio_mutual(tls, host, port, subset, service_sans, account_sans, False)
    if mode is TLSMode.SIMPLE or mode is TLSMode.MUTUAL:
        server_name = tls.sni or host
        if tls.insecure_skip_verify:
            verify = Verify.NONE
        elif tls.subject_alt_names:
            verify = Verify.SAN
        else:
            verify = Verify.HOSTNAME
        return Origination(
            mode=mode,
            server_name=server_name,
            verify=verify,
            expected=tls.subject_alt_names,
            ca_certificates=tls.ca_certificates,
            client_certificate=tls.client_certificate if mode is TLSMode.MUTUAL else "",
            private_key=tls.private_key if mode is TLSMode.MUTUAL else "",
        )
    raise AssertionError(mode)  # pragma: no cover - every TLSMode is handled above


def _istio_mutual(
    tls: ClientTLSSettings,
    host: str,
    port: int,
    subset: str,
    service_sans: tuple[str, ...],
    account_sans: tuple[str, ...],
    auto: bool,
) -> Origination:
    expected = tls.subject_alt_names or service_sans or account_sans
    return Origination(
        mode=TLSMode.ISTIO_MUTUAL,
        server_name=tls.sni or istio_sni(port, subset, host),
        verify=Verify.SAN if expected else Verify.CHAIN,
        expected=expected,
        alpn=(ISTIO_ALPN_HTTP11,),
        auto=auto,
    )
