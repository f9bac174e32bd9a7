"""DestinationRule behaviour over real sockets: subsets, load balancing and its per-port/subset overrides.

Semantics: reference §1.3 (DestinationRule; LEAST_REQUEST is Istio's default), §1.7 (a subset that
selects no endpoint is 503 UH), §2.5 (flags). Each upstream answers with an ``x-upstream`` header
naming itself, so the client sees which endpoint served it.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http.cookies import SimpleCookie

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


def labelled(
    label: str, release: asyncio.Event | None = None, held: asyncio.Event | None = None
) -> Handler:
    """Answers at once, except ``/hold``, which sets ``held`` and waits for ``release``."""

    async def handler(req: SeenRequest) -> Reply:
        if req.target == "/hold" and release is not None:
            if held is not None:
                held.set()
            await release.wait()
        return Reply(headers=[("x-upstream", label)], body=label.encode())

    return handler


def service(
    endpoints: Sequence[tuple[Upstream, dict[str, str]]],
    *,
    two_ports: bool = False,
) -> str:
    eps = ""
    for up, labels in endpoints:
        lab = ", ".join(f"{k}: {v}" for k, v in labels.items())
        ports = f"{{http: {up.port}, admin: {up.port}}}" if two_ports else f"{{http: {up.port}}}"
        eps += f"  - address: 127.0.0.1\n    ports: {ports}\n    labels: {{{lab}}}\n"
    ports_spec = (
        "[{number: 9080, name: http}, {number: 9090, name: admin}]"
        if two_ports
        else "[{number: 9080, name: http}]"
    )
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n"
        "  hosts: [reviews]\n"
        f"  ports: {ports_spec}\n"
        "  resolution: STATIC\n"
        f"  endpoints:\n{eps}"
    )


def resource(kind: str, spec: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\n"
        f"kind: {kind}\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    )


def destination_rule(spec: str) -> str:
    return resource("DestinationRule", "host: reviews\n" + textwrap.dedent(spec))


def virtual_service(http: str) -> str:
    return resource("VirtualService", "hosts: [reviews]\nhttp:\n" + textwrap.dedent(http))


async def send(
    client: RawClient, target: str = "/", host: str = "reviews:9080", **headers: str
) -> RawResponse:
    hdrs = [("host", host), *((k.replace("_", "-"), v) for k, v in headers.items())]
    resp = await client.request("GET", target, hdrs)
    assert resp.status == 200, (resp.status, resp.body)
    return resp


def alternates(seq: Sequence[str]) -> bool:
    """No endpoint serves two requests in a row."""
    return all(a != b for a, b in itertools.pairwise(seq))


def served_by(resp: RawResponse) -> str:
    label = resp.header("x-upstream")
    assert label is not None
    return label


async def one(port: int, target: str = "/", host: str = "reviews:9080", **headers: str) -> str:
    """One request on a fresh connection; which endpoint served it."""
    client = await RawClient.connect(port)
    try:
        return served_by(await send(client, target, host, **headers))
    finally:
        await client.close()


@dataclass
class Pair:
    e1: Upstream
    e2: Upstream
    release: asyncio.Event
    held: asyncio.Event

    def service(self, *, two_ports: bool = False) -> str:
        return service(
            [
                (self.e1, {"version": "v1", "app": "reviews"}),
                (self.e2, {"version": "v2", "app": "reviews"}),
            ],
            two_ports=two_ports,
        )


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    release, held = asyncio.Event(), asyncio.Event()
    async with upstream(labelled("e1", release, held)) as e1:
        async with upstream(labelled("e2", release, held)) as e2:
            try:
                yield Pair(e1, e2, release, held)
            finally:
                release.set()


# --------------------------------------------------------------------------------------------
# subsets


async def test_subsets_select_endpoints_by_labels() -> None:
    async with upstream(labelled("v1")) as v1, upstream(labelled("canary")) as canary:
        async with upstream(labelled("stable")) as stable:
            config = join(
                bootstrap(),
                service(
                    [
                        (v1, {"version": "v1"}),
                        (canary, {"version": "v2", "track": "canary"}),
                        (stable, {"version": "v2", "track": "stable"}),
                    ]
                ),
                destination_rule(
                    """\
                    subsets:
                    - {name: v1, labels: {version: v1}}
                    - {name: v2, labels: {version: v2}}
                    - {name: canary, labels: {version: v2, track: canary}}
                    """
                ),
                virtual_service(
                    """\
                    - match: [{headers: {x-pick: {exact: v2}}}]
                      route: [{destination: {host: reviews, subset: v2}}]
                    - match: [{headers: {x-pick: {exact: canary}}}]
                      route: [{destination: {host: reviews, subset: canary}}]
                    - route: [{destination: {host: reviews, subset: v1}}]
                    """
                ),
            )
            async with proxy(config) as px:
                client = await RawClient.connect(px.port)
                v2s = Counter([served_by(await send(client, x_pick="v2")) for _ in range(60)])
                canaries = {served_by(await send(client, x_pick="canary")) for _ in range(20)}
                v1s = {served_by(await send(client)) for _ in range(20)}
                await client.close()
    assert set(v2s) == {"canary", "stable"}  # both version=v2 endpoints, nothing else
    assert canaries == {"canary"}  # every label of the selector must match
    assert v1s == {"v1"}


async def test_subset_that_selects_no_endpoint_is_503_uh(pair: Pair) -> None:
    log = io.StringIO()
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule("subsets:\n- {name: v9, labels: {version: v9}}\n"),
        virtual_service("- route: [{destination: {host: reviews, subset: v9}}]\n"),
    )
    async with proxy(config, access_log=log) as px:
        client = await RawClient.connect(px.port)
        resp = await client.request("GET", "/x", [("host", "reviews")])
        await client.close()
    assert (resp.status, resp.body) == (503, b"no healthy upstream")
    assert pair.e1.requests == pair.e2.requests == []
    line = log.getvalue()
    assert re.search(r'"GET /x HTTP/1\.1" 503 UH ', line), line


async def test_subset_traffic_policy_overrides_the_rules(pair: Pair) -> None:
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule(
            """\
            trafficPolicy:
              loadBalancer: {consistentHash: {httpHeaderName: x-user}}
            subsets:
            - name: rr
              labels: {app: reviews}
              trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
            - name: sticky
              labels: {app: reviews}
            """
        ),
        virtual_service(
            """\
            - match: [{headers: {x-subset: {exact: rr}}}]
              route: [{destination: {host: reviews, subset: rr}}]
            - route: [{destination: {host: reviews, subset: sticky}}]
            """
        ),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        rr = [served_by(await send(client, x_user="u1", x_subset="rr")) for _ in range(10)]
        sticky = [served_by(await send(client, x_user="u1")) for _ in range(10)]
        await client.close()
    assert alternates(rr), rr  # the subset's round robin
    assert len(set(sticky)) == 1  # the rule's consistent hash, inherited by the other subset


# --------------------------------------------------------------------------------------------
# simple load balancers


async def test_round_robin_strictly_alternates(pair: Pair) -> None:
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule("trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n"),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        seq = [served_by(await send(client)) for _ in range(20)]
        await client.close()
    assert alternates(seq), seq
    assert Counter(seq) == {"e1": 10, "e2": 10}


async def test_random_sends_traffic_to_both(pair: Pair) -> None:
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule("trafficPolicy: {loadBalancer: {simple: RANDOM}}\n"),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        seq = [served_by(await send(client)) for _ in range(200)]
        await client.close()
    counts = Counter(seq)
    assert counts["e1"] >= 60 and counts["e2"] >= 60, counts
    # Not a rotation: a random choice repeats an endpoint now and then.
    assert not alternates(seq)


@pytest.mark.parametrize(
    "rule",
    [
        "",  # no DestinationRule: Istio's default is LEAST_REQUEST
        "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n",
        "trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}\n",  # deprecated alias
    ],
    ids=["default", "explicit", "least-conn"],
)
async def test_least_request_avoids_the_busy_endpoint(pair: Pair, rule: str) -> None:
    docs = [bootstrap(), pair.service()]
    if rule:
        docs.append(destination_rule(rule))
    async with proxy(join(*docs)) as px:
        holder = await RawClient.connect(px.port)
        hold = asyncio.create_task(send(holder, "/hold"))
        try:
            await asyncio.wait_for(pair.held.wait(), 5)  # one endpoint now holds a request
            busy = "e1" if pair.e1.requests else "e2"
            client = await RawClient.connect(px.port)
            # With two endpoints, power-of-two-choices compares both: the idle one wins each time.
            others = {served_by(await send(client)) for _ in range(20)}
            await client.close()
        finally:
            pair.release.set()
            held = await hold
            await holder.close()
    assert served_by(held) == busy
    assert others == {"e1", "e2"} - {busy}


# --------------------------------------------------------------------------------------------
# consistent hash


ALGORITHMS = [
    pytest.param("", id="default-ring"),
    pytest.param(", ringHash: {minimumRingSize: 2048}", id="ringHash"),
    pytest.param(", maglev: {tableSize: 65537}", id="maglev"),
]


def hash_rule(key: str, algorithm: str) -> str:
    return f"trafficPolicy: {{loadBalancer: {{consistentHash: {{{key}{algorithm}}}}}}}\n"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_hash_by_header_is_sticky_and_spreads(pair: Pair, algorithm: str) -> None:
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule(hash_rule("httpHeaderName: x-user", algorithm)),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        same = {served_by(await send(client, x_user="alice")) for _ in range(20)}
        first = {f"u{i}": served_by(await send(client, x_user=f"u{i}")) for i in range(40)}
        again = {f"u{i}": served_by(await send(client, x_user=f"u{i}")) for i in range(40)}
        # A request without the header has no key: balanced at random, as Envoy does.
        keyless = {served_by(await send(client)) for _ in range(40)}
        await client.close()
        # The key decides, not the connection: a fresh connection lands on the same endpoint.
        fresh = await one(px.port, x_user="alice")
    assert len(same) == 1
    assert fresh in same
    assert first == again
    assert set(first.values()) == {"e1", "e2"}
    assert keyless == {"e1", "e2"}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_hash_by_cookie_with_ttl_sets_it_and_sticks(pair: Pair, algorithm: str) -> None:
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule(hash_rule("httpCookie: {name: user, ttl: 60s, path: /}", algorithm)),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        first = await send(client)
        set_cookie = first.header("set-cookie")
        assert set_cookie is not None
        jar: SimpleCookie = SimpleCookie()
        jar.load(set_cookie)
        morsel = jar["user"]
        assert morsel.value
        assert morsel["max-age"] == "60"
        assert morsel["path"] == "/"
        cookie = f"user={morsel.value}"
        followers = [await send(client, cookie=cookie) for _ in range(10)]
        await client.close()
        # Each client without the cookie gets its own value, so clients spread over endpoints.
        fresh: list[tuple[str, str | None]] = []
        for _ in range(40):
            c = await RawClient.connect(px.port)
            r = await send(c)
            fresh.append((served_by(r), r.header("set-cookie")))
            await c.close()
    assert {served_by(r) for r in followers} == {served_by(first)}
    assert all(r.header("set-cookie") is None for r in followers)  # already set: not set again
    assert {label for label, _ in fresh} == {"e1", "e2"}
    assert len({value for _, value in fresh}) == 40


async def test_hash_by_cookie_without_ttl_sets_no_cookie(pair: Pair) -> None:
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule(hash_rule("httpCookie: {name: user}", "")),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        plain = await send(client)
        sticky = {served_by(await send(client, cookie="user=abc; other=1")) for _ in range(10)}
        await client.close()
    assert plain.header("set-cookie") is None
    assert len(sticky) == 1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_hash_by_source_ip(pair: Pair, algorithm: str) -> None:
    config = join(
        bootstrap(), pair.service(), destination_rule(hash_rule("useSourceIp: true", algorithm))
    )
    by_ip: dict[str, set[str]] = {}
    async with proxy(config) as px:
        for i in range(2, 34):
            source = f"127.0.0.{i}"  # loopback: all of 127/8 is local
            for _ in range(3):  # separate connections, separate source ports
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", px.port, local_addr=(source, 0)
                )
                client = RawClient(reader, writer)
                by_ip.setdefault(source, set()).add(served_by(await send(client)))
                await client.close()
    assert all(len(labels) == 1 for labels in by_ip.values()), by_ip
    assert set().union(*by_ip.values()) == {"e1", "e2"}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_hash_by_query_parameter(pair: Pair, algorithm: str) -> None:
    config = join(
        bootstrap(),
        pair.service(),
        destination_rule(hash_rule("httpQueryParameterName: user", algorithm)),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        same = {served_by(await send(client, f"/p?a={i}&user=bob")) for i in range(20)}
        first = [served_by(await send(client, f"/p?user=u{i}")) for i in range(40)]
        again = [served_by(await send(client, f"/q?x=1&user=u{i}")) for i in range(40)]
        await client.close()
    assert len(same) == 1
    assert first == again
    assert set(first) == {"e1", "e2"}


# --------------------------------------------------------------------------------------------
# port level settings


async def test_port_level_settings_apply_to_their_port_only(pair: Pair) -> None:
    config = join(
        bootstrap(),
        pair.service(two_ports=True),
        destination_rule(
            """\
            trafficPolicy:
              loadBalancer: {simple: ROUND_ROBIN}
              portLevelSettings:
              - port: {number: 9090}
                loadBalancer: {consistentHash: {httpHeaderName: x-user}}
            """
        ),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        p9080 = [served_by(await send(client, host="reviews:9080", x_user="a")) for _ in range(10)]
        p9090 = [served_by(await send(client, host="reviews:9090", x_user="a")) for _ in range(10)]
        await client.close()
    assert alternates(p9080), p9080  # round robin
    assert len(set(p9090)) == 1  # the port's consistent hash


async def test_port_level_settings_through_a_virtual_service_destination_port(pair: Pair) -> None:
    config = join(
        bootstrap(),
        pair.service(two_ports=True),
        destination_rule(
            """\
            trafficPolicy:
              loadBalancer: {consistentHash: {httpHeaderName: x-user}}
              portLevelSettings:
              - port: {number: 9090}
                loadBalancer: {simple: ROUND_ROBIN}
            """
        ),
        virtual_service(
            """\
            - match: [{uri: {prefix: /admin}}]
              route: [{destination: {host: reviews, port: {number: 9090}}}]
            - route: [{destination: {host: reviews, port: {number: 9080}}}]
            """
        ),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        admin = [
            served_by(await send(client, "/admin", host="reviews", x_user="a")) for _ in range(10)
        ]
        main = [served_by(await send(client, "/", host="reviews", x_user="a")) for _ in range(10)]
        await client.close()
    assert alternates(admin), admin
    assert len(set(main)) == 1


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(
            """\
            trafficPolicy:
              loadBalancer: {consistentHash: {httpHeaderName: x-user}}
              portLevelSettings:
              - port: {number: 9090}
                connectionPool: {http: {maxRequestsPerConnection: 100}}
            subsets:
            - {name: all, labels: {app: reviews}}
            """,
            id="rule-port-level",
        ),
        pytest.param(
            """\
            trafficPolicy:
              loadBalancer: {consistentHash: {httpHeaderName: x-user}}
            subsets:
            - name: all
              labels: {app: reviews}
              trafficPolicy:
                portLevelSettings:
                - port: {number: 9090}
                  connectionPool: {http: {maxRequestsPerConnection: 100}}
            """,
            id="subset-port-level",
        ),
    ],
)
async def test_port_level_settings_replace_rather_than_inherit(pair: Pair, rule: str) -> None:
    """destination_rule.proto: "Traffic settings specified at the destination-level will not be
    inherited when overridden by port-level settings, i.e. default values will be applied to fields
    omitted in port-level traffic policies" (Istio ``GetPortLevelTrafficPolicy``,
    ``mergeTrafficPolicy`` with ``hasPortLevel``). The port's policy sets no loadBalancer, so port
    9090 gets the default (LEAST_REQUEST), not the rule's consistent hash."""
    config = join(
        bootstrap(),
        pair.service(two_ports=True),
        destination_rule(rule),
        virtual_service(
            """\
            - match: [{port: 9090}]
              route: [{destination: {host: reviews, subset: all, port: {number: 9090}}}]
            - route: [{destination: {host: reviews, subset: all, port: {number: 9080}}}]
            """
        ),
    )
    async with proxy(config) as px:
        client = await RawClient.connect(px.port)
        p9080 = {served_by(await send(client, host="reviews:9080", x_user="a")) for _ in range(40)}
        p9090 = {served_by(await send(client, host="reviews:9090", x_user="a")) for _ in range(40)}
        await client.close()
    assert len(p9080) == 1  # the rule's consistent hash on the other port
    assert p9090 == {"e1", "e2"}  # no hash policy on 9090: both endpoints serve the same user
