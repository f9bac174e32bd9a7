"""Retries and timeouts over real sockets, against upstreams that misbehave on purpose.

Semantics: reference §1.2 (Istio's ``HTTPRetry`` and its default policy), §2.1 (Envoy's retry
conditions, backoff, attempt count, ``URX``), §2.2 (route and per-try timeouts), §2.5 (flags).
Every upstream here is one we control: it fails its first tries, resets before or after its
response head, never answers, answers slowly or refuses connections. Each retry condition has a
case that retries and one that must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from helpers import (
    RawClient,
    RawResponse,
    Reply,
    SeenRequest,
    Upstream,
    bootstrap,
    join,
    proxy,
    service_entry,
    svc_virtual_service,
    upstream,
)

HOST = "svc"
CLUSTER = "outbound|9080||svc.default.svc.cluster.local"
RESET = b"upstream connect error or disconnect/reset before headers. reset reason: "
TERMINATED = RESET + b"connection termination"
REFUSED = RESET + b"remote connection failure"

# --------------------------------------------------------------------------------------------
# Configuration


virtual_service = svc_virtual_service


def mesh(ports: Sequence[int], route: str | None = None, *, extra: str = "") -> str:
    docs = [bootstrap(extra=extra), service_entry(HOST, ports)]
    if route is not None:
        docs.append(virtual_service(route))
    return join(*docs)


def retries(retry_on: str, attempts: int = 1, more: str = "") -> str:
    return f"retries: {{attempts: {attempts}, retryOn: '{retry_on}'{more}}}"


# --------------------------------------------------------------------------------------------
# Upstreams that misbehave on a script


class Script:
    """An upstream handler playing one step per request, then answering ``200 ok <n>``.

    A step is a ``Reply``; ``"reset"`` (drop the connection after reading the request, before any
    response byte); or ``"hang"`` (never answer until ``release`` is set).
    """

    def __init__(self, *steps: Reply | str) -> None:
        self.steps = steps
        self.up: Upstream | None = None
        self.release = asyncio.Event()
        self.arrived: list[float] = []

    async def __call__(self, req: SeenRequest) -> Reply:
        self.arrived.append(asyncio.get_running_loop().time())
        n = len(self.arrived)
        step = self.steps[n - 1] if n <= len(self.steps) else Reply(body=b"ok %d" % n)
        if step == "reset":
            abort(self.up, req)
            return Reply()
        if step == "hang":
            await self.release.wait()
            return Reply(body=b"late %d" % n)
        assert isinstance(step, Reply)
        return step


def abort(up: Upstream | None, req: SeenRequest) -> None:
    """Reset the connection that carried ``req`` (no response byte was written)."""
    assert up is not None
    for proto in up.open:
        if proto.id == req.connection_id and proto.transport is not None:
            proto.transport.abort()


@contextlib.asynccontextmanager
async def scripted(*steps: Reply | str) -> AsyncIterator[tuple[Upstream, Script]]:
    script = Script(*steps)
    async with upstream(script) as up:
        script.up = up
        try:
            yield up, script
        finally:
            script.release.set()


def fail(status: int, n: int = 0, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    return Reply(status=status, headers=[("x-try", str(n)), *headers], body=b"fail %d" % n)


def grpc(code: int) -> Reply:
    return Reply(headers=[("content-type", "application/grpc"), ("grpc-status", str(code))])


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[tuple[int, list[int]]]:
    """A byte-level upstream; yields its port and a list counting the requests it read."""
    seen: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            seen.append(1)
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        for w in writers:
            w.close()


async def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


# --------------------------------------------------------------------------------------------
# Clients and observation


async def call(
    port: int,
    *,
    method: str = "GET",
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout: float = 2.5,
) -> RawResponse:
    """One request on its own client connection."""
    client = await RawClient.connect(port)
    try:
        return await client.request(method, path, [("host", HOST), *headers], body, timeout)
    finally:
        await client.close()


def flags(log: io.StringIO) -> list[str]:
    """The response-flags column of each access-log line."""
    return [line.split('HTTP/1.1" ', 1)[1].split(" ")[1] for line in log.getvalue().splitlines()]


async def cluster(admin_port: int, name: str = CLUSTER) -> dict[str, typing.Any]:
    client = await RawClient.connect(admin_port)
    try:
        resp = await client.request("GET", "/clusters", [("host", "admin")])
    finally:
        await client.close()
    found: dict[str, typing.Any] = next(
        c for c in json.loads(resp.body)["clusters"] if c["name"] == name
    )
    return found


def attempt_counts(up: Upstream) -> list[str | None]:
    return [r.header("x-envoy-attempt-count") for r in up.requests]


# --------------------------------------------------------------------------------------------
# Fail the first tries: retried, numbered, and the last answer when exhausted


async def test_failing_tries_are_retried_and_each_try_is_numbered() -> None:
    log = io.StringIO()
    async with scripted(fail(503, 1), fail(500, 2)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 2)), access_log=log) as px:
            resp = await call(px.port)
            stats = await cluster(px.admin_port)
    assert (resp.status, resp.body) == (200, b"ok 3")
    assert attempt_counts(up) == ["1", "2", "3"]
    assert resp.header("x-envoy-attempt-count") == "3"
    assert stats["retries"] == 2
    assert flags(log) == ["-"]


@pytest.mark.parametrize("attempts", [1, 2, 4])
async def test_exhausted_retries_answer_with_the_last_upstream_response_and_urx(
    attempts: int,
) -> None:
    steps = [fail(503, n + 1) for n in range(attempts + 5)]
    log = io.StringIO()
    async with scripted(*steps) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", attempts)), access_log=log) as px:
            resp = await call(px.port)
    tries = attempts + 1
    assert len(up.requests) == tries  # never more than 1 + attempts
    assert attempt_counts(up) == [str(n) for n in range(1, tries + 1)]
    assert resp.status == 503
    assert resp.body == b"fail %d" % tries  # the last upstream answer, not a local reply
    assert resp.header("x-try") == str(tries)
    assert resp.header("x-envoy-attempt-count") == str(tries)
    assert flags(log) == ["URX"]


async def test_attempts_zero_disables_retries() -> None:
    log = io.StringIO()
    async with scripted(fail(503, 1)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 0)), access_log=log) as px:
            resp = await call(px.port)
    assert (resp.status, len(up.requests)) == (503, 1)
    assert flags(log) == ["-"]


async def test_attempts_zero_disables_even_connect_failure_retries() -> None:
    log = io.StringIO()
    async with proxy(mesh([await closed_port()], retries("5xx", 0)), access_log=log) as px:
        resp = await call(px.port)
        stats = await cluster(px.admin_port)
    assert (resp.status, resp.body) == (503, REFUSED)
    assert stats["endpoints"][0]["connect_failures"] == 1
    assert stats["retries"] == 0
    assert flags(log) == ["UF"]


# --------------------------------------------------------------------------------------------
# Each retry condition: a case that retries and one that must not (attempts: 1)

# Envoy's gRPC retry names and the grpc-status each one matches (response headers only).
GRPC = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

CONDITIONS: list[tuple[str, str, Reply | str, bool]] = [
    ("5xx-500", "5xx", fail(500), True),
    ("5xx-503", "5xx", fail(503), True),
    ("5xx-reset", "5xx", "reset", True),
    ("5xx-not-404", "5xx", fail(404), False),
    ("gateway-502", "gateway-error", fail(502), True),
    ("gateway-503", "gateway-error", fail(503), True),
    ("gateway-504", "gateway-error", fail(504), True),
    ("gateway-reset", "gateway-error", "reset", True),  # Envoy counts a reset as one
    ("gateway-not-500", "gateway-error", fail(500), False),
    ("reset-reset", "reset", "reset", True),
    ("reset-not-503", "reset", fail(503), False),
    # The request had been sent when the upstream reset: not "before request".
    ("reset-before-request-not-after-sending", "reset-before-request", "reset", False),
    ("connect-failure-not-reset", "connect-failure", "reset", False),
    ("connect-failure-not-503", "connect-failure", fail(503), False),
    ("retriable-4xx-409", "retriable-4xx", fail(409), True),
    ("retriable-4xx-not-429", "retriable-4xx", fail(429), False),
    ("retriable-4xx-not-500", "retriable-4xx", fail(500), False),
    ("codes-500", "retriable-status-codes,503,500", fail(500), True),
    ("bare-codes-503", "503,500", fail(503), True),
    ("bare-codes-500", "503,500", fail(500), True),
    ("bare-codes-not-502", "503,500", fail(502), False),
    ("bare-codes-not-reset", "503", "reset", False),  # a reset is not a "503"
    ("codes-none-listed", "retriable-status-codes", fail(503), False),
    *[(f"grpc-{name}", name, grpc(code), True) for name, code in GRPC.items()],
    ("grpc-unavailable-not-cancelled", "unavailable", grpc(1), False),
    ("grpc-cancelled-not-unavailable", "cancelled", grpc(14), False),
    ("grpc-deadline-not-internal", "deadline-exceeded", grpc(13), False),
    ("grpc-internal-not-resource", "internal", grpc(8), False),
    ("grpc-resource-not-deadline", "resource-exhausted", grpc(4), False),
    ("grpc-unavailable-not-ok", "unavailable", grpc(0), False),
    ("grpc-names-ignore-http-503", "unavailable,cancelled", fail(503), False),
]


@pytest.mark.parametrize(
    ("retry_on", "first", "retried"),
    [c[1:] for c in CONDITIONS],
    ids=[c[0] for c in CONDITIONS],
)
async def test_retry_condition(retry_on: str, first: Reply | str, retried: bool) -> None:
    log = io.StringIO()
    async with scripted(first) as (up, _):
        async with proxy(mesh([up.port], retries(retry_on)), access_log=log) as px:
            resp = await call(px.port)
    if retried:
        assert (resp.status, resp.body) == (200, b"ok 2")
        assert len(up.requests) == 2
        assert resp.header("x-envoy-attempt-count") == "2"
        assert flags(log) == ["-"]
    elif first == "reset":
        assert (resp.status, resp.body) == (503, TERMINATED)
        assert len(up.requests) == 1
        assert flags(log) == ["UC"]
    else:
        assert isinstance(first, Reply)
        assert (resp.status, len(up.requests)) == (first.status, 1)
        assert flags(log) == ["-"]


@pytest.mark.parametrize(
    ("response_header", "retried"), [("x-retry-me", True), ("x-something-else", False)]
)
async def test_retriable_headers_named_by_the_request(response_header: str, retried: bool) -> None:
    first = Reply(headers=[(response_header, "1")], body=b"first")
    async with scripted(first) as (up, _):
        async with proxy(mesh([up.port], retries("retriable-headers"))) as px:
            resp = await call(
                px.port, headers=[("x-envoy-retriable-header-names", "x-retry-me,x-also")]
            )
    assert len(up.requests) == (2 if retried else 1)
    assert resp.body == (b"ok 2" if retried else b"first")
    assert up.requests[0].header("x-envoy-retriable-header-names") is None  # consumed


async def _two_endpoints_one_refusing(
    route: str | None, requests: int = 8
) -> tuple[list[RawResponse], Upstream, dict[str, typing.Any], list[str]]:
    log = io.StringIO()
    dead = await closed_port()
    async with upstream() as up:
        async with proxy(mesh([dead, up.port], route), access_log=log) as px:
            responses = [await call(px.port, path=f"/{n}") for n in range(requests)]
            stats = await cluster(px.admin_port)
    return responses, up, stats, flags(log)


@pytest.mark.parametrize("retry_on", ["connect-failure", "reset-before-request", "5xx"])
async def test_refused_connection_is_retried_on_the_other_endpoint(retry_on: str) -> None:
    responses, up, stats, logged = await _two_endpoints_one_refusing(retries(retry_on))
    assert [r.status for r in responses] == [200] * 8
    dead = stats["endpoints"][0]
    assert dead["connect_failures"] >= 1  # some first tries did pick the closed port...
    assert stats["retries"] == dead["connect_failures"]  # ...and each was retried once
    assert len(up.requests) == 8
    assert logged == ["-"] * 8


async def test_refused_connection_is_not_retried_without_a_matching_condition() -> None:
    responses, _, stats, logged = await _two_endpoints_one_refusing(retries("retriable-4xx"))
    refused = stats["endpoints"][0]["connect_failures"]
    assert refused >= 1
    assert sorted(r.status for r in responses) == [200] * (8 - refused) + [503] * refused
    assert stats["retries"] == 0
    assert logged.count("UF") == refused


async def test_a_try_that_could_not_connect_counts_as_an_attempt() -> None:
    """Envoy counts every try, connected or not: after a refused connection the retry carries
    ``x-envoy-attempt-count: 2`` upstream and back (router.cc ``doRetry``: ``attempt_count_++``)."""
    responses, up, stats, _ = await _two_endpoints_one_refusing(None)
    retried = stats["endpoints"][0]["connect_failures"]
    assert retried >= 1
    assert attempt_counts(up).count("2") == retried
    assert [r.header("x-envoy-attempt-count") for r in responses].count("2") == retried


# --------------------------------------------------------------------------------------------
# Istio's default policy (no VirtualService): 2 retries on
# connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes (no codes)


async def test_default_policy_retries_a_refused_connection_on_another_endpoint() -> None:
    responses, up, stats, logged = await _two_endpoints_one_refusing(None)
    assert [r.status for r in responses] == [200] * 8
    assert stats["endpoints"][0]["connect_failures"] >= 1
    assert stats["retries"] == stats["endpoints"][0]["connect_failures"]
    assert len(up.requests) == 8
    assert logged == ["-"] * 8


@pytest.mark.parametrize(
    ("first", "retried"),
    [
        (grpc(14), True),  # unavailable
        (grpc(1), True),  # cancelled
        (grpc(4), False),
        (grpc(13), False),
        (grpc(8), False),
        (fail(503), False),  # no retriable status code by default (Istio >= 1.24)
        (fail(503, headers=[("x-envoy-overloaded", "true")]), False),
        (fail(500), False),
        (fail(502), False),
        (fail(409), False),
        ("reset", False),  # the request was sent: no condition of the default covers it
    ],
    ids=[
        "unavailable",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "503",
        "503-overloaded",
        "500",
        "502",
        "409",
        "reset",
    ],
)
async def test_default_policy(first: Reply | str, retried: bool) -> None:
    async with scripted(first) as (up, _):
        async with proxy(mesh([up.port])) as px:
            resp = await call(px.port)
    assert len(up.requests) == (2 if retried else 1)
    if retried:
        assert (resp.status, resp.body) == (200, b"ok 2")
    elif first == "reset":
        assert (resp.status, resp.body) == (503, TERMINATED)
    else:
        assert isinstance(first, Reply)
        assert resp.status == first.status


async def test_default_policy_gives_up_after_two_retries() -> None:
    log = io.StringIO()
    async with scripted(*[grpc(14)] * 5) as (up, _):
        async with proxy(mesh([up.port]), access_log=log) as px:
            resp = await call(px.port)
    assert attempt_counts(up) == ["1", "2", "3"]
    assert (resp.status, resp.header("grpc-status")) == (200, "14")
    assert flags(log) == ["URX"]


# --------------------------------------------------------------------------------------------
# An upstream 503 with and without x-envoy-overloaded


@pytest.mark.parametrize("overloaded", [False, True], ids=["plain", "overloaded"])
async def test_upstream_503_is_retried_under_5xx_with_or_without_x_envoy_overloaded(
    overloaded: bool,
) -> None:
    """Envoy retries an upstream's ``x-envoy-overloaded`` 503 like any 503 since 1.15 ("router:
    extended to allow retries by default when upstream responds with x-envoy-overloaded");
    ``RetryStateImpl::wouldRetryFromHeaders`` no longer looks at that header."""
    headers = [("x-envoy-overloaded", "true")] if overloaded else []
    async with scripted(fail(503, 1, headers)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx"))) as px:
            resp = await call(px.port)
    assert (resp.status, resp.body) == (200, b"ok 2")
    assert len(up.requests) == 2


async def test_upstream_overloaded_503_passes_through_when_not_retried() -> None:
    log = io.StringIO()
    overloaded = fail(503, 1, [("x-envoy-overloaded", "true")])
    async with scripted(overloaded) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 0)), access_log=log) as px:
            resp = await call(px.port)
    assert (resp.status, resp.body) == (503, b"fail 1")
    assert resp.header("x-envoy-overloaded") == "true"
    assert len(up.requests) == 1
    assert flags(log) == ["-"]  # the upstream's answer, not our overflow (UO)


# --------------------------------------------------------------------------------------------
# Resets: before the response head (retriable) and after it (never retried)


async def test_reset_before_the_headers_is_retried_on_a_fresh_connection() -> None:
    async with scripted("reset", "reset") as (up, _):
        async with proxy(mesh([up.port], retries("reset", 2))) as px:
            resp = await call(px.port)
    assert (resp.status, resp.body) == (200, b"ok 3")
    assert [r.connection_id for r in up.requests] == [1, 2, 3]
    assert attempt_counts(up) == ["1", "2", "3"]


async def test_reset_mid_body_truncates_the_response_and_is_not_retried() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        transport = typing.cast(asyncio.Transport, writer.transport)
        transport.abort()

    log = io.StringIO()
    async with raw_server(half) as (port, seen):
        async with proxy(mesh([port], retries("5xx,reset,gateway-error", 3)), access_log=log) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            raw = b""
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(5):
                    while chunk := await reader.read(65536):
                        raw += chunk
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 100" in head.lower()
    assert body == b"x" * 10  # truncated: the client sees the connection end mid-body
    assert len(seen) == 1  # no retry once response bytes went downstream
    assert flags(log) == ["UC"]


# --------------------------------------------------------------------------------------------
# Timeouts: per try and for the route


async def test_per_try_timeout_retries_a_try_that_never_answers() -> None:
    log = io.StringIO()
    route = retries("5xx", 2, ", perTryTimeout: 100ms")
    async with scripted("hang") as (up, script):
        async with proxy(mesh([up.port], route), access_log=log) as px:
            loop = asyncio.get_running_loop()
            start = loop.time()
            resp = await call(px.port)
            elapsed = loop.time() - start
            stats = await cluster(px.admin_port)
    assert (resp.status, resp.body) == (200, b"ok 2")
    assert 0.1 <= elapsed < 2
    assert 0.1 <= script.arrived[1] - script.arrived[0] < 1
    assert stats["timeouts"] == 1
    assert flags(log) == ["-"]


async def test_per_try_timeouts_exhaust_the_retries_504_urx_ut() -> None:
    log = io.StringIO()
    route = retries("5xx", 2, ", perTryTimeout: 150ms") + "\ntimeout: 5s"
    async with scripted("hang", "hang", "hang") as (up, _):
        async with proxy(mesh([up.port], route), access_log=log) as px:
            loop = asyncio.get_running_loop()
            start = loop.time()
            resp = await call(px.port)
            elapsed = loop.time() - start
    assert (resp.status, resp.body) == (504, b"upstream request timeout")
    assert attempt_counts(up) == ["1", "2", "3"]
    # Three tries of 150 ms plus two backoffs (< 25 ms, < 75 ms): far below the 5 s route timeout.
    assert 0.45 <= elapsed < 1.5
    assert sorted(flags(log)[0].split(",")) == ["URX", "UT"]


async def test_per_try_timeout_is_not_retried_without_a_matching_condition() -> None:
    log = io.StringIO()
    route = retries("connect-failure,retriable-4xx", 2, ", perTryTimeout: 100ms")
    async with scripted("hang") as (up, _):
        async with proxy(mesh([up.port], route), access_log=log) as px:
            resp = await call(px.port)
    assert (resp.status, resp.body) == (504, b"upstream request timeout")
    assert len(up.requests) == 1
    assert flags(log) == ["UT"]


async def test_route_timeout_fires_during_the_third_attempt() -> None:
    """Two fast failures, then a try that hangs: the route's 300 ms deadline covers all three and
    answers 504 UT; the 1 s per-try timeout never extends it."""
    log = io.StringIO()
    route = retries("5xx", 5, ", perTryTimeout: 1s") + "\ntimeout: 300ms"
    async with scripted(fail(503, 1), fail(503, 2), "hang") as (up, script):
        async with proxy(mesh([up.port], route), access_log=log) as px:
            loop = asyncio.get_running_loop()
            start = loop.time()
            resp = await call(px.port)
            elapsed = loop.time() - start
    assert (resp.status, resp.body) == (504, b"upstream request timeout")
    assert attempt_counts(up) == ["1", "2", "3"]
    assert script.arrived[2] - start < 0.3  # the third try was under way when the deadline hit
    assert 0.28 <= elapsed < 0.9  # the deadline, not the third try's 1 s per-try timeout
    assert flags(log) == ["UT"]  # retries were left: no URX


async def test_route_timeout_from_the_virtual_service_without_retries() -> None:
    log = io.StringIO()
    async with scripted("hang") as (up, _):
        async with proxy(mesh([up.port], "timeout: 200ms"), access_log=log) as px:
            loop = asyncio.get_running_loop()
            start = loop.time()
            resp = await call(px.port)
            elapsed = loop.time() - start
    assert (resp.status, resp.body) == (504, b"upstream request timeout")
    assert len(up.requests) == 1  # Envoy never retries a route timeout
    assert 0.18 <= elapsed < 1
    assert flags(log) == ["UT"]


async def test_a_slow_answer_within_the_per_try_timeout_is_not_retried() -> None:
    async def slow(req: SeenRequest) -> Reply:
        await asyncio.sleep(0.2)  # the upstream's own latency, the behaviour under test
        return Reply(body=b"slow")

    route = retries("5xx", 2, ", perTryTimeout: 1s") + "\ntimeout: 3s"
    async with upstream(slow) as up:
        async with proxy(mesh([up.port], route)) as px:
            resp = await call(px.port)
    assert (resp.status, resp.body) == (200, b"slow")
    assert len(up.requests) == 1


async def test_per_try_timeout_stops_once_the_response_head_went_downstream() -> None:
    async def head_then_slow_body(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nfirst")
        await w.drain()
        await asyncio.sleep(0.3)  # a slow body: past the 100 ms per-try timeout
        w.write(b"end")
        await w.drain()
        await reader.read()

    route = retries("5xx,reset", 2, ", perTryTimeout: 100ms")
    async with raw_server(head_then_slow_body) as (port, seen):
        async with proxy(mesh([port], route)) as px:
            resp = await call(px.port)
    assert (resp.status, resp.body) == (200, b"firstend")
    assert len(seen) == 1


# --------------------------------------------------------------------------------------------
# Backoff


async def test_backoff_stays_within_envoys_window() -> None:
    """Default base 25 ms, full jitter: retry 1 waits in [0, 25 ms), retry 2 in [0, 75 ms)."""
    gaps: list[tuple[float, float]] = []
    for _ in range(3):
        async with scripted(fail(503, 1), fail(503, 2)) as (up, script):
            async with proxy(mesh([up.port], retries("5xx", 2))) as px:
                assert (await call(px.port)).status == 200
        a = script.arrived
        gaps.append((a[1] - a[0], a[2] - a[1]))
    slack = 0.06  # event-loop and socket time on a loaded machine
    for first, second in gaps:
        assert first < 0.025 + slack
        assert second < 0.075 + slack
        assert first + second < 0.35


async def test_configured_backoff_base_is_used() -> None:
    steps: list[Reply | str] = []
    for n in range(5):
        steps += [fail(503, n), Reply(body=b"ok")]
    async with scripted(*steps) as (up, script):
        async with proxy(mesh([up.port], retries("5xx", 1, ", backoff: 200ms"))) as px:
            for _ in range(5):
                assert (await call(px.port)).body == b"ok"  # one failure, a backoff, then ok
    a = script.arrived
    gaps = [a[i + 1] - a[i] for i in range(0, 10, 2)]
    assert all(g < 0.2 + 0.06 for g in gaps)  # retry 1 waits in [0, 200 ms)
    assert sum(gaps) > 5 * 0.025  # longer than the 25 ms default could ever give


# --------------------------------------------------------------------------------------------
# Request bodies: replayed while they fit the bound, forwarded but never replayed past it

BOUND_1K = "retryBufferBytes: 1024\n"


def payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize(
    ("extra", "size"),
    [(BOUND_1K, 1000), (BOUND_1K, 1024), ("", 65536)],
    ids=["1000-of-1k", "1024-of-1k", "64k-default"],
)
async def test_post_body_within_the_replay_bound_is_replayed_identically(
    extra: str, size: int
) -> None:
    body = payload(size)
    async with scripted(fail(503, 1), fail(502, 2)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 2), extra=extra)) as px:
            resp = await call(px.port, method="POST", body=body)
    assert (resp.status, resp.body) == (200, b"ok 3")
    assert [r.body for r in up.requests] == [body, body, body]
    assert [r.header("content-length") for r in up.requests] == [str(size)] * 3


@pytest.mark.parametrize(
    ("extra", "size"),
    [(BOUND_1K, 1025), ("", 65537), ("", 300_000)],
    ids=["1025-of-1k", "64k+1-default", "300k-default"],
)
async def test_post_body_over_the_replay_bound_is_forwarded_but_not_retried(
    extra: str, size: int
) -> None:
    body = payload(size)
    log = io.StringIO()
    async with scripted(fail(503, 1)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 2), extra=extra), access_log=log) as px:
            resp = await call(px.port, method="POST", body=body)
    assert (resp.status, resp.body) == (503, b"fail 1")
    assert [r.body for r in up.requests] == [body]  # forwarded whole, once
    assert flags(log) == ["-"]  # retries were abandoned, not exhausted: no URX


@pytest.mark.parametrize(("size", "retried"), [(1000, True), (2000, False)])
async def test_a_reset_replays_the_body_only_when_it_was_kept_whole(
    size: int, retried: bool
) -> None:
    body = payload(size)
    async with scripted("reset") as (up, _):
        async with proxy(mesh([up.port], retries("reset", 2), extra=BOUND_1K)) as px:
            resp = await call(px.port, method="POST", body=body)
    if retried:
        assert (resp.status, resp.body) == (200, b"ok 2")
        assert [r.body for r in up.requests] == [body, body]
    else:
        assert (resp.status, resp.body) == (503, TERMINATED)
        assert [r.body for r in up.requests] == [body]


async def test_chunked_body_is_replayed_identically() -> None:
    async with scripted(fail(503, 1)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 1))) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(
                b"POST /c HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert [r.body for r in up.requests] == [b"hello world", b"hello world"]


# --------------------------------------------------------------------------------------------
# Which endpoint a retry goes to (retryIgnorePreviousHosts)


def first_try_fails(label: str) -> Callable[[SeenRequest], Reply]:
    def handler(req: SeenRequest) -> Reply:
        if req.header("x-envoy-attempt-count") == "1":
            return fail(503)
        return Reply(body=label.encode())

    return handler


async def _endpoint_pairs(more: str) -> list[tuple[str, str]]:
    """For 20 requests whose first try always fails: (endpoint of try 1, endpoint of try 2)."""
    async with upstream(first_try_fails("a")) as a, upstream(first_try_fails("b")) as b:
        async with proxy(mesh([a.port, b.port], retries("5xx", 1, more))) as px:
            for n in range(20):
                assert (await call(px.port, path=f"/{n}")).status == 200
    tries: dict[str, dict[str, str]] = {}
    for label, up in (("a", a), ("b", b)):
        for r in up.requests:
            tries.setdefault(r.target, {})[str(r.header("x-envoy-attempt-count"))] = label
    assert len(tries) == 20
    return [(t["1"], t["2"]) for t in tries.values()]


@pytest.mark.parametrize("more", ["", ", retryIgnorePreviousHosts: true"], ids=["default", "true"])
async def test_a_retry_goes_to_the_other_endpoint(more: str) -> None:
    pairs = await _endpoint_pairs(more)
    assert all(first != second for first, second in pairs)
    assert {first for first, _ in pairs} == {"a", "b"}  # first tries were balanced over both


async def test_a_retry_may_return_to_the_same_endpoint_when_previous_hosts_are_not_ignored() -> (
    None
):
    pairs = await _endpoint_pairs(", retryIgnorePreviousHosts: false")
    assert any(first == second for first, second in pairs)


# --------------------------------------------------------------------------------------------
# Retries configured by Envoy's request headers (consumed, never forwarded)

ENVOY_HEADERS = (
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
)


def assert_consumed(up: Upstream) -> None:
    for r in up.requests:
        for name in ENVOY_HEADERS:
            assert r.header(name) is None, name
        assert len(r.all("x-envoy-attempt-count")) == 1


async def test_x_envoy_retry_on_adds_a_condition_to_the_default_policy() -> None:
    async with scripted(fail(503, 1), fail(500, 2)) as (up, _):
        async with proxy(mesh([up.port])) as px:
            resp = await call(px.port, headers=[("x-envoy-retry-on", "5xx")])
    assert (resp.status, resp.body) == (200, b"ok 3")  # the default's 2 retries
    assert_consumed(up)


async def test_x_envoy_retry_on_without_a_route_policy_retries_once() -> None:
    log = io.StringIO()
    async with scripted(*[fail(503, n) for n in range(1, 6)]) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 0)), access_log=log) as px:
            resp = await call(px.port, headers=[("x-envoy-retry-on", "5xx")])
    assert (resp.status, resp.body) == (503, b"fail 2")
    assert len(up.requests) == 2
    assert flags(log) == ["URX"]
    assert_consumed(up)


async def test_x_envoy_max_retries_sets_the_count() -> None:
    async with scripted(*[fail(503, n) for n in range(1, 9)]) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 1))) as px:
            resp = await call(px.port, headers=[("x-envoy-max-retries", "3")])
    assert attempt_counts(up) == ["1", "2", "3", "4"]
    assert resp.header("x-envoy-attempt-count") == "4"
    assert_consumed(up)


async def test_x_envoy_max_retries_zero_turns_retries_off() -> None:
    """The header's 0 overrides the route's count; the failure is still retriable, so Envoy's
    ``shouldRetry`` answers ``NoRetryLimitExceeded`` and the log says ``URX``."""
    log = io.StringIO()
    async with scripted(fail(503, 1)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 2)), access_log=log) as px:
            resp = await call(px.port, headers=[("x-envoy-max-retries", "0")])
    assert (resp.status, len(up.requests)) == (503, 1)
    assert flags(log) == ["URX"]


@pytest.mark.parametrize(("status", "retried"), [(418, True), (500, False)])
async def test_x_envoy_retriable_status_codes(status: int, retried: bool) -> None:
    headers = [
        ("x-envoy-retry-on", "retriable-status-codes"),
        ("x-envoy-retriable-status-codes", "418,425"),
    ]
    async with scripted(fail(status, 1)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 0))) as px:
            resp = await call(px.port, headers=headers)
    assert len(up.requests) == (2 if retried else 1)
    assert resp.status == (200 if retried else status)
    assert_consumed(up)


@pytest.mark.parametrize(("code", "retried"), [(14, True), (8, True), (13, False)])
async def test_x_envoy_retry_grpc_on(code: int, retried: bool) -> None:
    async with scripted(grpc(code)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 0))) as px:
            resp = await call(
                px.port, headers=[("x-envoy-retry-grpc-on", "unavailable,resource-exhausted")]
            )
    assert len(up.requests) == (2 if retried else 1)
    assert resp.header("grpc-status") == (None if retried else str(code))
    assert_consumed(up)


async def test_x_envoy_per_try_timeout_header() -> None:
    headers = [("x-envoy-retry-on", "5xx"), ("x-envoy-upstream-rq-per-try-timeout-ms", "100")]
    async with scripted("hang") as (up, script):
        async with proxy(mesh([up.port])) as px:
            resp = await call(px.port, headers=headers)
    assert (resp.status, resp.body) == (200, b"ok 2")
    assert 0.1 <= script.arrived[1] - script.arrived[0] < 1
    assert_consumed(up)


async def test_x_envoy_route_timeout_header_covers_all_tries() -> None:
    log = io.StringIO()
    headers = [("x-envoy-retry-on", "5xx"), ("x-envoy-upstream-rq-timeout-ms", "250")]
    async with scripted(fail(503, 1), "hang") as (up, _):
        async with proxy(mesh([up.port]), access_log=log) as px:
            resp = await call(px.port, headers=headers)
    assert (resp.status, resp.body) == (504, b"upstream request timeout")
    assert len(up.requests) == 2
    assert flags(log) == ["UT"]
    assert_consumed(up)


async def test_client_attempt_count_is_replaced_and_unknown_envoy_headers_pass() -> None:
    async with scripted(fail(503, 1)) as (up, _):
        async with proxy(mesh([up.port], retries("5xx", 1))) as px:
            await call(px.port, headers=[("x-envoy-attempt-count", "7"), ("x-envoy-foo", "bar")])
    assert [r.all("x-envoy-attempt-count") for r in up.requests] == [["1"], ["2"]]
    assert [r.header("x-envoy-foo") for r in up.requests] == ["bar", "bar"]


# --------------------------------------------------------------------------------------------
# Local replies after tries carry the attempt count too


async def test_local_replies_after_tries_carry_the_attempt_count() -> None:
    """Envoy's router answers its local replies (UT, UF...) through ``modify_headers_``, which sets
    ``x-envoy-attempt-count`` when the route includes it in responses (router.cc), as it does for
    upstream answers: after three tries the 504 or 503 says 3."""
    route = retries("5xx", 2, ", perTryTimeout: 100ms")
    async with scripted("hang", "hang", "hang") as (up, _):
        async with proxy(mesh([up.port], route)) as px:
            timed_out = await call(px.port)
    async with proxy(mesh([await closed_port()])) as px:
        refused = await call(px.port)
    assert (timed_out.status, timed_out.header("x-envoy-attempt-count")) == (504, "3")
    assert (refused.status, refused.header("x-envoy-attempt-count")) == (503, "3")
