"""Workload identity: Istio's SPIFFE IDs and the principal form AuthorizationPolicy compares.

Owns the one spelling of an Istio workload identity (reference §4; istio/istio ``pkg/spiffe``):

- the URI ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`` that a workload
  certificate carries as its URI SAN, and
- the *principal*, the same thing without the ``spiffe://`` scheme
  (``<trust-domain>/ns/<namespace>/sa/<service-account>``), which is what AuthorizationPolicy's
  ``principals`` and ``source.principal`` are written against (security/v1beta1
  ``authorization_policy.proto`` Source.principals).

Parsing is strict, as the SPIFFE ID spec (spiffe/spiffe ``standards/SPIFFE-ID.md`` §2) and
Istio's ``spiffe.ParseIdentity`` are: the scheme is exactly ``spiffe``, the trust domain is lower
case letters, digits, ``.``, ``-`` and ``_``; the path is exactly ``/ns/<ns>/sa/<sa>`` with
non-empty segments of letters, digits, ``.``, ``-``, ``_`` (no ``.``/``..`` segments, no
percent-encoding, query, fragment, port or user info). Anything else is not an Istio identity and
parses to ``None``: a peer presenting it is treated as having no identity.

Rules: pure; no ssl, no sockets. Certificates are read by ``io/``; this module sees strings only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"

# SPIFFE-ID.md §2.1 (trust domain) and §2.2 (path segments).
_SPIFFE = re.compile(
    r"spiffe://(?P<td>[a-z0-9._-]+)/ns/(?P<ns>[A-Za-z0-9._-]+)/sa/(?P<sa>[A-Za-z0-9._-]+)"
)
_DOT_SEGMENTS = frozenset({".", ".."})


@dataclass(frozen=True, slots=True, kw_only=True)
class SpiffeId:
    """One Istio workload identity."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        """``spiffe://td/ns/NS/sa/SA``: the certificate's URI SAN."""
        return spiffe_uri(self.trust_domain, self.namespace, self.service_account)

    @property
    def principal(self) -> str:
        """``td/ns/NS/sa/SA``: AuthorizationPolicy's form (the URI without its scheme)."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def spiffe_uri(trust_domain: str, namespace: str, service_account: str) -> str:
    """Istio's workload identity URI, ``spiffe://<trust domain>/ns/<namespace>/sa/<account>``."""
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe(uri: str) -> SpiffeId | None:
    """The identity in ``uri``, or ``None`` unless it is exactly an Istio SPIFFE ID."""
    m = _SPIFFE.fullmatch(uri)
    if m is None:
        return None
    ns, sa = m.group("ns"), m.group("sa")
    if ns in _DOT_SEGMENTS or sa in _DOT_SEGMENTS:
        return None
    return SpiffeId(trust_domain=m.group("td"), namespace=ns, service_account=sa)


def parse_principal(principal: str) -> SpiffeId | None:
    """The identity in an AuthorizationPolicy principal (``td/ns/NS/sa/SA``), or ``None``."""
    if not principal:
        return None
    return parse_spiffe(SCHEME + principal)
