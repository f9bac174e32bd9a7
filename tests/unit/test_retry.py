"""Retry policy and retry state (core/retry.py): Istio's HTTPRetry, Envoy's conditions and headers.

Synchronous and pure: policies are built the way the route table builds them (``istio_policy``
from a VirtualService rule's ``retries``), refined by Envoy's ``x-envoy-retry-*`` request headers
(``with_headers``), and ``RetryState`` is driven with ``Outcome``s and a seeded ``random.Random``.
Semantics: reference §1.2 (Istio's translation and default policy) and §2.1 (Envoy's retry
conditions, header refinements and the fully jittered backoff), issue #4 §1 and §6.

``RetryState``'s calling order is the one its docstrings give: ``decide`` the outcome; on RETRY,
``backoff()`` is the wait before retry N (N = retries so far + 1 = ``attempts``), then
``next_attempt()`` counts the new try.
"""

from __future__ import annotations

import random
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.config.load import load_texts
from meshproxy.config.model import Duration, HTTPRetry
from meshproxy.core.classify import Failure, Outcome, failed, response
from meshproxy.core.http1 import Header, RequestHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.retry import (
    CONDITIONS,
    DEFAULT_BACKOFF,
    ISTIO_DEFAULT_RETRIES,
    ISTIO_DEFAULT_RETRY_ON,
    NO_RETRY,
    RetryHeaders,
    RetryPolicy,
    RetryState,
    Verdict,
    istio_policy,
    parse_retry_on,
    retriable,
    with_headers,
)
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import HostTable
from meshproxy.layers.headers import plan_request

DEFAULT = istio_policy(None)

RESET = failed(Failure.RESET)
CONNECT = failed(Failure.CONNECT_FAILURE)
TIMEOUT = failed(Failure.TIMEOUT)
PROTOCOL = failed(Failure.PROTOCOL_ERROR)
OVERFLOW = failed(Failure.OVERFLOW)
RATELIMITED: Header = (b"x-envoy-ratelimited", b"true")
OVERLOADED: Header = (b"x-envoy-overloaded", b"true")


def policy(
    retry_on: str,
    attempts: int = 2,
    *,
    per_try_timeout: float | None = None,
    backoff: float | None = None,
    ignore_previous_hosts: bool | None = None,
) -> RetryPolicy:
    """The policy Istio writes for a rule's ``retries`` block."""
    return istio_policy(
        HTTPRetry(
            attempts=attempts,
            retry_on=retry_on,
            per_try_timeout=Duration(per_try_timeout) if per_try_timeout is not None else None,
            backoff=Duration(backoff) if backoff is not None else None,
            retry_ignore_previous_hosts=ignore_previous_hosts,
        )
    )


def grpc(code: int) -> Outcome:
    """A gRPC answer: HTTP 200 with ``grpc-status`` in the response headers."""
    return response(200, ((b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code)))


class FixedRandom(random.Random):
    """A random source whose ``random()`` always returns one value (the edges of the window)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# ---------------------------------------------------------------------------------------------
# Istio's default policy and HTTPRetry translation (reference §1.2)


def test_istio_default_policy_when_a_route_sets_no_retries() -> None:
    assert DEFAULT.num_retries == ISTIO_DEFAULT_RETRIES == 2
    assert DEFAULT.retry_on == ISTIO_DEFAULT_RETRY_ON
    assert DEFAULT.retry_on == {
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "retriable-status-codes",
    }
    assert DEFAULT.status_codes == frozenset()  # Istio >= 1.24: no 503 in the default
    assert DEFAULT.grpc_codes == {1, 14}  # cancelled, unavailable
    assert DEFAULT.per_try_timeout is None  # default: the route timeout, i.e. none
    assert DEFAULT.backoff_base == DEFAULT_BACKOFF == 0.025
    assert DEFAULT.backoff_max == pytest.approx(0.25)
    assert DEFAULT.ignore_previous_hosts is True
    assert DEFAULT.enabled


def test_istio_default_policy_retries_what_its_conditions_name_and_nothing_else() -> None:
    assert retriable(DEFAULT, CONNECT)
    assert retriable(DEFAULT, grpc(14))  # unavailable
    assert retriable(DEFAULT, grpc(1))  # cancelled
    assert not retriable(DEFAULT, grpc(4))  # deadline-exceeded is not in the default
    assert not retriable(DEFAULT, grpc(0))
    # No status codes in the default list: a 503 stands, and so does a reset after the request.
    assert not retriable(DEFAULT, response(503))
    assert not retriable(DEFAULT, response(500))
    assert not retriable(DEFAULT, RESET)  # refused-stream is HTTP/2's REFUSED_STREAM only
    assert not retriable(DEFAULT, TIMEOUT)
    assert not retriable(DEFAULT, OVERFLOW)


def test_attempts_without_retry_on_keep_the_default_conditions() -> None:
    p = policy("", attempts=5)
    assert p.num_retries == 5
    assert p.retry_on == ISTIO_DEFAULT_RETRY_ON
    assert p.grpc_codes == {1, 14}
    assert retriable(p, CONNECT)


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_zero_disables_retries(attempts: int) -> None:
    p = policy("5xx,connect-failure", attempts=attempts)
    assert p == NO_RETRY
    assert not p.enabled
    assert p.num_retries == 0
    state = RetryState(p, random.Random(1))
    assert state.decide(response(503)) is Verdict.DONE
    assert state.decide(CONNECT) is Verdict.DONE


def test_no_retry_policy_is_disabled() -> None:
    assert not NO_RETRY.enabled
    assert not RetryPolicy(num_retries=3).enabled  # a count without a condition retries nothing
    assert not RetryPolicy(retry_on=frozenset({"5xx"})).enabled  # a condition without a count


def test_retry_on_is_split_into_conditions_and_codes() -> None:
    p = policy("gateway-error,connect-failure")
    assert p.retry_on == {"gateway-error", "connect-failure"}
    assert p.status_codes == frozenset()
    assert p.num_retries == 2


def test_per_try_timeout() -> None:
    assert policy("5xx").per_try_timeout is None
    assert policy("5xx", per_try_timeout=0.5).per_try_timeout == 0.5


def test_backoff_default_and_custom() -> None:
    default = policy("5xx")
    assert default.backoff_base == 0.025
    assert default.backoff_max == pytest.approx(0.25)  # Envoy: max defaults to 10 x base
    custom = policy("5xx", backoff=0.1)
    assert custom.backoff_base == 0.1
    assert custom.backoff_max == pytest.approx(1.0)


def test_retry_ignore_previous_hosts_defaults_to_true() -> None:
    assert policy("5xx").ignore_previous_hosts is True
    assert policy("5xx", ignore_previous_hosts=True).ignore_previous_hosts is True
    assert policy("5xx", ignore_previous_hosts=False).ignore_previous_hosts is False


# ---------------------------------------------------------------------------------------------
# retryOn parsing


def test_parse_retry_on_bare_codes_add_retriable_status_codes() -> None:
    conditions, codes, unknown = parse_retry_on("5xx,503")
    assert conditions == {"5xx", "retriable-status-codes"}
    assert codes == {503}
    assert unknown == []


def test_parse_retry_on_only_codes() -> None:
    conditions, codes, unknown = parse_retry_on("503,504")
    assert conditions == {"retriable-status-codes"}
    assert codes == {503, 504}
    assert unknown == []


def test_parse_retry_on_codes_with_the_condition_named_once() -> None:
    conditions, codes, _ = parse_retry_on("retriable-status-codes,409")
    assert conditions == {"retriable-status-codes"}
    assert codes == {409}


def test_parse_retry_on_trims_whitespace_and_skips_empty_tokens() -> None:
    conditions, codes, unknown = parse_retry_on(" 5xx ,\tgateway-error ,, 503 ,")
    assert conditions == {"5xx", "gateway-error", "retriable-status-codes"}
    assert codes == {503}
    assert unknown == []


def test_parse_retry_on_reports_unknown_tokens() -> None:
    conditions, codes, unknown = parse_retry_on("5xx,bogus, 5XX ,42,connect_failure")
    assert conditions == {"5xx"}
    assert codes == frozenset()
    assert unknown == ["bogus", "5XX", "42", "connect_failure"]  # names are case-sensitive


def test_parse_retry_on_empty() -> None:
    assert parse_retry_on("") == (frozenset(), frozenset(), [])
    assert parse_retry_on(" , ") == (frozenset(), frozenset(), [])


def test_parse_retry_on_knows_every_envoy_condition() -> None:
    conditions, codes, unknown = parse_retry_on(",".join(sorted(CONDITIONS)))
    assert conditions == CONDITIONS
    assert codes == frozenset()
    assert unknown == []


def test_istio_policy_with_bare_codes() -> None:
    p = policy("connect-failure, 500")
    assert p.retry_on == {"connect-failure", "retriable-status-codes"}
    assert p.status_codes == {500}
    assert retriable(p, response(500))
    assert not retriable(p, response(503))
    assert retriable(p, CONNECT)


# ---------------------------------------------------------------------------------------------
# retriable(): each condition, a case that retries and one that must not (reference §2.1)

_GRPC_ON = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
_EVERYTHING = ",".join(sorted(CONDITIONS)) + ",500,503"


def _name(outcome: Outcome) -> str:
    if outcome.failure is not None:
        return outcome.failure.value
    extra = "+".join(n.decode() for n, _ in outcome.headers)
    return f"{outcome.status}{'+' + extra if extra else ''}"


_CASES: list[tuple[str, Outcome, bool]] = [
    # 5xx: any 5xx, or no answer at all (reset, connect failure, timeout).
    ("5xx", response(500), True),
    ("5xx", response(503), True),
    ("5xx", response(599), True),
    ("5xx", RESET, True),
    ("5xx", CONNECT, True),
    ("5xx", TIMEOUT, True),
    ("5xx", PROTOCOL, True),
    ("5xx", response(200), False),
    ("5xx", response(404), False),
    ("5xx", response(409), False),
    ("5xx", response(429), False),
    # gateway-error: 502, 503, 504, and (like 5xx) no answer.
    ("gateway-error", response(502), True),
    ("gateway-error", response(503), True),
    ("gateway-error", response(504), True),
    ("gateway-error", RESET, True),
    ("gateway-error", CONNECT, True),
    ("gateway-error", TIMEOUT, True),
    ("gateway-error", response(500), False),
    ("gateway-error", response(501), False),
    ("gateway-error", response(200), False),
    # reset: no answer at all; an answer, even a 5xx, is not a reset.
    ("reset", RESET, True),
    ("reset", TIMEOUT, True),
    ("reset", PROTOCOL, True),
    ("reset", CONNECT, True),
    ("reset", response(503), False),
    ("reset", response(500), False),
    # reset-before-request: only when the request never went out (a connect failure).
    ("reset-before-request", CONNECT, True),
    ("reset-before-request", RESET, False),
    ("reset-before-request", TIMEOUT, False),
    ("reset-before-request", response(503), False),
    # connect-failure: the connect failed; a reset after connecting is not one.
    ("connect-failure", CONNECT, True),
    ("connect-failure", RESET, False),
    ("connect-failure", TIMEOUT, False),
    ("connect-failure", PROTOCOL, False),
    ("connect-failure", response(503), False),
    # refused-stream: HTTP/2 REFUSED_STREAM; an HTTP/1.1 reset or connect failure is not one.
    ("refused-stream", RESET, False),
    ("refused-stream", CONNECT, False),
    ("refused-stream", response(503), False),
    # retriable-4xx: 409 only.
    ("retriable-4xx", response(409), True),
    ("retriable-4xx", response(400), False),
    ("retriable-4xx", response(404), False),
    ("retriable-4xx", response(429), False),
    ("retriable-4xx", response(503), False),
    # retriable-status-codes: the listed codes, and only answers (a reset "is" a 503 to the
    # client but matches `reset`, not "503": reference §1.2).
    ("retriable-status-codes,418", response(418), True),
    ("503", response(503), True),
    ("retriable-status-codes,418", response(503), False),
    ("retriable-status-codes", response(503), False),  # no codes listed
    ("503", RESET, False),
    ("503", CONNECT, False),
    ("503", response(502), False),
    # envoy-ratelimited: an answer carrying x-envoy-ratelimited.
    ("envoy-ratelimited", response(429, (RATELIMITED,)), True),
    ("envoy-ratelimited", response(503, (RATELIMITED,)), True),
    ("envoy-ratelimited", response(429), False),
    ("envoy-ratelimited", response(503), False),
    # gRPC conditions: grpc-status in the response headers.
    *((name, grpc(code), True) for name, code in _GRPC_ON.items()),
    *((name, grpc(0), False) for name in _GRPC_ON),
    *((name, grpc(2), False) for name in _GRPC_ON),  # UNKNOWN is in no condition
    ("unavailable", grpc(4), False),
    ("deadline-exceeded", grpc(14), False),
    ("5xx", grpc(14), False),  # a gRPC status is an answer (HTTP 200), not a 5xx
    ("unavailable", RESET, False),
    ("unavailable", response(503), False),
    # Overflow is never retried, whatever the conditions.
    (_EVERYTHING, OVERFLOW, False),
    ("5xx", OVERFLOW, False),
    ("reset", OVERFLOW, False),
    ("connect-failure", OVERFLOW, False),
    # An upstream's x-envoy-overloaded answer is retried like any other since Envoy 1.15
    # ("router: allow retries by default when upstream responds with x-envoy-overloaded").
    (_EVERYTHING, response(503, (OVERLOADED,)), True),
    ("5xx", response(503, (OVERLOADED,)), True),
    ("gateway-error", response(503, (OVERLOADED,)), True),
    ("503", response(503, (OVERLOADED,)), True),
    ("unavailable", response(200, (OVERLOADED, (b"grpc-status", b"14"))), True),
]


@pytest.mark.parametrize(
    ("retry_on", "outcome", "expected"),
    _CASES,
    ids=[f"{on if on != _EVERYTHING else 'all'}:{_name(o)}" for on, o, _ in _CASES],
)
def test_retriable_per_condition(retry_on: str, outcome: Outcome, expected: bool) -> None:
    assert retriable(policy(retry_on), outcome) is expected


def test_retriable_headers() -> None:
    p = with_headers(
        NO_RETRY, RetryHeaders(retry_on="retriable-headers", header_names="x-upstream-retry")
    )
    assert p.enabled and p.header_names == (b"x-upstream-retry",)
    assert retriable(p, response(200, ((b"x-upstream-retry", b"yes"),)))
    assert retriable(p, response(503, ((b"x-upstream-retry", b""),)))  # presence is enough
    assert not retriable(p, response(503))
    assert not retriable(p, response(200, ((b"x-other", b"1"),)))
    assert not retriable(p, RESET)


def test_retriable_header_names_without_the_condition_retry_nothing() -> None:
    p = with_headers(DEFAULT, RetryHeaders(header_names="x-upstream-retry"))
    assert not retriable(p, response(200, ((b"x-upstream-retry", b"yes"),)))


def test_a_rate_limited_answer_is_retried_only_under_envoy_ratelimited() -> None:
    """Envoy: "A response that contains the x-envoy-ratelimited header comes from an upstream
    envoy. We retry these only when the envoy-ratelimited policy is in effect"
    (source/common/router/retry_state_impl.cc, wouldRetryFromHeaders; router_filter.rst)."""
    answer = response(503, (RATELIMITED,))
    wrongly_retried = [
        on for on in ("5xx", "gateway-error", "503") if retriable(policy(on), answer)
    ]
    assert wrongly_retried == []
    assert retriable(policy("envoy-ratelimited"), answer)
    assert retriable(policy("5xx,envoy-ratelimited"), answer)


def test_grpc_conditions_from_the_request_header() -> None:
    for name, code in _GRPC_ON.items():
        p = with_headers(NO_RETRY, RetryHeaders(grpc_retry_on=name))
        assert p.enabled and p.num_retries == 1
        assert p.grpc_codes == {code}
        assert retriable(p, grpc(code))
        assert not retriable(p, grpc(0))


# ---------------------------------------------------------------------------------------------
# Envoy's request headers refine the route's policy (reference §2.1)


def test_no_headers_leave_the_policy_unchanged() -> None:
    assert with_headers(DEFAULT, RetryHeaders()) is DEFAULT
    assert with_headers(NO_RETRY, RetryHeaders()) is NO_RETRY


def test_retry_on_header_adds_to_the_routes_conditions() -> None:
    p = with_headers(DEFAULT, RetryHeaders(retry_on="5xx"))
    assert p.retry_on == ISTIO_DEFAULT_RETRY_ON | {"5xx"}
    assert p.num_retries == 2  # the route's count stands
    assert retriable(p, response(500))  # from the header
    assert retriable(p, grpc(14))  # still the route's
    assert retriable(p, CONNECT)


def test_retry_grpc_on_header_adds_grpc_conditions() -> None:
    p = with_headers(DEFAULT, RetryHeaders(grpc_retry_on="deadline-exceeded,internal"))
    assert p.grpc_codes == {1, 4, 13, 14}
    assert retriable(p, grpc(4)) and retriable(p, grpc(13)) and retriable(p, grpc(14))
    assert not retriable(p, grpc(8))


def test_max_retries_header_replaces_the_count() -> None:
    assert with_headers(DEFAULT, RetryHeaders(max_retries=5)).num_retries == 5
    assert with_headers(policy("5xx", attempts=4), RetryHeaders(max_retries=1)).num_retries == 1
    p = with_headers(policy("5xx", attempts=4), RetryHeaders(retry_on="reset", max_retries=7))
    assert p.num_retries == 7


def test_max_retries_zero_disables_the_routes_retries() -> None:
    p = with_headers(DEFAULT, RetryHeaders(max_retries=0))
    assert not p.enabled
    # Envoy keeps the retry state with none left: a retriable outcome is "limit exceeded" (URX).
    assert RetryState(p, random.Random(1)).decide(CONNECT) is Verdict.EXHAUSTED
    assert RetryState(p, random.Random(1)).decide(response(200)) is Verdict.DONE


def test_header_only_retries_default_to_one() -> None:
    p = with_headers(NO_RETRY, RetryHeaders(retry_on="5xx"))
    assert p.enabled
    assert p.num_retries == 1
    assert p.retry_on == {"5xx"}
    state = RetryState(p, random.Random(1))
    assert state.decide(response(503)) is Verdict.RETRY
    state.backoff()
    assert state.next_attempt() == 2
    assert state.decide(response(503)) is Verdict.EXHAUSTED


def test_header_only_retries_with_a_count() -> None:
    p = with_headers(NO_RETRY, RetryHeaders(retry_on="connect-failure", max_retries=3))
    assert p.num_retries == 3 and p.enabled


def test_no_policy_and_no_retry_on_header_means_no_retries() -> None:
    # Envoy: "If a retry policy is not configured and x-envoy-retry-on or x-envoy-retry-grpc-on
    # headers are not specified, Envoy will not retry a failed request."
    assert not with_headers(NO_RETRY, RetryHeaders(max_retries=3)).enabled
    assert not with_headers(NO_RETRY, RetryHeaders(retry_on="bogus")).enabled
    assert not with_headers(NO_RETRY, RetryHeaders(retry_on="")).enabled
    assert not with_headers(NO_RETRY, RetryHeaders(status_codes="503")).enabled
    assert not with_headers(NO_RETRY, RetryHeaders(per_try_timeout_ms=100)).enabled


def test_unknown_header_conditions_are_ignored() -> None:
    p = with_headers(policy("5xx"), RetryHeaders(retry_on="bogus, gateway-error"))
    assert p.retry_on == {"5xx", "gateway-error"}


def test_per_try_timeout_header() -> None:
    assert with_headers(DEFAULT, RetryHeaders(per_try_timeout_ms=250)).per_try_timeout == 0.25
    routed = policy("5xx", per_try_timeout=1.0)
    assert with_headers(routed, RetryHeaders(per_try_timeout_ms=40)).per_try_timeout == 0.04
    assert with_headers(routed, RetryHeaders(retry_on="reset")).per_try_timeout == 1.0


def test_retriable_status_codes_header_adds_codes() -> None:
    # The default policy names retriable-status-codes with no codes: the header supplies them.
    p = with_headers(DEFAULT, RetryHeaders(status_codes="503, 504"))
    assert p.status_codes == {503, 504}
    assert retriable(p, response(503)) and retriable(p, response(504))
    assert not retriable(p, response(502))
    # Added to the route's own codes, not in place of them; junk tokens are skipped.
    q = with_headers(policy("500"), RetryHeaders(status_codes="502,x,"))
    assert q.status_codes == {500, 502}
    assert retriable(q, response(500)) and retriable(q, response(502))


def test_retriable_status_codes_need_the_condition() -> None:
    p = with_headers(policy("5xx"), RetryHeaders(status_codes="409"))
    assert p.status_codes == {409}
    assert not retriable(p, response(409))  # retriable-status-codes is not among the conditions
    q = with_headers(
        policy("5xx"), RetryHeaders(retry_on="retriable-status-codes", status_codes="409")
    )
    assert retriable(q, response(409))


def test_retriable_header_names_header() -> None:
    p = with_headers(
        NO_RETRY,
        RetryHeaders(retry_on="retriable-headers", header_names=" X-Upstream-Retry ,x-other,,"),
    )
    assert p.header_names == (b"x-upstream-retry", b"x-other")  # lower-cased, trimmed
    assert retriable(p, response(200, ((b"x-other", b"1"),)))


def test_retriable_header_names_header_adds_to_the_routes() -> None:
    """router_filter.rst x-envoy-retriable-header-names: the listed headers are retriable "in
    addition to the response headers enabled for retry through other retry policies"; this
    module's docstring says the same ("add codes and headers")."""
    route = RetryPolicy(
        num_retries=1,
        retry_on=frozenset({"retriable-headers"}),
        header_names=(b"x-route-retry",),
    )
    p = with_headers(route, RetryHeaders(header_names="x-header-retry"))
    assert retriable(p, response(200, ((b"x-header-retry", b"1"),)))
    assert retriable(p, response(200, ((b"x-route-retry", b"1"),)))


# ---------------------------------------------------------------------------------------------
# Where the headers and the route's policy come from: plan_request and the route table

_RETRY_REQUEST_HEADERS: list[Header] = [
    (b"x-envoy-retry-on", b"5xx,retriable-4xx"),
    (b"x-envoy-retry-grpc-on", b"unavailable"),
    (b"x-envoy-max-retries", b"3"),
    (b"x-envoy-upstream-rq-per-try-timeout-ms", b"250"),
    (b"x-envoy-retriable-status-codes", b"418"),
    (b"x-envoy-retriable-header-names", b"x-retry-me"),
]


def _plan(headers: list[Header]) -> tuple[list[Header], RetryHeaders | None]:
    head = RequestHead(method=b"GET", target=b"/p", headers=[(b"host", b"reviews:9080"), *headers])
    rec = RequestRecord(Direction.OUTBOUND, 100.0, "10.0.0.9:5555")
    plan = plan_request(head, rec, random.Random(1))
    return list(plan.head.headers), plan.retry_headers


def test_plan_request_consumes_the_retry_headers() -> None:
    forwarded, retry_headers = _plan([*_RETRY_REQUEST_HEADERS, (b"x-envoy-attempt-count", b"7")])
    assert retry_headers == RetryHeaders(
        retry_on="5xx,retriable-4xx",
        grpc_retry_on="unavailable",
        max_retries=3,
        per_try_timeout_ms=250,
        status_codes="418",
        header_names="x-retry-me",
    )
    names = [n for n, _ in forwarded]
    for name, _ in _RETRY_REQUEST_HEADERS:
        assert name not in names  # consumed, not forwarded
    # Istio's include_request_attempt_count: the first try says 1, whatever the client sent.
    assert [v for n, v in forwarded if n == b"x-envoy-attempt-count"] == [b"1"]

    p = with_headers(DEFAULT, retry_headers)
    assert p.num_retries == 3
    assert p.retry_on == ISTIO_DEFAULT_RETRY_ON | {"5xx", "retriable-4xx"}
    assert p.per_try_timeout == 0.25
    assert p.status_codes == {418}
    assert p.header_names == (b"x-retry-me",)
    assert retriable(p, response(409)) and retriable(p, response(418))


def test_plan_request_without_retry_headers() -> None:
    forwarded, retry_headers = _plan([])
    assert retry_headers is None
    assert [v for n, v in forwarded if n == b"x-envoy-attempt-count"] == [b"1"]


def test_plan_request_ignores_unparsable_counts() -> None:
    _, retry_headers = _plan(
        [(b"x-envoy-max-retries", b"three"), (b"x-envoy-upstream-rq-per-try-timeout-ms", b"-5")]
    )
    assert retry_headers == RetryHeaders()
    assert with_headers(DEFAULT, retry_headers) is DEFAULT


_MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {name: app-v1, namespace: default, labels: {app: productpage}}
spec:
  outbound: {address: 127.0.0.1:0}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: tuned
    match: [{uri: {prefix: /tuned}}]
    retries:
      attempts: 4
      perTryTimeout: 500ms
      retryOn: "gateway-error, 409"
      retryIgnorePreviousHosts: false
      backoff: 100ms
    route: [{destination: {host: reviews}}]
  - name: disabled
    match: [{uri: {prefix: /off}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
  - name: faulty
    match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 10}}}
    retries: {attempts: 5, retryOn: 5xx}
    route: [{destination: {host: reviews}}]
  - name: plain
    route: [{destination: {host: reviews}}]
"""


def test_route_table_compiles_each_rules_retry_policy() -> None:
    config = load_texts([("mesh.yaml", textwrap.dedent(_MESH))])
    vs = RouteTable(config, HostTable(config)).lookup("reviews.default.svc.cluster.local")
    assert vs is not None
    by_name = {route.name: route.retry_policy for route in vs.routes}
    tuned = by_name["tuned"]
    assert tuned.num_retries == 4
    assert tuned.retry_on == {"gateway-error", "retriable-status-codes"}
    assert tuned.status_codes == {409}
    assert tuned.per_try_timeout == 0.5
    assert tuned.ignore_previous_hosts is False
    assert tuned.backoff_base == 0.1
    assert tuned.backoff_max == pytest.approx(1.0)
    assert by_name["disabled"] == NO_RETRY
    # Istio: "timeouts or retries will not be enabled when faults are enabled".
    assert by_name["faulty"] == NO_RETRY
    assert by_name["plain"] == DEFAULT


# ---------------------------------------------------------------------------------------------
# RetryState: one request's tries


def _drive(p: RetryPolicy, outcomes: list[Outcome], seed: int = 7) -> tuple[list[Verdict], int]:
    """Run tries until a verdict other than RETRY; returns the verdicts and the total tries."""
    state = RetryState(p, random.Random(seed))
    verdicts: list[Verdict] = []
    for outcome in outcomes:
        verdict = state.decide(outcome)
        verdicts.append(verdict)
        if verdict is not Verdict.RETRY:
            break
        state.backoff()
        state.next_attempt()
    return verdicts, state.attempts


def test_state_starts_at_the_first_attempt() -> None:
    assert RetryState(DEFAULT, random.Random(1)).attempts == 1


def test_success_is_done_at_once() -> None:
    for outcome in (response(200), response(204), response(404), grpc(0)):
        assert _drive(DEFAULT, [outcome]) == ([Verdict.DONE], 1)
        assert _drive(policy("5xx,gateway-error,reset"), [outcome]) == ([Verdict.DONE], 1)


def test_total_tries_never_exceed_one_plus_num_retries() -> None:
    verdicts, tries = _drive(DEFAULT, [CONNECT] * 10)
    assert verdicts == [Verdict.RETRY, Verdict.RETRY, Verdict.EXHAUSTED]
    assert tries == 3  # 1 + attempts: Envoy's URX after 2 retries, 3 upstream hits


@pytest.mark.parametrize("attempts", [1, 2, 3, 5])
def test_exhausted_after_num_retries(attempts: int) -> None:
    verdicts, tries = _drive(policy("5xx", attempts=attempts), [response(503)] * 10)
    assert verdicts == [Verdict.RETRY] * attempts + [Verdict.EXHAUSTED]
    assert tries == 1 + attempts


def test_a_success_after_retries_is_done() -> None:
    verdicts, tries = _drive(policy("5xx", attempts=3), [response(503), RESET, response(200)])
    assert verdicts == [Verdict.RETRY, Verdict.RETRY, Verdict.DONE]
    assert tries == 3


def test_an_outcome_the_policy_does_not_retry_is_done_not_exhausted() -> None:
    assert _drive(DEFAULT, [response(503)]) == ([Verdict.DONE], 1)
    assert _drive(DEFAULT, [CONNECT, RESET]) == ([Verdict.RETRY, Verdict.DONE], 2)
    assert _drive(policy("5xx"), [OVERFLOW]) == ([Verdict.DONE], 1)
    assert _drive(DEFAULT, [response(503, (OVERLOADED,))]) == ([Verdict.DONE], 1)


def test_a_retriable_answer_below_500_is_retried() -> None:
    # 409 is a "success" to the classifier, but retriable-4xx asks for another try.
    verdicts, tries = _drive(policy("retriable-4xx", attempts=1), [response(409)] * 3)
    assert verdicts == [Verdict.RETRY, Verdict.EXHAUSTED]
    assert tries == 2
    assert _drive(policy("unavailable", attempts=1), [grpc(14), grpc(0)]) == (
        [Verdict.RETRY, Verdict.DONE],
        2,
    )


def test_next_attempt_counts_tries() -> None:
    state = RetryState(policy("5xx", attempts=3), random.Random(1))
    assert [state.next_attempt() for _ in range(3)] == [2, 3, 4]
    assert state.attempts == 4
    assert state.decide(response(503)) is Verdict.EXHAUSTED


def test_disabled_policy_is_always_done() -> None:
    for outcome in (CONNECT, RESET, response(503), grpc(14), OVERFLOW, response(200)):
        assert RetryState(NO_RETRY, random.Random(1)).decide(outcome) is Verdict.DONE


# ---------------------------------------------------------------------------------------------
# Backoff: fully jittered exponential, retry N uniform in [0, (2^N - 1) x base), capped at 10 x base


def _backoffs(p: RetryPolicy, rng: random.Random, retries: int) -> list[float]:
    state = RetryState(p, rng)
    delays = []
    for _ in range(retries):
        assert state.decide(response(503)) is Verdict.RETRY
        delays.append(state.backoff())
        state.next_attempt()
    return delays


def test_backoff_windows_with_the_default_base() -> None:
    """Envoy: "the first retry will be delayed randomly by 0-24ms, the 2nd by 0-74ms, the 3rd by
    0-174ms, and so on", capped at 250 ms."""
    p = policy("5xx", attempts=6)
    top = _backoffs(p, FixedRandom(0.999999), 6)
    assert top == pytest.approx([0.025, 0.075, 0.175, 0.25, 0.25, 0.25], rel=1e-5)
    for delay, window in zip(top, [0.025, 0.075, 0.175, 0.25, 0.25, 0.25], strict=True):
        assert delay < window
    assert _backoffs(p, FixedRandom(0.0), 6) == [0.0] * 6
    half = _backoffs(p, FixedRandom(0.5), 3)
    assert half == pytest.approx([0.0125, 0.0375, 0.0875])


def test_backoff_with_a_custom_base() -> None:
    p = policy("5xx", attempts=5, backoff=0.1)
    top = _backoffs(p, FixedRandom(0.999999), 5)
    assert top == pytest.approx([0.1, 0.3, 0.7, 1.0, 1.0], rel=1e-5)


def test_backoff_is_reproducible_with_the_same_seed() -> None:
    p = policy("5xx", attempts=4)
    assert _backoffs(p, random.Random(42), 4) == _backoffs(p, random.Random(42), 4)


def _window(base: float, n: int) -> float:
    return min(((1 << n) - 1) * base, 10 * base)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**64),
    n=st.integers(min_value=1, max_value=64),
    base=st.floats(min_value=0.001, max_value=10.0, allow_nan=False),
)
def test_backoff_stays_within_its_window_for_any_seed(seed: int, n: int, base: float) -> None:
    state = RetryState(policy("5xx", attempts=n, backoff=base), random.Random(seed))
    for _ in range(n - 1):
        state.next_attempt()
    delay = state.backoff()
    assert 0.0 <= delay < _window(base, n)


@settings(max_examples=300, deadline=None)
@given(
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    n=st.integers(min_value=1, max_value=64),
    base=st.floats(min_value=0.001, max_value=10.0, allow_nan=False),
)
def test_backoff_stays_within_its_window_at_its_edges(draw: float, n: int, base: float) -> None:
    state = RetryState(policy("5xx", attempts=n, backoff=base), FixedRandom(draw))
    for _ in range(n - 1):
        state.next_attempt()
    assert 0.0 <= state.backoff() < _window(base, n)


# ---------------------------------------------------------------------------------------------
# Retries never exceed attempts, for random policies and outcome sequences

_RESPONSE_HEADERS = st.lists(
    st.sampled_from(
        [
            (b"grpc-status", b"1"),
            (b"grpc-status", b"4"),
            (b"grpc-status", b"14"),
            (b"grpc-status", b"0"),
            OVERLOADED,
            RATELIMITED,
            (b"x-retry-me", b"1"),
        ]
    ),
    max_size=2,
).map(tuple)
OUTCOMES = st.one_of(
    st.builds(
        response,
        st.sampled_from([200, 204, 404, 409, 418, 429, 500, 502, 503, 504]),
        _RESPONSE_HEADERS,
    ),
    st.builds(failed, st.sampled_from(list(Failure))),
)
_TOKENS = st.sampled_from([*sorted(CONDITIONS), "503", "418", "bogus"])
RETRY_HEADERS = st.one_of(
    st.none(),
    st.builds(
        RetryHeaders,
        retry_on=st.one_of(st.none(), st.lists(_TOKENS, max_size=3).map(",".join)),
        max_retries=st.one_of(st.none(), st.integers(min_value=0, max_value=6)),
        status_codes=st.one_of(st.none(), st.just("500,502")),
        header_names=st.one_of(st.none(), st.just("x-retry-me")),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    attempts=st.integers(min_value=0, max_value=6),
    tokens=st.lists(_TOKENS, max_size=4),
    headers=RETRY_HEADERS,
    outcomes=st.lists(OUTCOMES, min_size=1, max_size=12),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_retries_never_exceed_attempts(
    attempts: int,
    tokens: list[str],
    headers: RetryHeaders | None,
    outcomes: list[Outcome],
    seed: int,
) -> None:
    p = policy(",".join(tokens), attempts=attempts)
    if headers is not None:
        p = with_headers(p, headers)
    state = RetryState(p, random.Random(seed))
    tries = 1
    for outcome in outcomes:
        verdict = state.decide(outcome)
        if verdict is Verdict.RETRY:
            assert p.enabled and retriable(p, outcome)
            assert 0.0 <= state.backoff() < _window(p.backoff_base, tries)
            tries += 1
            assert state.next_attempt() == tries
            assert tries <= 1 + p.num_retries
            continue
        if verdict is Verdict.EXHAUSTED:
            assert p.retry_on and retriable(p, outcome)
            assert tries == 1 + p.num_retries
        else:
            assert verdict is Verdict.DONE
            assert not (p.enabled and retriable(p, outcome))
        break
    assert state.attempts == tries <= 1 + p.num_retries
    if not p.enabled:
        assert tries == 1
