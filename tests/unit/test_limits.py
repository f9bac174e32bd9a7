"""Per-cluster concurrency limits (core/limits.py): Istio's defaults and mapping, Envoy's semantics.

Synchronous and clock-free: the limits never look at time. The Hypothesis state machine drives
random grants and releases of all four kinds against a model and checks that no counter goes
negative, no slot leaks (grants - releases == counter) and no grant exceeds its limit.
"""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from meshproxy.config.load import load_texts
from meshproxy.config.model import (
    ConnectionPoolSettings,
    Duration,
    HTTPSettings,
    Percent,
    RetryBudget,
    TCPSettings,
    TrafficPolicy,
)
from meshproxy.core.limits import (
    UNLIMITED,
    ClusterLimits,
    LimitSettings,
    limit_settings,
)

KINDS = ("connection", "pending", "request", "retry")


def pool(
    *,
    max_connections: int | None = None,
    pending: int | None = None,
    requests: int | None = None,
    retries: int | None = None,
) -> TrafficPolicy:
    return TrafficPolicy(
        connection_pool=ConnectionPoolSettings(
            tcp=TCPSettings(max_connections=max_connections),
            http=HTTPSettings(
                http1_max_pending_requests=pending,
                http2_max_requests=requests,
                max_retries=retries,
            ),
        )
    )


# ---------------------------------------------------------------------------------------------
# Defaults and Istio's mapping


def test_unlimited_is_max_uint32() -> None:
    # Istio's getDefaultCircuitBreakerThresholds uses math.MaxUint32 for all four.
    assert UNLIMITED == 4294967295


def test_defaults_are_istios_not_envoys() -> None:
    s = LimitSettings()
    assert s.max_connections == UNLIMITED  # Envoy: 1024
    assert s.max_pending_requests == UNLIMITED  # Envoy: 1024
    assert s.max_requests == UNLIMITED  # Envoy: 1024
    assert s.max_retries == UNLIMITED  # Envoy: 3
    assert s.retry_budget_percent is None
    assert s.min_retry_concurrency == 3


def test_no_policy_and_empty_policy_give_the_defaults() -> None:
    assert LimitSettings.from_policy(None) == LimitSettings()
    assert LimitSettings.from_policy(TrafficPolicy()) == LimitSettings()
    assert LimitSettings.from_policy(TrafficPolicy(connection_pool=ConnectionPoolSettings())) == (
        LimitSettings()
    )
    assert limit_settings(None) == LimitSettings()


def test_connection_pool_fields_map_to_the_four_thresholds() -> None:
    s = LimitSettings.from_policy(pool(max_connections=10, pending=5, requests=7, retries=2))
    assert s == LimitSettings(
        max_connections=10, max_pending_requests=5, max_requests=7, max_retries=2
    )
    assert limit_settings(pool(max_connections=10)).max_connections == 10


def test_zero_means_unset_to_istio() -> None:
    # applyConnectionPool copies each value only when > 0 (it cannot tell 0 from unset).
    s = LimitSettings.from_policy(pool(max_connections=0, pending=0, requests=0, retries=0))
    assert s == LimitSettings()


def test_only_the_blocks_present_are_read() -> None:
    tcp_only = TrafficPolicy(
        connection_pool=ConnectionPoolSettings(tcp=TCPSettings(max_connections=3))
    )
    assert LimitSettings.from_policy(tcp_only) == LimitSettings(max_connections=3)
    http_only = TrafficPolicy(
        connection_pool=ConnectionPoolSettings(http=HTTPSettings(max_retries=4))
    )
    assert LimitSettings.from_policy(http_only) == LimitSettings(max_retries=4)


def test_retry_budget_block_defaults_to_20_percent_and_3() -> None:
    s = LimitSettings.from_policy(TrafficPolicy(retry_budget=RetryBudget()))
    assert s.retry_budget_percent == 20.0
    assert s.min_retry_concurrency == 3


def test_retry_budget_fields_are_copied() -> None:
    policy = TrafficPolicy(
        retry_budget=RetryBudget(percent=Percent(value=50.0), min_retry_concurrency=1),
        connection_pool=ConnectionPoolSettings(http=HTTPSettings(max_retries=2)),
    )
    s = LimitSettings.from_policy(policy)
    assert s.retry_budget_percent == 50.0
    assert s.min_retry_concurrency == 1
    assert s.max_retries == 2  # kept, but the budget overrides it (see below)


def test_retry_budget_min_concurrency_zero_means_default() -> None:
    # applyRetryBudget copies minRetryConcurrency only when > 0.
    s = LimitSettings.from_policy(TrafficPolicy(retry_budget=RetryBudget(min_retry_concurrency=0)))
    assert s.min_retry_concurrency == 3


def test_retry_budget_percent_is_clamped_to_a_percentage() -> None:
    high = TrafficPolicy(retry_budget=RetryBudget(percent=Percent(value=150.0)))
    low = TrafficPolicy(retry_budget=RetryBudget(percent=Percent(value=-5.0)))
    assert LimitSettings.from_policy(high).retry_budget_percent == 100.0
    assert LimitSettings.from_policy(low).retry_budget_percent == 0.0


def test_retry_budget_decodes_from_destination_rule_yaml() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: meshproxy.io/v1alpha1
        kind: MeshProxy
        metadata: {name: app-v1, namespace: default}
        spec:
          serviceAccount: app
          admin: 127.0.0.1:0
          outbound: {address: 127.0.0.1:0}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          ports: [{number: 9080, name: http, protocol: HTTP}]
          resolution: STATIC
          endpoints: [{address: 127.0.0.1}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          trafficPolicy:
            connectionPool:
              tcp: {maxConnections: 100}
              http: {http1MaxPendingRequests: 10, http2MaxRequests: 50, maxRetries: 2}
            retryBudget:
              percent: {value: 25}
              minRetryConcurrency: 4
              budgetInterval: 1s
        """
    )
    config = load_texts([("mesh.yaml", text)])
    policy = config.destination_rules[0].spec.traffic_policy
    assert policy is not None
    assert policy.retry_budget == RetryBudget(
        percent=Percent(value=25.0), min_retry_concurrency=4, budget_interval=Duration(1.0)
    )
    assert LimitSettings.from_policy(policy) == LimitSettings(
        max_connections=100,
        max_pending_requests=10,
        max_requests=50,
        max_retries=2,
        retry_budget_percent=25.0,
        min_retry_concurrency=4,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_connections": -1},
        {"max_pending_requests": -1},
        {"max_requests": -1},
        {"max_retries": -1},
        {"retry_budget_percent": 101.0},
        {"retry_budget_percent": -1.0},
        {"min_retry_concurrency": -1},
    ],
)
def test_settings_reject_impossible_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LimitSettings(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# ClusterLimits


def test_default_cluster_limits_are_unlimited() -> None:
    limits = ClusterLimits()
    assert limits.settings == LimitSettings()
    for _ in range(100):
        assert limits.try_connection()
        assert limits.try_pending()
        assert limits.try_request()
        assert limits.try_retry()
    assert (limits.connections, limits.pending, limits.active, limits.retries) == (100,) * 4


@pytest.mark.parametrize("kind", KINDS)
def test_each_limit_grants_up_to_its_maximum_then_overflows(kind: str) -> None:
    settings = LimitSettings(
        max_connections=2, max_pending_requests=2, max_requests=2, max_retries=2
    )
    limits = ClusterLimits(settings)
    take = getattr(limits, f"try_{kind}")
    give = getattr(limits, f"release_{kind}")
    overflow = {
        "connection": "overflow_connections",
        "pending": "overflow_pending",
        "request": "overflow_requests",
        "retry": "overflow_retries",
    }[kind]
    assert take() and take()
    assert not take()
    assert not take()
    assert getattr(limits, overflow) == 2
    give()
    assert take()  # a released slot is usable again
    assert getattr(limits, overflow) == 2


def test_limits_are_independent() -> None:
    limits = ClusterLimits(
        LimitSettings(max_connections=1, max_pending_requests=1, max_requests=1, max_retries=1)
    )
    assert limits.try_connection()
    assert not limits.try_connection()
    assert limits.try_pending() and limits.try_request() and limits.try_retry()
    assert (
        limits.overflow_connections,
        limits.overflow_pending,
        limits.overflow_requests,
        limits.overflow_retries,
    ) == (1, 0, 0, 0)


def test_a_zero_limit_refuses_everything() -> None:
    limits = ClusterLimits(LimitSettings(max_requests=0))
    assert not limits.try_request()
    assert limits.active == 0
    assert limits.overflow_requests == 1


@pytest.mark.parametrize("kind", KINDS)
def test_release_without_grant_is_a_bug(kind: str) -> None:
    limits = ClusterLimits()
    with pytest.raises(ValueError):
        getattr(limits, f"release_{kind}")()
    assert getattr(limits, f"try_{kind}")()
    getattr(limits, f"release_{kind}")()
    with pytest.raises(ValueError):
        getattr(limits, f"release_{kind}")()
    snap = limits.snapshot()
    assert snap["connections"] == snap["pending_requests"] == snap["requests"] == 0
    assert snap["retries"] == 0


def test_retry_budget_floor_is_min_retry_concurrency() -> None:
    limits = ClusterLimits(LimitSettings(retry_budget_percent=20.0, max_retries=1))
    # No active requests: 20% of 0 is 0, so min_retry_concurrency (3) applies, and the budget
    # overrides max_retries (1).
    assert limits.max_retries_now() == 3
    assert limits.try_retry() and limits.try_retry() and limits.try_retry()
    assert not limits.try_retry()
    assert limits.overflow_retries == 1


def test_retry_budget_counts_active_and_pending_requests() -> None:
    limits = ClusterLimits(LimitSettings(retry_budget_percent=20.0))
    for _ in range(20):
        assert limits.try_request()
    for _ in range(5):
        assert limits.try_pending()
    # Envoy: budget_percent / 100 * (active + pending) = 0.2 * 25 = 5.
    assert limits.max_retries_now() == 5
    for _ in range(5):
        assert limits.try_retry()
    assert not limits.try_retry()
    # One more request in flight is not enough for another retry: 0.2 * 26 = 5.2 -> 5.
    assert limits.try_request()
    assert not limits.try_retry()
    for _ in range(4):
        assert limits.try_request()
    assert limits.max_retries_now() == 6  # 0.2 * 30
    assert limits.try_retry()


def test_retry_budget_shrinks_with_load_but_keeps_granted_retries() -> None:
    limits = ClusterLimits(LimitSettings(retry_budget_percent=50.0, min_retry_concurrency=1))
    for _ in range(10):
        limits.try_request()
    for _ in range(5):
        assert limits.try_retry()
    for _ in range(10):
        limits.release_request()
    assert limits.max_retries_now() == 1
    assert limits.retries == 5  # granted retries are never revoked
    assert not limits.try_retry()
    assert limits.snapshot()["remaining_retries"] == 0


def test_without_a_budget_max_retries_applies() -> None:
    limits = ClusterLimits(LimitSettings(max_retries=2))
    for _ in range(100):
        limits.try_request()
    assert limits.max_retries_now() == 2


def test_snapshot_reports_limits_use_headroom_and_overflows() -> None:
    limits = ClusterLimits(
        LimitSettings(max_connections=4, max_pending_requests=3, max_requests=2, max_retries=1)
    )
    limits.try_connection()
    limits.try_pending()
    limits.try_pending()
    limits.try_request()
    limits.try_request()
    limits.try_request()  # overflow
    limits.try_retry()
    limits.try_retry()  # overflow
    assert limits.snapshot() == {
        "max_connections": 4,
        "connections": 1,
        "remaining_connections": 3,
        "max_pending_requests": 3,
        "pending_requests": 2,
        "remaining_pending_requests": 1,
        "max_requests": 2,
        "requests": 2,
        "remaining_requests": 0,
        "max_retries": 1,
        "retries": 1,
        "remaining_retries": 0,
        "retry_budget_percent": None,
        "min_retry_concurrency": None,
        "overflow_connections": 0,
        "overflow_pending": 0,
        "overflow_requests": 1,
        "overflow_retries": 1,
    }


def test_snapshot_with_a_budget_shows_the_current_retry_limit() -> None:
    limits = ClusterLimits(LimitSettings(retry_budget_percent=10.0, min_retry_concurrency=2))
    for _ in range(40):
        limits.try_request()
    snap = limits.snapshot()
    assert snap["max_retries"] == 4
    assert snap["retry_budget_percent"] == 10.0
    assert snap["min_retry_concurrency"] == 2
    assert snap["max_requests"] == UNLIMITED


# ---------------------------------------------------------------------------------------------
# State machine


class LimitsMachine(RuleBasedStateMachine):
    """Random grants and releases against a model of what was granted."""

    limits: ClusterLimits

    @initialize(
        max_connections=st.integers(0, 4),
        max_pending=st.integers(0, 4),
        max_requests=st.integers(0, 4),
        max_retries=st.integers(0, 4),
        budget=st.none() | st.floats(0, 100, allow_nan=False),
        min_retry=st.integers(0, 4),
    )
    def setup(
        self,
        max_connections: int,
        max_pending: int,
        max_requests: int,
        max_retries: int,
        budget: float | None,
        min_retry: int,
    ) -> None:
        self.limits = ClusterLimits(
            LimitSettings(
                max_connections=max_connections,
                max_pending_requests=max_pending,
                max_requests=max_requests,
                max_retries=max_retries,
                retry_budget_percent=budget,
                min_retry_concurrency=min_retry,
            )
        )
        self.granted = dict.fromkeys(KINDS, 0)
        self.released = dict.fromkeys(KINDS, 0)
        self.refused = dict.fromkeys(KINDS, 0)

    def _held(self, kind: str) -> int:
        return self.granted[kind] - self.released[kind]

    def _limit(self, kind: str) -> int:
        s = self.limits.settings
        if kind == "connection":
            return s.max_connections
        if kind == "pending":
            return s.max_pending_requests
        if kind == "request":
            return s.max_requests
        return self.limits.max_retries_now()

    @rule(kind=st.sampled_from(KINDS))
    def take(self, kind: str) -> None:
        limit = self._limit(kind)
        before = self._held(kind)
        if getattr(self.limits, f"try_{kind}")():
            self.granted[kind] += 1
            assert before < limit, f"{kind}: granted the {before + 1}th slot of {limit}"
        else:
            self.refused[kind] += 1
            assert before >= limit, f"{kind}: refused with {before} of {limit} in use"

    @rule(kind=st.sampled_from(KINDS))
    def give_back(self, kind: str) -> None:
        if self._held(kind) > 0:
            getattr(self.limits, f"release_{kind}")()
            self.released[kind] += 1
        else:
            with pytest.raises(ValueError):
                getattr(self.limits, f"release_{kind}")()

    @precondition(lambda self: self._held("request") > 0 and self._held("retry") > 0)
    @rule()
    def retried_request_finishes(self) -> None:
        self.limits.release_retry()
        self.released["retry"] += 1
        self.limits.release_request()
        self.released["request"] += 1

    @invariant()
    def counters_match_grants_minus_releases(self) -> None:
        counters = {
            "connection": self.limits.connections,
            "pending": self.limits.pending,
            "request": self.limits.active,
            "retry": self.limits.retries,
        }
        for kind in KINDS:
            assert counters[kind] == self._held(kind) >= 0

    @invariant()
    def fixed_limits_are_never_exceeded(self) -> None:
        s = self.limits.settings
        assert self.limits.connections <= s.max_connections
        assert self.limits.pending <= s.max_pending_requests
        assert self.limits.active <= s.max_requests
        if s.retry_budget_percent is None:
            assert self.limits.retries <= s.max_retries

    @invariant()
    def overflows_count_the_refusals(self) -> None:
        assert self.limits.overflow_connections == self.refused["connection"]
        assert self.limits.overflow_pending == self.refused["pending"]
        assert self.limits.overflow_requests == self.refused["request"]
        assert self.limits.overflow_retries == self.refused["retry"]

    @invariant()
    def snapshot_headroom_is_never_negative(self) -> None:
        snap = self.limits.snapshot()
        for key in (
            "remaining_connections",
            "remaining_pending_requests",
            "remaining_requests",
            "remaining_retries",
        ):
            value = snap[key]
            assert isinstance(value, int) and value >= 0


LimitsMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLimitsMachine = LimitsMachine.TestCase
