"""The header step: what a request and a response look like on the far side of the proxy.

Owns header handling as an Istio sidecar's Envoy does it (reference §2.6, §2.7): hop-by-hop headers
and every header named in ``Connection`` are removed both ways; ``x-request-id`` is generated when
absent and kept when present; ``x-forwarded-proto`` is set when absent; ``x-forwarded-for`` is
passed through untouched (``use_remote_address: false``); an absolute-form target becomes origin
form with its authority in ``host``; ``x-envoy-upstream-rq-timeout-ms`` is consumed, not forwarded;
``Expect: 100-continue`` is answered by the proxy (Envoy's ``proxy_100_continue: false``) and not
forwarded; responses gain ``x-envoy-upstream-service-time``. Everything else passes unchanged.

Rules: one pass over the header list per message; no regex; names are already lower-case.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meshproxy.core.http1 import Header, RequestHead, ResponseHead
from meshproxy.core.record import RequestRecord
from meshproxy.core.retry import RetryHeaders
from meshproxy.errors import BadRequest, UpgradeForbidden

# RFC 9110 §7.6.1 hop-by-hop fields plus the de-facto ones Envoy strips (reference §2.7).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)
# Request headers Envoy's router consumes (reference §2.1 [obs]); more arrive with retries (#4).
_CONSUMED = frozenset(
    {
        b"x-envoy-upstream-rq-timeout-ms",
        b"expect",
        b"x-envoy-retry-on",
        b"x-envoy-retry-grpc-on",
        b"x-envoy-max-retries",
        b"x-envoy-upstream-rq-per-try-timeout-ms",
        b"x-envoy-retriable-status-codes",
        b"x-envoy-retriable-header-names",
        b"x-envoy-attempt-count",  # ours to set, per try
    }
)
_CHUNKED: Header = (b"transfer-encoding", b"chunked")
_FIRST_ATTEMPT: Header = (b"x-envoy-attempt-count", b"1")


@dataclass(slots=True)
class RequestPlan:
    """What the header step learnt about a request, for the steps after it."""

    head: RequestHead  # as it goes upstream
    authority: str
    timeout_ms: int | None  # x-envoy-upstream-rq-timeout-ms
    websocket: bool
    expect_continue: bool
    has_body: bool
    retry_headers: RetryHeaders | None = None  # Envoy's x-envoy-retry-* request headers


def _uint64(value: bytes) -> int | None:
    """Envoy parses the timeout headers as uint64 and ignores anything else."""
    if 0 < len(value) <= 20 and value.isdigit():
        number = int(value)
        if number < 1 << 64:
            return number
    return None


# Timers beyond ~24 days overflow event-loop timer arithmetic; no request waits that long anyway.
_MAX_TIMEOUT_MS = 1 << 31


def timeout_seconds(ms: int | None) -> float | None:
    """A request's timeout in seconds from ``x-envoy-upstream-rq-timeout-ms`` (0: none)."""
    return min(ms, _MAX_TIMEOUT_MS) / 1000.0 if ms else None


def _named_in_connection(value: bytes) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def request_id(rng: random.Random) -> bytes:
    """A UUIDv4 string, as Envoy's UUID request-id extension generates."""
    bits = rng.getrandbits(128)
    bits = (bits & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
    bits = (bits & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    h = b"%032x" % bits
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def plan_request(
    head: RequestHead, record: RequestRecord, rng: random.Random, scheme: bytes = b"http"
) -> RequestPlan:
    """Build the upstream request head and fill the record's request fields."""
    target = head.target
    absolute_authority: bytes | None = None
    if not target.startswith(b"/"):
        if target.startswith((b"http://", b"https://")):
            rest = target.split(b"://", 1)[1]
            # The authority ends at the path or, with no path, at the query (RFC 9112 §3.2.2).
            end = len(rest)
            for sep in (b"/", b"?"):
                at = rest.find(sep)
                if 0 <= at < end:
                    end = at
            absolute_authority = rest[:end]
            target = rest[end:] if rest[end:].startswith(b"/") else b"/" + rest[end:]
            if not absolute_authority:
                raise BadRequest("absolute-form target without authority")
        elif target != b"*" or head.method != b"OPTIONS":
            raise BadRequest("unsupported request target")

    connection: bytes = b""
    for name, value in head.headers:
        if name == b"connection":
            connection = connection + b"," + value if connection else value
    dropped = _named_in_connection(connection) if connection else frozenset()
    upgrade_tokens = b"upgrade" in dropped

    out: list[Header] = []
    append = out.append
    rid: bytes | None = None
    has_xfp = False
    timeout_ms: int | None = None
    retry_values: dict[bytes, str] = {}
    upgrade: bytes | None = None
    expect_continue = False
    chunked = False
    has_length = False
    host: bytes = b""
    for header in head.headers:
        name = header[0]
        if name in _HOP_BY_HOP:
            if name == b"transfer-encoding":
                chunked = True
            elif name == b"upgrade":
                upgrade = header[1]
            elif name == b"te" and b"trailers" in header[1].lower():
                # TE is hop-by-hop but "trailers" survives (Envoy keeps `te: trailers`).
                append((b"te", b"trailers"))
            continue
        if name in dropped:
            continue
        if name in _CONSUMED:
            if name == b"expect":
                expect_continue = header[1].lower() == b"100-continue"
                if not expect_continue:
                    append(header)
            elif name == b"x-envoy-upstream-rq-timeout-ms":
                timeout_ms = _uint64(header[1])
            elif name != b"x-envoy-attempt-count":
                retry_values[name] = header[1].decode("latin-1")
            continue
        if name == b"host":
            host = header[1]
            if absolute_authority is not None:
                continue
        elif name == b"x-request-id":
            rid = header[1]
        elif name == b"x-forwarded-proto":
            has_xfp = True
        elif name == b"content-length":
            has_length = True
        elif name == b"user-agent":
            record.user_agent = header[1].decode("latin-1")
        elif name == b"x-forwarded-for":
            record.x_forwarded_for = header[1].decode("latin-1")
        append(header)

    if absolute_authority is not None:
        host = absolute_authority
        out.insert(0, (b"host", host))
    websocket = False
    if upgrade is not None and upgrade_tokens:
        if upgrade.lower() != b"websocket":
            # Istio configures upgrade_configs [websocket] only; Envoy answers others with 403.
            raise UpgradeForbidden(f"upgrade {upgrade!r}")
        websocket = True
        append((b"connection", b"upgrade"))
        append((b"upgrade", upgrade))
    if rid is None:
        rid = request_id(rng)
        append((b"x-request-id", rid))
    if not has_xfp:
        append((b"x-forwarded-proto", scheme))
    if chunked:
        append(_CHUNKED)

    authority = host.decode("latin-1")
    record.method = head.method.decode("latin-1")
    record.path = target.decode("latin-1")
    record.authority = authority
    record.request_id = rid.decode("latin-1")
    # Istio sets include_request_attempt_count: each try tells the upstream its number.
    append(_FIRST_ATTEMPT)
    return RequestPlan(
        head=RequestHead(method=head.method, target=target, headers=out),
        authority=authority,
        timeout_ms=timeout_ms,
        websocket=websocket,
        expect_continue=expect_continue,
        has_body=chunked or has_length,
        retry_headers=_retry_headers(retry_values) if retry_values else None,
    )


def _retry_headers(values: dict[bytes, str]) -> RetryHeaders:
    max_retries = values.get(b"x-envoy-max-retries")
    per_try = values.get(b"x-envoy-upstream-rq-per-try-timeout-ms")
    return RetryHeaders(
        retry_on=values.get(b"x-envoy-retry-on"),
        grpc_retry_on=values.get(b"x-envoy-retry-grpc-on"),
        max_retries=_uint64(max_retries.encode()) if max_retries is not None else None,
        per_try_timeout_ms=_uint64(per_try.encode()) if per_try is not None else None,
        status_codes=values.get(b"x-envoy-retriable-status-codes"),
        header_names=values.get(b"x-envoy-retriable-header-names"),
    )


def response_head(
    head: ResponseHead,
    service_time_ms: int,
    close: bool,
    websocket: bool = False,
    attempts: int = 0,
) -> ResponseHead:
    """The response head as the client sees it."""
    connection = b""
    chunked = False
    for name, value in head.headers:
        if name == b"connection":
            connection = connection + b"," + value if connection else value
    dropped = _named_in_connection(connection) if connection else frozenset()
    out: list[Header] = []
    append = out.append
    for header in head.headers:
        name = header[0]
        if name in _HOP_BY_HOP or name in dropped:
            if name == b"transfer-encoding":
                chunked = True
            elif websocket and name == b"upgrade":
                append(header)
            continue
        append(header)
    append((b"x-envoy-upstream-service-time", b"%d" % service_time_ms))
    if attempts:
        # Envoy include_attempt_count_in_response: how many tries the upstream saw.
        append((b"x-envoy-attempt-count", b"%d" % attempts))
    if websocket:
        append((b"connection", b"upgrade"))
    elif chunked:
        append(_CHUNKED)
    if close:
        append((b"connection", b"close"))
    return ResponseHead(status=head.status, headers=out, reason=head.reason)
