"""Concurrency limits and outlier ejection over real sockets, with upstreams we hold or break.

Semantics: reference §1.3 (DestinationRule ``connectionPool``, ``outlierDetection``,
``retryBudget`` as Istio maps them), §2.3 (Envoy's circuit breakers: overflow is 503,
``x-envoy-overloaded: true``, its body, flag ``UO``), §2.4 (outlier detection; all ejected is 503
``UH``), §2.8 (admin). Concurrency is made deterministic with upstreams that hold every request
on an ``asyncio.Event`` until the test releases them; the proxy's state is read from
``/clusters``.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import typing
from collections.abc import Callable, Sequence

import pytest
from helpers import (
    RawClient,
    RawResponse,
    Reply,
    RunningProxy,
    SeenRequest,
    Upstream,
    bootstrap,
    join,
    proxy,
    service_entry,
    svc_destination_rule,
    svc_virtual_service,
    upstream,
)

HOST = "svc"
CLUSTER = "outbound|9080||svc.default.svc.cluster.local"
OVERFLOW = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
NO_HEALTHY = b"no healthy upstream"

# --------------------------------------------------------------------------------------------
# Configuration


destination_rule = svc_destination_rule


virtual_service = svc_virtual_service


def mesh(ports: Sequence[int], traffic_policy: str | None = None, route: str | None = None) -> str:
    docs = [bootstrap(), service_entry(HOST, ports)]
    if traffic_policy is not None:
        docs.append(destination_rule(traffic_policy))
    if route is not None:
        docs.append(virtual_service(route))
    return join(*docs)


def outlier(fields: str, *, no_reuse: bool = False) -> str:
    """An ``outlierDetection`` block; ``no_reuse`` adds maxRequestsPerConnection: 1, so a reset
    never meets a reused connection (whose one replay would hide it)."""
    pool = "\nconnectionPool: {http: {maxRequestsPerConnection: 1}}" if no_reuse else ""
    return f"outlierDetection: {{{fields}}}{pool}"


# --------------------------------------------------------------------------------------------
# Upstreams


class Held:
    """Holds every request until ``release`` is set; ``wait_for(n)`` returns once n arrived."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.count = 0
        self._arrived = asyncio.Event()

    async def __call__(self, req: SeenRequest) -> Reply:
        self.count += 1
        self._arrived.set()
        await self.release.wait()
        return Reply(body=b"held")

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self.count < n:
                self._arrived.clear()
                await self._arrived.wait()


class Steps:
    """One step per request in arrival order, then ``200 ok``: a status, or ``"reset"``."""

    def __init__(self, *steps: int | str) -> None:
        self.steps = steps
        self.up: Upstream | None = None

    def __call__(self, req: SeenRequest) -> Reply:
        assert self.up is not None
        n = len(self.up.requests)
        step = self.steps[n - 1] if n <= len(self.steps) else 200
        if step == "reset":
            for proto in self.up.open:
                if proto.id == req.connection_id and proto.transport is not None:
                    proto.transport.abort()
            return Reply()
        assert isinstance(step, int)
        return Reply(status=step, body=b"step %d" % n)


async def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def always(status: int) -> Callable[[SeenRequest], Reply]:
    return lambda req: Reply(status=status, body=b"%d" % status)


# --------------------------------------------------------------------------------------------
# Clients and observation


async def call(port: int, path: str = "/", timeout: float = 2.5) -> RawResponse:
    client = await RawClient.connect(port)
    try:
        return await client.request("GET", path, [("host", HOST)], timeout=timeout)
    finally:
        await client.close()


async def admin(px: RunningProxy, method: str, path: str) -> RawResponse:
    client = await RawClient.connect(px.admin_port)
    try:
        return await client.request(method, path, [("host", "admin")])
    finally:
        await client.close()


async def cluster(px: RunningProxy) -> dict[str, typing.Any]:
    data = json.loads((await admin(px, "GET", "/clusters")).body)
    found: dict[str, typing.Any] = next(c for c in data["clusters"] if c["name"] == CLUSTER)
    return found


async def until(
    px: RunningProxy, check: Callable[[dict[str, typing.Any]], bool], timeout: float = 5.0
) -> dict[str, typing.Any]:
    """Read ``/clusters`` until ``check`` holds (each read is a round trip to the admin server)."""
    async with asyncio.timeout(timeout):
        while True:
            state = await cluster(px)
            if check(state):
                return state


def flags(log: io.StringIO) -> list[str]:
    return [line.split('HTTP/1.1" ', 1)[1].split(" ")[1] for line in log.getvalue().splitlines()]


async def settle(tasks: Sequence[asyncio.Task[RawResponse]], n: int) -> list[RawResponse]:
    """Wait until ``n`` of the tasks are done; return those responses."""
    async with asyncio.timeout(5):
        while sum(t.done() for t in tasks) < n:
            await asyncio.wait([t for t in tasks if not t.done()], return_when="FIRST_COMPLETED")
    return [t.result() for t in tasks if t.done()]


def is_overflow(resp: RawResponse) -> bool:
    return (
        resp.status == 503 and resp.body == OVERFLOW and resp.header("x-envoy-overloaded") == "true"
    )


# --------------------------------------------------------------------------------------------
# Overflow: exactly the excess is answered 503 UO, at once


async def test_max_requests_overflow_is_exactly_the_excess() -> None:
    held = Held()
    log = io.StringIO()
    async with upstream(held) as up:
        rule = "connectionPool: {http: {http2MaxRequests: 4}}"
        async with proxy(mesh([up.port], rule), access_log=log) as px:
            tasks = [asyncio.create_task(call(px.port, f"/{n}")) for n in range(10)]
            await held.wait_for(4)
            early = await settle(tasks, 6)  # answered while four are still held upstream
            during = (await cluster(px))["limits"]
            held.release.set()
            responses = await asyncio.gather(*tasks)
            after = (await cluster(px))["limits"]
    assert len(early) == 6 and all(is_overflow(r) for r in early)
    assert sorted(r.status for r in responses) == [200] * 4 + [503] * 6
    assert held.count == 4 and len(up.requests) == 4
    assert (during["max_requests"], during["requests"], during["remaining_requests"]) == (4, 4, 0)
    assert (after["requests"], after["overflow_requests"]) == (0, 6)
    assert sorted(flags(log)) == ["-"] * 4 + ["UO"] * 6


async def test_pending_overflow_behind_max_connections_is_exactly_the_excess() -> None:
    """maxConnections 2 and http1MaxPendingRequests 3: two requests in flight, three queued for a
    connection, and every further one is answered 503 UO at once."""
    held = Held()
    log = io.StringIO()
    rule = "connectionPool: {tcp: {maxConnections: 2}, http: {http1MaxPendingRequests: 3}}"
    async with upstream(held) as up:
        async with proxy(mesh([up.port], rule), access_log=log) as px:
            active = [asyncio.create_task(call(px.port, f"/a{n}")) for n in range(2)]
            await held.wait_for(2)
            queued = [asyncio.create_task(call(px.port, f"/q{n}")) for n in range(3)]
            state = await until(px, lambda c: c["limits"]["pending_requests"] == 3)
            excess = [asyncio.create_task(call(px.port, f"/x{n}")) for n in range(7)]
            refused = await settle(excess, 7)
            assert not any(t.done() for t in [*active, *queued])
            held.release.set()
            served = await asyncio.gather(*active, *queued)
            after = (await cluster(px))["limits"]
    assert all(is_overflow(r) for r in refused)
    assert [r.status for r in served] == [200] * 5
    assert up.connections == 2  # never more than maxConnections
    assert state["limits"]["connections"] == 2
    assert state["endpoints"][0]["waiting_requests"] == 3
    assert (after["pending_requests"], after["overflow_pending"]) == (0, 7)
    assert sorted(flags(log)) == ["-"] * 5 + ["UO"] * 7


async def test_a_request_queued_behind_max_connections_waits_at_most_the_connect_timeout() -> None:
    held = Held()
    log = io.StringIO()
    rule = "connectionPool: {tcp: {maxConnections: 1, connectTimeout: 300ms}}"
    async with upstream(held) as up:
        async with proxy(mesh([up.port], rule), access_log=log) as px:
            first = asyncio.create_task(call(px.port, "/first"))
            await held.wait_for(1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            queued = await call(px.port, "/queued")
            waited = loop.time() - start
            held.release.set()
            served = await first
    assert 0.28 <= waited < 2
    assert is_overflow(queued)
    assert served.status == 200
    assert len(up.requests) == 1
    assert flags(log) == ["UO", "-"]


# --------------------------------------------------------------------------------------------
# Retry limits: maxRetries and the retry budget


async def _two_requests_wanting_retries(
    traffic_policy: str,
) -> tuple[RawResponse, RawResponse, Upstream, dict[str, typing.Any], list[str]]:
    """Request A's first try fails and its retry is held upstream; while it is, request B's
    first try fails too. Returns (A, B, upstream, /clusters, flags in completion order)."""
    release = asyncio.Event()
    retried = {"/a": asyncio.Event(), "/b": asyncio.Event()}

    async def handler(req: SeenRequest) -> Reply:
        if req.header("x-envoy-attempt-count") == "1":
            return Reply(status=503, body=b"fail " + req.target.encode())
        retried[req.target].set()
        await release.wait()
        return Reply(body=b"ok " + req.target.encode())

    log = io.StringIO()
    async with upstream(handler) as up:
        config = mesh([up.port], traffic_policy, "retries: {attempts: 3, retryOn: 5xx}")
        async with proxy(config, access_log=log) as px:
            a = asyncio.create_task(call(px.port, "/a"))
            await asyncio.wait_for(retried["/a"].wait(), 5)  # A's retry holds a retry slot
            b = asyncio.create_task(call(px.port, "/b"))
            b_retry = asyncio.create_task(retried["/b"].wait())
            # B's fate is decided once it is answered (retry skipped) or its retry arrives.
            await asyncio.wait([b, b_retry], timeout=5, return_when="FIRST_COMPLETED")
            b_retry.cancel()
            release.set()
            ra, rb = await asyncio.gather(a, b)
            state = await cluster(px)
    return ra, rb, up, state, flags(log)


@pytest.mark.parametrize(
    ("traffic_policy", "b_retried"),
    [
        ("connectionPool: {http: {maxRetries: 1}}", False),
        ("connectionPool: {http: {maxRetries: 2}}", True),
        # The budget replaces maxRetries: 20% of 2 active is 0, so minRetryConcurrency decides.
        (
            "retryBudget: {percent: {value: 20}, minRetryConcurrency: 1}\n"
            "connectionPool: {http: {maxRetries: 100}}",
            False,
        ),
        ("retryBudget: {percent: {value: 20}, minRetryConcurrency: 2}", True),
    ],
    ids=["max-retries-1", "max-retries-2", "budget-min-1", "budget-min-2"],
)
async def test_concurrent_retries_are_limited(traffic_policy: str, b_retried: bool) -> None:
    a, b, up, state, _ = await _two_requests_wanting_retries(traffic_policy)
    assert (a.status, a.body) == (200, b"ok /a")
    b_tries = [r.header("x-envoy-attempt-count") for r in up.requests if r.target == "/b"]
    if b_retried:
        assert (b.status, b.body) == (200, b"ok /b")
        assert b_tries == ["1", "2"]
        assert (state["retries"], state["retry_overflows"]) == (2, 0)
    else:
        # The retry was skipped: B gets its upstream's 503, not a local reply.
        assert (b.status, b.body) == (503, b"fail /b")
        assert b.header("x-envoy-overloaded") is None
        assert b_tries == ["1"]
        assert (state["retries"], state["retry_overflows"]) == (1, 1)
        assert state["limits"]["overflow_retries"] == 1
    assert state["limits"]["retries"] == 0  # every slot given back


async def test_a_retry_skipped_by_the_limit_is_logged_uo_not_urx() -> None:
    """Envoy's router sets ``UpstreamOverflow`` when ``shouldRetry*`` answers ``NoOverflow``
    (router.cc), and forwards the upstream's answer."""
    _, b, _, _, logged = await _two_requests_wanting_retries(
        "connectionPool: {http: {maxRetries: 1}}"
    )
    assert b.status == 503
    assert logged == ["UO", "-"]  # B (skipped retry) finished first, then A


# --------------------------------------------------------------------------------------------
# Outlier ejection


async def test_consecutive_5xx_ejects_the_only_endpoint_then_it_returns() -> None:
    steps = Steps(500, 500, 500)
    log = io.StringIO()
    rule = outlier("consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 300ms")
    async with upstream(steps) as up:
        steps.up = up
        async with proxy(mesh([up.port], rule), access_log=log) as px:
            loop = asyncio.get_running_loop()
            statuses = [(await call(px.port)).status for _ in range(3)]
            ejected_at = loop.time()
            refused = await call(px.port)
            state = await cluster(px)
            back = await until(px, lambda c: c["endpoints"][0]["health"] == "healthy")
            out_for = loop.time() - ejected_at
            served = await call(px.port)
    assert statuses == [500, 500, 500]
    assert (refused.status, refused.body) == (503, NO_HEALTHY)  # all ejected: 503 UH
    endpoint = state["endpoints"][0]
    assert endpoint["health"] == "ejected"
    assert 0 < endpoint["returns_in_seconds"] <= 0.3
    od = state["outlier_detection"]
    assert (od["ejected"], od["ejections_total"], od["ejections_consecutive_5xx"]) == (1, 1, 1)
    assert od["hosts"][0]["ejections"] == 1
    assert od["hosts"][0]["last_ejection"] == "consecutive_5xx"
    assert 0.25 <= out_for < 3  # no traffic until baseEjectionTime passed
    assert back["endpoints"][0]["returns_in_seconds"] is None
    assert (served.status, served.body) == (200, b"step 4")
    assert len(up.requests) == 4  # the refused request never reached it
    assert flags(log) == ["-", "-", "-", "UH", "-"]


async def test_an_ejected_endpoint_gets_no_traffic_until_it_returns() -> None:
    rule = outlier(
        "consecutive5xxErrors: 2, interval: 100ms, baseEjectionTime: 400ms, maxEjectionPercent: 50"
    )
    async with upstream(always(500)) as bad, upstream() as good:
        async with proxy(mesh([bad.port, good.port], rule)) as px:
            for n in range(40):
                if len(bad.requests) == 2:
                    break
                await call(px.port, f"/before{n}")
            state = await cluster(px)
            loop = asyncio.get_running_loop()
            ejected_at = loop.time()
            during = [await call(px.port, f"/during{n}") for n in range(10)]
            hits_while_ejected = len(bad.requests) - 2
            await until(px, lambda c: c["endpoints"][0]["health"] == "healthy")
            out_for = loop.time() - ejected_at
            for n in range(40):
                if len(bad.requests) > 2:
                    break
                await call(px.port, f"/after{n}")
    assert state["endpoints"][0]["health"] == "ejected"
    assert state["endpoints"][1]["health"] == "healthy"
    assert [r.status for r in during] == [200] * 10
    assert hits_while_ejected == 0
    assert 0.3 <= out_for < 3
    assert len(bad.requests) > 2  # back in the balancer after baseEjectionTime


async def test_consecutive_gateway_errors_count_only_502_503_504() -> None:
    steps = Steps(500, 500, 500, 502, 200, 502, 503)
    rule = outlier(
        "consecutiveGatewayErrors: 2, consecutive5xxErrors: 0, interval: 100ms, "
        "baseEjectionTime: 30s"
    )
    async with upstream(steps) as up:
        steps.up = up
        async with proxy(mesh([up.port], rule)) as px:
            statuses = [(await call(px.port)).status for _ in range(8)]
            state = await cluster(px)
    assert statuses == [500, 500, 500, 502, 200, 502, 503, 503]
    assert len(up.requests) == 7  # the eighth was refused: no healthy upstream
    od = state["outlier_detection"]
    assert (od["ejections_total"], od["ejections_consecutive_gateway_failure"]) == (1, 1)
    assert od["ejections_consecutive_5xx"] == 0


@pytest.mark.parametrize(
    ("fields", "refusals", "kind"),
    [
        # Split: a refused connection is a local-origin failure only; the 5xx count of 1 never
        # sees it, the local-origin count of 3 does.
        (
            "splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3, "
            "consecutive5xxErrors: 1",
            3,
            "consecutive_local_origin_failure",
        ),
        # Not split: Envoy maps a refused connection to a 503, so it is a 5xx like any other.
        ("consecutive5xxErrors: 1", 1, "consecutive_5xx"),
    ],
    ids=["split", "not-split"],
)
async def test_refused_connections_are_local_origin_failures(
    fields: str, refusals: int, kind: str
) -> None:
    log = io.StringIO()
    rule = outlier(f"{fields}, interval: 100ms, baseEjectionTime: 30s")
    config = mesh([await closed_port()], rule, "retries: {attempts: 0}")
    async with proxy(config, access_log=log) as px:
        responses = [await call(px.port) for _ in range(refusals + 1)]
        state = await cluster(px)
    assert [r.status for r in responses] == [503] * (refusals + 1)
    assert responses[-1].body == NO_HEALTHY
    assert flags(log) == ["UF"] * refusals + ["UH"]
    od = state["outlier_detection"]
    assert od["ejections_total"] == 1
    assert od["hosts"][0]["last_ejection"] == kind


@pytest.mark.parametrize(
    ("fields", "steps", "reached", "kind"),
    [
        # Split: the 500s add up to three, the resets between them left out of that count (and
        # never two local-origin failures in a row).
        (
            "splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2, "
            "consecutive5xxErrors: 3",
            ("reset", 500, "reset", 500, 500),
            5,
            "consecutive_5xx",
        ),
        # Not split: a reset is a local-origin failure counted as a 5xx (Envoy maps it to 503).
        ("consecutive5xxErrors: 3", ("reset", "reset", "reset"), 3, "consecutive_5xx"),
    ],
    ids=["split-5xx", "not-split-resets"],
)
async def test_resets_and_5xx_towards_ejection(
    fields: str, steps: tuple[int | str, ...], reached: int, kind: str
) -> None:
    script = Steps(*steps)
    rule = outlier(f"{fields}, interval: 100ms, baseEjectionTime: 30s", no_reuse=True)
    async with upstream(script) as up:
        script.up = up
        async with proxy(mesh([up.port], rule)) as px:
            responses = [await call(px.port) for _ in range(reached + 1)]
            state = await cluster(px)
    assert len(up.requests) == reached  # ejected after the last step; the next one is refused
    assert (responses[-1].status, responses[-1].body) == (503, NO_HEALTHY)
    od = state["outlier_detection"]
    assert od["ejections_total"] == 1
    assert od["hosts"][0]["last_ejection"] == kind


async def test_split_mode_resets_after_a_connect_do_not_add_up() -> None:
    """In split mode Envoy's router reports ``LocalOriginConnectSuccess`` when a try gets its
    connection (``UpstreamRequest::onPoolReady``), which clears the consecutive local-origin count,
    and ``LocalOriginConnectFailed`` when the stream is then reset (``Filter::onUpstreamReset``).
    A reset after connecting therefore never makes two in a row: only refused connections and
    connect timeouts (which never reach pool-ready) add up."""
    script = Steps("reset", "reset", "reset")
    fields = (
        "splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2, "
        "consecutive5xxErrors: 5, interval: 100ms, baseEjectionTime: 30s"
    )
    async with upstream(script) as up:
        script.up = up
        async with proxy(mesh([up.port], outlier(fields, no_reuse=True))) as px:
            statuses = [(await call(px.port)).status for _ in range(4)]
            state = await cluster(px)
    assert statuses == [503, 503, 503, 200]
    assert len(up.requests) == 4
    assert state["outlier_detection"]["ejections_total"] == 0


@pytest.mark.parametrize(
    ("percent", "ejected", "upstream_hits"),
    [("", 1, 8), ("maxEjectionPercent: 50, ", 1, 8), ("maxEjectionPercent: 100, ", 2, 4)],
    ids=["default-10", "50", "100"],
)
async def test_max_ejection_percent(percent: str, ejected: int, upstream_hits: int) -> None:
    """Two endpoints always failing: Envoy ejects at least one host whatever the percentage, and
    no more than it allows; with 100% both go and the rest is 503 UH."""
    rule = outlier(f"{percent}consecutive5xxErrors: 2, interval: 100ms, baseEjectionTime: 30s")
    async with upstream(always(500)) as a, upstream(always(500)) as b:
        async with proxy(mesh([a.port, b.port], rule)) as px:
            statuses = [(await call(px.port, f"/{n}")).status for n in range(8)]
            state = await cluster(px)
    assert len(a.requests) + len(b.requests) == upstream_hits
    assert statuses == [500] * upstream_hits + [503] * (8 - upstream_hits)
    od = state["outlier_detection"]
    assert od["ejected"] == ejected
    assert [e["health"] for e in state["endpoints"]].count("ejected") == ejected
    if ejected == 1:
        # The survivor hit the threshold at its 2nd, 4th and 6th error: refused by the cap.
        assert od["ejections_overflow"] == 3


@pytest.mark.parametrize(("min_health", "panic"), [(50, False), (60, True)])
async def test_min_health_percent_panic_balances_over_all_endpoints(
    min_health: int, panic: bool
) -> None:
    rule = outlier(
        f"consecutive5xxErrors: 2, interval: 100ms, baseEjectionTime: 30s, "
        f"maxEjectionPercent: 100, minHealthPercent: {min_health}"
    )
    async with upstream(always(500)) as bad, upstream() as good:
        async with proxy(mesh([bad.port, good.port], rule)) as px:
            for n in range(40):
                if len(bad.requests) == 2:
                    break
                await call(px.port, f"/before{n}")
            state = await cluster(px)
            for n in range(20):
                await call(px.port, f"/after{n}")
    assert state["endpoints"][0]["health"] == "ejected"
    assert state["outlier_detection"]["panic"] is panic
    # One of two healthy is 50%: below 60% Envoy balances across all hosts, ejected or not.
    assert (len(bad.requests) > 2) is panic


async def test_without_outlier_detection_a_failing_endpoint_is_never_ejected() -> None:
    async with upstream(always(500)) as up:
        async with proxy(mesh([up.port])) as px:
            statuses = [(await call(px.port)).status for _ in range(8)]
            state = await cluster(px)
    assert statuses == [500] * 8
    assert "outlier_detection" not in state
    assert state["endpoints"][0]["health"] == "healthy"


# --------------------------------------------------------------------------------------------
# Admin: /healthcheck/fail and /healthcheck/ok


async def test_healthcheck_fail_and_ok() -> None:
    async with upstream() as up:
        async with proxy(mesh([up.port])) as px:
            live = await admin(px, "GET", "/ready")
            failed = await admin(px, "POST", "/healthcheck/fail")
            draining = await admin(px, "GET", "/ready")
            during = await call(px.port)  # traffic still flows: only the health answer changes
            ok = await admin(px, "POST", "/healthcheck/ok")
            again = await admin(px, "GET", "/ready")
            wrong_method = await admin(px, "GET", "/healthcheck/fail")
    assert (live.status, live.body) == (200, b"LIVE\n")
    assert failed.status == 200
    assert (draining.status, draining.body) == (503, b"DRAINING\n")
    assert during.status == 200
    assert ok.status == 200
    assert (again.status, again.body) == (200, b"LIVE\n")
    assert wrong_method.status == 405
