"""Outlier ejection (core/outlier.py): Istio's mapping and defaults, Envoy's ejection semantics.

Synchronous, with a fake clock: ``now`` is a plain float the test advances. The Hypothesis state
machine records random outcomes on random hosts, ticks and advances time, and checks the
invariants: ejection never exceeds its cap (at least one host), an ejected host is out exactly
``min(base * n, max)`` and is back after it, a host whose errors are interleaved with good answers
is never ejected, consecutive 5xx = 0 disables that detector, and panic returns every host below
``min_health_percent``.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from meshproxy.config.load import load_texts
from meshproxy.config.model import Duration, OutlierDetection, TrafficPolicy
from meshproxy.core.outlier import (
    EjectionKind,
    OutlierDetector,
    OutlierSettings,
    outlier_settings,
)


def fail(d: OutlierDetector, host: int, times: int, *, status: int = 503, now: float = 0.0) -> int:
    """``times`` responses with ``status`` on ``host``; how many of them ejected it."""
    return sum(
        d.record(host, status=status, local_origin_failure=False, now=now) for _ in range(times)
    )


def ok(d: OutlierDetector, host: int, *, now: float = 0.0) -> None:
    d.record(host, status=200, local_origin_failure=False, now=now)


def local(d: OutlierDetector, host: int, times: int = 1, *, now: float = 0.0) -> int:
    return sum(
        d.record(host, status=None, local_origin_failure=True, now=now) for _ in range(times)
    )


# ---------------------------------------------------------------------------------------------
# Settings: defaults and Istio's mapping


def test_defaults_are_what_istio_gives_an_empty_block() -> None:
    s = OutlierSettings()
    assert s.consecutive_5xx == 5  # consecutive5xxErrors default
    assert s.consecutive_gateway == 0  # consecutiveGatewayErrors: disabled by default
    assert s.consecutive_local_origin == 5  # consecutiveLocalOriginFailures default
    assert s.split_external_local_origin_errors is False
    assert s.interval == 10.0
    assert s.base_ejection == 30.0
    assert s.max_ejection == 300.0  # Envoy max_ejection_time default
    assert s.max_ejection_percent == 10
    assert s.min_health_percent == 0  # Istio: panic mode off (Envoy's own default is 50)
    assert OutlierSettings.from_istio(OutlierDetection()) == s
    assert outlier_settings(OutlierDetection()) == s


def test_every_istio_field_is_mapped() -> None:
    od = OutlierDetection(
        consecutive_5xx_errors=7,
        consecutive_gateway_errors=3,
        consecutive_local_origin_failures=2,
        split_external_local_origin_errors=True,
        interval=Duration(5.0),
        base_ejection_time=Duration(60.0),
        max_ejection_percent=50,
        min_health_percent=30,
    )
    assert OutlierSettings.from_istio(od) == OutlierSettings(
        consecutive_5xx=7,
        consecutive_gateway=3,
        consecutive_local_origin=2,
        split_external_local_origin_errors=True,
        interval=5.0,
        base_ejection=60.0,
        max_ejection=300.0,
        max_ejection_percent=50,
        min_health_percent=30,
    )


def test_max_ejection_is_at_least_the_base() -> None:
    # max_ejection_time: "the default value (300s) or base_ejection_time, whatever is larger".
    s = OutlierSettings.from_istio(OutlierDetection(base_ejection_time=Duration(900.0)))
    assert (s.base_ejection, s.max_ejection) == (900.0, 900.0)


def test_consecutive_5xx_zero_disables_it() -> None:
    s = OutlierSettings.from_istio(OutlierDetection(consecutive_5xx_errors=0))
    assert s.consecutive_5xx == 0
    d = OutlierDetector(10, s)
    assert fail(d, 0, 50) == 0
    assert d.healthy(0, 0.0)


def test_deprecated_consecutive_errors_means_gateway_errors_only() -> None:
    s = OutlierSettings.from_istio(OutlierDetection(consecutive_errors=4))
    assert (s.consecutive_gateway, s.consecutive_5xx) == (4, 0)
    d = OutlierDetector(10, s)
    assert fail(d, 0, 10, status=500) == 0  # a 500 is not a gateway error
    assert fail(d, 1, 4, status=502) == 1


def test_newer_fields_override_consecutive_errors() -> None:
    both = OutlierDetection(
        consecutive_errors=4, consecutive_5xx_errors=6, consecutive_gateway_errors=2
    )
    assert OutlierSettings.from_istio(both).consecutive_5xx == 6
    assert OutlierSettings.from_istio(both).consecutive_gateway == 2
    five = OutlierSettings.from_istio(
        OutlierDetection(consecutive_errors=4, consecutive_5xx_errors=6)
    )
    assert (five.consecutive_5xx, five.consecutive_gateway) == (6, 4)
    # 0 is "unset" for the old int32 field.
    assert OutlierSettings.from_istio(OutlierDetection(consecutive_errors=0)) == OutlierSettings()


def test_zero_local_origin_failures_keeps_envoys_default() -> None:
    # Istio copies consecutiveLocalOriginFailures only when > 0.
    od = OutlierDetection(
        split_external_local_origin_errors=True, consecutive_local_origin_failures=0
    )
    assert OutlierSettings.from_istio(od).consecutive_local_origin == 5


def test_percentages_follow_istio() -> None:
    # maxEjectionPercent is copied only when > 0; minHealthPercent always (0 = panic off).
    assert (
        OutlierSettings.from_istio(OutlierDetection(max_ejection_percent=0)).max_ejection_percent
        == 10
    )
    assert (
        OutlierSettings.from_istio(OutlierDetection(max_ejection_percent=100)).max_ejection_percent
        == 100
    )
    assert (
        OutlierSettings.from_istio(OutlierDetection(min_health_percent=0)).min_health_percent == 0
    )
    assert (
        OutlierSettings.from_istio(OutlierDetection(min_health_percent=75)).min_health_percent == 75
    )


def test_values_istio_would_reject_do_not_fail_at_runtime() -> None:
    s = OutlierSettings.from_istio(
        OutlierDetection(
            consecutive_5xx_errors=-1,
            interval=Duration(0.0),
            base_ejection_time=Duration(-1.0),
            max_ejection_percent=250,
            min_health_percent=-3,
        )
    )
    assert (s.consecutive_5xx, s.interval, s.base_ejection) == (0, 10.0, 30.0)
    assert (s.max_ejection_percent, s.min_health_percent) == (100, 0)


def test_from_policy_is_none_without_the_block() -> None:
    assert OutlierSettings.from_policy(None) is None
    assert OutlierSettings.from_policy(TrafficPolicy()) is None
    policy = TrafficPolicy(outlier_detection=OutlierDetection(consecutive_5xx_errors=3))
    settings_ = OutlierSettings.from_policy(policy)
    assert settings_ is not None and settings_.consecutive_5xx == 3


def test_outlier_detection_decodes_from_yaml() -> None:
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
            outlierDetection:
              consecutive5xxErrors: 3
              consecutiveGatewayErrors: 2
              interval: 1s
              baseEjectionTime: 2m
              maxEjectionPercent: 100
              minHealthPercent: 50
        """
    )
    config = load_texts([("mesh.yaml", text)])
    s = OutlierSettings.from_policy(config.destination_rules[0].spec.traffic_policy)
    assert s == OutlierSettings(
        consecutive_5xx=3,
        consecutive_gateway=2,
        interval=1.0,
        base_ejection=120.0,
        max_ejection=300.0,
        max_ejection_percent=100,
        min_health_percent=50,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_5xx": -1},
        {"consecutive_gateway": -1},
        {"consecutive_local_origin": -1},
        {"interval": 0.0},
        {"base_ejection": 0.0},
        {"base_ejection": 400.0},  # above the default max_ejection
        {"max_ejection_percent": 101},
        {"min_health_percent": -1},
    ],
)
def test_settings_reject_impossible_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierSettings(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Counting


def test_five_consecutive_5xx_eject_by_default() -> None:
    d = OutlierDetector(10, OutlierSettings())
    assert fail(d, 3, 4, status=500) == 0
    assert d.healthy(3, 0.0)
    assert d.record(3, status=500, local_origin_failure=False, now=0.0) is True
    assert not d.healthy(3, 0.0)
    assert d.eligible(0.0) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert d.ejections_total == 1
    assert d.ejections_by_kind[EjectionKind.CONSECUTIVE_5XX] == 1


def test_any_non_5xx_response_resets_the_5xx_run() -> None:
    d = OutlierDetector(10, OutlierSettings())
    for status in (200, 404, 302, 499):
        fail(d, 0, 4)
        d.record(0, status=status, local_origin_failure=False, now=0.0)
    fail(d, 0, 4)
    assert d.healthy(0, 0.0)
    assert d.ejections_total == 0


def test_gateway_run_is_reset_by_other_5xx() -> None:
    d = OutlierDetector(10, OutlierSettings(consecutive_5xx=0, consecutive_gateway=3))
    fail(d, 0, 2, status=502)
    fail(d, 0, 1, status=500)  # a 5xx, but not a gateway error
    fail(d, 0, 2, status=504)
    assert d.healthy(0, 0.0)
    assert fail(d, 0, 1, status=503) == 1
    assert d.ejections_by_kind[EjectionKind.CONSECUTIVE_GATEWAY_FAILURE] == 1


def test_gateway_errors_also_count_as_5xx() -> None:
    d = OutlierDetector(10, OutlierSettings(consecutive_5xx=3, consecutive_gateway=0))
    fail(d, 0, 1, status=502)
    fail(d, 0, 1, status=500)
    assert fail(d, 0, 1, status=504) == 1


def test_local_failure_counts_as_5xx_and_gateway_when_not_split() -> None:
    d = OutlierDetector(10, OutlierSettings(consecutive_5xx=0, consecutive_gateway=2))
    assert local(d, 0, 2) == 1  # mapped to 503: a gateway error
    d = OutlierDetector(10, OutlierSettings(consecutive_5xx=3))
    local(d, 0)
    fail(d, 0, 1, status=500)
    assert local(d, 0) == 1
    d = OutlierDetector(10, OutlierSettings())
    assert local(d, 0, 20) == 1  # local-origin counter not used when not split


def test_local_failure_may_carry_the_status_to_map_it_to() -> None:
    d = OutlierDetector(10, OutlierSettings(consecutive_5xx=0, consecutive_gateway=2))
    # A per-try timeout is mapped to 504 (Envoy resultToHttpCode LOCAL_ORIGIN_TIMEOUT).
    assert d.record(0, status=504, local_origin_failure=True, now=0.0) is False
    assert d.record(0, status=504, local_origin_failure=True, now=0.0) is True


def test_split_mode_counts_local_failures_apart() -> None:
    s = OutlierSettings(
        split_external_local_origin_errors=True,
        consecutive_local_origin=3,
        max_ejection_percent=100,
    )
    d = OutlierDetector(10, s)
    fail(d, 0, 4)
    local(d, 0, 2)
    # Local failures neither add to nor reset the 5xx run: this is the 5th consecutive 5xx.
    assert fail(d, 0, 1) == 1
    assert d.ejections_by_kind[EjectionKind.CONSECUTIVE_5XX] == 1
    assert local(d, 1, 2) == 0
    assert local(d, 1, 1) == 1
    assert d.ejections_by_kind[EjectionKind.CONSECUTIVE_LOCAL_ORIGIN_FAILURE] == 1


def test_split_mode_any_response_or_connection_resets_local_origin() -> None:
    s = OutlierSettings(split_external_local_origin_errors=True, consecutive_local_origin=3)
    d = OutlierDetector(10, s)
    local(d, 0, 2)
    fail(d, 0, 1, status=503)  # even a 503 proves the connection worked
    local(d, 0, 2)
    d.record(0, status=None, local_origin_failure=False, now=0.0)  # connected
    local(d, 0, 2)
    assert d.healthy(0, 0.0)
    assert local(d, 0, 1) == 1


def test_a_bare_connected_event_changes_nothing_when_not_split() -> None:
    d = OutlierDetector(10, OutlierSettings())
    fail(d, 0, 4)
    assert d.record(0, status=None, local_origin_failure=False, now=0.0) is False
    assert fail(d, 0, 1) == 1


def test_errors_on_an_ejected_host_are_ignored() -> None:
    d = OutlierDetector(10, OutlierSettings(max_ejection_percent=100))
    fail(d, 0, 5)
    assert fail(d, 0, 50) == 0
    assert (d.ejections_total, d.ejections_overflow) == (1, 0)


# ---------------------------------------------------------------------------------------------
# Ejection cap


def test_max_ejection_percent_caps_ejections_and_counts_overflow() -> None:
    d = OutlierDetector(10, OutlierSettings())  # 10% of 10 hosts: 1
    assert fail(d, 0, 5) == 1
    assert fail(d, 1, 5) == 0
    assert d.healthy(1, 0.0)
    assert d.ejections_overflow == 1
    # The run restarted when the cap refused it: four more errors are not enough.
    assert fail(d, 1, 4) == 0
    assert d.ejections_overflow == 1
    assert fail(d, 1, 1) == 0
    assert d.ejections_overflow == 2


def test_at_least_one_host_is_ejected_however_small_the_percentage() -> None:
    d = OutlierDetector(3, OutlierSettings())  # 10% of 3 rounds to 0
    assert fail(d, 0, 5) == 1
    assert fail(d, 1, 5) == 0
    assert d.eligible(0.0) == [1, 2]
    single = OutlierDetector(1, OutlierSettings())
    assert fail(single, 0, 5) == 1
    assert single.eligible(0.0) == []  # panic off: no healthy upstream (503 UH)


@pytest.mark.parametrize(
    ("size", "percent", "expected"),
    [(10, 50, 5), (10, 100, 10), (4, 30, 1), (7, 50, 3), (20, 10, 2), (5, 0, 1)],
)
def test_ejection_cap_is_floor_of_the_percentage(size: int, percent: int, expected: int) -> None:
    d = OutlierDetector(size, OutlierSettings(max_ejection_percent=percent))
    ejected = sum(fail(d, host, 5) for host in range(size))
    assert ejected == expected
    assert d.ejected_count(0.0) == expected
    assert d.ejections_overflow == size - expected


# ---------------------------------------------------------------------------------------------
# Ejection time and the multiplier


def test_ejected_host_returns_after_base_ejection_time() -> None:
    d = OutlierDetector(10, OutlierSettings())
    fail(d, 0, 5, now=100.0)
    assert d.returns_at(0) == 130.0
    assert not d.healthy(0, 129.999)
    assert 0 not in d.eligible(129.999)
    assert d.healthy(0, 130.0)
    assert 0 in d.eligible(130.0)
    d.tick(130.0)
    assert d.returns_at(0) is None


def test_ejection_time_grows_with_the_multiplier_and_is_capped() -> None:
    s = OutlierSettings(base_ejection=30.0, max_ejection=100.0)
    d = OutlierDetector(10, s)
    now = 0.0
    durations = []
    for _ in range(6):
        fail(d, 0, 5, now=now)
        until = d.returns_at(0)
        assert until is not None
        durations.append(until - now)
        now = until  # back exactly on time, and at once failing again (no tick in between)
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0]
    # Envoy stops raising the multiplier once base * n passes the cap (n * base < max + base).
    snap = d.snapshot(now)
    hosts = snap["hosts"]
    assert isinstance(hosts, list)
    assert hosts[0]["times_ejected"] == 5
    assert hosts[0]["ejections"] == 6


def test_return_restarts_the_counters() -> None:
    d = OutlierDetector(10, OutlierSettings(max_ejection_percent=100, consecutive_gateway=7))
    fail(d, 0, 6, status=502)  # the 5xx run ejects at the 5th; the 6th finds it ejected
    assert not d.healthy(0, 0.0)
    # Back at 30 s: the runs restarted, so four errors do not eject it again.
    assert fail(d, 0, 4, status=502, now=30.0) == 0
    assert d.healthy(0, 30.0)
    assert fail(d, 0, 1, status=502, now=30.0) == 1


def test_tick_decrements_the_multiplier_of_hosts_healthy_for_an_interval() -> None:
    s = OutlierSettings(interval=10.0, base_ejection=30.0)
    d = OutlierDetector(10, s)

    def times(now: float) -> int:
        hosts = d.snapshot(now)["hosts"]
        assert isinstance(hosts, list)
        value = hosts[0]["times_ejected"]
        assert isinstance(value, int)
        return value

    fail(d, 0, 5, now=5.0)  # out until 35, multiplier 1
    d.tick(10.0)
    d.tick(20.0)
    d.tick(30.0)
    assert times(30.0) == 1
    d.tick(40.0)  # returned at this sweep: it was ejected during the interval, no decrement
    assert d.healthy(0, 40.0)
    assert times(40.0) == 1
    d.tick(50.0)  # healthy throughout the interval
    assert times(50.0) == 0
    fail(d, 0, 5, now=55.0)
    assert d.returns_at(0) == 85.0  # base * 1 again


def test_multiplier_survives_when_the_host_fails_again_before_a_sweep() -> None:
    s = OutlierSettings(interval=10.0, base_ejection=1.0, max_ejection=300.0)
    d = OutlierDetector(10, s)
    fail(d, 0, 5, now=0.0)  # out until 1
    fail(d, 0, 5, now=2.0)  # back, and out again until 4 (n = 2)
    assert d.returns_at(0) == 4.0
    d.tick(10.0)  # was ejected during the interval: no decrement
    fail(d, 0, 5, now=11.0)
    assert d.returns_at(0) == 14.0  # n = 3


# ---------------------------------------------------------------------------------------------
# Panic and eligibility


def test_panic_returns_every_host_below_min_health_percent() -> None:
    s = OutlierSettings(max_ejection_percent=100, min_health_percent=50)
    d = OutlierDetector(4, s)
    fail(d, 0, 5)
    fail(d, 1, 5)
    # 2 of 4 healthy: 50% is not below 50%.
    assert d.eligible(0.0) == [2, 3]
    assert not d.panic(0.0)
    fail(d, 2, 5)
    assert d.panic(0.0)
    assert d.eligible(0.0) == [0, 1, 2, 3]
    # Health itself is unchanged by panic.
    assert [d.healthy(i, 0.0) for i in range(4)] == [False, False, False, True]


def test_without_panic_every_host_can_be_ejected() -> None:
    d = OutlierDetector(3, OutlierSettings(max_ejection_percent=100))
    for host in range(3):
        fail(d, host, 5)
    assert d.eligible(0.0) == []
    assert not d.panic(0.0)
    assert d.eligible(30.0) == [0, 1, 2]


def test_empty_cluster() -> None:
    d = OutlierDetector(0, OutlierSettings(min_health_percent=50))
    assert d.eligible(0.0) == []
    assert not d.panic(0.0)
    d.tick(10.0)
    assert d.snapshot(10.0)["hosts"] == []


def test_snapshot_for_admin() -> None:
    d = OutlierDetector(2, OutlierSettings(max_ejection_percent=50))
    fail(d, 0, 5, now=1.0)
    fail(d, 1, 3, status=502, now=1.0)
    assert d.snapshot(2.0) == {
        "size": 2,
        "ejected": 1,
        "panic": False,
        "ejections_total": 1,
        "ejections_overflow": 0,
        "ejections_consecutive_5xx": 1,
        "ejections_consecutive_gateway_failure": 0,
        "ejections_consecutive_local_origin_failure": 0,
        "hosts": [
            {
                "host": 0,
                "healthy": False,
                "ejected_until": 31.0,
                "times_ejected": 1,
                "ejections": 1,
                "last_ejection": "consecutive_5xx",
                "consecutive_5xx": 0,
                "consecutive_gateway": 5,
                "consecutive_local_origin": 0,
            },
            {
                "host": 1,
                "healthy": True,
                "ejected_until": None,
                "times_ejected": 0,
                "ejections": 0,
                "last_ejection": None,
                "consecutive_5xx": 3,
                "consecutive_gateway": 3,
                "consecutive_local_origin": 0,
            },
        ],
    }
    snap = d.snapshot(31.0)
    assert snap["ejected"] == 0
    hosts = snap["hosts"]
    assert isinstance(hosts, list)
    assert hosts[0]["healthy"] is True
    assert hosts[0]["consecutive_gateway"] == 0


# ---------------------------------------------------------------------------------------------
# State machine

OUTCOMES = ("200", "404", "500", "502", "503", "504", "local", "connected")


@dataclass
class Run:
    """A model of one host's current runs, never reset by ejection (so always >= the detector's)."""

    fivexx: int = 0
    gateway: int = 0
    local: int = 0


class OutlierMachine(RuleBasedStateMachine):
    detector: OutlierDetector

    @initialize(
        size=st.integers(1, 12),
        consecutive_5xx=st.integers(0, 4),
        consecutive_gateway=st.integers(0, 4),
        consecutive_local=st.integers(1, 4),
        split=st.booleans(),
        base=st.sampled_from([1.0, 2.5, 10.0, 30.0]),
        max_factor=st.integers(1, 5),
        max_percent=st.integers(0, 100),
        min_health=st.integers(0, 100),
    )
    def setup(
        self,
        size: int,
        consecutive_5xx: int,
        consecutive_gateway: int,
        consecutive_local: int,
        split: bool,
        base: float,
        max_factor: int,
        max_percent: int,
        min_health: int,
    ) -> None:
        self.settings = OutlierSettings(
            consecutive_5xx=consecutive_5xx,
            consecutive_gateway=consecutive_gateway,
            consecutive_local_origin=consecutive_local,
            split_external_local_origin_errors=split,
            interval=10.0,
            base_ejection=base,
            max_ejection=base * max_factor,
            max_ejection_percent=max_percent,
            min_health_percent=min_health,
        )
        self.detector = OutlierDetector(size, self.settings)
        self.now = 0.0
        self.runs = [Run() for _ in range(size)]
        self.ejections = [0] * size
        self.ejected_by_record = 0

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0, 45.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def tick(self) -> None:
        self.detector.tick(self.now)

    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES))
    def record(self, data: st.DataObject, outcome: str) -> None:
        host = data.draw(st.integers(0, self.detector.size - 1), label="host")
        run = self.runs[host]
        split = self.settings.split_external_local_origin_errors
        was_healthy = self.detector.healthy(host, self.now)
        if outcome == "local":
            ejected = self.detector.record(
                host, status=None, local_origin_failure=True, now=self.now
            )
            if split:
                run.local += 1
            else:
                run.fivexx += 1
                run.gateway += 1
        elif outcome == "connected":
            ejected = self.detector.record(
                host, status=None, local_origin_failure=False, now=self.now
            )
            run.local = 0
        else:
            status = int(outcome)
            ejected = self.detector.record(
                host, status=status, local_origin_failure=False, now=self.now
            )
            run.local = 0
            if status >= 500:
                run.fivexx += 1
                run.gateway = run.gateway + 1 if status in (502, 503, 504) else 0
            else:
                run.fivexx = run.gateway = 0
        if not ejected:
            return
        self.ejected_by_record += 1
        self.ejections[host] += 1
        s = self.settings
        # Ejected only by a full run of consecutive errors of an enabled kind: a good answer in
        # between, or a threshold of 0, never ejects.
        assert (
            (s.consecutive_5xx > 0 and run.fivexx >= s.consecutive_5xx)
            or (s.consecutive_gateway > 0 and run.gateway >= s.consecutive_gateway)
            or (split and run.local >= s.consecutive_local_origin)
        ), (run, s)
        assert was_healthy
        # Out for min(base * n, max), n between 1 and the host's ejections so far.
        until = self.detector.returns_at(host)
        assert until is not None
        duration = until - self.now
        assert not self.detector.healthy(host, self.now)
        if self.ejections[host] == 1:
            assert duration == min(s.base_ejection, s.max_ejection)
        n = round(duration / s.base_ejection)
        capped = math.isclose(duration, s.max_ejection)
        assert capped or (
            1 <= n <= self.ejections[host] and math.isclose(duration, s.base_ejection * n)
        ), (duration, n, self.ejections[host])
        assert duration <= s.max_ejection

    @invariant()
    def ejection_never_exceeds_its_cap(self) -> None:
        size = self.detector.size
        cap = max(1, self.settings.max_ejection_percent * size // 100)
        assert self.detector.ejected_count(self.now) <= cap

    @invariant()
    def ejected_hosts_return_on_time(self) -> None:
        for host in range(self.detector.size):
            until = self.detector.returns_at(host)
            healthy = self.detector.healthy(host, self.now)
            assert healthy == (until is None or self.now >= until)
            if until is not None:
                assert until - self.now <= self.settings.max_ejection

    @invariant()
    def eligible_is_healthy_or_everyone_in_panic(self) -> None:
        size = self.detector.size
        healthy = [h for h in range(size) if self.detector.healthy(h, self.now)]
        eligible = self.detector.eligible(self.now)
        if len(healthy) * 100 < self.settings.min_health_percent * size:
            assert eligible == list(range(size))
            assert self.detector.panic(self.now)
        else:
            assert eligible == healthy
            assert not self.detector.panic(self.now)

    @invariant()
    def totals_add_up(self) -> None:
        d = self.detector
        assert d.ejections_total == self.ejected_by_record == sum(d.ejections_by_kind.values())


OutlierMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOutlierMachine = OutlierMachine.TestCase
