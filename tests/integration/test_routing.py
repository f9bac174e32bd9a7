"""VirtualService routing over real sockets: every HTTPRoute field as Istio documents it.

Semantics: reference §1.1 (VirtualService), §1.7 (routing edge cases), §2.5 (flags), §2.6 (headers).
The bookinfo cases are Istio's own task examples (request routing, traffic shifting, fault
injection) written as our fixtures. Each upstream answers with an ``x-upstream`` header naming
itself, so the client sees which destination served it and the upstream records what it received.
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field

import pytest
from helpers import (
    Handler,
    RawClient,
    RawResponse,
    Reply,
    SeenRequest,
    Upstream,
    bootstrap,
    join,
    proxy,
    upstream,
)

# --------------------------------------------------------------------------------------------
# Config builders


def endpoint(port: int, labels: dict[str, str] | None = None, name: str = "http") -> str:
    lab = ", ".join(f"{k}: {v}" for k, v in (labels or {}).items())
    return f"  - address: 127.0.0.1\n    ports: {{{name}: {port}}}\n    labels: {{{lab}}}\n"


def service(
    name: str,
    endpoints: Sequence[str] = (),
    *,
    ports: str = "[{number: 9080, name: http, protocol: HTTP}]",
    resolution: str = "STATIC",
    host: str | None = None,
) -> str:
    eps = f"  endpoints:\n{''.join(endpoints)}" if endpoints else ""
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        "spec:\n"
        f"  hosts: [{host or name}]\n"
        f"  ports: {ports}\n"
        f"  resolution: {resolution}\n"
        f"{eps}"
    )


def simple(name: str, port: int, labels: dict[str, str] | None = None) -> str:
    return service(name, [endpoint(port, labels)])


def virtual_service(name: str, spec: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    )


def destination_rule(name: str, spec: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    )


VERSION_SUBSETS = """\
host: reviews
subsets:
- {name: v1, labels: {version: v1}}
- {name: v2, labels: {version: v2}}
- {name: v3, labels: {version: v3}}
"""


# --------------------------------------------------------------------------------------------
# Upstreams and clients


def labelled(label: str) -> Handler:
    def handler(req: SeenRequest) -> Reply:
        return Reply(headers=[("x-upstream", label)], body=label.encode())

    return handler


@dataclass
class Req:
    target: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "GET"
    host: str = "reviews:9080"


async def send(client: RawClient, req: Req) -> RawResponse:
    headers = [("host", req.host), *req.headers.items()]
    return await client.request(req.method, req.target, headers)


async def get(port: int, target: str = "/", host: str = "reviews:9080", **kw: str) -> RawResponse:
    client = await RawClient.connect(port)
    try:
        return await send(client, R(target, host=host, **kw))
    finally:
        await client.close()


def served_by(resp: RawResponse) -> str | None:
    return resp.header("x-upstream")


LOG_LINE = re.compile(r'"(?P<method>\S+) (?P<path>\S+) HTTP/1\.1" (?P<code>\d+) (?P<flags>\S+) ')


def log_entries(log: io.StringIO) -> list[tuple[str, int, str]]:
    """(path, response code, response flags) of each access-log line."""
    out = []
    for line in log.getvalue().splitlines():
        m = LOG_LINE.search(line)
        assert m is not None, line
        out.append((m["path"], int(m["code"]), m["flags"]))
    return out


class Watched:
    """An upstream handler that wakes waiters whenever a request arrives (mirrors come on their
    own, after the primary's response, so the test waits for them on this, never on a sleep)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.arrived = asyncio.Event()

    async def __call__(self, req: SeenRequest) -> Reply:
        self.arrived.set()
        result = self.handler(req)
        return await result if isinstance(result, Awaitable) else result

    async def wait(self, up: Upstream, count: int, timeout: float = 5.0) -> None:
        """Until ``up`` (served by this handler) has received ``count`` requests."""
        async with asyncio.timeout(timeout):
            while len(up.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()


# --------------------------------------------------------------------------------------------
# hosts


async def test_short_name_and_fqdn_hosts_select_the_virtual_service() -> None:
    async with upstream(labelled("own")) as own, upstream(labelled("backend")) as backend:
        config = join(
            bootstrap(),
            simple("reviews", own.port),
            simple("ratings", own.port),
            simple("backend", backend.port),
            virtual_service(
                "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: backend}}]"
            ),
            virtual_service(
                "ratings",
                "hosts: [ratings.default.svc.cluster.local]\n"
                "http:\n- route: [{destination: {host: backend}}]",
            ),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            hosts = [
                "reviews",
                "reviews:9080",
                "reviews.default",
                "reviews.default.svc",
                "reviews.default.svc.cluster.local:9080",
                "Reviews.Default.Svc.Cluster.Local",
                "ratings",
                "ratings.default.svc.cluster.local",
            ]
            for host in hosts:
                resp = await send(client, Req(host=host))
                assert (resp.status, served_by(resp)) == (200, "backend"), host
            await client.close()
    assert own.requests == []
    # The Host header is not rewritten by routing.
    assert [r.header("host") for r in backend.requests] == hosts


@pytest.mark.parametrize("resolution", ["NONE", "DNS"])
async def test_wildcard_host_and_exact_beats_wildcard(resolution: str) -> None:
    async with upstream(labelled("any")) as wild, upstream(labelled("api")) as api:
        config = join(
            bootstrap(),
            service(
                "example",
                host='"*.example.com"',
                resolution=resolution,
                ports="[{number: 80, name: http, protocol: HTTP}]",
            ),
            simple("wild", wild.port),
            simple("api", api.port),
            virtual_service(
                "wild", 'hosts: ["*.example.com"]\nhttp:\n- route: [{destination: {host: wild}}]'
            ),
            virtual_service(
                "exact", "hosts: [api.example.com]\nhttp:\n- route: [{destination: {host: api}}]"
            ),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            seen = {}
            for host in (
                "a.example.com",
                "b.c.example.com:80",
                "api.example.com",
                "x.API.example.com",
            ):
                resp = await send(client, Req(host=host))
                assert resp.status == 200, host
                seen[host] = served_by(resp)
            # `*.example.com` needs a label before the suffix: the bare domain is not covered.
            bare = await send(client, Req(host="example.com"))
            await client.close()
    assert seen == {
        "a.example.com": "any",
        "b.c.example.com:80": "any",
        "api.example.com": "api",  # the exact host beats the wildcard
        "x.API.example.com": "any",
    }
    assert bare.status == 502  # REGISTRY_ONLY: not a known host


async def test_http_rules_in_order_first_match_wins() -> None:
    async with upstream(labelled("v1")) as v1, upstream(labelled("v2")) as v2:
        async with upstream(labelled("v3")) as v3:
            config = join(
                bootstrap(),
                service(
                    "reviews",
                    [
                        endpoint(v1.port, {"version": "v1"}),
                        endpoint(v2.port, {"version": "v2"}),
                        endpoint(v3.port, {"version": "v3"}),
                    ],
                ),
                destination_rule("reviews", VERSION_SUBSETS),
                virtual_service(
                    "reviews",
                    """\
                    hosts: [reviews]
                    http:
                    - match: [{uri: {prefix: /api}}]
                      route: [{destination: {host: reviews, subset: v1}}]
                    - match: [{uri: {prefix: /api/v2}}]   # shadowed by the rule above
                      route: [{destination: {host: reviews, subset: v2}}]
                    - route: [{destination: {host: reviews, subset: v3}}]
                    """,
                ),
            )
            async with proxy(config) as px:
                client = await RawClient.connect(px.port)
                got = [
                    served_by(await send(client, Req(target=t)))
                    for t in ("/api", "/api/v2/x", "/apis", "/other", "/")
                ]
                await client.close()
    assert got == ["v1", "v1", "v1", "v3", "v3"]
    assert v2.requests == []


async def test_no_matching_rule_is_404_nr_and_never_falls_through() -> None:
    log = io.StringIO()
    async with upstream(labelled("reviews")) as up:
        config = join(
            bootstrap(),
            simple("reviews", up.port),
            virtual_service(
                "reviews",
                """\
                hosts: [reviews]
                http:
                - match: [{uri: {prefix: /only}}]
                  route: [{destination: {host: reviews}}]
                """,
            ),
        )
        async with proxy(config, access_log=log) as px:
            miss = await get(px.port, "/elsewhere")
            hit = await get(px.port, "/only/x")
    assert (miss.status, miss.body) == (404, b"")
    assert hit.status == 200
    assert [r.target for r in up.requests] == ["/only/x"]
    assert log_entries(log) == [("/elsewhere", 404, "NR"), ("/only/x", 200, "-")]


async def test_host_without_virtual_service_goes_to_its_endpoints() -> None:
    async with upstream(labelled("reviews")) as reviews, upstream(labelled("ratings")) as ratings:
        config = join(
            bootstrap(),
            simple("reviews", reviews.port),
            simple("ratings", ratings.port),
            virtual_service(
                "reviews",
                "hosts: [reviews]\nhttp:\n- match: [{uri: {exact: /x}}]\n"
                "  route: [{destination: {host: reviews}}]",
            ),
        )
        async with proxy(config) as px:
            resp = await get(px.port, "/anything?q=1", host="ratings:9080")
    assert (resp.status, served_by(resp)) == (200, "ratings")
    assert ratings.requests[0].target == "/anything?q=1"
    assert reviews.requests == []


# --------------------------------------------------------------------------------------------
# match: each case routes matching requests to `hit`, everything else to `miss`


def R(target: str = "/", method: str = "GET", host: str = "reviews:9080", **headers: str) -> Req:
    return Req(
        target=target,
        method=method,
        host=host,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


MATCH_CASES = [
    pytest.param(
        "[{uri: {exact: /productpage}}]",
        [
            (R("/productpage"), True),
            (R("/productpage?u=normal"), True),  # the query string is not part of the path
            (R("/productpage/"), False),
            (R("/productpage2"), False),
            (R("/Productpage"), False),  # case-sensitive
        ],
        id="uri-exact",
    ),
    pytest.param(
        "[{uri: {prefix: /api/v1}}]",
        [
            (R("/api/v1"), True),
            (R("/api/v1/books?x=1"), True),
            (R("/api/v10"), True),  # a plain string prefix, not a path segment
            (R("/api/v2"), False),
            (R("/API/v1"), False),
        ],
        id="uri-prefix",
    ),
    pytest.param(
        r"[{uri: {regex: '/reviews/\d+'}}]",
        [
            (R("/reviews/12"), True),
            (R("/reviews/12?page=3"), True),
            (R("/reviews/12/x"), False),  # full match, not search
            (R("/v/reviews/12"), False),
            (R("/reviews/"), False),
        ],
        id="uri-regex-full-match",
    ),
    pytest.param(
        "[{uri: {exact: /Login}, ignoreUriCase: true}]",
        [(R("/login"), True), (R("/LOGIN?next=/"), True), (R("/login/x"), False)],
        id="ignore-uri-case-exact",
    ),
    pytest.param(
        "[{uri: {prefix: /Static}, ignoreUriCase: true}]",
        [(R("/static/a.css"), True), (R("/STATIC"), True), (R("/stat"), False)],
        id="ignore-uri-case-prefix",
    ),
    pytest.param(
        "[{uri: {regex: /abc}, ignoreUriCase: true}]",
        [(R("/abc"), True), (R("/ABC"), False)],  # ignoreUriCase does not apply to regex
        id="ignore-uri-case-not-for-regex",
    ),
    pytest.param("[{scheme: {exact: http}}]", [(R("/"), True)], id="scheme-http"),
    pytest.param("[{scheme: {exact: https}}]", [(R("/"), False)], id="scheme-https"),
    pytest.param(
        "[{method: {exact: POST}}]",
        [(R("/", "POST"), True), (R("/", "GET"), False), (R("/", "post"), False)],
        id="method-exact",
    ),
    pytest.param(
        "[{method: {regex: 'GET|HEAD'}}]",
        [(R("/", "HEAD"), True), (R("/", "GET"), True), (R("/", "DELETE"), False)],
        id="method-regex",
    ),
    pytest.param(
        "[{authority: {exact: 'reviews:9080'}}]",
        [(R(host="reviews:9080"), True), (R(host="reviews"), False)],
        id="authority-exact",
    ),
    pytest.param(
        "[{authority: {prefix: reviews.default}}]",
        [(R(host="reviews.default.svc:9080"), True), (R(host="reviews:9080"), False)],
        id="authority-prefix",
    ),
    pytest.param(
        r"[{authority: {regex: 'reviews(:\d+)?'}}]",
        [
            (R(host="reviews"), True),
            (R(host="reviews:9080"), True),
            (R(host="reviews.default"), False),
        ],
        id="authority-regex",
    ),
    pytest.param(
        "[{headers: {end-user: {exact: jason}}}]",
        [
            (R(end_user="jason"), True),
            (R(End_User="jason"), True),  # header names are case-insensitive
            (R(end_user="Jason"), False),  # values are not
            (R(end_user="jason2"), False),
            (R(), False),
        ],
        id="header-exact",
    ),
    pytest.param(
        "[{headers: {x-version: {prefix: v1}}}]",
        [(R(x_version="v1.2"), True), (R(x_version="v2"), False), (R(), False)],
        id="header-prefix",
    ),
    pytest.param(
        r"[{headers: {x-id: {regex: '\d+'}}}]",
        [(R(x_id="123"), True), (R(x_id="12a"), False), (R(x_id="a123"), False), (R(), False)],
        id="header-regex",
    ),
    pytest.param(
        "[{headers: {x-canary: {}}}]",
        [(R(x_canary="1"), True), (R(x_canary="anything"), True), (R(), False)],
        id="header-presence",
    ),
    pytest.param(
        "[{withoutHeaders: {end-user: {exact: jason}}}]",
        [
            (R(), True),  # a missing header is the empty value, which is not "jason"
            (R(end_user="bob"), True),
            (R(end_user="jason"), False),
        ],
        id="without-headers-exact",
    ),
    pytest.param(
        "[{withoutHeaders: {x-anything: {regex: '.*'}}}]",
        [(R(), False), (R(x_anything="1"), False)],  # ".*" matches the empty value too
        id="without-headers-regex-dot-star-excludes-all",
    ),
    pytest.param(
        "[{queryParams: {debug: {exact: ''}}}]",
        [
            (R("/?debug"), True),
            (R("/p?a=1&debug"), True),
            (R("/?debug="), True),
            (R("/?debug=1"), False),
            (R("/"), False),
        ],
        id="query-exact-empty-is-bare-key",
    ),
    pytest.param(
        "[{queryParams: {v: {exact: '2'}}}]",
        [(R("/?v=2"), True), (R("/x?a=1&v=2"), True), (R("/?v=22"), False), (R("/v=2"), False)],
        id="query-exact",
    ),
    pytest.param(
        r"[{queryParams: {id: {regex: '\d+'}}}]",
        [(R("/?id=123"), True), (R("/?id=a123"), False), (R("/?id=123a"), False), (R("/"), False)],
        id="query-regex-full-match",
    ),
    pytest.param(
        "[{port: 9090}]",
        [
            (R(host="reviews:9090"), True),
            (R(host="reviews:9080"), False),
            (R(host="reviews"), False),
        ],
        id="port",
    ),
    pytest.param(
        "[{uri: {prefix: /a}, headers: {x-t: {exact: '1'}}}, {method: {exact: DELETE}}]",
        [
            (R("/a/b", x_t="1"), True),  # first block: both conditions
            (R("/a/b"), False),  # first block: one condition only
            (R("/b", x_t="1"), False),
            (R("/z", "DELETE"), True),  # second block
        ],
        id="blocks-ored-conditions-anded",
    ),
    pytest.param(
        "[{name: named, uri: {prefix: /n}, headers: {uri: {exact: /n}}}]",
        # `name` is a label; `headers` keys uri/scheme/method/authority are ignored by Istio.
        [(R("/n/x"), True), (R("/m"), False)],
        id="name-and-pseudo-header-keys",
    ),
]


@pytest.mark.parametrize(("matches", "cases"), MATCH_CASES)
async def test_match_conditions(matches: str, cases: list[tuple[Req, bool]]) -> None:
    async with upstream(labelled("hit")) as hit, upstream(labelled("miss")) as miss:
        config = join(
            bootstrap(),
            service(
                "reviews",
                ports="[{number: 9080, name: http}, {number: 9090, name: admin}]",
            ),
            simple("hit", hit.port),
            simple("miss", miss.port),
            virtual_service(
                "reviews",
                f"""\
                hosts: [reviews]
                http:
                - match: {matches}
                  route: [{{destination: {{host: hit}}}}]
                - route: [{{destination: {{host: miss}}}}]
                """,
            ),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            got = []
            for req, _ in cases:
                resp = await send(client, req)
                assert resp.status == 200, req
                got.append(served_by(resp) == "hit")
            await client.close()
    assert got == [expected for _, expected in cases]
    # Whichever rule served it, the request reached the upstream as sent.
    assert [r.target for r in hit.requests] == [req.target for req, ok in cases if ok]
    assert [r.target for r in miss.requests] == [req.target for req, ok in cases if not ok]


# --------------------------------------------------------------------------------------------
# bookinfo (Istio's request-routing, traffic-shifting and fault-injection tasks)


@dataclass
class Versions:
    v1: Upstream
    v2: Upstream
    v3: Upstream

    def reviews(self) -> str:
        return service(
            "reviews",
            [
                endpoint(self.v1.port, {"version": "v1"}),
                endpoint(self.v2.port, {"version": "v2"}),
                endpoint(self.v3.port, {"version": "v3"}),
            ],
        )

    def config(self, http: str) -> str:
        return join(
            bootstrap(),
            self.reviews(),
            destination_rule("reviews", VERSION_SUBSETS),
            virtual_service("reviews", "hosts: [reviews]\nhttp:\n" + textwrap.dedent(http)),
        )


@pytest.fixture
async def versions() -> AsyncIterator[Versions]:
    async with upstream(labelled("v1")) as v1, upstream(labelled("v2")) as v2:
        async with upstream(labelled("v3")) as v3:
            yield Versions(v1, v2, v3)


@pytest.mark.parametrize("user", ["jason", "test-user"])
async def test_bookinfo_end_user_to_v2_everyone_else_to_v1(versions: Versions, user: str) -> None:
    config = versions.config(
        f"""\
        - match: [{{headers: {{end-user: {{exact: {user}}}}}}}]
          route: [{{destination: {{host: reviews, subset: v2}}}}]
        - route: [{{destination: {{host: reviews, subset: v1}}}}]
        """
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        mine = [served_by(await send(client, R(end_user=user))) for _ in range(10)]
        others = [served_by(await send(client, R(end_user="someone"))) for _ in range(10)]
        anonymous = [served_by(await send(client, R())) for _ in range(10)]
        await client.close()
    assert set(mine) == {"v2"}
    assert set(others) == set(anonymous) == {"v1"}
    assert versions.v3.requests == []


async def test_bookinfo_jason_to_v2_everyone_else_to_v3(versions: Versions) -> None:
    config = versions.config(
        """\
        - match: [{headers: {end-user: {exact: jason}}}]
          route: [{destination: {host: reviews, subset: v2}}]
        - route: [{destination: {host: reviews, subset: v3}}]
        """
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        jason = [served_by(await send(client, R(end_user="jason"))) for _ in range(5)]
        other = [served_by(await send(client, R(end_user="kim"))) for _ in range(5)]
        await client.close()
    assert (set(jason), set(other)) == ({"v2"}, {"v3"})
    assert versions.v1.requests == []


@pytest.mark.parametrize(("w1", "w3"), [(80, 20), (50, 50), (1, 3)])
async def test_bookinfo_weighted_split(versions: Versions, w1: int, w3: int) -> None:
    config = versions.config(
        f"""\
        - route:
          - {{destination: {{host: reviews, subset: v1}}, weight: {w1}}}
          - {{destination: {{host: reviews, subset: v3}}, weight: {w3}}}
        """
    )
    n = 1000
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        for _ in range(n):
            assert (await send(client, R())).status == 200
        await client.close()
    share = 100 * len(versions.v1.requests) / n
    expected = 100 * w1 / (w1 + w3)  # weights are relative: share = weight / sum
    assert abs(share - expected) <= 5, (share, expected)
    assert len(versions.v1.requests) + len(versions.v3.requests) == n
    assert versions.v2.requests == []


async def test_weight_zero_destination_gets_nothing(versions: Versions) -> None:
    config = versions.config(
        """\
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 0}
          - {destination: {host: reviews, subset: v2}, weight: 100}
          - {destination: {host: reviews, subset: v3}, weight: 0}
        """
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        for _ in range(200):
            assert served_by(await send(client, R())) == "v2"
        await client.close()
    assert versions.v1.requests == versions.v3.requests == []


async def test_bookinfo_fault_delay_for_one_user(versions: Versions) -> None:
    log = io.StringIO()
    config = versions.config(
        """\
        - match: [{headers: {end-user: {exact: jason}}}]
          fault: {delay: {fixedDelay: 200ms, percentage: {value: 100}}}
          route: [{destination: {host: reviews, subset: v1}}]
        - route: [{destination: {host: reviews, subset: v1}}]
        """
    )
    loop = asyncio.get_running_loop()
    async with proxy(config, access_log=log) as px:
        client = await RawClient.connect(px.port)
        start = loop.time()
        other = await send(client, R("/other", end_user="kim"))
        other_time = loop.time() - start
        start = loop.time()
        jason = await send(client, R("/jason", end_user="jason"))
        jason_time = loop.time() - start
        await client.close()
    assert (jason.status, served_by(jason)) == (200, "v1")  # delayed, then forwarded
    assert other.status == 200
    assert jason_time >= 0.19
    assert other_time < 0.19
    assert [r.target for r in versions.v1.requests] == ["/other", "/jason"]
    assert log_entries(log) == [("/other", 200, "-"), ("/jason", 200, "DI")]


async def test_bookinfo_fault_abort_for_one_user(versions: Versions) -> None:
    log = io.StringIO()
    config = versions.config(
        """\
        - match: [{headers: {end-user: {exact: jason}}}]
          fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
          route: [{destination: {host: reviews, subset: v1}}]
        - route: [{destination: {host: reviews, subset: v1}}]
        """
    )
    async with proxy(config, access_log=log) as px:
        client = await RawClient.connect(px.port)
        jason = await send(client, R("/jason", end_user="jason"))
        other = await send(client, R("/other", end_user="kim"))
        await client.close()
    assert (jason.status, jason.body) == (500, b"fault filter abort")
    assert (other.status, served_by(other)) == (200, "v1")
    assert [r.target for r in versions.v1.requests] == ["/other"]  # the abort never left
    assert log_entries(log) == [("/jason", 500, "FI"), ("/other", 200, "-")]


async def test_fault_delay_then_abort_when_both_fire(versions: Versions) -> None:
    """Envoy's fault filter delays first and rolls the abort when the delay ends ("Delays can be
    followed by aborts", ``FaultFilter::postDelayInjection``): the abort arrives after the delay
    and the log shows both flags."""
    log = io.StringIO()
    config = versions.config(
        """\
        - fault:
            delay: {fixedDelay: 200ms, percentage: {value: 100}}
            abort: {httpStatus: 503, percentage: {value: 100}}
          route: [{destination: {host: reviews, subset: v1}}]
        """
    )
    loop = asyncio.get_running_loop()
    async with proxy(config, access_log=log) as px:
        start = loop.time()
        resp = await get(px.port, "/both")
        elapsed = loop.time() - start
    assert (resp.status, resp.body) == (503, b"fault filter abort")
    assert elapsed >= 0.19
    assert versions.v1.requests == []
    ((path, code, flags),) = log_entries(log)
    assert (path, code, set(flags.split(","))) == ("/both", 503, {"DI", "FI"})


async def test_fault_without_percentage_never_fires(versions: Versions) -> None:
    log = io.StringIO()
    config = versions.config(
        """\
        - fault:
            delay: {fixedDelay: 5s}
            abort: {httpStatus: 503}
          route: [{destination: {host: reviews, subset: v1}}]
        """
    )
    loop = asyncio.get_running_loop()
    async with proxy(config, access_log=log) as px:
        client = await RawClient.connect(px.port)
        start = loop.time()
        for _ in range(20):
            assert (await send(client, R())).status == 200
        elapsed = loop.time() - start
        await client.close()
    assert elapsed < 2.0  # no 5 s delay ever applied
    assert len(versions.v1.requests) == 20
    assert {flags for _, _, flags in log_entries(log)} == {"-"}


async def test_fault_abort_percentage_applies_to_about_that_share(versions: Versions) -> None:
    config = versions.config(
        """\
        - fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
          route: [{destination: {host: reviews, subset: v1}}]
        """
    )
    n = 400
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        statuses = [(await send(client, R())).status for _ in range(n)]
        await client.close()
    aborted = statuses.count(503)
    assert abs(100 * aborted / n - 50) <= 8
    assert aborted + statuses.count(200) == n
    assert len(versions.v1.requests) == n - aborted


# --------------------------------------------------------------------------------------------
# destinations, ports and header operations


async def test_destination_port_selects_the_service_port() -> None:
    async with upstream(labelled("http")) as http, upstream(labelled("admin")) as admin:
        config = join(
            bootstrap(),
            service(
                "reviews",
                [
                    "  - address: 127.0.0.1\n"
                    f"    ports: {{http: {http.port}, admin: {admin.port}}}\n"
                ],
                ports="[{number: 9080, name: http}, {number: 9090, name: admin}]",
            ),
            virtual_service(
                "reviews",
                """\
                hosts: [reviews]
                http:
                - match: [{uri: {prefix: /admin}}]
                  route: [{destination: {host: reviews, port: {number: 9090}}}]
                - route: [{destination: {host: reviews, port: {number: 9080}}}]
                """,
            ),
        )
        async with proxy(config) as px:
            a = await get(px.port, "/admin/x", host="reviews")
            b = await get(px.port, "/x", host="reviews:9090")
    assert served_by(a) == "admin"
    assert served_by(b) == "http"  # the route's destination port wins over the Host's port


async def test_route_and_destination_header_operations() -> None:
    def handler(req: SeenRequest) -> Reply:
        return Reply(
            headers=[
                ("x-upstream", "v1"),
                ("x-resp-set", "from-app"),
                ("x-resp-add", "from-app"),
                ("x-resp-remove", "from-app"),
            ]
        )

    async with upstream(handler) as up:
        config = join(
            bootstrap(),
            simple("reviews", up.port),
            virtual_service(
                "reviews",
                """\
                hosts: [reviews]
                http:
                - headers:
                    request:
                      set: {x-req-set: route}
                      add: {x-req-add: route}
                      remove: [x-req-remove]
                    response:
                      set: {x-resp-set: route}
                      add: {x-resp-add: route}
                      remove: [x-resp-remove]
                  route:
                  - destination: {host: reviews}
                    headers:
                      request: {set: {x-dest: v1}}
                      response: {set: {x-dest-resp: v1}}
                """,
            ),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            resp = await send(
                client,
                R(
                    x_req_set="client",
                    x_req_add="client",
                    x_req_remove="client",
                    x_keep="client",
                ),
            )
            await client.close()
    seen = up.requests[0]
    assert seen.all("x-req-set") == ["route"]  # set overwrites
    assert ",".join(seen.all("x-req-add")) == "client,route"  # add appends
    assert seen.all("x-req-remove") == []
    assert seen.all("x-keep") == ["client"]
    assert seen.all("x-dest") == ["v1"]
    values = {k: [v for n, v in resp.headers if n == k] for k, _ in resp.headers}
    assert values["x-resp-set"] == ["route"]
    assert ",".join(values["x-resp-add"]) == "from-app,route"
    assert "x-resp-remove" not in values
    assert values["x-dest-resp"] == ["v1"]


async def test_route_level_set_wins_over_destination_level_set() -> None:
    def handler(req: SeenRequest) -> Reply:
        return Reply(headers=[("x-who", "app")])

    async with upstream(handler) as up:
        config = join(
            bootstrap(),
            simple("reviews", up.port),
            virtual_service(
                "reviews",
                """\
                hosts: [reviews]
                http:
                - headers:
                    request: {set: {x-who: route}}
                    response: {set: {x-who: route}}
                  route:
                  - destination: {host: reviews}
                    headers:
                      request: {set: {x-who: destination}}
                      response: {set: {x-who: destination}}
                """,
            ),
        )
        async with proxy(config) as px:
            resp = await get(px.port, x_who="client")
    assert up.requests[0].all("x-who") == ["route"]
    assert [v for k, v in resp.headers if k == "x-who"] == ["route"]


async def test_header_set_of_host_is_an_authority_rewrite() -> None:
    async with upstream(labelled("v1")) as up:
        config = join(
            bootstrap(),
            simple("reviews", up.port),
            virtual_service(
                "reviews",
                """\
                hosts: [reviews]
                http:
                - headers: {request: {set: {host: route.example}}}
                  route:
                  - destination: {host: reviews}
                    headers: {request: {set: {host: dest.example}}}
                """,
            ),
        )
        async with proxy(config) as px:
            resp = await get(px.port)
    assert resp.status == 200
    assert up.requests[0].all("host") == ["route.example"]


# --------------------------------------------------------------------------------------------
# rewrite


async def rewrite_case(http: str, targets: Sequence[str], **headers: str) -> list[SeenRequest]:
    log = io.StringIO()
    async with upstream(labelled("v1")) as up:
        config = join(
            bootstrap(),
            simple("ratings", up.port),
            virtual_service("ratings", "hosts: [ratings]\nhttp:\n" + textwrap.dedent(http)),
        )
        async with proxy(config, access_log=log) as px:
            client = await RawClient.connect(px.port)
            for target in targets:
                resp = await send(client, R(target, host="ratings:9080", **headers))
                assert resp.status == 200, target
            await client.close()
    # The access log shows the path the client sent (Envoy: X-ENVOY-ORIGINAL-PATH?:PATH).
    assert [path for path, _, _ in log_entries(log)] == list(targets)
    return up.requests


async def test_rewrite_uri_replaces_the_matched_prefix() -> None:
    seen = await rewrite_case(
        """\
        - match: [{uri: {prefix: /ratings}}]
          rewrite: {uri: /v1/bookRatings}
          route: [{destination: {host: ratings}}]
        """,
        ["/ratings/7?x=1", "/ratingsXYZ", "/ratings"],
    )
    # The literal prefix is replaced: `/ratingsXYZ` becomes `/v1/bookRatingsXYZ` (reference §1.7).
    assert [r.target for r in seen] == [
        "/v1/bookRatings/7?x=1",
        "/v1/bookRatingsXYZ",
        "/v1/bookRatings",
    ]
    assert [r.header("x-envoy-original-path") for r in seen] == [
        "/ratings/7?x=1",
        "/ratingsXYZ",
        "/ratings",
    ]


async def test_rewrite_uri_with_ignore_uri_case_prefix() -> None:
    seen = await rewrite_case(
        """\
        - match: [{uri: {prefix: /old}, ignoreUriCase: true}]
          rewrite: {uri: /new}
          route: [{destination: {host: ratings}}]
        """,
        ["/OLD/page"],
    )
    assert seen[0].target == "/new/page"


async def test_rewrite_uri_after_exact_match_replaces_the_whole_path() -> None:
    seen = await rewrite_case(
        """\
        - match: [{uri: {exact: /legacy/ratings}}]
          rewrite: {uri: /v2/ratings}
          route: [{destination: {host: ratings}}]
        """,
        ["/legacy/ratings?id=3"],
    )
    assert seen[0].target == "/v2/ratings?id=3"
    assert seen[0].header("x-envoy-original-path") == "/legacy/ratings?id=3"


async def test_rewrite_authority() -> None:
    seen = await rewrite_case(
        """\
        - rewrite: {authority: ratings.internal:8080}
          route: [{destination: {host: ratings}}]
        """,
        ["/r"],
    )
    assert seen[0].all("host") == ["ratings.internal:8080"]
    assert seen[0].target == "/r"
    assert seen[0].header("x-envoy-original-path") is None  # the path did not change


async def test_uri_regex_rewrite_with_capture_groups() -> None:
    seen = await rewrite_case(
        r"""
        - match: [{uri: {prefix: /service}}]
          rewrite:
            uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\2/instance/\1'}
          route: [{destination: {host: ratings}}]
        """,
        ["/service/foo/v1/api?q=1", "/service"],
    )
    assert [r.target for r in seen] == ["/v1/api/instance/foo?q=1", "/service"]
    assert seen[0].header("x-envoy-original-path") == "/service/foo/v1/api?q=1"
    assert seen[1].header("x-envoy-original-path") is None  # no match: path unchanged


async def test_no_rewrite_no_original_path_header() -> None:
    seen = await rewrite_case(
        "- route: [{destination: {host: ratings}}]\n",
        ["/plain?x=1"],
    )
    assert seen[0].target == "/plain?x=1"
    assert seen[0].header("x-envoy-original-path") is None


# --------------------------------------------------------------------------------------------
# redirect and directResponse


async def local_answers(http: str, requests: Sequence[Req]) -> list[RawResponse]:
    async with upstream(labelled("v1")) as up:
        config = join(
            bootstrap(),
            simple("ratings", up.port),
            virtual_service("ratings", "hosts: [ratings]\nhttp:\n" + textwrap.dedent(http)),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            out = [await send(client, req) for req in requests]
            await client.close()
    assert up.requests == []  # answered by the proxy, never forwarded
    return out


async def test_redirect_uri_and_authority_default_301_query_kept() -> None:
    (resp,) = await local_answers(
        """\
        - match: [{uri: {exact: /v1/getProductRatings}}]
          redirect: {uri: /v1/bookRatings, authority: newratings.default.svc.cluster.local}
        """,
        [R("/v1/getProductRatings?id=7", host="ratings")],
    )
    assert resp.status == 301
    assert resp.header("location") == (
        "http://newratings.default.svc.cluster.local/v1/bookRatings?id=7"
    )


async def test_redirect_code_scheme_and_port() -> None:
    resp, same_path = await local_answers(
        """\
        - match: [{uri: {prefix: /secure}}]
          redirect: {scheme: https, port: 8443, redirectCode: 308}
        - redirect: {redirectCode: 302, authority: other.example}
        """,
        [R("/secure/a?b=1", host="ratings"), R("/x?y=2", host="ratings")],
    )
    assert resp.status == 308
    assert resp.header("location") == "https://ratings:8443/secure/a?b=1"
    assert same_path.status == 302
    assert same_path.header("location") == "http://other.example/x?y=2"


async def test_redirect_authority_replaces_host_and_port() -> None:
    """Istio's ``authority`` becomes Envoy's ``host_redirect``, which replaces the whole
    host[:port] of the request (``RouteEntryImplBase::newUri``: ``final_host = host_redirect_``);
    ``derivePort: FROM_REQUEST_PORT`` is how Istio keeps the request's port (it sets
    ``port_redirect`` to the port the route serves)."""
    plain, derived = await local_answers(
        """\
        - match: [{uri: {prefix: /derive}}]
          redirect: {authority: other.example, derivePort: FROM_REQUEST_PORT}
        - redirect: {authority: other.example}
        """,
        [R("/x?y=2", host="ratings:9080"), R("/derive", host="ratings:9080")],
    )
    assert plain.header("location") == "http://other.example/x?y=2"
    assert derived.header("location") == "http://other.example:9080/derive"


async def test_redirect_to_https_drops_the_default_http_port() -> None:
    """Envoy keeps the request's Host as is unless the scheme changes and the Host carries the
    old scheme's default port (``RouteEntryImplBase::processRequestHost``)."""
    default_port, other_port = await local_answers(
        "- redirect: {scheme: https}\n",
        [R("/a", host="ratings:80"), R("/b", host="ratings:9080")],
    )
    assert default_port.header("location") == "https://ratings/a"
    assert other_port.header("location") == "https://ratings:9080/b"


async def test_redirect_prefix_rewrite_pitfall() -> None:
    (resp,) = await local_answers(
        """\
        - match: [{uri: {prefix: /legacy}}]
          redirect: {prefixRewrite: /}
        """,
        [R("/legacy/baz?q=1", host="ratings")],
    )
    assert resp.status == 301
    # `/legacy` replaced by `/` leaves the slash that followed it: `//baz` (reference §1.7).
    assert resp.header("location") == "http://ratings//baz?q=1"


async def test_direct_response_status_and_body() -> None:
    down, ok = await local_answers(
        """\
        - match: [{uri: {prefix: /down}}]
          directResponse: {status: 503, body: {string: "service is down for maintenance"}}
        - directResponse: {status: 200}
        """,
        [R("/down", host="ratings"), R("/", host="ratings")],
    )
    assert (down.status, down.body) == (503, b"service is down for maintenance")
    assert (ok.status, ok.body) == (200, b"")


# --------------------------------------------------------------------------------------------
# mirrors


def mirror_config(primary: int, http: str, *mirrors: tuple[str, int]) -> str:
    return join(
        bootstrap(),
        simple("reviews", primary),
        *(simple(name, port) for name, port in mirrors),
        virtual_service("reviews", "hosts: [reviews]\nhttp:\n" + textwrap.dedent(http)),
    )


async def test_mirror_gets_a_copy_with_shadow_host() -> None:
    watched = Watched(labelled("m"))
    async with upstream(labelled("primary")) as primary, upstream(watched) as shadow:
        config = mirror_config(
            primary.port,
            """\
            - route: [{destination: {host: reviews}}]
              mirror: {host: mirror}
            """,
            ("mirror", shadow.port),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            first = await client.request(
                "POST", "/r?x=1", [("host", "reviews:9080"), ("x-trace", "t1")], body=b"payload"
            )
            second = await send(client, R("/s", host="reviews.default.svc.cluster.local"))
            await client.close()
            await watched.wait(shadow, 2)
    assert (first.status, served_by(first)) == (200, "primary")
    assert second.status == 200
    copies = {r.target: r for r in shadow.requests}
    copy = copies["/r?x=1"]
    assert (copy.method, copy.body, copy.header("x-trace")) == ("POST", b"payload", "t1")
    # Host gets `-shadow` on its host part, even though the mirror is another service.
    assert copy.all("host") == ["reviews-shadow:9080"]
    assert copies["/s"].all("host") == ["reviews.default.svc.cluster.local-shadow"]
    assert [r.header("host") for r in primary.requests] == [
        "reviews:9080",
        "reviews.default.svc.cluster.local",
    ]


async def test_mirrors_list_and_mirror_percentage_zero() -> None:
    watch_a, watch_c = Watched(labelled("a")), Watched(labelled("c"))
    async with upstream(labelled("primary")) as primary, upstream(watch_a) as a:
        async with upstream(labelled("b")) as b, upstream(watch_c) as c:
            config = mirror_config(
                primary.port,
                """\
                - match: [{uri: {prefix: /sentinel}}]
                  route: [{destination: {host: reviews}}]
                  mirrors: [{destination: {host: mirror-a}}, {destination: {host: mirror-c}}]
                - match: [{uri: {prefix: /single}}]
                  route: [{destination: {host: reviews}}]
                  mirror: {host: mirror-c}
                  mirrorPercentage: {value: 0}
                - route: [{destination: {host: reviews}}]
                  mirrors:
                  - {destination: {host: mirror-a}}
                  - {destination: {host: mirror-b}, percentage: {value: 0}}
                """,
                ("mirror-a", a.port),
                ("mirror-b", b.port),
                ("mirror-c", c.port),
            )
            async with proxy(config) as px:
                client = await RawClient.connect(px.port)
                for i in range(10):
                    assert (await send(client, R(f"/list/{i}"))).status == 200
                    assert (await send(client, R(f"/single/{i}"))).status == 200
                # The sentinel's copies are sent after every earlier copy was started.
                assert (await send(client, R("/sentinel"))).status == 200
                await client.close()
                await watch_a.wait(a, 11)
                await watch_c.wait(c, 1)
    assert len(primary.requests) == 21
    assert sorted(r.target for r in a.requests) == sorted(
        [f"/list/{i}" for i in range(10)] + ["/sentinel"]
    )
    assert b.requests == []  # mirrors[].percentage 0: none
    assert [r.target for r in c.requests] == ["/sentinel"]  # mirrorPercentage 0: none


async def test_dead_mirror_never_fails_or_slows_the_primary() -> None:
    dead = socket.socket()  # bound, never listening: connections are refused
    dead.bind(("127.0.0.1", 0))
    try:
        async with upstream(labelled("primary")) as primary:
            config = mirror_config(
                primary.port,
                """\
                - route: [{destination: {host: reviews}}]
                  mirror: {host: mirror}
                """,
                ("mirror", dead.getsockname()[1]),
            )
            loop = asyncio.get_running_loop()
            async with proxy(config) as px:
                client = await RawClient.connect(px.port)
                start = loop.time()
                statuses = [(await send(client, R(f"/{i}"))).status for i in range(20)]
                elapsed = loop.time() - start
                await client.close()
    finally:
        dead.close()
    assert statuses == [200] * 20
    assert len(primary.requests) == 20
    assert elapsed < 2.0


async def test_slow_mirror_never_slows_the_primary() -> None:
    release = asyncio.Event()

    async def stuck(req: SeenRequest) -> Reply:
        await release.wait()  # answers only when the test says so
        return Reply()

    watched = Watched(stuck)
    loop = asyncio.get_running_loop()
    async with upstream(labelled("primary")) as primary, upstream(watched) as shadow:
        config = mirror_config(
            primary.port,
            """\
            - route: [{destination: {host: reviews}}]
              mirror: {host: mirror}
            """,
            ("mirror", shadow.port),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            start = loop.time()
            first = await send(client, R("/a"))
            await watched.wait(shadow, 1)
            # The mirror holds the copy, yet the primary answered and the connection goes on.
            second = await send(client, R("/b"))
            elapsed = loop.time() - start
            assert not release.is_set()
            await client.close()
            await watched.wait(shadow, 2)
            release.set()
    assert (first.status, second.status) == (200, 200)
    assert elapsed < 1.0
    assert [r.target for r in primary.requests] == ["/a", "/b"]


# --------------------------------------------------------------------------------------------
# CORS


CORS_VS = """\
- corsPolicy:
    allowOrigins:
    - exact: https://example.com
    - regex: 'https://.*\\.trusted\\.io'
    allowMethods: [POST, GET]
    allowHeaders: [X-Foo-Bar, X-Bar]
    exposeHeaders: [X-Expose, X-Other]
    maxAge: 24h
    allowCredentials: true
  route: [{destination: {host: reviews}}]
"""


async def cors_exchange(
    requests: Sequence[Req], policy: str = CORS_VS
) -> tuple[list[RawResponse], list[SeenRequest]]:
    async with upstream(labelled("app")) as up:
        config = join(
            bootstrap(),
            simple("reviews", up.port),
            virtual_service("reviews", "hosts: [reviews]\nhttp:\n" + policy),
        )
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            out = [await send(client, req) for req in requests]
            await client.close()
    return out, up.requests


def preflight(origin: str) -> Req:
    return R("/api", "OPTIONS", origin=origin, access_control_request_method="POST")


@pytest.mark.parametrize("origin", ["https://example.com", "https://api.trusted.io"])
async def test_cors_preflight_from_allowed_origin_is_answered_by_the_proxy(origin: str) -> None:
    (resp,), seen = await cors_exchange([preflight(origin)])
    assert resp.status == 200
    assert resp.header("access-control-allow-origin") == origin
    assert resp.header("access-control-allow-methods") == "POST,GET"
    assert resp.header("access-control-allow-headers") == "X-Foo-Bar,X-Bar"
    assert resp.header("access-control-max-age") == "86400"
    assert resp.header("access-control-allow-credentials") == "true"
    assert served_by(resp) is None
    assert seen == []


async def test_cors_preflight_from_unknown_origin_is_forwarded_to_the_app() -> None:
    (resp,), seen = await cors_exchange([preflight("https://evil.example")])
    assert (resp.status, served_by(resp)) == (200, "app")
    assert resp.header("access-control-allow-origin") is None
    assert [(r.method, r.header("origin")) for r in seen] == [("OPTIONS", "https://evil.example")]


async def test_cors_unmatched_preflight_ignore_is_not_forwarded() -> None:
    policy = CORS_VS.replace("allowCredentials: true", "unmatchedPreflights: IGNORE")
    (resp,), seen = await cors_exchange([preflight("https://evil.example")], policy)
    assert resp.status == 200
    assert resp.header("access-control-allow-origin") is None
    assert seen == []


async def test_cors_actual_request_gets_allow_origin_and_expose_headers() -> None:
    (allowed, other, none), seen = await cors_exchange(
        [
            R("/api", "POST", origin="https://example.com"),
            R("/api", "GET", origin="https://evil.example"),
            R("/api", "GET"),
        ]
    )
    assert (allowed.status, served_by(allowed)) == (200, "app")
    assert allowed.header("access-control-allow-origin") == "https://example.com"
    assert allowed.header("access-control-expose-headers") == "X-Expose,X-Other"
    assert allowed.header("access-control-allow-credentials") == "true"
    for resp in (other, none):
        assert (resp.status, served_by(resp)) == (200, "app")
        assert resp.header("access-control-allow-origin") is None
        assert resp.header("access-control-expose-headers") is None
    assert [r.method for r in seen] == ["POST", "GET", "GET"]


# --------------------------------------------------------------------------------------------
# timeout


async def test_route_timeout_is_504_ut() -> None:
    release = asyncio.Event()

    async def slow(req: SeenRequest) -> Reply:
        await release.wait()
        return Reply()

    log = io.StringIO()
    loop = asyncio.get_running_loop()
    async with upstream(slow) as up:
        config = join(
            bootstrap(),
            simple("reviews", up.port),
            virtual_service(
                "reviews",
                "hosts: [reviews]\nhttp:\n- timeout: 200ms\n"
                "  route: [{destination: {host: reviews}}]",
            ),
        )
        async with proxy(config, access_log=log) as px:
            start = loop.time()
            resp = await get(px.port, "/slow")
            elapsed = loop.time() - start
            release.set()
    assert (resp.status, resp.body) == (504, b"upstream request timeout")
    assert 0.19 <= elapsed < 2.0
    assert len(up.requests) == 1
    assert log_entries(log) == [("/slow", 504, "UT")]


async def test_no_route_timeout_by_default() -> None:
    async def slowish(req: SeenRequest) -> Reply:
        await asyncio.sleep(0.4)  # the upstream's own processing time
        return Reply(body=b"late but fine")

    async with upstream(slowish) as up:
        config = join(
            bootstrap(),
            simple("reviews", up.port),
            virtual_service(
                "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]"
            ),
        )
        async with proxy(config) as px:
            resp = await get(px.port)
    assert (resp.status, resp.body) == (200, b"late but fine")
    assert up.requests[0].header("x-envoy-expected-rq-timeout-ms") is None
