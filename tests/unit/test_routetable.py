"""Compiled VirtualServices (core/routetable.py) and the route step's decisions over them.

Configs go through the real loader, so each test reads the YAML an operator writes. Semantics:
reference §1.1 (weights, header operations, rewrite, fault, mirrors, CORS, timeout), §1.7 (edge
cases). Draws use a seeded ``random.Random``, so the statistical checks are reproducible.
"""

from __future__ import annotations

import base64
import random
import textwrap
from collections import Counter

import pytest

from meshproxy.config.load import load_texts
from meshproxy.core.http1 import RequestHead
from meshproxy.core.match import RequestView
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routetable import (
    ActionKind,
    CompiledVirtualService,
    HeaderOps,
    Route,
    RouteTable,
    compile_ops,
    explain,
)
from meshproxy.core.routing import HostTable
from meshproxy.errors import DirectReply
from meshproxy.layers.route import Decision, Router

REVIEWS = "reviews.default.svc.cluster.local"

BASE = """\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {name: app-v1, namespace: default, labels: {app: productpage}}
spec:
  outbound: {address: 127.0.0.1:0}
  outboundTrafficPolicy: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mirror}
spec:
  hosts: [mirror, mirror-b]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.9.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: example}
spec:
  hosts: ["*.example.com", "*.api.example.com"]
  ports: [{number: 80, name: http}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


def vs_doc(http: str, *, name: str = "reviews", hosts: str = "[reviews]", extra: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n"
        f"  hosts: {hosts}\n"
        f"{extra}"
        "  http:\n" + textwrap.indent(textwrap.dedent(http).strip("\n") + "\n", "  ")
    )


def table(*docs: str) -> RouteTable:
    config = load_texts([("test.yaml", "---\n".join([BASE, *docs]))])
    return RouteTable(config, HostTable(config))


def vs_of(http: str) -> CompiledVirtualService:
    found = table(vs_doc(http)).lookup(REVIEWS)
    assert found is not None
    return found


def only_route(http: str) -> Route:
    (route,) = vs_of(http).routes
    return route


def view(target: str = "/", method: str = "GET", **headers: str) -> RequestView:
    return RequestView(
        method=method,
        path=target,
        authority="reviews:9080",
        scheme="http",
        port=9080,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


# --------------------------------------------------------------------------------------------
# weighted destinations


@pytest.mark.parametrize(
    "weights",
    [(80, 20), (50, 50), (1, 3), (33, 33, 34), (10, 0, 90), (1, 1, 1)],
    ids=str,
)
def test_weighted_picks_converge_to_their_shares(weights: tuple[int, ...]) -> None:
    dests = "\n".join(
        f"  - {{destination: {{host: reviews, subset: v{i + 1}}}, weight: {w}}}"
        for i, w in enumerate(weights)
    )
    route = only_route(f"- route:\n{dests}\n")
    rng = random.Random(20240601)
    n = 30_000
    counts = Counter(route.pick(rng).destination.subset for _ in range(n))
    total = sum(weights)
    for i, w in enumerate(weights):
        share = counts[f"v{i + 1}"] / n
        assert abs(share - w / total) < 0.01, (weights, counts)
        if w == 0:
            assert counts[f"v{i + 1}"] == 0  # weight 0 receives nothing, ever


def test_weight_zero_destinations_are_not_compiled() -> None:
    route = only_route(
        """\
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 0}
          - {destination: {host: reviews, subset: v2}, weight: 7}
        """
    )
    assert [wc.destination.subset for wc in route.clusters] == ["v2"]
    rng = random.Random(1)
    assert {route.pick(rng).destination.subset for _ in range(100)} == {"v2"}


def test_single_destination_without_weight_gets_everything() -> None:
    route = only_route("- route: [{destination: {host: reviews, subset: v3}}]")
    assert route.kind is ActionKind.FORWARD
    assert [wc.weight for wc in route.clusters] == [100]
    assert route.clusters[0].cluster.name == f"outbound|9080|v3|{REVIEWS}"
    assert [e.address for e in route.clusters[0].cluster.endpoints] == ["10.0.0.3"]


def test_picks_are_reproducible_with_the_same_seed() -> None:
    route = only_route(
        """\
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 30}
          - {destination: {host: reviews, subset: v2}, weight: 70}
        """
    )
    a, b = random.Random(5), random.Random(5)
    assert [route.pick(a).destination.subset for _ in range(200)] == [
        route.pick(b).destination.subset for _ in range(200)
    ]


# --------------------------------------------------------------------------------------------
# explain()

EXPLAINED = """\
- name: jason
  match: [{headers: {end-user: {exact: jason}}}]
  route: [{destination: {host: reviews, subset: v2}}]
- name: api
  match:
  - {name: get-api, uri: {prefix: /api}, method: {exact: GET}}
  - {uri: {exact: /x}}
  route: [{destination: {host: reviews, subset: v3}}]
- route: [{destination: {host: reviews, subset: v1}}]
"""


def test_explain_lists_each_rule_up_to_the_match_with_the_failed_condition() -> None:
    verdicts = explain(vs_of(EXPLAINED), view("/other", end_user="kim"))
    assert [(v.route.index, v.matched) for v in verdicts] == [(0, False), (1, False), (2, True)]
    assert verdicts[0].reason == "match[0]: header end-user exact 'jason' did not match"
    assert verdicts[1].reason == (
        "match[0] (get-api): uri prefix '/api' did not match; "
        "match[1]: uri exact '/x' did not match"
    )
    assert verdicts[2].reason == "no match conditions"


def test_explain_names_the_matching_block() -> None:
    vs = vs_of(EXPLAINED)
    (jason,) = explain(vs, view("/api", end_user="jason"))
    assert (jason.matched, jason.reason) == (True, "match[0]: header end-user exact 'jason'")
    first, second = explain(vs, view("/api/books", "GET"))
    assert first.matched is False
    assert (second.matched, second.reason) == (
        True,
        "match[0] (get-api): uri prefix '/api', method exact 'GET'",
    )
    # A later condition of the same block fails: that one is named, not the uri.
    _, post, _ = explain(vs, view("/api/books", "POST"))
    assert post.reason.startswith("match[0] (get-api): method exact 'GET' did not match")


def test_explain_agrees_with_routing() -> None:
    vs = vs_of(EXPLAINED)
    for req in (view("/x"), view("/api", end_user="jason"), view("/zzz"), view("/api", "PUT")):
        found = vs.route(req)
        assert found is not None
        verdicts = explain(vs, req)
        assert verdicts[-1].matched
        assert verdicts[-1].route is found[0]


def test_blocks_for_other_workloads_are_dropped_but_keep_their_index() -> None:
    vs = vs_of(
        """\
        - match:
          - {sourceLabels: {app: ratings}, uri: {prefix: /a}}
          - {uri: {prefix: /b}}
          route: [{destination: {host: reviews, subset: v2}}]
        - match: [{sourceLabels: {app: ratings}}]   # not for this proxy at all
          route: [{destination: {host: reviews, subset: v3}}]
        - route: [{destination: {host: reviews, subset: v1}}]
        """
    )
    assert [r.index for r in vs.routes] == [0, 2]
    found = vs.route(view("/a"))
    assert found is not None and found[0].index == 2
    verdicts = explain(vs, view("/a"))
    assert verdicts[0].reason == "match[1]: uri prefix '/b' did not match"


# --------------------------------------------------------------------------------------------
# header operations


def test_compile_ops_lower_cases_names_and_keeps_values() -> None:
    route = only_route(
        """\
        - headers:
            request:
              set: {X-Set: Value-1}
              add: {X-Add: a}
              remove: [X-Gone]
          route: [{destination: {host: reviews}}]
        """
    )
    ops = route.request_ops
    assert ops.set == ((b"x-set", b"Value-1"),)
    assert ops.add == ((b"x-add", b"a"),)
    assert ops.remove == frozenset({b"x-gone"})
    assert route.response_ops.empty
    assert compile_ops(None).empty


def test_header_ops_apply_remove_set_add() -> None:
    ops = HeaderOps(
        set=((b"x-set", b"new"),),
        add=((b"x-add", b"b"), (b"x-fresh", b"1")),
        remove=frozenset({b"x-gone"}),
    )
    out = ops.apply([(b"x-set", b"old"), (b"x-add", b"a"), (b"x-gone", b"1"), (b"x-keep", b"k")])
    assert sorted(out) == sorted(
        [(b"x-set", b"new"), (b"x-add", b"a,b"), (b"x-keep", b"k"), (b"x-fresh", b"1")]
    )


def test_set_of_host_is_an_authority() -> None:
    assert HeaderOps(set=((b"host", b"h.example"),)).authority() == "h.example"
    assert HeaderOps(set=((b":authority", b"a.example"),)).authority() == "a.example"
    assert HeaderOps(set=((b"x", b"y"),)).authority() is None


def test_destination_level_ops_compile_per_destination() -> None:
    route = only_route(
        """\
        - route:
          - destination: {host: reviews, subset: v1}
            weight: 50
            headers: {request: {set: {x-dest: v1}}, response: {remove: [x-internal]}}
          - destination: {host: reviews, subset: v2}
            weight: 50
        """
    )
    v1, v2 = route.clusters
    assert v1.request_ops.set == ((b"x-dest", b"v1"),)
    assert v1.response_ops.remove == frozenset({b"x-internal"})
    assert v2.request_ops.empty and v2.response_ops.empty


# --------------------------------------------------------------------------------------------
# the route step's decisions (Router over the compiled table)


def router(http: str, seed: int = 3) -> Router:
    config = load_texts([("test.yaml", "---\n".join([BASE, vs_doc(http)]))])
    hosts = HostTable(config)
    return Router(hosts, RouteTable(config, hosts), random.Random(seed))


def decide(
    r: Router, target: str = "/", authority: str = "reviews:9080", **headers: str
) -> Decision:
    hdrs = [(b"host", authority.encode())] + [
        (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()
    ]
    head = RequestHead(method=b"GET", target=target.encode(), headers=hdrs)
    return r.route(head, authority, RequestRecord(Direction.OUTBOUND, 0.0, "127.0.0.1:5000"))


def header(decision: Decision, name: bytes) -> list[bytes]:
    return [v for n, v in decision.head.headers if n == name]


def test_route_level_set_wins_over_destination_level_set() -> None:
    r = router(
        """\
        - headers:
            request: {set: {x-who: route}}
            response: {set: {x-who: route}}
          route:
          - destination: {host: reviews}
            headers:
              request: {set: {x-who: destination}}
              response: {set: {x-who: destination}}
        """
    )
    d = decide(r, x_who="client")
    assert header(d, b"x-who") == [b"route"]
    applied = d.response_ops.apply([(b"x-who", b"app")])
    assert [v for n, v in applied if n == b"x-who"] == [b"route"]


@pytest.mark.parametrize(
    ("http", "target", "upstream_target"),
    [
        (
            "- match: [{uri: {prefix: /ratings}}]\n  rewrite: {uri: /v1/bookRatings}",
            "/ratingsXYZ?a=1",
            "/v1/bookRatingsXYZ?a=1",
        ),
        (
            "- match: [{uri: {exact: /old}}]\n  rewrite: {uri: /new}",
            "/old?q",
            "/new?q",
        ),
        (
            "- match: [{uri: {prefix: /API}, ignoreUriCase: true}]\n  rewrite: {uri: /v2}",
            "/api/x",
            "/v2/x",
        ),
        (
            "- match: [{uri: {prefix: /s}}]\n"
            "  rewrite: {uriRegexRewrite: {match: '^/s/([^/]+)/(.*)$', rewrite: '/\\2/\\1'}}",
            "/s/foo/bar/baz?z=1",
            "/bar/baz/foo?z=1",
        ),
    ],
    ids=["prefix", "exact", "ignore-case-prefix", "regex"],
)
def test_rewrite_decisions(http: str, target: str, upstream_target: str) -> None:
    r = router(http + "\n  route: [{destination: {host: reviews}}]\n")
    d = decide(r, target)
    assert d.head.target.decode() == upstream_target
    assert header(d, b"x-envoy-original-path") == [target.encode()]


def test_rewrite_compiles_uri_regex_and_authority() -> None:
    route = only_route(
        """\
        - rewrite:
            authority: ratings.internal
            uriRegexRewrite: {match: '^/x/(.*)$', rewrite: '/y/\\1'}
          route: [{destination: {host: reviews}}]
        """
    )
    assert route.rewrite is not None
    assert route.rewrite.uri is None
    assert route.rewrite.authority == "ratings.internal"
    assert route.rewrite.regex is not None and route.rewrite.regex.pattern == "^/x/(.*)$"
    assert route.rewrite.regex_substitution == "/y/\\1"
    d = decide(
        router(
            "- rewrite: {authority: ratings.internal}\n  route: [{destination: {host: reviews}}]"
        )
    )
    assert header(d, b"host") == [b"ratings.internal"]
    assert header(d, b"x-envoy-original-path") == []  # path unchanged: no header


# --------------------------------------------------------------------------------------------
# fault


def test_fault_percentages_compile() -> None:
    unset = only_route(
        """\
        - fault: {delay: {fixedDelay: 7s}, abort: {httpStatus: 500}}
          route: [{destination: {host: reviews}}]
        """
    ).fault
    assert unset is not None
    assert (unset.delay, unset.delay_percent) == (7.0, 0.0)  # percentage unset: no fault
    assert (unset.abort_status, unset.abort_percent) == (500, 0.0)
    full = only_route(
        """\
        - fault:
            delay: {fixedDelay: 200ms, percentage: {value: 100}}
            abort: {httpStatus: 503, percentage: {value: 12.5}}
          route: [{destination: {host: reviews}}]
        """
    ).fault
    assert full is not None
    assert (full.delay, full.delay_percent) == (0.2, 100.0)
    assert (full.abort_status, full.abort_percent) == (503, 12.5)
    legacy = only_route(
        "- fault: {delay: {fixedDelay: 1s, percent: 40}}\n  route: [{destination: {host: reviews}}]"
    ).fault
    assert legacy is not None and legacy.delay_percent == 40.0
    assert only_route("- route: [{destination: {host: reviews}}]").fault is None


def test_fault_without_percentage_never_fires() -> None:
    r = router(
        """\
        - fault: {delay: {fixedDelay: 7s}, abort: {httpStatus: 500}}
          route: [{destination: {host: reviews}}]
        """
    )
    for _ in range(500):
        assert decide(r).delay is None


@pytest.mark.parametrize("percent", [0, 25, 50, 100])
def test_fault_abort_fires_for_its_share(percent: int) -> None:
    r = router(
        f"""\
        - fault: {{abort: {{httpStatus: 503, percentage: {{value: {percent}}}}}}}
          route: [{{destination: {{host: reviews}}}}]
        """
    )
    n = 4000
    aborted = 0
    for _ in range(n):
        try:
            decide(r)
        except DirectReply as reply:
            assert (reply.status_hint, reply.flag, reply.body) == (503, "FI", b"fault filter abort")
            aborted += 1
    assert abs(aborted / n - percent / 100) < 0.03


def test_fault_delay_decision_and_flag() -> None:
    r = router(
        """\
        - fault: {delay: {fixedDelay: 150ms, percentage: {value: 100}}}
          route: [{destination: {host: reviews}}]
        """
    )
    record = RequestRecord(Direction.OUTBOUND, 0.0, "127.0.0.1:1")
    head = RequestHead(method=b"GET", target=b"/", headers=[(b"host", b"reviews")])
    d = r.route(head, "reviews", record)
    assert d.delay == 0.15
    assert record.flags == ["DI"]


# --------------------------------------------------------------------------------------------
# mirrors


@pytest.mark.parametrize(
    ("fields", "percent"),
    [
        ("mirror: {host: mirror}", 100.0),  # mirrorPercentage absent: 100%
        ("mirror: {host: mirror}\n  mirrorPercentage: {value: 0}", 0.0),  # explicit 0: none
        ("mirror: {host: mirror}\n  mirrorPercentage: {value: 12.5}", 12.5),
        ("mirrors: [{destination: {host: mirror}}]", 100.0),
        ("mirrors: [{destination: {host: mirror}, percentage: {value: 0}}]", 0.0),
        ("mirrors: [{destination: {host: mirror}, percentage: {value: 30}}]", 30.0),
    ],
    ids=["absent", "zero", "fraction", "list-absent", "list-zero", "list-30"],
)
def test_mirror_percentages_compile(fields: str, percent: float) -> None:
    route = only_route(f"- route: [{{destination: {{host: reviews}}}}]\n  {fields}\n")
    (mirror,) = route.mirrors
    assert mirror.percent == percent
    assert mirror.service == "mirror.default.svc.cluster.local"


def test_mirror_and_mirrors_together() -> None:
    route = only_route(
        """\
        - route: [{destination: {host: reviews}}]
          mirror: {host: mirror}
          mirrors:
          - {destination: {host: mirror-b}, percentage: {value: 50}}
        """
    )
    assert [(m.service.split(".")[0], m.percent) for m in route.mirrors] == [
        ("mirror", 100.0),
        ("mirror-b", 50.0),
    ]


@pytest.mark.parametrize("percent", [0, 25, 100])
def test_mirror_decisions_follow_the_percentage(percent: int) -> None:
    r = router(
        f"""\
        - route: [{{destination: {{host: reviews}}}}]
          mirror: {{host: mirror}}
          mirrorPercentage: {{value: {percent}}}
        """
    )
    n = 4000
    mirrored = 0
    for _ in range(n):
        d = decide(r, "/m", authority="reviews:9080")
        for cluster, head in d.mirrors:
            mirrored += 1
            assert cluster.service == "mirror.default.svc.cluster.local"
            assert [v for k, v in head.headers if k == b"host"] == [b"reviews-shadow:9080"]
            assert head.target == b"/m"
    assert abs(mirrored / n - percent / 100) < 0.03


@pytest.mark.parametrize(
    ("authority", "shadow"),
    [
        ("reviews", b"reviews-shadow"),
        ("reviews:9080", b"reviews-shadow:9080"),
        (
            "reviews.default.svc.cluster.local:9080",
            b"reviews.default.svc.cluster.local-shadow:9080",
        ),
    ],
)
def test_shadow_host_appends_to_the_host_part(authority: str, shadow: bytes) -> None:
    r = router("- route: [{destination: {host: reviews}}]\n  mirror: {host: mirror}\n")
    (mirror,) = decide(r, authority=authority).mirrors
    assert [v for k, v in mirror[1].headers if k == b"host"] == [shadow]


# --------------------------------------------------------------------------------------------
# CORS, timeout, redirect, directResponse


def test_cors_compiles_as_envoy_sends_it() -> None:
    route = only_route(
        """\
        - corsPolicy:
            allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: ".*\\\\.c\\\\.io"}]
            allowMethods: [GET, POST]
            allowHeaders: [X-A, X-B]
            exposeHeaders: [X-E]
            maxAge: 24h
            allowCredentials: true
          route: [{destination: {host: reviews}}]
        """
    )
    cors = route.cors
    assert cors is not None
    assert (cors.allow_methods, cors.allow_headers, cors.expose_headers) == (
        b"GET,POST",
        b"X-A,X-B",
        b"X-E",
    )
    assert cors.max_age == b"86400"
    assert cors.allow_credentials is True
    assert cors.forward_unmatched is True  # unmatchedPreflights FORWARD is the default
    assert cors.allowed("https://a.example")
    assert cors.allowed("https://b.example")
    assert cors.allowed("https://x.c.io")
    assert not cors.allowed("https://a.example.evil")
    assert not cors.allowed("https://c.io.evil")


def test_cors_unmatched_preflights_ignore() -> None:
    route = only_route(
        """\
        - corsPolicy: {allowOrigins: [{exact: "https://a"}], unmatchedPreflights: IGNORE}
          route: [{destination: {host: reviews}}]
        """
    )
    assert route.cors is not None and route.cors.forward_unmatched is False


def test_timeout_is_none_by_default_and_parsed_when_set() -> None:
    assert only_route("- route: [{destination: {host: reviews}}]").timeout is None
    assert only_route("- timeout: 200ms\n  route: [{destination: {host: reviews}}]").timeout == 0.2
    assert decide(router("- route: [{destination: {host: reviews}}]")).timeout is None
    timed = router("- timeout: 1.5s\n  route: [{destination: {host: reviews}}]")
    assert decide(timed).timeout == 1.5


def test_redirect_and_direct_response_compile() -> None:
    redirect = only_route("- redirect: {uri: /new}")
    assert redirect.kind is ActionKind.REDIRECT
    assert redirect.redirect is not None and redirect.redirect.redirect_code == 301
    text = only_route("- directResponse: {status: 418, body: {string: teapot}}")
    assert (text.kind, text.direct_status, text.direct_body) == (ActionKind.DIRECT, 418, b"teapot")
    raw = base64.b64encode(b"\x00\x01bin").decode()
    binary = only_route(f"- directResponse: {{status: 200, body: {{bytes: '{raw}'}}}}")
    assert binary.direct_body == b"\x00\x01bin"


# --------------------------------------------------------------------------------------------
# hosts


def test_host_lookup_aliases_exact_and_wildcards() -> None:
    t = table(
        vs_doc("- route: [{destination: {host: reviews}}]"),
        vs_doc("- route: [{destination: {host: reviews}}]", name="wild", hosts='["*.example.com"]'),
        vs_doc(
            "- route: [{destination: {host: reviews}}]",
            name="api-wild",
            hosts='["*.api.example.com"]',
        ),
        vs_doc("- route: [{destination: {host: reviews}}]", name="exact", hosts="[x.example.com]"),
    )

    def owner(host: str) -> str | None:
        found = t.lookup(host)
        return found.name if found is not None else None

    for alias in ("reviews", "reviews.default", "reviews.default.svc", REVIEWS):
        assert owner(alias) == "reviews.default"
    assert owner("y.example.com") == "wild.default"
    assert owner("x.example.com") == "exact.default"  # exact beats wildcard
    assert owner("v1.api.example.com") == "api-wild.default"  # the longest suffix wins
    assert owner("example.com") is None  # the wildcard needs a label before the suffix
    assert owner("ratings") is None


def test_second_virtual_service_for_a_host_is_shadowed() -> None:
    t = table(
        vs_doc("- route: [{destination: {host: reviews, subset: v1}}]", name="first"),
        vs_doc("- route: [{destination: {host: reviews, subset: v2}}]", name="second"),
    )
    found = t.lookup("reviews")
    assert found is not None and found.name == "first.default"
    assert t.shadowed == [(REVIEWS, "first.default", "second.default")]


@pytest.mark.parametrize(
    ("gateways", "applies"),
    [
        ("", True),
        ("  gateways: [mesh]\n", True),
        ("  gateways: [mesh, gw]\n", True),
        ("  gateways: [gw]\n", False),
    ],
)
def test_only_mesh_virtual_services_apply_to_a_sidecar(gateways: str, applies: bool) -> None:
    t = table(vs_doc("- route: [{destination: {host: reviews}}]", extra=gateways))
    assert (t.lookup("reviews") is not None) is applies
