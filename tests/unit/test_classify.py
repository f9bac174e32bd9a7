"""The one classifier (core/classify.py): what an upstream attempt's outcome means, for everyone.

Retries, outlier ejection and metrics read the same ``Outcome`` properties, so these tests pin the
labels: Envoy counts a local-origin failure (connect failure, reset, per-try timeout, protocol
error) as a 5xx and as a gateway error (router_filter.rst ``5xx``: "or does not respond at all";
outlier_detection.proto: local-origin errors count unless split out), while an overflow is refused
before any host sees it (flag UO, reference §2.3), so it counts against nobody. gRPC status and
``x-envoy-overloaded`` come from the response headers only (reference §1.2, §2.1).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.core.classify import Failure, Outcome, failed, response
from meshproxy.core.http1 import Header

LOCAL_ORIGIN = (Failure.CONNECT_FAILURE, Failure.RESET, Failure.TIMEOUT, Failure.PROTOCOL_ERROR)


# ---------------------------------------------------------------------------------------------
# Failure names


def test_failure_values_are_envoy_names() -> None:
    assert Failure.CONNECT_FAILURE.value == "connect-failure"  # flag UF
    assert Failure.RESET.value == "reset"  # flag UC
    assert Failure.TIMEOUT.value == "timeout"  # flag UT
    assert Failure.PROTOCOL_ERROR.value == "protocol-error"  # flag UPE
    assert Failure.OVERFLOW.value == "overflow"  # flag UO
    assert set(Failure) == {*LOCAL_ORIGIN, Failure.OVERFLOW}


def test_constructors_fill_one_side_only() -> None:
    r = response(503, ((b"x-a", b"1"),))
    assert (r.status, r.failure, tuple(r.headers)) == (503, None, ((b"x-a", b"1"),))
    f = failed(Failure.RESET)
    assert (f.status, f.failure, tuple(f.headers)) == (None, Failure.RESET, ())


def test_outcome_is_frozen() -> None:
    outcome = response(200)
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.status = 503  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Answers from the upstream


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304, 400, 404, 409, 429, 499])
def test_an_answer_below_500_is_a_success(status: int) -> None:
    outcome = response(status)
    assert outcome.success
    assert not outcome.is_5xx
    assert not outcome.is_gateway_error
    assert not outcome.local_origin


@pytest.mark.parametrize("status", [500, 501, 505, 599])
def test_a_5xx_that_is_not_a_gateway_error(status: int) -> None:
    outcome = response(status)
    assert outcome.is_5xx
    assert not outcome.is_gateway_error
    assert not outcome.success
    assert not outcome.local_origin  # the upstream answered: not a local-origin failure


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_are_502_503_504(status: int) -> None:
    outcome = response(status)
    assert outcome.is_gateway_error
    assert outcome.is_5xx
    assert not outcome.success
    assert not outcome.local_origin


# ---------------------------------------------------------------------------------------------
# Failures without an answer


@pytest.mark.parametrize("failure", LOCAL_ORIGIN, ids=lambda f: f.value)
def test_local_origin_failures_are_5xx_and_gateway_errors(failure: Failure) -> None:
    outcome = failed(failure)
    assert outcome.local_origin
    assert outcome.is_5xx  # Envoy: "or does not respond at all" counts as a 5xx
    assert outcome.is_gateway_error
    assert not outcome.success
    assert outcome.status is None
    assert outcome.grpc_status is None
    assert not outcome.overloaded


def test_overflow_is_neither_a_success_nor_local_origin() -> None:
    outcome = failed(Failure.OVERFLOW)
    assert not outcome.success
    assert not outcome.local_origin
    # Refused before any host saw it: nothing to count against an endpoint.
    assert not outcome.is_5xx
    assert not outcome.is_gateway_error


# ---------------------------------------------------------------------------------------------
# Response headers the decisions read


def test_header_lookup_is_exact_first_match() -> None:
    outcome = response(200, ((b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")))
    assert outcome.header(b"x-a") == b"1"
    assert outcome.header(b"x-b") == b"2"
    assert outcome.header(b"x-c") is None
    assert outcome.header(b"X-A") is None  # names are lower-cased at parse time, once


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0", 0),
        (b"1", 1),
        (b"4", 4),
        (b"14", 14),
        (b"16", 16),
        (b"999", 999),
        (b"", None),
        (b"abc", None),
        (b"-1", None),
        (b"1.0", None),
        (b" 14", None),
        (b"9999", None),
        (b"99999999999999999999999", None),
    ],
)
def test_grpc_status_is_read_from_the_response_headers(value: bytes, expected: int | None) -> None:
    assert response(200, ((b"grpc-status", value),)).grpc_status == expected


def test_grpc_status_absent() -> None:
    assert response(200).grpc_status is None
    assert response(200, ((b"grpc-message", b"14"),)).grpc_status is None


@pytest.mark.parametrize("value", [b"true", b"", b"anything"])
def test_overloaded_is_the_presence_of_x_envoy_overloaded(value: bytes) -> None:
    assert response(503, ((b"x-envoy-overloaded", value),)).overloaded
    assert not response(503).overloaded
    assert not response(503, ((b"x-envoy-ratelimited", b"true"),)).overloaded


# ---------------------------------------------------------------------------------------------
# Properties over every outcome

_HEADER = st.sampled_from(
    [
        (b"grpc-status", b"14"),
        (b"grpc-status", b"0"),
        (b"x-envoy-overloaded", b"true"),
        (b"x-envoy-ratelimited", b"true"),
        (b"x-other", b"v"),
    ]
)
_HEADERS = st.lists(_HEADER, max_size=3).map(tuple)
OUTCOMES = st.one_of(
    st.builds(response, st.integers(min_value=100, max_value=599), _HEADERS),
    st.builds(failed, st.sampled_from(list(Failure))),
)


@settings(max_examples=300, deadline=None)
@given(OUTCOMES)
def test_classifier_properties(outcome: Outcome) -> None:
    if outcome.local_origin:
        assert outcome.is_5xx and outcome.is_gateway_error and not outcome.success
    if outcome.failure is Failure.OVERFLOW:
        assert not outcome.success and not outcome.local_origin
    if outcome.is_gateway_error:
        assert outcome.is_5xx
    # Every failure is a non-success; an answer is a success exactly when it is not a 5xx.
    assert outcome.success == (outcome.failure is None and not outcome.is_5xx)
    if outcome.status is not None:
        assert outcome.is_5xx == (outcome.status >= 500)
        assert outcome.is_gateway_error == (outcome.status in (502, 503, 504))
    headers: tuple[Header, ...] = tuple(outcome.headers)
    assert outcome.overloaded == any(n == b"x-envoy-overloaded" for n, _ in headers)
