"""TLS at the edge: this workload's certificate, the contexts built from it, and their rotation.

Owns three things:

* **Workload credentials** (``WorkloadCredentials``): the certificate chain, key and trust bundle
  of ``spec.tls``, read from files (cert-manager's csi-driver-spiffe, SPIRE's spiffe-helper) or
  issued by the proxy itself from a dev CA directory (``spec.tls.ca``: Istio's 24 h lifetime,
  re-issued at half of it, istio-agent's ``SECRET_GRACE_PERIOD_RATIO`` 0.5). Every generation is
  checked before use (the key matches the leaf, the leaf chains to the bundle, it is valid now):
  a half-written or mismatched set is rejected with one log line and the old one stays. The files
  are polled (size, mtime, inode) so a rewrite is picked up within a poll period; new handshakes
  use the new generation, established connections keep theirs.
* **Contexts**: the inbound server context (client certificate required, chained to the bundle;
  identity is then a matter for AuthorizationPolicy, as in Istio) and, per ``Origination``
  (``core/origination.py``), the outbound client contexts, cached and rebuilt on rotation.
* **Peer facts**: a connection's peer SPIFFE ID and certificate hash (Envoy's XFCC ``Hash``).

Rules: contexts are built at load or rotation, never per connection; keys never reach a log,
``/certs`` or ``/config_dump``; the validated bytes are what the contexts load (copied to a private
0700 directory), so a file rewritten between the check and the load cannot slip in unchecked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshproxy.config.model import TLSMode, WorkloadTLS
from meshproxy.core.identity import parse_spiffe
from meshproxy.core.origination import ISTIO_ALPN_HTTP11, Origination, Verify
from meshproxy.errors import CertCheck, CertificateError

if TYPE_CHECKING:
    from meshproxy.io.ca import CertInfo

# ``meshproxy.io.ca`` (and with it ``cryptography``, about 9 MiB of RSS) is imported only by a
# proxy that holds a certificate: the functions below import it when first called.

log = logging.getLogger(__name__)

# ALPN the inbound side accepts: Istio's mTLS HTTP chains match these (filterchain_options.go),
# plain http/1.1 for a non-Istio TLS client.
SERVER_ALPN = ("istio-http/1.1", "istio-http/1.0", "http/1.1")
# Polling period for certificate files: "within seconds" of a rewrite (issue #5 §1).
POLL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What a TLS peer proved: its SPIFFE ID ("" when its certificate has none) and the hex
    SHA-256 of its certificate (DER), as Envoy's ``x-forwarded-client-cert`` ``Hash``."""

    uri: str
    cert_hash: str


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerIdentity | None:
    """The peer's identity from a completed handshake; None when it sent no certificate."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    # Only a well-formed SPIFFE ID is an identity (core/identity.py): the URI SAN's text goes
    # verbatim into x-forwarded-client-cert, the principal and the logs, so one that merely
    # starts with spiffe:// could add XFCC fields (; , ") or header lines (CR LF) of its own.
    uri = next((v for v in _sans(ssl_object, "URI") if parse_spiffe(v) is not None), "")
    return PeerIdentity(uri=uri, cert_hash=hashlib.sha256(der).hexdigest())


def _sans(ssl_object: ssl.SSLObject | ssl.SSLSocket, *kinds: str) -> list[str]:
    """The peer certificate's SAN values of the given kinds (``getpeercert()``'s pairs)."""
    cert = ssl_object.getpeercert()
    out: list[str] = []
    if cert:
        for entry in cert.get("subjectAltName", ()):
            kind, value = entry[0], entry[1]
            if kind in kinds and isinstance(value, str):
                out.append(value)
    return out


def server_sans(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, ...]:
    """Every DNS and URI SAN of the server's certificate (for a ``subjectAltNames`` check)."""
    return tuple(_sans(ssl_object, "URI", "DNS"))


@dataclass(frozen=True, slots=True)
class Generation:
    """One validated set of credentials and the contexts built from it."""

    number: int
    leaf: CertInfo
    roots: tuple[CertInfo, ...]
    server: ssl.SSLContext
    client: ssl.SSLContext  # ISTIO_MUTUAL origination
    cert_file: str
    key_file: str
    root_pem: bytes
    loaded_at: float


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    side = (
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx = ssl.SSLContext(side)
    # Istio's mesh minimum is TLS 1.2 (meshConfig.meshMTLS.minProtocolVersion default).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class WorkloadCredentials:
    """This workload's certificate, key and bundle: loaded, checked, rotated; contexts from them."""

    def __init__(
        self,
        settings: WorkloadTLS,
        *,
        base: Path,
        namespace: str,
        service_account: str,
        on_rotate: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._base = base  # relative paths in spec.tls resolve against this (the working directory)
        self._namespace = namespace
        self._service_account = service_account
        self._on_rotate = on_rotate
        self.current: Generation | None = None
        self.rotations = 0  # generations loaded after the first
        self.rejected = 0  # candidate generations refused (half-written, mismatched, expired)
        self.last_error = ""
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._private = Path(tempfile.mkdtemp(prefix="meshproxy-tls-"))
        os.chmod(self._private, 0o700)
        self._task: asyncio.Task[None] | None = None
        self._reissue_at = 0.0

    # -- paths ----------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self._base / path

    @property
    def self_issued(self) -> bool:
        return bool(self.settings.ca)

    def _files(self) -> tuple[Path, Path, Path]:
        s = self.settings
        return self._path(s.cert_chain), self._path(s.private_key), self._path(s.root_cert)

    # -- loading --------------------------------------------------------------------------------
    def load(self) -> Generation:
        """Load the first generation; raises ``CertificateError`` (the proxy does not start)."""
        generation = self._candidate()
        self._install(generation)
        return generation

    def _candidate(self) -> Generation:
        if self.self_issued:
            try:
                from meshproxy.io.ca import issue_in_memory

                cert_pem, key_pem, root_pem = issue_in_memory(
                    self._path(self.settings.ca),
                    (self._namespace, self._service_account),
                    self.settings.ttl,
                )
            except ValueError as exc:  # a namespace or account the CA cannot name
                raise CertificateError(CertCheck.CA, str(exc)) from exc
        else:
            self._stamp = self._stat()
            cert_path, key_path, root_path = self._files()
            try:
                cert_pem = cert_path.read_bytes()
                key_pem = key_path.read_bytes()
                root_pem = root_path.read_bytes()
            except OSError as exc:
                raise CertificateError(
                    CertCheck.PEM, f"cannot read {exc.filename}: {exc.strerror}"
                ) from exc
        from meshproxy.io.ca import load_pair

        leaf = load_pair(cert_pem, key_pem, root_pem)
        return self._build(cert_pem, key_pem, root_pem, leaf)

    def _build(
        self, cert_pem: bytes, key_pem: bytes, root_pem: bytes, leaf: CertInfo
    ) -> Generation:
        number = self.current.number + 1 if self.current is not None else 1
        cert_file = self._private / f"cert-{number}.pem"
        key_file = self._private / f"key-{number}.pem"
        try:
            # Made again if it went: a host's temporary-file cleaner (systemd-tmpfiles, 10 days
            # unused under /tmp) may remove it under a long-running proxy.
            self._private.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(key_pem)
            cert_file.write_bytes(cert_pem)
        except OSError as exc:
            raise CertificateError(
                CertCheck.PEM, f"cannot keep a private copy in {self._private}: {exc.strerror}"
            ) from exc
        from meshproxy.io.ca import cert_info

        blocks = _split_pem(root_pem)
        roots = tuple(cert_info(p) for p in blocks)
        # Only the certificate blocks: a bundle made from Mozilla's list has UTF-8 comment lines
        # ("# Issuer: ...") that the checks allow but ``cadata`` (ASCII text) does not.
        root_pem = b"".join(blocks)
        try:
            server = _base_context(ssl.Purpose.CLIENT_AUTH)
            server.load_cert_chain(cert_file, key_file)
            server.load_verify_locations(cadata=root_pem.decode("ascii"))
            server.verify_mode = ssl.CERT_REQUIRED
            server.set_alpn_protocols(list(SERVER_ALPN))
            client = _base_context(ssl.Purpose.SERVER_AUTH)
            # The server's identity is its URI SAN, checked against the destination's expected
            # SPIFFE IDs after the handshake (Istio's match_subject_alt_names), not a host name.
            client.check_hostname = False
            client.verify_mode = ssl.CERT_REQUIRED
            client.load_cert_chain(cert_file, key_file)
            client.load_verify_locations(cadata=root_pem.decode("ascii"))
            # ISTIO_MUTUAL always offers Istio's ALPN: set here, with the generation, so that
            # no file is read when a connection is made (the private copies may be gone).
            client.set_alpn_protocols([ISTIO_ALPN_HTTP11])
        except (ssl.SSLError, ValueError) as exc:
            raise CertificateError(
                CertCheck.PEM, f"the TLS library refused the credentials: {exc}"
            ) from exc
        return Generation(
            number=number,
            leaf=leaf,
            roots=roots,
            server=server,
            client=client,
            cert_file=str(cert_file),
            key_file=str(key_file),
            root_pem=root_pem,
            loaded_at=time.time(),
        )

    def _install(self, generation: Generation) -> None:
        old = self.current
        self.current = generation
        if old is not None:
            self.rotations += 1
            log.info(
                "certificate rotated: serial %s -> %s (%s, expires %s)",
                old.leaf.serial,
                generation.leaf.serial,
                generation.leaf.spiffe_id,
                _iso(generation.leaf.not_after.timestamp()),
            )
            # The files of the old generation are no longer needed: contexts hold their copies.
            for name in (old.cert_file, old.key_file):
                Path(name).unlink(missing_ok=True)
        if self.self_issued:
            # istio-agent: re-issue when half the lifetime is left (SECRET_GRACE_PERIOD_RATIO),
            # the lifetime counted from issue, as its ``rotateTime`` does (``ExpireTime -
            # ratio * (ExpireTime - CreatedTime)``), not from notBefore: notBefore is back-dated
            # by the 2-minute clock-skew grace, so counting from it would make a short-lived
            # certificate (2m) due at once and re-issued at every poll.
            expires = generation.leaf.not_after.timestamp()
            issued = generation.loaded_at
            from meshproxy.io.ca import ROTATION_RATIO

            self._reissue_at = expires - ROTATION_RATIO * max(0.0, expires - issued)
        if old is not None and self._on_rotate is not None:
            self._on_rotate()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                out.append((0, 0, 0))
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def check(self) -> bool:
        """Load a new generation if the files changed (or a re-issue is due); True if rotated.

        A candidate that fails a check is refused with one log line and the current generation
        stays; the same unchanged files are not tried again until they change.
        """
        if self.self_issued:
            if time.time() < self._reissue_at:
                return False
        elif self._stat() == self._stamp:
            return False
        try:
            generation = self._candidate()
        except CertificateError as exc:
            self.rejected += 1
            self.last_error = str(exc)
            serial = self.current.leaf.serial if self.current is not None else "-"
            log.warning("new certificate rejected, keeping serial %s: %s", serial, exc)
            if self.self_issued:
                self._reissue_at = time.time() + POLL_SECONDS * 10  # try again later
            return False
        self._install(generation)
        return True

    # -- the watcher ----------------------------------------------------------------------------
    def start_watching(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._watch(), name="tls-credentials-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            # Reading and checking a few KiB of PEM is quick; do it on the loop.
            try:
                self.check()
            except Exception as exc:  # the watcher must outlive a failed try, or rotation stops
                self.rejected += 1
                self.last_error = f"unexpected error: {exc!r}"
                log.exception("certificate check failed; keeping the current certificate")

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        shutil.rmtree(self._private, ignore_errors=True)

    # -- views ----------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, object]]:
        """``/certs``: each certificate held, with SPIFFE ID, serial and validity; never a key."""
        gen = self.current
        if gen is None:
            return []
        source = (
            f"issued from dev CA {self.settings.ca}"
            if self.self_issued
            else f"{self.settings.cert_chain}"
        )
        out: list[dict[str, object]] = [_describe("workload", gen.leaf, source)]
        out.extend(
            _describe("root", root, self.settings.root_cert or self.settings.ca)
            for root in gen.roots
        )
        return out

    def expiries(self) -> list[tuple[str, float]]:
        gen = self.current
        if gen is None:
            return []
        return [("workload", gen.leaf.not_after.timestamp())] + [
            (f"root:{r.serial}", r.not_after.timestamp()) for r in gen.roots
        ]


def _describe(kind: str, info: CertInfo, source: str) -> dict[str, object]:
    return {
        "kind": kind,
        "spiffe_id": info.spiffe_id,
        "serial": info.serial,
        "subject": info.subject,
        "issuer": info.issuer,
        "not_before": _iso(info.not_before.timestamp()),
        "not_after": _iso(info.not_after.timestamp()),
        "days_until_expiration": round((info.not_after.timestamp() - time.time()) / 86400, 2),
        "source": source,
    }


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def _split_pem(bundle: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    parts = []
    for chunk in bundle.split(marker):
        if b"-----BEGIN CERTIFICATE-----" in chunk:
            parts.append(chunk[chunk.index(b"-----BEGIN") :] + marker + b"\n")
    return parts


class ClientContexts:
    """Outbound ``SSLContext``s by ``Origination``: built once, rebuilt when credentials rotate."""

    def __init__(self, credentials: WorkloadCredentials | None) -> None:
        self._credentials = credentials
        self._cache: dict[Origination, ssl.SSLContext] = {}
        self._generation = 0

    @property
    def has_workload_certificate(self) -> bool:
        return self._credentials is not None and self._credentials.current is not None

    def context(self, origination: Origination) -> ssl.SSLContext:
        """The context for an origination; raises ``CertificateError`` when it cannot be built."""
        creds = self._credentials
        if origination.mode is TLSMode.ISTIO_MUTUAL:
            if creds is None or creds.current is None:
                raise CertificateError(
                    CertCheck.PEM, "ISTIO_MUTUAL needs this workload's certificate (spec.tls)"
                )
            if creds.current.number != self._generation:
                self._cache.clear()
                self._generation = creds.current.number
            found = self._cache.get(origination)
            if found is None:
                found = creds.current.client
                if origination.alpn and origination.alpn != (ISTIO_ALPN_HTTP11,):
                    found = self._with_alpn(origination, creds.current)
                self._cache[origination] = found
            return found
        found = self._cache.get(origination)
        if found is None:
            found = self._cache[origination] = _external_context(origination)
        return found

    def _with_alpn(self, origination: Origination, gen: Generation) -> ssl.SSLContext:
        ctx = _base_context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(gen.cert_file, gen.key_file)
        ctx.load_verify_locations(cadata=gen.root_pem.decode("ascii"))
        ctx.set_alpn_protocols(list(origination.alpn))
        return ctx


def _external_context(origination: Origination) -> ssl.SSLContext:
    """SIMPLE / MUTUAL: the DestinationRule's files (or the system roots)."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH)
    try:
        if origination.verify is Verify.NONE:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.check_hostname = origination.verify is Verify.HOSTNAME
            ctx.verify_mode = ssl.CERT_REQUIRED
            if origination.ca_certificates:
                ctx.load_verify_locations(cafile=origination.ca_certificates)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if origination.mode is TLSMode.MUTUAL:
            ctx.load_cert_chain(origination.client_certificate, origination.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            CertCheck.PEM, f"cannot build the {origination.mode.value} context: {exc}"
        ) from exc
    if origination.alpn:
        ctx.set_alpn_protocols(list(origination.alpn))
    return ctx


def check_server_identity(origination: Origination, ssl_object: ssl.SSLObject) -> str:
    """ "" when the server is who the origination expects, else why not (for flag UF)."""
    if origination.verify is not Verify.SAN:
        return ""
    seen = server_sans(ssl_object)
    expected = origination.expected
    for value in seen:
        if value in expected:
            return ""
    shown = ", ".join(seen) or "no SAN"
    return f"upstream identity {shown} is not one of {', '.join(expected)}"


def verify_failure_reason(exc: BaseException) -> str:
    """A short, stable reason for a failed handshake, for the log and the failure counter."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "handshake timed out"
    if isinstance(exc, UnicodeDecodeError):
        return f"certificate name is not UTF-8: {exc.object[:80]!r}"
    return str(exc) or type(exc).__name__


__all__ = [
    "SERVER_ALPN",
    "ClientContexts",
    "Generation",
    "PeerIdentity",
    "WorkloadCredentials",
    "check_server_identity",
    "peer_identity",
    "verify_failure_reason",
]
