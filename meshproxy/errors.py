"""The error tree of meshproxy.

Owns every exception type the proxy raises on purpose. Each request-level error carries the HTTP
status Envoy would answer with (``status_hint``), Envoy's response flag (``flag``, e.g. ``UF``) and
the exact local-reply body Envoy sends (reference §2.5, §2.10), so the edge can turn any of them into
a local reply without a lookup table of its own. Foreign errors (h11, ssl, OSError) are mapped into
these at the I/O edge with ``raise ... from``.

Rules: no imports beyond the standard library; nothing here touches a socket.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Envoy's local reply bodies (reference §2.10); byte-for-byte.
_RESET_PREFIX = "upstream connect error or disconnect/reset before headers. reset reason: "


class MeshProxyError(Exception):
    """Base class of every error meshproxy raises deliberately."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigIssue:
    """One problem found in the configuration, located to file, line and field path."""

    file: str
    line: int
    where: str  # "VirtualService reviews" or "" for file-level problems
    path: str  # "spec.http[0].route[0].destination.subset" or ""
    message: str

    def __str__(self) -> str:
        loc = f"{self.file}:{self.line}"
        subject = f" {self.where}:" if self.where else ""
        field = f" {self.path}:" if self.path else ""
        return f"{loc}:{subject}{field} {self.message}"


class ConfigError(MeshProxyError):
    """The configuration is invalid; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


# ---------------------------------------------------------------------------------------------
# Certificates (the dev CA and the workload's certificate files; ``io/ca.py``)


class CertCheck(enum.Enum):
    """Which check a certificate, key or trust bundle failed."""

    CA = "ca directory"  # the CA directory: missing, already initialised, unusable root or key
    FILE = "file"  # a certificate, key or bundle file cannot be read
    PEM = "pem"  # a file is not (complete) PEM of the expected kind
    KEY_MISMATCH = "key mismatch"  # the private key is not the leaf certificate's key
    CHAIN = "chain"  # the leaf does not chain to a root of the trust bundle
    EXPIRED = "expired"  # a certificate of the chain is past its notAfter
    NOT_YET_VALID = "not yet valid"  # a certificate of the chain is before its notBefore
    NO_SPIFFE_ID = "no spiffe id"  # the leaf carries no spiffe:// URI SAN


class CertificateError(MeshProxyError):
    """A certificate, key or trust bundle was rejected; ``check`` says which check failed.

    Not a request-level error: it stops ``meshproxy ca``, a proxy start, or one rotation (the
    caller keeps the pair it had).
    """

    def __init__(self, check: CertCheck, message: str) -> None:
        super().__init__(f"{check.value}: {message}")
        self.check = check


# ---------------------------------------------------------------------------------------------
# Request-level errors: each one is a local reply.


class ProxyError(MeshProxyError):
    """An error that ends a request with a local reply."""

    status_hint: int = 503
    flag: str = ""
    body: bytes = b""
    # Close the downstream connection after the reply (malformed input leaves the stream unusable).
    close: bool = False
    # Extra response headers of the local reply (lower-case name, value).
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.__class__.__name__)
        self.detail = detail


class DirectReply(ProxyError):
    """A reply the route itself prescribes: redirect, directResponse, CORS preflight, fault abort."""

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        *,
        flag: str = "",
        headers: tuple[tuple[bytes, bytes], ...] = (),
        detail: str = "",
    ) -> None:
        super().__init__(detail or f"direct reply {status}")
        self.status_hint = status
        self.body = body
        self.flag = flag
        self.headers = headers


class NoRoute(ProxyError):
    """No route matched the request (Envoy: 404, empty body, flag NR)."""

    status_hint = 404
    flag = "NR"


class BlackHole(ProxyError):
    """REGISTRY_ONLY and the host is not in the registry (Istio's BlackHoleCluster: 502)."""

    status_hint = 502
    flag = ""  # Istio answers from a direct_response route: no response flag


class NoHealthyUpstream(ProxyError):
    """The destination has no endpoint to send to (503 UH)."""

    status_hint = 503
    flag = "UH"
    body = b"no healthy upstream"


class ConnectFailure(ProxyError):
    """The upstream TCP connect failed or timed out (503 UF)."""

    status_hint = 503
    flag = "UF"
    body = (_RESET_PREFIX + "remote connection failure").encode()


class UpstreamReset(ProxyError):
    """The upstream closed the connection before a complete response head (503 UC)."""

    status_hint = 503
    flag = "UC"
    body = (_RESET_PREFIX + "connection termination").encode()


class UpstreamOverflow(ProxyError):
    """A concurrency limit of the cluster refused the request (503 UO, x-envoy-overloaded)."""

    status_hint = 503
    flag = "UO"
    body = (_RESET_PREFIX + "overflow").encode()


class UpstreamTimeout(ProxyError):
    """The route deadline passed before the response began (504 UT)."""

    status_hint = 504
    flag = "UT"
    body = b"upstream request timeout"


class UpstreamProtocolError(ProxyError):
    """The upstream sent something that is not valid HTTP/1.1 (502 UPE)."""

    status_hint = 502
    flag = "UPE"
    body = (_RESET_PREFIX + "protocol error").encode()


class BadRequest(ProxyError):
    """Malformed downstream request (400 DPE, then close)."""

    status_hint = 400
    flag = "DPE"
    body = b"Bad Request"
    close = True


class HeadersTooLarge(BadRequest):
    """Request head over the limit (431, Envoy ``max_request_headers_kb`` 60)."""

    status_hint = 431
    body = b"Request Header Fields Too Large"


class UpgradeRequired(BadRequest):
    """HTTP/1.0 or an unknown HTTP version (Envoy: 426 with ``accept_http_10`` off)."""

    status_hint = 426
    body = b"Upgrade Required"


class NotImplementedEncoding(BadRequest):
    """A Transfer-Encoding other than chunked (Envoy: 501)."""

    status_hint = 501
    body = b"Not Implemented"


class AccessDenied(ProxyError):
    """An AuthorizationPolicy denied the request (Envoy's RBAC filter: 403, no response flag;
    the deciding policy is in the response code details, ``rbac_access_denied_matched_policy``)."""

    status_hint = 403
    flag = ""
    body = b"RBAC: access denied"


class UpgradeForbidden(ProxyError):
    """An ``Upgrade`` other than websocket (Envoy: 403 without a matching upgrade_config)."""

    status_hint = 403
    flag = ""
    body = b""


class RequestTimeout(BadRequest):
    """The client did not finish sending its request head in time (Envoy: 408)."""

    status_hint = 408
    body = b"request timeout"
