"""The route explainer and the configuration warnings (core/explain.py).

Configs go through the real loader, so every case is the YAML an operator writes. The explainer
must agree with the live route step (``layers/route.py``): one test replays requests through both.
"""

from __future__ import annotations

import json
import random

import pytest

from meshproxy.config.load import load_texts
from meshproxy.config.model import MeshConfig
from meshproxy.core.explain import (
    DEFAULT_RETRY_ON,
    EndpointInfo,
    Explanation,
    Outcome,
    explain_request,
    lint,
    parse_url,
    to_json,
    to_text,
)
from meshproxy.core.http1 import RequestHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import PASSTHROUGH_NAME, HostTable
from meshproxy.errors import BlackHole, DirectReply, NoRoute
from meshproxy.layers.route import Router

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"


def bootstrap(policy: str = "REGISTRY_ONLY") -> str:
    return f"""\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {{name: productpage-v1, namespace: default}}
spec:
  outbound: {{address: 127.0.0.1:0}}
  outboundTrafficPolicy: {policy}
"""


SERVICES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, ports: {http: 9081}, labels: {version: v1}}
  - {address: 10.0.0.2, ports: {http: 9082}, labels: {version: v2, zone: a}}
  - {address: 10.0.0.3, ports: {http: 9083}, labels: {version: v2, zone: b}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.1.1, ports: {http: 9080}, labels: {version: v1}}
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

CANARY = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: test-user
    match:
    - headers: {end-user: {exact: test-user}}
      uri: {prefix: /reviews}
    - queryParams: {canary: {exact: "1"}}
    route:
    - destination: {host: reviews, subset: v2}
  - name: split
    match:
    - uri: {prefix: /api}
    rewrite: {uri: /v1}
    timeout: 3s
    retries: {attempts: 3, retryOn: 5xx, perTryTimeout: 500ms}
    headers:
      request: {set: {x-route: api}, remove: [x-debug]}
      response: {add: {x-served-by: mesh}}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 60
      headers: {request: {set: {x-dest: v1}}}
    - destination: {host: reviews, subset: v2}
      weight: 20
    - destination: {host: reviews, subset: v3}
      weight: 20
    - destination: {host: reviews, subset: v2}
      weight: 0
    mirror: {host: ratings}
    mirrorPercentage: {value: 10}
  - name: fault
    match:
    - method: {exact: DELETE}
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 50}}
      abort: {httpStatus: 503}
    timeout: 1s
    route:
    - destination: {host: reviews, subset: v1}
  - name: moved
    match:
    - uri: {prefix: /old}
    redirect: {uri: /new, authority: "reviews:9080"}
  - name: gone
    match:
    - uri: {exact: /gone}
      name: gone-page
    directResponse: {status: 410, body: {string: "gone for good"}}
  - name: ports
    match:
    - port: 9090
    route:
    - destination: {host: reviews, subset: v1}
  - name: only-get
    match:
    - method: {exact: GET}
    route:
    - destination: {host: reviews, subset: v1}
"""


def load(*docs: str, policy: str = "REGISTRY_ONLY") -> MeshConfig:
    return load_texts([("mesh.yaml", "---\n".join([bootstrap(policy), *docs]))])


def tables(config: MeshConfig) -> tuple[HostTable, RouteTable]:
    hosts = HostTable(config)
    return hosts, RouteTable(config, hosts)


@pytest.fixture(scope="module")
def canary() -> tuple[HostTable, RouteTable]:
    return tables(load(SERVICES, CANARY))


def explain(
    t: tuple[HostTable, RouteTable], url: str, method: str = "GET", **headers: str
) -> Explanation:
    return explain_request(
        t[0],
        t[1],
        method=method,
        url=url,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


# ---------------------------------------------------------------------------------------------
# Which rule, and why not the earlier ones


def test_the_canary_header_selects_the_first_rule(canary: tuple[HostTable, RouteTable]) -> None:
    expl = explain(canary, "http://reviews:9080/reviews/1", end_user="test-user")
    assert expl.outcome is Outcome.FORWARD
    assert expl.virtual_service == "reviews.default"
    assert expl.virtual_service_hosts == (REVIEWS,)
    assert expl.rule is not None
    assert (expl.rule.index, expl.rule.name, expl.rule.matched) == (0, "test-user", True)
    assert expl.rule.blocks[0].failed is None
    assert expl.rule.blocks[0].conditions == (
        "uri prefix '/reviews'",
        "header end-user exact 'test-user'",
    )
    assert [(d.subset, d.share) for d in expl.destinations] == [("v2", 100.0)]


def test_each_earlier_rule_states_the_first_failing_condition_of_each_block(
    canary: tuple[HostTable, RouteTable],
) -> None:
    expl = explain(
        canary, "http://reviews:9080/reviews/1?canary=0", method="POST", end_user="jason"
    )
    assert [(r.index, r.matched) for r in expl.rules] == [
        (0, False),
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (5, False),
        (6, False),
    ]
    first = expl.rules[0]
    # Conditions are checked in order; the uri matches, so the header is the first failure.
    assert [(b.index, b.failed) for b in first.blocks] == [
        (0, "header end-user exact 'test-user'"),
        (1, "query canary exact '1'"),
    ]
    assert expl.rules[1].blocks[0].failed == "uri prefix '/api'"
    assert expl.rules[2].blocks[0].failed == "method exact 'DELETE'"
    assert expl.rules[4].blocks[0].name == "gone-page"
    assert expl.rules[5].blocks[0].failed == "port 9090"
    assert expl.rules[6].blocks[0].failed == "method exact 'GET'"
    text = to_text(expl)
    assert "  http[0] (test-user): no match\n" in text
    assert "    match[0]: header end-user exact 'test-user' did not match\n" in text
    assert "    match[1]: query canary exact '1' did not match\n" in text
    assert "    match[0] (gone-page): uri exact '/gone' did not match\n" in text


def test_no_rule_matching_is_404_nr(canary: tuple[HostTable, RouteTable]) -> None:
    expl = explain(canary, "http://reviews:9080/x", method="PUT")
    assert expl.outcome is Outcome.NO_ROUTE
    assert (expl.status, expl.flag) == (404, "NR")
    assert expl.rule is None
    assert len(expl.rules) == 7 and not any(r.matched for r in expl.rules)
    assert expl.destinations == ()
    assert "no route: 404 NR\n" in to_text(expl)


def test_the_second_block_can_match(canary: tuple[HostTable, RouteTable]) -> None:
    expl = explain(canary, "http://reviews/anything?canary=1")
    assert expl.rule is not None and expl.rule.index == 0
    assert [(b.index, b.failed) for b in expl.rule.blocks] == [
        (0, "uri prefix '/reviews'"),
        (1, None),
    ]
    assert "http[0] (test-user): matched by match[1]: query canary exact '1'" in to_text(expl)


def test_a_host_without_port_uses_the_service_port_and_port_matches_compare_it(
    canary: tuple[HostTable, RouteTable],
) -> None:
    expl = explain(canary, "http://reviews.default.svc.cluster.local/x", method="PATCH")
    assert expl.port == 9080
    assert expl.outcome is Outcome.NO_ROUTE
    expl = explain(canary, "http://reviews:9090/x", method="PATCH")
    assert expl.rule is not None and expl.rule.name == "ports"


def test_a_host_header_overrides_the_url_authority(canary: tuple[HostTable, RouteTable]) -> None:
    expl = explain(canary, "http://127.0.0.1:15001/reviews/1", end_user="test-user", host="reviews")
    assert expl.authority == "reviews"
    assert expl.virtual_service == "reviews.default"
    assert expl.rule is not None and expl.rule.index == 0


def test_header_names_are_case_insensitive(canary: tuple[HostTable, RouteTable]) -> None:
    hosts, routes = canary
    expl = explain_request(
        hosts, routes, method="get", url="reviews/reviews/1", headers={"End-User": "test-user"}
    )
    assert expl.method == "GET"
    assert expl.rule is not None and expl.rule.index == 0


def test_no_host_at_all_is_an_error(canary: tuple[HostTable, RouteTable]) -> None:
    with pytest.raises(ValueError, match="no host"):
        explain(canary, "http:///path")


def test_parse_url() -> None:
    assert parse_url("http://reviews:9080/path?q=1") == ("http", "reviews:9080", "/path?q=1")
    assert parse_url("reviews") == ("http", "reviews", "/")
    assert parse_url("HTTP://user:pw@[::1]:80?x") == ("http", "[::1]:80", "/?x")
    assert parse_url("http://r/a#frag") == ("http", "r", "/a")


# ---------------------------------------------------------------------------------------------
# What the matching rule does


def test_weighted_destinations_with_shares_subset_endpoints_and_modifiers(
    canary: tuple[HostTable, RouteTable],
) -> None:
    expl = explain(canary, "http://reviews:9080/api/items?q=1")
    assert expl.rule is not None and expl.rule.name == "split"
    # Shares are weight / sum of weights; weight 0 receives nothing and is not listed.
    assert [(d.subset, d.weight, d.share) for d in expl.destinations] == [
        ("v1", 60, 60.0),
        ("v2", 20, 20.0),
        ("v3", 20, 20.0),
    ]
    v1, v2, v3 = expl.destinations
    assert v1.cluster == f"outbound|9080|v1|{REVIEWS}"
    assert v1.endpoints == (EndpointInfo(address="10.0.0.1", port=9081, labels={"version": "v1"}),)
    assert [(e.address, e.port, dict(e.labels)) for e in v2.endpoints] == [
        ("10.0.0.2", 9082, {"version": "v2", "zone": "a"}),
        ("10.0.0.3", 9083, {"version": "v2", "zone": "b"}),
    ]
    assert v3.endpoints == ()
    assert v1.lb == "LEAST_REQUEST"
    assert v1.request_headers is not None and dict(v1.request_headers.set) == {"x-dest": "v1"}
    assert v2.request_headers is None
    assert expl.timeout == 3.0
    assert expl.retries is not None
    assert (expl.retries.attempts, expl.retries.retry_on, expl.retries.per_try_timeout) == (
        3,
        "5xx",
        0.5,
    )
    assert not expl.retries.istio_default
    assert expl.fault is None
    assert expl.rewrite is not None
    assert (expl.rewrite.uri, expl.rewrite.path) == ("/v1", "/v1/items?q=1")
    assert expl.request_headers is not None
    assert dict(expl.request_headers.set) == {"x-route": "api"}
    assert expl.request_headers.remove == ("x-debug",)
    assert expl.response_headers is not None
    assert dict(expl.response_headers.add) == {"x-served-by": "mesh"}
    [mirror] = expl.mirrors
    assert (mirror.host, mirror.percent, mirror.shadow_authority) == (
        RATINGS,
        10.0,
        "reviews-shadow:9080",
    )
    assert [e.address for e in mirror.endpoints] == ["10.0.1.1"]

    text = to_text(expl)
    assert "route: http[1] (split) of VirtualService reviews.default\n" in text
    assert f"  60% {REVIEWS} subset v1 port 9080 (weight 60)\n" in text
    assert "      endpoint 10.0.0.2:9082 version=v2,zone=a\n" in text
    assert "      no endpoint: subset v3 selects none; requests here fail with 503 UH\n" in text
    assert "timeout: 3s (the rule's timeout)\n" in text
    assert "retries: 3 on 5xx, per try 500ms\n" in text
    assert "rewrite: uri '/v1', upstream path /v1/items?q=1\n" in text
    assert "request headers: set x-route: api; remove x-debug\n" in text
    assert "response headers: add x-served-by: mesh\n" in text
    assert "mirror: 10% to ratings.default.svc.cluster.local" in text


def test_a_fault_turns_off_timeout_and_retries(canary: tuple[HostTable, RouteTable]) -> None:
    expl = explain(canary, "http://reviews/x", method="DELETE")
    assert expl.rule is not None and expl.rule.name == "fault"
    assert expl.fault is not None
    assert (expl.fault.delay, expl.fault.delay_percent) == (2.0, 50.0)
    # Abort without a percentage never fires (reference §1.7).
    assert (expl.fault.abort_status, expl.fault.abort_percent) == (503, 0.0)
    assert expl.timeout is None
    assert expl.retries is None
    text = to_text(expl)
    assert "fault: delay 2s for 50% (flag DI); abort 503 for no request (flag FI)\n" in text
    assert "retries: none (the rule injects faults)\n" in text


def test_the_timeout_header_overrides_the_route_timeout(
    canary: tuple[HostTable, RouteTable],
) -> None:
    expl = explain(canary, "http://reviews/api", x_envoy_upstream_rq_timeout_ms="250")
    assert expl.timeout == 0.25
    assert "x-envoy-upstream-rq-timeout-ms" in expl.timeout_source


def test_istio_default_retries_when_the_rule_sets_none(
    canary: tuple[HostTable, RouteTable],
) -> None:
    expl = explain(canary, "http://reviews/", method="GET")
    assert expl.rule is not None and expl.rule.name == "only-get"
    assert expl.retries is not None and expl.retries.istio_default
    assert (expl.retries.attempts, expl.retries.retry_on) == (2, DEFAULT_RETRY_ON)
    assert expl.timeout is None


def test_redirect_and_direct_response(canary: tuple[HostTable, RouteTable]) -> None:
    expl = explain(canary, "http://reviews/old/page?x=1")
    assert expl.outcome is Outcome.REDIRECT
    assert (expl.status, expl.redirect_location) == (301, "http://reviews:9080/new?x=1")
    assert expl.destinations == ()
    assert "redirect: 301 to http://reviews:9080/new?x=1 (http[3] (moved)" in to_text(expl)

    expl = explain(canary, "http://reviews/gone")
    assert expl.outcome is Outcome.DIRECT_RESPONSE
    assert (expl.status, expl.direct_body) == (410, "gone for good")
    assert "direct response: 410 body 'gone for good'" in to_text(expl)


# ---------------------------------------------------------------------------------------------
# Hosts without a VirtualService


def test_a_host_without_a_virtual_service_goes_to_its_cluster(
    canary: tuple[HostTable, RouteTable],
) -> None:
    expl = explain(canary, "http://ratings:9080/ratings/1")
    assert expl.outcome is Outcome.SERVICE
    assert expl.virtual_service is None and expl.rules == ()
    [dest] = expl.destinations
    assert (dest.cluster, dest.share, dest.subset) == (f"outbound|9080||{RATINGS}", 100.0, "")
    assert [(e.address, e.port) for e in dest.endpoints] == [("10.0.1.1", 9080)]
    assert "no VirtualService: cluster outbound|9080||ratings" in to_text(expl)


def test_an_unknown_host_is_a_502_blackhole_under_registry_only(
    canary: tuple[HostTable, RouteTable],
) -> None:
    expl = explain(canary, "http://example.com/")
    assert expl.outcome is Outcome.BLACKHOLE
    assert expl.status == 502
    assert expl.destinations == ()
    assert "blackhole (REGISTRY_ONLY): 502\n" in to_text(expl)


def test_an_unknown_host_passes_through_under_allow_any() -> None:
    t = tables(load(SERVICES, policy="ALLOW_ANY"))
    expl = explain(t, "http://example.com/x")
    assert expl.outcome is Outcome.PASSTHROUGH
    [dest] = expl.destinations
    assert (dest.cluster, dest.host, dest.port, dest.original_dst) == (
        PASSTHROUGH_NAME,
        "example.com",
        80,
        True,
    )
    assert "passthrough (ALLOW_ANY): PassthroughCluster to example.com:80\n" in to_text(expl)
    expl = explain(t, "http://example.com:8443/x")
    assert expl.destinations[0].port == 8443


# ---------------------------------------------------------------------------------------------
# JSON, and agreement with the live route step


def test_json_is_plain_data(canary: tuple[HostTable, RouteTable]) -> None:
    data = to_json(explain(canary, "http://reviews:9080/api/items", end_user="x"))
    assert json.loads(json.dumps(data)) == data
    assert data["outcome"] == "forward"
    assert data["rule"] == {
        "label": "http[1] (split)",
        "index": 1,
        "name": "split",
        "matched": True,
        "blocks": [
            {"index": 0, "name": "", "conditions": ["uri prefix '/api'"], "failed": None},
        ],
    }
    destinations = data["destinations"]
    assert isinstance(destinations, list)
    assert destinations[0]["endpoints"] == [
        {"address": "10.0.0.1", "port": 9081, "labels": {"version": "v1"}}
    ]
    assert [d["share"] for d in destinations] == [60.0, 20.0, 20.0]


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/reviews/1", {"end-user": "test-user"}),
        ("GET", "/reviews/1", {"end-user": "jason"}),
        ("GET", "/x?canary=1", {}),
        ("POST", "/api/a", {}),
        ("DELETE", "/x", {}),
        ("GET", "/old", {}),
        ("GET", "/gone", {}),
        ("PUT", "/nothing", {}),
    ],
)
def test_the_explanation_agrees_with_the_live_route_step(
    canary: tuple[HostTable, RouteTable], method: str, target: str, headers: dict[str, str]
) -> None:
    hosts, routes = canary
    expl = explain_request(
        hosts, routes, method=method, url=f"http://reviews:9080{target}", headers=headers
    )
    head = RequestHead(
        method=method.encode(),
        target=target.encode(),
        headers=[(b"host", b"reviews:9080")]
        + [(k.encode(), v.encode()) for k, v in headers.items()],
    )
    record = RequestRecord(Direction.OUTBOUND, 0.0, "127.0.0.1:1")
    router = Router(hosts, routes, random.Random(7))
    try:
        decision = router.route(head, "reviews:9080", record)
    except NoRoute:
        assert expl.outcome is Outcome.NO_ROUTE
        return
    except DirectReply as reply:
        # No fault here fires (abort has no percentage): every local reply is the rule's own.
        assert expl.outcome in (Outcome.REDIRECT, Outcome.DIRECT_RESPONSE)
        assert expl.status == reply.status_hint
        if expl.outcome is Outcome.REDIRECT:
            assert reply.headers == ((b"location", (expl.redirect_location or "").encode()),)
        else:
            assert reply.body.decode() == expl.direct_body
        return
    assert decision.route is not None and expl.rule is not None
    assert decision.route.index == expl.rule.index
    assert decision.target.cluster.name in {d.cluster for d in expl.destinations}
    if expl.rewrite is not None:
        assert decision.head.target.decode() == expl.rewrite.path


def test_blackhole_agrees_with_the_live_route_step(canary: tuple[HostTable, RouteTable]) -> None:
    hosts, routes = canary
    router = Router(hosts, routes, random.Random(7))
    head = RequestHead(method=b"GET", target=b"/", headers=[(b"host", b"example.com")])
    with pytest.raises(BlackHole):
        router.route(head, "example.com", RequestRecord(Direction.OUTBOUND, 0.0, "x"))
    assert explain(canary, "http://example.com/").outcome is Outcome.BLACKHOLE


# ---------------------------------------------------------------------------------------------
# lint


def vs(name: str, http: str, hosts: str = "[reviews]") -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: {hosts}
  http:
{http}"""


def warnings(*docs: str) -> list[str]:
    config = load(SERVICES, *docs)
    hosts, routes = tables(config)
    return lint(config, hosts, routes)


TO_V1 = "    route:\n    - destination: {host: reviews, subset: v1}\n"


def rule(match: str = "", name: str = "") -> str:
    out = f"  - name: {name}\n" if name else "  -\n"
    if match:
        out += "    match:\n" + "".join(f"    - {m}\n" for m in match.split("|"))
    return out + TO_V1


def test_a_clean_config_has_no_warnings() -> None:
    assert warnings(vs("reviews", rule("{headers: {end-user: {exact: a}}}") + rule())) == []


def test_two_virtual_services_for_one_host() -> None:
    out = warnings(
        vs("reviews", rule()),
        vs("reviews-b", rule(), hosts="[ratings, reviews.default.svc.cluster.local]"),
    )
    assert out == [
        f"VirtualService reviews-b.default: spec.hosts[1]: host {REVIEWS} is already claimed by "
        "VirtualService reviews.default; this one is ignored for it"
    ]


def test_a_rule_after_one_without_match_blocks_never_matches() -> None:
    out = warnings(vs("reviews", rule(name="all") + rule("{uri: {prefix: /a}}", name="late")))
    assert out == [
        'VirtualService reviews.default: spec.http[1]: rule "late" can never match: '
        'every request it matches is taken first: match[0] by http[0] "all" (no match conditions)'
    ]


def test_a_rule_whose_blocks_are_all_covered_by_earlier_blocks() -> None:
    http = (
        rule("{uri: {prefix: /api}}|{headers: {end-user: {exact: jason}}}", name="a")
        + rule("{method: {exact: GET}}", name="b")
        + rule(
            "{uri: {prefix: /api/v2}, headers: {x: {}}}"
            "|{headers: {end-user: {exact: jason}, x: {exact: y}}}"
            "|{uri: {exact: /x}, method: {exact: GET}}",
            name="c",
        )
    )
    assert warnings(vs("reviews", http)) == [
        'VirtualService reviews.default: spec.http[2]: rule "c" can never match: every request '
        'it matches is taken first: match[0] by http[0] "a" match[0]; '
        'match[1] by http[0] "a" match[1]; match[2] by http[1] "b" match[0]'
    ]


def test_a_rule_without_blocks_after_an_empty_block() -> None:
    out = warnings(vs("reviews", rule("{name: everything}") + rule()))
    assert out == [
        "VirtualService reviews.default: spec.http[1]: rule can never match: "
        "http[0] match[0] takes every request first"
    ]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        # The later block is looser or different: not shadowed.
        ("{uri: {prefix: /api/v2}}", "{uri: {prefix: /api}}"),
        ("{uri: {exact: /a}}", "{uri: {prefix: /a}}"),
        ("{headers: {u: {exact: a}}}", "{headers: {u: {exact: b}}}"),
        ("{headers: {u: {exact: a}}, method: {exact: GET}}", "{headers: {u: {exact: a}}}"),
        ("{headers: {u: {exact: a}}}", "{queryParams: {u: {exact: a}}}"),
        ("{uri: {regex: '/a.*'}}", "{uri: {prefix: /a}}"),
        ("{uri: {prefix: /A}}", "{uri: {prefix: /A}, ignoreUriCase: true}"),
        ("{withoutHeaders: {u: {exact: a}}}", "{withoutHeaders: {u: {exact: b}}}"),
        ("{withoutHeaders: {u: {prefix: a}}}", "{withoutHeaders: {u: {exact: ab}}}"),
        ("{port: 9080}", "{uri: {prefix: /}}"),
        # sourceLabels select proxies: the earlier block does not apply on every proxy.
        ("{sourceLabels: {app: x}}", "{uri: {prefix: /a}}"),
        ("{sourceNamespace: other}", "{uri: {prefix: /a}}"),
        ("{gateways: [mesh]}", "{gateways: [mesh, edge]}"),
    ],
)
def test_no_warning_unless_certain(earlier: str, later: str) -> None:
    assert warnings(vs("reviews", rule(earlier) + rule(later))) == []


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ("{uri: {prefix: /api}}", "{uri: {exact: /api/x}}"),
        ("{uri: {prefix: /API}, ignoreUriCase: true}", "{uri: {prefix: /api/v1}}"),
        ("{uri: {exact: /A}, ignoreUriCase: true}", "{uri: {exact: /a}, ignoreUriCase: true}"),
        ("{uri: {regex: '/a/[0-9]+'}}", "{uri: {exact: /a/12}}"),
        ("{uri: {regex: '/a/[0-9]+'}}", "{uri: {regex: '/a/[0-9]+'}, method: {exact: GET}}"),
        ("{headers: {u: {}}}", "{headers: {u: {prefix: x}}}"),
        ("{headers: {u: {prefix: ab}}}", "{headers: {u: {prefix: abc}}}"),
        ("{queryParams: {q: {exact: ''}}}", "{queryParams: {q: {exact: ''}}, port: 9080}"),
        ("{withoutHeaders: {u: {exact: ab}}}", "{withoutHeaders: {u: {prefix: a}}}"),
        ("{port: 9080}", "{port: 9080, uri: {prefix: /}}"),
        ("{sourceLabels: {app: x}}", "{sourceLabels: {app: x, v: '1'}}"),
        ("{gateways: [mesh, edge]}", "{gateways: [mesh]}"),
    ],
)
def test_a_warning_when_certain(earlier: str, later: str) -> None:
    [warning] = warnings(vs("reviews", rule(earlier) + rule(later)))
    assert warning.startswith("VirtualService reviews.default: spec.http[1]: rule can never match")


def test_weight_on_a_subset_without_endpoints() -> None:
    http = (
        "  - match: [{uri: {prefix: /a}}]\n"
        "    route:\n"
        "    - destination: {host: reviews, subset: v1}\n"
        "      weight: 75\n"
        "    - destination: {host: reviews, subset: v3}\n"
        "      weight: 25\n"
        "    - destination: {host: reviews, subset: v3}\n"
        "      weight: 0\n"
        "    mirror: {host: reviews, subset: v3}\n"
        "  - route:\n"
        "    - destination: {host: reviews, subset: v3}\n"
    )
    assert warnings(vs("reviews", http)) == [
        "VirtualService reviews.default: spec.http[0].route[1]: subset v3 of "
        f"{REVIEWS} selects no endpoint; its 25% share will fail with 503 UH",
        f"VirtualService reviews.default: spec.http[0].mirror: subset v3 of {REVIEWS} selects "
        "no endpoint; mirrored copies are dropped",
        "VirtualService reviews.default: spec.http[1].route[0]: subset v3 of "
        f"{REVIEWS} selects no endpoint; every request will fail with 503 UH",
    ]
