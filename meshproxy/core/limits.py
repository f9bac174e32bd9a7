"""Per-cluster concurrency limits: Envoy's cluster "circuit breakers", as Istio configures them.

Owns the four counters Envoy keeps per cluster and priority (``circuit_breaker.proto``
``CircuitBreakers.Thresholds``, reference §2.3) and the decision "may one more start?":

- connections open to the cluster's endpoints (``max_connections``),
- requests waiting for a connection (``max_pending_requests``),
- requests in flight upstream (``max_requests``),
- retries in flight (``max_retries``, or the ``retry_budget`` that replaces it).

A refusal is an *overflow*: the caller answers at once with Envoy's local reply (503,
``x-envoy-overloaded: true``, flag ``UO``) for a pending/request overflow, skips the retry for a
retry overflow (``upstream_rq_retry_overflow``), and queues the request instead of opening a
connection for a connection overflow. The overflow totals here feed ``/clusters`` and metrics.

These are *concurrency limits*, nothing more. Ejecting a failing endpoint is outlier detection
(``core/outlier.py``); the two are separate mechanisms and are never called by one name.

Rules: pure bookkeeping, no clocks, sockets or asyncio. Every grant (``try_*`` returning True)
must be matched by exactly one release; a release without a grant is a bug in the caller and
raises ``ValueError`` rather than letting a counter go negative and silently widen a limit. A
refusal takes no slot and needs no release.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from meshproxy.config.model import TrafficPolicy

# Istio replaces Envoy's thresholds (1024 connections, 1024 pending, 1024 requests, 3 retries) with
# MaxUint32, because max_retries=3 caused client-facing 503s during rolling updates
# (istio/istio pilot/pkg/networking/core/cluster_traffic_policy.go getDefaultCircuitBreakerThresholds;
# reference §1.3).
UNLIMITED = 2**32 - 1

# Envoy circuit_breaker.proto RetryBudget: "budget_percent ... Defaults to 20%",
# "min_retry_concurrency ... Defaults to 3"; Istio's applyRetryBudget fills the same two values
# when the DestinationRule has a retryBudget block without them.
DEFAULT_RETRY_BUDGET_PERCENT = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitSettings:
    """The thresholds of one cluster. Defaults are Istio's (all unlimited, no retry budget)."""

    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    # Percent (0-100) of active + pending requests that may be retries; None: no budget, so
    # ``max_retries`` applies. A budget overrides ``max_retries`` (circuit_breaker.proto).
    retry_budget_percent: float | None = None
    min_retry_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.retry_budget_percent is not None and not 0 <= self.retry_budget_percent <= 100:
            raise ValueError("retry_budget_percent must be 0..100")
        if self.min_retry_concurrency < 0:
            raise ValueError("min_retry_concurrency must not be negative")

    @classmethod
    def from_policy(cls, policy: TrafficPolicy | None) -> LimitSettings:
        """Istio's ``applyConnectionPool`` + ``applyRetryBudget`` for one cluster's policy.

        Each Istio field replaces its threshold only when it is > 0: Istio cannot tell an explicit
        0 from unset ("FIXME: there isn't a way to distinguish between unset values and zero
        values", cluster_traffic_policy.go), so 0 means "unlimited", not "none allowed".
        ``http2MaxRequests`` bounds active requests for HTTP/1.1 too (reference §1.3).
        """
        if policy is None:
            return cls()
        max_connections = max_pending = max_requests = max_retries = UNLIMITED
        pool = policy.connection_pool
        if pool is not None and pool.tcp is not None:
            max_connections = _positive_or(pool.tcp.max_connections, UNLIMITED)
        if pool is not None and pool.http is not None:
            max_pending = _positive_or(pool.http.http1_max_pending_requests, UNLIMITED)
            max_requests = _positive_or(pool.http.http2_max_requests, UNLIMITED)
            max_retries = _positive_or(pool.http.max_retries, UNLIMITED)
        budget_percent: float | None = None
        min_concurrency = DEFAULT_MIN_RETRY_CONCURRENCY
        budget = policy.retry_budget
        if budget is not None:
            # Istio's applyRetryBudget: percent when set, else the documented 20%; a
            # minRetryConcurrency of 0 (or unset) means 3. (Istio's Go code writes the default as
            # Percent{Value: 0.2}, which Envoy reads as 0.2%; we follow the API's documented
            # 20%, as destination_rule.proto and Envoy's own default say.)
            budget_percent = (
                budget.percent.value if budget.percent is not None else DEFAULT_RETRY_BUDGET_PERCENT
            )
            # Envoy's type.v3.Percent is validated to 0..100; clamp rather than fail at runtime.
            budget_percent = min(100.0, max(0.0, budget_percent))
            min_concurrency = _positive_or(
                budget.min_retry_concurrency, DEFAULT_MIN_RETRY_CONCURRENCY
            )
        return cls(
            max_connections=max_connections,
            max_pending_requests=max_pending,
            max_requests=max_requests,
            max_retries=max_retries,
            retry_budget_percent=budget_percent,
            min_retry_concurrency=min_concurrency,
        )

    def shared_by(self, workers: int) -> LimitSettings:
        """Each worker's part of the thresholds when ``workers`` processes serve one cluster.

        Envoy's circuit breakers are per cluster, shared by its worker threads; meshproxy's
        workers are processes that share nothing, so each enforces ``ceil(limit / workers)``:
        the cluster as a whole admits about what the DestinationRule says (up to
        ``workers - 1`` more). An unlimited threshold stays unlimited; the retry budget is a
        ratio and needs no dividing.
        """
        if workers <= 1:
            return self

        def part(limit: int) -> int:
            return limit if limit >= UNLIMITED else max(1, -(-limit // workers))

        return dataclasses.replace(
            self,
            max_connections=part(self.max_connections),
            max_pending_requests=part(self.max_pending_requests),
            max_requests=part(self.max_requests),
            max_retries=part(self.max_retries),
            min_retry_concurrency=part(self.min_retry_concurrency),
        )


def limit_settings(policy: TrafficPolicy | None) -> LimitSettings:
    """``LimitSettings.from_policy`` as a function."""
    return LimitSettings.from_policy(policy)


def _positive_or(value: int | None, default: int) -> int:
    return value if value is not None and value > 0 else default


class ClusterLimits:
    """The live counters of one cluster, shared by every listener that routes to it.

    ``try_X()`` takes a slot and returns True, or counts an overflow and returns False (Envoy's
    ``canCreate()``: the count is below the maximum). ``release_X()`` gives a granted slot back.
    """

    __slots__ = (
        "active",
        "connections",
        "overflow_connections",
        "overflow_pending",
        "overflow_requests",
        "overflow_retries",
        "pending",
        "retries",
        "settings",
    )

    def __init__(self, settings: LimitSettings | None = None) -> None:
        self.settings = settings if settings is not None else LimitSettings()
        self.connections = 0
        self.pending = 0
        self.active = 0
        self.retries = 0
        self.overflow_connections = 0
        self.overflow_pending = 0
        self.overflow_requests = 0
        self.overflow_retries = 0

    # -- connections ------------------------------------------------------------------------
    def try_connection(self) -> bool:
        if self.connections < self.settings.max_connections:
            self.connections += 1
            return True
        self.overflow_connections += 1  # Envoy upstream_cx_overflow
        return False

    def release_connection(self) -> None:
        if self.connections <= 0:
            raise ValueError("release_connection() without a granted connection")
        self.connections -= 1

    # -- pending requests (waiting for a connection) ----------------------------------------
    def try_pending(self) -> bool:
        if self.pending < self.settings.max_pending_requests:
            self.pending += 1
            return True
        self.overflow_pending += 1  # Envoy upstream_rq_pending_overflow
        return False

    def release_pending(self) -> None:
        if self.pending <= 0:
            raise ValueError("release_pending() without a granted pending request")
        self.pending -= 1

    # -- active requests ----------------------------------------------------------------------
    def try_request(self) -> bool:
        if self.active < self.settings.max_requests:
            self.active += 1
            return True
        self.overflow_requests += 1
        return False

    def release_request(self) -> None:
        if self.active <= 0:
            raise ValueError("release_request() without a granted request")
        self.active -= 1

    # -- retries ------------------------------------------------------------------------------
    def max_retries_now(self) -> int:
        """How many retries may be in flight at this moment.

        With a budget, Envoy's ``RetryBudgetImpl::max()`` (source/common/upstream/
        resource_manager_impl.h): ``max(budget_percent / 100 * (active + pending),
        min_retry_concurrency)``, truncated to an integer as Envoy's uint64 conversion does; the
        budget replaces ``max_retries``. Without one, ``max_retries``.
        """
        percent = self.settings.retry_budget_percent
        if percent is None:
            return self.settings.max_retries
        budget = int(percent / 100.0 * (self.active + self.pending))
        return max(budget, self.settings.min_retry_concurrency)

    def try_retry(self) -> bool:
        if self.retries < self.max_retries_now():
            self.retries += 1
            return True
        self.overflow_retries += 1  # Envoy upstream_rq_retry_overflow
        return False

    def release_retry(self) -> None:
        if self.retries <= 0:
            raise ValueError("release_retry() without a granted retry")
        self.retries -= 1

    # -- admin ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """Limits, use, remaining headroom (Envoy's ``track_remaining`` gauges) and overflows."""
        s = self.settings
        max_retries = self.max_retries_now()
        return {
            "max_connections": s.max_connections,
            "connections": self.connections,
            "remaining_connections": max(0, s.max_connections - self.connections),
            "max_pending_requests": s.max_pending_requests,
            "pending_requests": self.pending,
            "remaining_pending_requests": max(0, s.max_pending_requests - self.pending),
            "max_requests": s.max_requests,
            "requests": self.active,
            "remaining_requests": max(0, s.max_requests - self.active),
            "max_retries": max_retries,
            "retries": self.retries,
            "remaining_retries": max(0, max_retries - self.retries),
            "retry_budget_percent": s.retry_budget_percent,
            "min_retry_concurrency": (
                s.min_retry_concurrency if s.retry_budget_percent is not None else None
            ),
            "overflow_connections": self.overflow_connections,
            "overflow_pending": self.overflow_pending,
            "overflow_requests": self.overflow_requests,
            "overflow_retries": self.overflow_retries,
        }
