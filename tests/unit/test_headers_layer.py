"""The header step (layers/headers.py) and the request record it fills (core/record.py).

What Envoy in an Istio sidecar does to request and response heads, reference §2.6 and §2.7.
"""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.core.http1 import Header, RequestHead, ResponseHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.errors import BadRequest, UpgradeForbidden
from meshproxy.layers.headers import RequestPlan, plan_request, request_id, response_head

HOST: Header = (b"host", b"reviews:9080")
RID = b"0b9e8f3a-1111-4222-8333-444455556666"


def record() -> RequestRecord:
    return RequestRecord(Direction.OUTBOUND, 100.0, "10.0.0.9:5555")


def plan(
    headers: list[Header],
    *,
    target: bytes = b"/p",
    method: bytes = b"GET",
    rec: RequestRecord | None = None,
    seed: int = 1,
    scheme: bytes = b"http",
) -> RequestPlan:
    head = RequestHead(method=method, target=target, headers=headers)
    return plan_request(head, rec or record(), random.Random(seed), scheme)


def names(headers: object) -> list[bytes]:
    assert isinstance(headers, list)
    return [name for name, _ in headers]


def values(plan_or_head: RequestPlan | ResponseHead, name: bytes) -> list[bytes]:
    head = plan_or_head.head if isinstance(plan_or_head, RequestPlan) else plan_or_head
    return [v for n, v in head.headers if n == name]


def is_uuid4(value: bytes) -> bool:
    text = value.decode("ascii")
    parsed = uuid.UUID(text)
    return (
        parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text  # canonical
    )


# ---------------------------------------------------------------------------------------------
# Hop-by-hop headers (§2.7)


@pytest.mark.parametrize(
    "header",
    [
        (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"deflate"),
        (b"te", b"gzip;q=0.5"),
        (b"upgrade", b"websocket"),  # without `Connection: upgrade` it is not an upgrade
    ],
)
def test_hop_by_hop_request_headers_removed(header: Header) -> None:
    p = plan([HOST, header, (b"x-app", b"1")])
    assert header[0] not in names(p.head.headers)
    assert (b"x-app", b"1") in p.head.headers
    assert not p.websocket


def test_connection_close_is_not_forwarded() -> None:
    p = plan([HOST, (b"connection", b"close")])
    assert b"connection" not in names(p.head.headers)


def test_headers_named_in_connection_removed() -> None:
    p = plan(
        [
            HOST,
            (b"connection", b"X-Foo, keep-alive"),
            (b"x-foo", b"1"),
            (b"connection", b"x-bar"),
            (b"x-bar", b"2"),
            (b"x-baz", b"3"),
        ]
    )
    got = names(p.head.headers)
    assert b"x-foo" not in got
    assert b"x-bar" not in got
    assert b"connection" not in got
    assert (b"x-baz", b"3") in p.head.headers


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (b"trailers", [b"trailers"]),
        (b"trailers, deflate", [b"trailers"]),
        (b"deflate, Trailers", [b"trailers"]),
        (b"gzip", []),
    ],
)
def test_te_keeps_only_trailers(value: bytes, kept: list[bytes]) -> None:
    assert values(plan([HOST, (b"te", value)]), b"te") == kept


def test_other_headers_pass_unchanged_and_in_order() -> None:
    headers = [
        HOST,
        (b"accept", b"*/*"),
        (b"x-b", b"2"),
        (b"cookie", b"a=1"),
        (b"x-a", b"1"),
        (b"x-request-id", RID),
        (b"x-forwarded-proto", b"https"),
    ]
    p = plan(headers)
    # Only x-envoy-attempt-count is added (Istio's include_request_attempt_count), at the end.
    assert p.head.headers == [*headers, (b"x-envoy-attempt-count", b"1")]
    assert p.head.method == b"GET"
    assert p.head.target == b"/p"
    assert p.head.http_version == b"1.1"


# ---------------------------------------------------------------------------------------------
# Headers Envoy adds or keeps (§2.6)


def test_request_id_generated_as_uuid4_when_absent() -> None:
    rec = record()
    p = plan([HOST], rec=rec)
    (rid,) = values(p, b"x-request-id")
    assert is_uuid4(rid)
    assert rec.request_id == rid.decode()


def test_request_id_differs_per_request_and_follows_the_seed() -> None:
    rng = random.Random(11)
    head = RequestHead(method=b"GET", target=b"/", headers=[HOST])
    ids = [values(plan_request(head, record(), rng), b"x-request-id")[0] for _ in range(100)]
    assert len(set(ids)) == 100
    assert values(plan([HOST], seed=3), b"x-request-id") == values(
        plan([HOST], seed=3), b"x-request-id"
    )


def test_request_id_kept_when_present() -> None:
    rec = record()
    p = plan([HOST, (b"x-request-id", b"client-chosen")], rec=rec)
    assert values(p, b"x-request-id") == [b"client-chosen"]
    assert rec.request_id == "client-chosen"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**64))
def test_request_id_is_always_a_canonical_uuid4(seed: int) -> None:
    assert is_uuid4(request_id(random.Random(seed)))


def test_forwarded_proto_added_when_absent() -> None:
    assert values(plan([HOST]), b"x-forwarded-proto") == [b"http"]
    assert values(plan([HOST], scheme=b"https"), b"x-forwarded-proto") == [b"https"]


def test_forwarded_proto_kept_when_present() -> None:
    p = plan([HOST, (b"x-forwarded-proto", b"https")])
    assert values(p, b"x-forwarded-proto") == [b"https"]


def test_forwarded_for_passed_through_untouched() -> None:
    rec = record()
    p = plan([HOST, (b"x-forwarded-for", b"1.2.3.4, 5.6.7.8")], rec=rec)
    assert values(p, b"x-forwarded-for") == [b"1.2.3.4, 5.6.7.8"]
    assert rec.x_forwarded_for == "1.2.3.4, 5.6.7.8"


def test_forwarded_for_not_added() -> None:
    # use_remote_address: false (Envoy default, Istio sidecar default).
    assert values(plan([HOST]), b"x-forwarded-for") == []


# ---------------------------------------------------------------------------------------------
# Request target forms


@pytest.mark.parametrize(
    ("target", "path", "authority"),
    [
        (b"http://other:81/x", b"/x", b"other:81"),
        (b"http://other:81/x?y=1", b"/x?y=1", b"other:81"),
        (b"https://secure.example/a/b", b"/a/b", b"secure.example"),
        (b"http://other", b"/", b"other"),
        (b"http://other:81?y=1", b"/?y=1", b"other:81"),
    ],
)
def test_absolute_form_becomes_origin_form(target: bytes, path: bytes, authority: bytes) -> None:
    rec = record()
    p = plan([(b"host", b"ignored:1"), (b"x-a", b"1")], target=target, rec=rec)
    assert p.head.target == path
    assert values(p, b"host") == [authority]
    assert p.authority == authority.decode()
    assert rec.path == path.decode()
    assert rec.authority == authority.decode()
    assert (b"x-a", b"1") in p.head.headers


def test_absolute_form_without_authority_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        plan([HOST], target=b"http:///x")


@pytest.mark.parametrize(
    ("method", "target"), [(b"GET", b"x"), (b"GET", b"*"), (b"GET", b"ftp://a/")]
)
def test_unsupported_target_is_bad_request(method: bytes, target: bytes) -> None:
    with pytest.raises(BadRequest):
        plan([HOST], method=method, target=target)


def test_asterisk_form_options() -> None:
    p = plan([HOST], method=b"OPTIONS", target=b"*")
    assert p.head.target == b"*"


def test_origin_form_authority_from_host() -> None:
    p = plan([(b"host", b"Reviews:9080")])
    assert p.authority == "Reviews:9080"
    assert values(p, b"host") == [b"Reviews:9080"]


# ---------------------------------------------------------------------------------------------
# Headers the router consumes


@pytest.mark.parametrize(
    ("value", "expected"), [(b"250", 250), (b"0", 0), (b"abc", None), (b"-5", None)]
)
def test_upstream_rq_timeout_consumed(value: bytes, expected: int | None) -> None:
    p = plan([HOST, (b"x-envoy-upstream-rq-timeout-ms", value)])
    assert p.timeout_ms == expected
    assert b"x-envoy-upstream-rq-timeout-ms" not in names(p.head.headers)


@pytest.mark.parametrize(
    "value",
    [b"18446744073709551616", b"1" * 400, b"1" * 5000],
    ids=["2**64", "400-digits", "5000-digits"],
)
def test_upstream_rq_timeout_beyond_uint64_is_ignored(value: bytes) -> None:
    # Envoy parses the header as uint64 and ignores a value that does not fit. Here a 5000-digit
    # value (it fits in a 60 KiB head) makes int() raise ValueError (CPython's 4300-digit limit),
    # and a 400-digit one parses but cannot become seconds (timeout_ms / 1000.0: OverflowError).
    p = plan([HOST, (b"x-envoy-upstream-rq-timeout-ms", value)])
    assert p.timeout_ms is None
    assert b"x-envoy-upstream-rq-timeout-ms" not in names(p.head.headers)


def test_no_timeout_header() -> None:
    assert plan([HOST]).timeout_ms is None


@pytest.mark.parametrize("value", [b"100-continue", b"100-Continue"])
def test_expect_100_continue_consumed(value: bytes) -> None:
    p = plan([HOST, (b"content-length", b"5"), (b"expect", value)], method=b"POST")
    assert p.expect_continue
    assert b"expect" not in names(p.head.headers)


def test_no_expect() -> None:
    assert not plan([HOST]).expect_continue


# ---------------------------------------------------------------------------------------------
# Upgrades


@pytest.mark.parametrize(
    "headers",
    [
        [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")],
        [(b"connection", b"keep-alive, upgrade"), (b"upgrade", b"WebSocket")],
        [(b"upgrade", b"websocket"), (b"connection", b"upgrade")],
    ],
)
def test_websocket_upgrade_kept(headers: list[Header]) -> None:
    p = plan([HOST, (b"sec-websocket-key", b"k"), *headers])
    assert p.websocket
    assert values(p, b"connection") == [b"upgrade"]
    (upgrade,) = values(p, b"upgrade")
    assert upgrade.lower() == b"websocket"
    assert (b"sec-websocket-key", b"k") in p.head.headers


@pytest.mark.parametrize("protocol", [b"foo", b"h2c", b"TLS/1.2"])
def test_other_upgrade_forbidden(protocol: bytes) -> None:
    with pytest.raises(UpgradeForbidden) as info:
        plan([HOST, (b"connection", b"upgrade"), (b"upgrade", protocol)])
    assert info.value.status_hint == 403


def test_connection_upgrade_without_upgrade_header_is_plain() -> None:
    p = plan([HOST, (b"connection", b"upgrade")])
    assert not p.websocket
    assert b"connection" not in names(p.head.headers)


# ---------------------------------------------------------------------------------------------
# Body framing


def test_chunked_request_reframed() -> None:
    p = plan([HOST, (b"transfer-encoding", b"chunked")], method=b"POST")
    assert values(p, b"transfer-encoding") == [b"chunked"]
    assert p.has_body


def test_content_length_request_has_body() -> None:
    p = plan([HOST, (b"content-length", b"3")], method=b"POST")
    assert values(p, b"content-length") == [b"3"]
    assert b"transfer-encoding" not in names(p.head.headers)
    assert p.has_body


def test_bodyless_request() -> None:
    p = plan([HOST])
    assert not p.has_body
    assert b"transfer-encoding" not in names(p.head.headers)


# ---------------------------------------------------------------------------------------------
# The record


def test_record_request_fields_filled() -> None:
    rec = record()
    plan(
        [
            HOST,
            (b"user-agent", b"curl/8.0"),
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"x-request-id", RID),
        ],
        method=b"PUT",
        target=b"/a?b=c",
        rec=rec,
    )
    assert rec.method == "PUT"
    assert rec.path == "/a?b=c"
    assert rec.authority == "reviews:9080"
    assert rec.request_id == RID.decode()
    assert rec.user_agent == "curl/8.0"
    assert rec.x_forwarded_for == "1.1.1.1"
    assert rec.direction is Direction.OUTBOUND
    assert rec.downstream_remote == "10.0.0.9:5555"


def test_new_record_defaults() -> None:
    rec = RequestRecord(Direction.INBOUND, 5.0, "-")
    assert rec.start == 5.0
    assert rec.end == 0.0
    assert rec.duration == 0.0
    assert rec.flags == []
    assert rec.flags_text == "-"
    assert rec.attempts == 0
    assert rec.response_code == 0
    assert rec.upstream_service_time is None
    assert (rec.bytes_received, rec.bytes_sent) == (0, 0)


def test_record_flags_deduplicated_in_order() -> None:
    rec = record()
    for flag in ("UF", "", "URX", "UF"):
        rec.add_flag(flag)
    assert rec.flags == ["UF", "URX"]
    assert rec.flags_text == "UF,URX"


def test_record_duration() -> None:
    rec = record()
    rec.end = 100.25
    assert rec.duration == pytest.approx(0.25)


def test_record_is_slotted() -> None:
    rec = record()
    with pytest.raises(AttributeError):
        rec.unknown = 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Responses


def response(headers: list[Header], status: int = 200) -> ResponseHead:
    return ResponseHead(status=status, headers=headers, reason=b"OK")


@pytest.mark.parametrize(
    "header",
    [
        (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"close"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"connection", b"close"),
    ],
)
def test_response_hop_by_hop_removed(header: Header) -> None:
    out = response_head(response([(b"content-length", b"2"), header]), 3, close=False)
    assert header[0] not in names(out.headers)
    assert (b"content-length", b"2") in out.headers


def test_response_headers_named_in_connection_removed() -> None:
    head = response([(b"connection", b"x-secret"), (b"x-secret", b"1"), (b"x-public", b"2")])
    out = response_head(head, 0, close=False)
    assert b"x-secret" not in names(out.headers)
    assert (b"x-public", b"2") in out.headers


def test_response_service_time_added() -> None:
    out = response_head(response([(b"content-length", b"0")]), 12, close=False)
    assert values(out, b"x-envoy-upstream-service-time") == [b"12"]
    assert out.status == 200
    assert out.reason == b"OK"
    assert out.headers[0] == (b"content-length", b"0")


def test_response_connection_close_when_closing() -> None:
    out = response_head(response([(b"content-length", b"0")]), 1, close=True)
    assert values(out, b"connection") == [b"close"]
    out = response_head(response([(b"content-length", b"0")]), 1, close=False)
    assert values(out, b"connection") == []


def test_response_chunked_reframed() -> None:
    out = response_head(response([(b"transfer-encoding", b"chunked")]), 1, close=False)
    assert values(out, b"transfer-encoding") == [b"chunked"]


def test_response_websocket_switch() -> None:
    head = ResponseHead(
        status=101,
        headers=[
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-accept", b"x"),
        ],
        reason=b"Switching Protocols",
    )
    out = response_head(head, 1, close=False, websocket=True)
    assert out.status == 101
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"connection") == [b"upgrade"]
    assert (b"sec-websocket-accept", b"x") in out.headers


def test_response_other_headers_pass_unchanged() -> None:
    headers = [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    out = response_head(response([*headers, (b"content-length", b"0")]), 7, close=False)
    assert out.headers[:4] == [*headers, (b"content-length", b"0")]
