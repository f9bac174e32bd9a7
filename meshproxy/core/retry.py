"""Retry policy and retry state, apart, as in Envoy.

Owns when a failed attempt is tried again (reference §1.2, §2.1). ``RetryPolicy`` is the frozen
policy of a route: Istio's ``HTTPRetry`` (``attempts``, ``perTryTimeout``, ``retryOn`` with bare
status codes, ``retryIgnorePreviousHosts``, ``backoff``) or Istio's default when a route sets none
(2 retries on ``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes``),
refined by Envoy's request headers (``x-envoy-retry-on`` and ``x-envoy-retry-grpc-on`` add
conditions, ``x-envoy-max-retries`` replaces the count, ``x-envoy-upstream-rq-per-try-timeout-ms``
the per-try timeout, ``x-envoy-retriable-status-codes`` and ``x-envoy-retriable-header-names`` add
codes and headers). ``RetryState`` is one request's progress through it: given each attempt's
``Outcome`` it answers retry (with a fully jittered exponential backoff: retry N waits uniformly in
[0, (2^N - 1) x base), capped at 10 x base) or not, and why.

Rules: pure; the random source is injected; no clock (the caller owns deadlines).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field, replace

from meshproxy.config.istio import RETRY_ON
from meshproxy.config.model import HTTPRetry
from meshproxy.core.classify import Failure, Outcome

DEFAULT_BACKOFF = 0.025  # Envoy retry_back_off.base_interval default, Istio `backoff` default
# Istio retry.go defaultRetryOn / defaultNumRetries (reference §1.2).
ISTIO_DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)
ISTIO_DEFAULT_RETRIES = 2

CONDITIONS = RETRY_ON  # one list, in config/istio.py, for validation and decisions
_GRPC = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    num_retries: int = 0
    retry_on: frozenset[str] = frozenset()
    status_codes: frozenset[int] = frozenset()
    header_names: tuple[bytes, ...] = ()  # retriable-headers: response headers that ask for one
    per_try_timeout: float | None = None
    backoff_base: float = DEFAULT_BACKOFF
    backoff_max: float = DEFAULT_BACKOFF * 10
    ignore_previous_hosts: bool = True
    grpc_codes: frozenset[int] = field(default=frozenset())

    @property
    def enabled(self) -> bool:
        return self.num_retries > 0 and bool(self.retry_on)


NO_RETRY = RetryPolicy()


def parse_retry_on(text: str) -> tuple[frozenset[str], frozenset[int], list[str]]:
    """Split a ``retryOn`` list into conditions, bare status codes and unknown tokens."""
    conditions: set[str] = set()
    codes: set[int] = set()
    unknown: list[str] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            continue
        if token.isdigit() and len(token) == 3:
            codes.add(int(token))
        elif token in CONDITIONS:
            conditions.add(token)
        else:
            unknown.append(token)
    if codes:
        # Istio: bare integers become retriable_status_codes, and the condition is added.
        conditions.add("retriable-status-codes")
    return frozenset(conditions), frozenset(codes), unknown


def _names(text: str) -> bool:
    """Whether a retry-on list names retriable-status-codes explicitly."""
    return any(t.strip() == "retriable-status-codes" for t in text.split(","))


def _with_grpc(policy: RetryPolicy) -> RetryPolicy:
    codes = frozenset(code for name, code in _GRPC.items() if name in policy.retry_on)
    return replace(policy, grpc_codes=codes)


def istio_policy(retries: HTTPRetry | None, route_timeout: float | None = None) -> RetryPolicy:
    """The route's policy as Istio's pilot writes it (retry.go)."""
    if retries is None:
        return _with_grpc(
            RetryPolicy(num_retries=ISTIO_DEFAULT_RETRIES, retry_on=ISTIO_DEFAULT_RETRY_ON)
        )
    if retries.attempts <= 0:
        return NO_RETRY  # attempts: 0 disables retries
    conditions, codes, _ = parse_retry_on(retries.retry_on)
    if not retries.retry_on:
        conditions = ISTIO_DEFAULT_RETRY_ON
    base = retries.backoff if retries.backoff is not None else DEFAULT_BACKOFF
    ignore_previous = (
        retries.retry_ignore_previous_hosts
        if retries.retry_ignore_previous_hosts is not None
        else True
    )
    return _with_grpc(
        RetryPolicy(
            num_retries=retries.attempts,
            retry_on=conditions,
            status_codes=codes,
            per_try_timeout=retries.per_try_timeout,
            backoff_base=base,
            backoff_max=base * 10,
            ignore_previous_hosts=ignore_previous,
        )
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryHeaders:
    """Envoy's retry request headers, consumed from the request (None: absent or unparsable)."""

    retry_on: str | None = None
    grpc_retry_on: str | None = None
    max_retries: int | None = None
    per_try_timeout_ms: int | None = None
    status_codes: str | None = None
    header_names: str | None = None


def with_headers(policy: RetryPolicy, h: RetryHeaders) -> RetryPolicy:
    """Envoy: header conditions are added to the route's; x-envoy-max-retries replaces the count;
    a route without a policy retries once when only the headers ask for it."""
    if h == RetryHeaders():
        return policy
    extra: set[str] = set()
    codes = set(policy.status_codes)
    for text in (h.retry_on, h.grpc_retry_on):
        if text:
            # Bare status codes are Istio's retryOn shorthand; Envoy's header takes names only.
            conditions, _, _ = parse_retry_on(text)
            extra |= conditions - {"retriable-status-codes"} if not _names(text) else conditions
    if h.status_codes:
        codes |= {int(t) for t in h.status_codes.split(",") if t.strip().isdigit()}
    num = policy.num_retries
    if extra and not policy.enabled:
        num = 1  # Envoy: header-configured retries default to one retry
    if h.max_retries is not None:
        num = h.max_retries
    names = policy.header_names
    if h.header_names:
        # "in addition to" the route's (Envoy x-envoy-retriable-header-names)
        names += tuple(n.strip().lower().encode() for n in h.header_names.split(",") if n.strip())
    per_try = policy.per_try_timeout
    if h.per_try_timeout_ms is not None:
        per_try = h.per_try_timeout_ms / 1000.0 or None  # 0 turns the per-try timeout off
    return _with_grpc(
        replace(
            policy,
            num_retries=num,
            retry_on=policy.retry_on | extra,
            status_codes=frozenset(codes),
            header_names=names,
            per_try_timeout=per_try,
        )
    )


def retriable(policy: RetryPolicy, outcome: Outcome) -> bool:
    """Whether the policy's conditions call for retrying this outcome (reference §2.1)."""
    on = policy.retry_on
    failure = outcome.failure
    if failure is Failure.OVERFLOW:
        return False  # a local limit refused it: retrying would only add load
    if failure is not None:
        if "5xx" in on or "gateway-error" in on or "reset" in on:
            return True
        if failure is Failure.CONNECT_FAILURE:
            # A connect failure never sent the request: both conditions cover it.
            return "connect-failure" in on or "reset-before-request" in on
        return False
    status = outcome.status
    if status is None:
        return False
    # An upstream's x-envoy-overloaded answer is retried like any other (Envoy >= 1.15: "allow
    # retries by default when upstream responds with x-envoy-overloaded").
    if outcome.header(b"x-envoy-ratelimited") is not None:
        # Envoy (wouldRetryFromHeaders): a rate-limited answer is retried only under
        # envoy-ratelimited, whatever else the policy says.
        return "envoy-ratelimited" in on
    if "5xx" in on and status >= 500:
        return True
    if "gateway-error" in on and status in (502, 503, 504):
        return True
    if "retriable-4xx" in on and status == 409:
        return True
    if "retriable-status-codes" in on and status in policy.status_codes:
        return True
    if "retriable-headers" in on and any(
        outcome.header(n) is not None for n in policy.header_names
    ):
        return True
    if policy.grpc_codes:
        grpc = outcome.grpc_status
        if grpc is not None and grpc in policy.grpc_codes:
            return True
    return False


class Verdict(enum.Enum):
    DONE = "done"  # a success, or an outcome the policy does not retry
    RETRY = "retry"
    EXHAUSTED = "exhausted"  # retriable, but no attempt left (flag URX)


class RetryState:
    """One request's retries: counts attempts and draws backoffs."""

    __slots__ = ("_rng", "attempts", "policy")

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self.attempts = 1  # the first attempt is under way when the state is created

    def decide(self, outcome: Outcome) -> Verdict:
        if not self.policy.retry_on or not retriable(self.policy, outcome):
            return Verdict.DONE
        if self.attempts > self.policy.num_retries:
            return Verdict.EXHAUSTED
        return Verdict.RETRY

    def backoff(self) -> float:
        """The wait before the next attempt: uniform in [0, (2^N - 1) x base), capped."""
        n = self.attempts  # retries so far + 1 = the number of the retry about to happen
        window = min(self.policy.backoff_base * ((1 << n) - 1), self.policy.backoff_max)
        return self._rng.random() * window

    def next_attempt(self) -> int:
        self.attempts += 1
        return self.attempts
