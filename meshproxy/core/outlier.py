"""Outlier ejection: Envoy's consecutive-error outlier detection, as Istio configures it.

Owns, per endpoint of one cluster, the answer to "is this endpoint ejected, and until when?".
Endpoints are named by their index in the cluster's endpoint list (as in ``core/balancer.py``).

What Istio turns on (``applyOutlierDetection`` in istio/istio
``pilot/pkg/networking/core/cluster_traffic_policy.go``; reference §1.3, §2.4): only when the
DestinationRule has an ``outlierDetection`` block; consecutive 5xx, consecutive gateway errors
and (in split mode) consecutive local-origin failures. Success-rate ejection is forced off
(``enforcing_success_rate: 0``), so it is not modelled; neither is failure-percentage ejection
(Envoy enforces it at 0% by default), ejection jitter (``max_ejection_time_jitter`` defaults to 0)
or active health checking.

How an attempt is counted (``record``), after Envoy's ``DetectorHostMonitorImpl``
(source/common/upstream/outlier_detection_impl.cc):

- A response with status ``s``: a 5xx adds one to the consecutive-5xx counter; a 502/503/504
  ("gateway error") also adds one to the consecutive-gateway counter, while any other 5xx resets
  it; a non-5xx resets both. A response also proves the connection worked, which resets the
  local-origin counter.
- A local-origin failure (no usable response: connect failure or timeout, reset, per-try timeout;
  ``local_origin_failure=True``). With ``split_external_local_origin_errors`` off, Envoy maps it to
  an HTTP code and counts it like a response (``resultToHttpCode``: connect failure -> 503,
  timeout -> 504), so it counts toward both the 5xx and the gateway counters; ``status`` may give
  the code to map it to (default 503). With split on, it counts only toward the consecutive
  local-origin counter and leaves the 5xx and gateway counters alone.
- ``status=None, local_origin_failure=False``: the connection was established (Envoy's
  ``LOCAL_ORIGIN_CONNECT_SUCCESS``): resets the local-origin counter in split mode, else nothing.

A counter reaching its threshold exactly (Envoy compares with ``==``) asks for an ejection, and
that counter restarts (``onConsecutiveErrorWorker``), so a host refused by the ejection cap must
fail another full run before it is considered again; a threshold of 0 never fires (disabled). A
host that is already ejected is left alone. The ejection is granted while fewer than
``max(1, floor(max_ejection_percent% of the hosts))`` are ejected (Envoy ``ejectHost``;
outlier_detection.proto max_ejection_percent: "will eject at least one host regardless of the
value"); otherwise it counts in ``ejections_overflow``.

An ejected host stays out for ``min(base_ejection * n, max_ejection)``, where ``n`` (the
``times_ejected`` multiplier) grows by one per ejection and, every interval sweep (``tick``) in
which the host was healthy throughout, shrinks by one (Envoy arch_overview/upstream/outlier.rst:
"If the host is healthy during that check, the ejection time multiplier is decremented";
``checkHostForUneject``). Like Envoy, ``n`` stops growing once ``base * n`` passes the cap
(``ejectHost``: incremented only while ``n * base < max + base``), so recovery takes at most about
``max / base`` sweeps. An ejected host returns exactly when its time is up (Envoy returns it at
the first sweep after that; we do not make it wait up to one more interval), and its counters
restart so a few new errors cannot re-eject it at once.

Load balancing reads ``eligible(now)``: the healthy hosts, or every host when the healthy share
is below ``min_health_percent`` (Envoy's ``healthy_panic_threshold``, which Istio sets from
``minHealthPercent``, default 0: panic mode off). With panic off and every host ejected the list
is empty, and the caller answers 503 ``UH`` (``no healthy upstream``).

Rules: pure state machine, no clocks, sockets, asyncio or random; every time is the caller's
``now`` (seconds, monotonic). This is ejection, not a concurrency limit: those live in
``core/limits.py``, and neither is called a "circuit breaker" here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import assert_never

from meshproxy.config.model import OutlierDetection, TrafficPolicy

# Envoy api/envoy/config/cluster/v3/outlier_detection.proto defaults, which Istio leaves in place
# unless the DestinationRule sets the field (reference §1.3, §2.4):
DEFAULT_CONSECUTIVE_5XX = 5  # consecutive_5xx "Defaults to 5"; Istio consecutive5xxErrors def 5
DEFAULT_CONSECUTIVE_LOCAL_ORIGIN = 5  # consecutive_local_origin_failure "Defaults to 5"
DEFAULT_INTERVAL = 10.0  # interval "Defaults to 10000ms or 10s"
DEFAULT_BASE_EJECTION = 30.0  # base_ejection_time "Defaults to 30000ms or 30s"
# max_ejection_time: "If not specified, the default value (300000ms or 300s) or
# base_ejection_time value is applied, whatever is larger." Istio never sets it.
DEFAULT_MAX_EJECTION = 300.0
DEFAULT_MAX_EJECTION_PERCENT = 10  # max_ejection_percent "Defaults to 10%"
# Istio sets healthy_panic_threshold from minHealthPercent even when unset (0): panic mode off.
# (Envoy's own default is 50%; destination_rule.proto: "The default is 0% as it's not typically
# applicable in k8s environments with few pods per service.")
DEFAULT_MIN_HEALTH_PERCENT = 0

_GATEWAY_ERRORS = frozenset({502, 503, 504})  # Envoy Http::CodeUtility::isGatewayError
# Envoy resultToHttpCode: LOCAL_ORIGIN_CONNECT_FAILED -> 503 when errors are not split.
_LOCAL_ORIGIN_STATUS = 503


class EjectionKind(enum.Enum):
    """Why a host was ejected (Envoy ``OutlierEjectionType``)."""

    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierSettings:
    """One cluster's outlier detection. Defaults are what Istio gives an empty block."""

    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX  # 0 disables
    consecutive_gateway: int = 0  # 0 disables (Istio: "disabled by default")
    consecutive_local_origin: int = DEFAULT_CONSECUTIVE_LOCAL_ORIGIN  # used only when split
    split_external_local_origin_errors: bool = False
    interval: float = DEFAULT_INTERVAL  # seconds between tick() sweeps
    base_ejection: float = DEFAULT_BASE_EJECTION
    max_ejection: float = DEFAULT_MAX_EJECTION
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT
    min_health_percent: int = DEFAULT_MIN_HEALTH_PERCENT

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_gateway", "consecutive_local_origin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.interval <= 0 or self.base_ejection <= 0:
            raise ValueError("interval and base_ejection must be positive")
        if self.max_ejection < self.base_ejection:
            # Envoy DetectorImpl::create: "outlier detector's max_ejection_time cannot be
            # smaller than base_ejection_time".
            raise ValueError("max_ejection must not be smaller than base_ejection")
        if not 0 <= self.max_ejection_percent <= 100 or not 0 <= self.min_health_percent <= 100:
            raise ValueError("max_ejection_percent and min_health_percent must be 0..100")

    @classmethod
    def from_istio(cls, outlier: OutlierDetection) -> OutlierSettings:
        """Istio's ``applyOutlierDetection`` for an ``outlierDetection`` block.

        Values that Istio's validation rejects (non-positive durations, percentages outside
        0..100) fall back to the default or are clamped here rather than failing at runtime;
        ``config/istio.py`` is where they should be reported.
        """
        # consecutive5xxErrors / consecutiveGatewayErrors (UInt32Value): when set, Istio copies
        # the value and enforces it at 100%, or at 0% when it is 0, i.e. disabled.
        # The deprecated consecutiveErrors ("a 502, 503, or 504 return code qualifies as an
        # error", destination_rule.proto) is mapped as Istio 1.5-1.7 did
        # (pilot/pkg/networking/core/v1alpha3/cluster.go applyOutlierDetection: "Only listen to
        # gateway errors, see https://github.com/istio/api/pull/617"):
        # consecutive_gateway_failure = N enforced at 100%, enforcing_consecutive_5xx = 0; the
        # two newer fields, when set, override it. (Current Istio no longer reads the field.)
        legacy = outlier.consecutive_errors if (outlier.consecutive_errors or 0) > 0 else None
        if outlier.consecutive_5xx_errors is not None:
            consecutive_5xx = max(0, outlier.consecutive_5xx_errors)
        elif legacy is not None:
            consecutive_5xx = 0
        else:
            consecutive_5xx = DEFAULT_CONSECUTIVE_5XX
        if outlier.consecutive_gateway_errors is not None:
            consecutive_gateway = max(0, outlier.consecutive_gateway_errors)
        elif legacy is not None:
            consecutive_gateway = legacy
        else:
            # Envoy's consecutive_gateway_failure defaults to 5 but enforcing 0%: never ejects.
            consecutive_gateway = 0
        # consecutiveLocalOriginFailures is copied only when split and > 0, so an explicit 0
        # leaves Envoy's default of 5.
        local = outlier.consecutive_local_origin_failures
        consecutive_local_origin = (
            local if local is not None and local > 0 else DEFAULT_CONSECUTIVE_LOCAL_ORIGIN
        )
        interval = _positive_or(outlier.interval, DEFAULT_INTERVAL)
        base = _positive_or(outlier.base_ejection_time, DEFAULT_BASE_EJECTION)
        # maxEjectionPercent is copied only when > 0 (0 is "unset" to Istio): default 10.
        max_percent = outlier.max_ejection_percent
        max_ejection_percent = (
            min(100, max_percent)
            if max_percent is not None and max_percent > 0
            else DEFAULT_MAX_EJECTION_PERCENT
        )
        min_health = outlier.min_health_percent
        min_health_percent = (
            min(100, max(0, min_health)) if min_health is not None else DEFAULT_MIN_HEALTH_PERCENT
        )
        return cls(
            consecutive_5xx=consecutive_5xx,
            consecutive_gateway=consecutive_gateway,
            consecutive_local_origin=consecutive_local_origin,
            split_external_local_origin_errors=outlier.split_external_local_origin_errors,
            interval=interval,
            base_ejection=base,
            max_ejection=max(DEFAULT_MAX_EJECTION, base),
            max_ejection_percent=max_ejection_percent,
            min_health_percent=min_health_percent,
        )

    @classmethod
    def from_policy(cls, policy: TrafficPolicy | None) -> OutlierSettings | None:
        """The settings for a cluster's policy, or None: without an ``outlierDetection`` block
        Istio configures no outlier detection at all, and every endpoint always stays eligible."""
        if policy is None or policy.outlier_detection is None:
            return None
        return cls.from_istio(policy.outlier_detection)


def outlier_settings(outlier: OutlierDetection) -> OutlierSettings:
    """``OutlierSettings.from_istio`` as a function."""
    return OutlierSettings.from_istio(outlier)


def _positive_or(value: float | None, default: float) -> float:
    return value if value is not None and value > 0 else default


class _Host:
    __slots__ = (
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local_origin",
        "ejected_in_interval",
        "ejected_until",
        "ejections",
        "last_kind",
        "times_ejected",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local_origin = 0
        self.ejected_until: float | None = None  # None: not ejected
        self.times_ejected = 0  # Envoy's ejection-time multiplier (ejectTimeBackoff)
        self.ejections = 0  # lifetime total, for /clusters
        self.ejected_in_interval = False  # ejected at some point since the last tick()
        self.last_kind: EjectionKind | None = None

    def reset_counters(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local_origin = 0


class OutlierDetector:
    """Consecutive-error ejection for the ``size`` endpoints of one cluster."""

    __slots__ = (
        "_ejected",
        "_hosts",
        "ejections_by_kind",
        "ejections_overflow",
        "ejections_total",
        "settings",
    )

    def __init__(self, size: int, settings: OutlierSettings | None = None) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self.settings = settings if settings is not None else OutlierSettings()
        self._hosts = [_Host() for _ in range(size)]
        self._ejected = 0  # hosts with ejected_until set (some may be due back: see _expire)
        self.ejections_total = 0  # Envoy ejections_enforced_total
        self.ejections_overflow = 0  # Envoy ejections_overflow: threshold hit, cap refused
        self.ejections_by_kind = dict.fromkeys(EjectionKind, 0)

    @property
    def size(self) -> int:
        return len(self._hosts)

    # -- input ------------------------------------------------------------------------------
    def record(
        self, host: int, *, status: int | None, local_origin_failure: bool, now: float
    ) -> bool:
        """Count one attempt's outcome on ``host``; True when it ejected the host.

        See the module docstring for how ``status`` and ``local_origin_failure`` are read.
        """
        self._expire(now)
        h = self._hosts[host]
        s = self.settings
        if local_origin_failure and s.split_external_local_origin_errors:
            # putResultWithLocalExternalSplit -> localOriginFailure()
            h.consecutive_local_origin += 1
            if h.consecutive_local_origin == s.consecutive_local_origin:
                return self._threshold(host, EjectionKind.CONSECUTIVE_LOCAL_ORIGIN_FAILURE, now)
            return False
        if not local_origin_failure:
            # A response, or a bare "connected": the connection worked (localOriginNoFailure).
            h.consecutive_local_origin = 0
            if status is None:
                return False
        code = status if status is not None else _LOCAL_ORIGIN_STATUS
        if not 500 <= code <= 599:
            # putHttpResponseCode: any non-5xx resets both counters.
            h.consecutive_5xx = 0
            h.consecutive_gateway = 0
            return False
        ejected = False
        if code in _GATEWAY_ERRORS:
            h.consecutive_gateway += 1
            if h.consecutive_gateway == s.consecutive_gateway:
                ejected = self._threshold(host, EjectionKind.CONSECUTIVE_GATEWAY_FAILURE, now)
        else:
            h.consecutive_gateway = 0
        h.consecutive_5xx += 1
        if h.consecutive_5xx == s.consecutive_5xx:
            ejected = self._threshold(host, EjectionKind.CONSECUTIVE_5XX, now) or ejected
        return ejected

    def tick(self, now: float) -> None:
        """The interval sweep (call every ``settings.interval``): return hosts whose time is up
        and decrement the multiplier of hosts that stayed healthy since the previous sweep."""
        self._expire(now)
        for h in self._hosts:
            if h.ejected_until is None and not h.ejected_in_interval and h.times_ejected > 0:
                h.times_ejected -= 1
            # A host still out now was not healthy during the next interval either.
            h.ejected_in_interval = h.ejected_until is not None

    # -- queries ------------------------------------------------------------------------------
    def healthy(self, host: int, now: float) -> bool:
        until = self._hosts[host].ejected_until
        return until is None or now >= until

    def returns_at(self, host: int) -> float | None:
        """When an ejected host returns (may already be past if not yet swept); None if in."""
        return self._hosts[host].ejected_until

    def ejected_count(self, now: float) -> int:
        if self._ejected == 0:
            return 0
        return sum(1 for i in range(len(self._hosts)) if not self.healthy(i, now))

    def panic(self, now: float) -> bool:
        """Envoy ``isHostSetInPanic``: healthy percentage strictly below the threshold."""
        n = len(self._hosts)
        if n == 0 or self.settings.min_health_percent == 0:
            return False
        healthy = n - self.ejected_count(now)
        return healthy * 100 < self.settings.min_health_percent * n

    def eligible(self, now: float) -> list[int]:
        """The hosts load balancing may pick: the healthy ones, or all of them in panic."""
        n = len(self._hosts)
        if self._ejected == 0:
            return list(range(n))
        healthy = [i for i in range(n) if self.healthy(i, now)]
        if len(healthy) * 100 < self.settings.min_health_percent * n:
            return list(range(n))
        return healthy

    def snapshot(self, now: float) -> dict[str, object]:
        """Per-host health and ejection state plus the ejection totals, for ``/clusters``."""
        self._expire(now)
        hosts: list[dict[str, object]] = [
            {
                "host": i,
                "healthy": h.ejected_until is None,
                "ejected_until": h.ejected_until,
                "times_ejected": h.times_ejected,
                "ejections": h.ejections,
                "last_ejection": h.last_kind.value if h.last_kind is not None else None,
                "consecutive_5xx": h.consecutive_5xx,
                "consecutive_gateway": h.consecutive_gateway,
                "consecutive_local_origin": h.consecutive_local_origin,
            }
            for i, h in enumerate(self._hosts)
        ]
        return {
            "size": len(self._hosts),
            "ejected": self._ejected,
            "panic": self.panic(now),
            "ejections_total": self.ejections_total,
            "ejections_overflow": self.ejections_overflow,
            **{f"ejections_{kind.value}": count for kind, count in self.ejections_by_kind.items()},
            "hosts": hosts,
        }

    # -- internals ----------------------------------------------------------------------------
    def _threshold(self, host: int, kind: EjectionKind, now: float) -> bool:
        h = self._hosts[host]
        if h.ejected_until is not None:
            return False  # onConsecutiveErrorWorker: already ejected, nothing to do
        n = len(self._hosts)
        allowed = (
            self._ejected == 0
            or (self._ejected + 1) * 100 <= self.settings.max_ejection_percent * n
        )
        if allowed:
            self._eject(h, kind, now)
        else:
            self.ejections_overflow += 1
        # The counter that fired restarts either way, so the next ejection attempt needs a
        # whole new run of errors.
        match kind:
            case EjectionKind.CONSECUTIVE_5XX:
                h.consecutive_5xx = 0
            case EjectionKind.CONSECUTIVE_GATEWAY_FAILURE:
                h.consecutive_gateway = 0
            case EjectionKind.CONSECUTIVE_LOCAL_ORIGIN_FAILURE:
                h.consecutive_local_origin = 0
            case _:
                assert_never(kind)
        return allowed

    def _eject(self, h: _Host, kind: EjectionKind, now: float) -> None:
        s = self.settings
        if h.times_ejected * s.base_ejection < s.max_ejection + s.base_ejection:
            h.times_ejected += 1
        h.ejected_until = now + min(s.base_ejection * h.times_ejected, s.max_ejection)
        h.ejected_in_interval = True
        h.ejections += 1
        h.last_kind = kind
        self._ejected += 1
        self.ejections_total += 1
        self.ejections_by_kind[kind] += 1

    def _expire(self, now: float) -> None:
        """Return every host whose ejection is over; its counters restart (checkHostForUneject:
        "to avoid re-ejection on very few new errors")."""
        if self._ejected == 0:
            return
        for h in self._hosts:
            if h.ejected_until is not None and now >= h.ejected_until:
                h.ejected_until = None
                h.reset_counters()
                self._ejected -= 1
