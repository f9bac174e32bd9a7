"""Host table and clusters (core/routing.py) and the route step over it (layers/route.py).

Configs go through the real loader (``load_texts``), so these tests read the YAML an operator
writes. Sidecar name resolution follows reference §1.7: `reviews`, `reviews.default`,
`reviews.default.svc` and the FQDN all mean the same service for a caller in `default`.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshproxy.config.load import load_texts
from meshproxy.core.http1 import RequestHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routing import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    PASSTHROUGH_NAME,
    ClusterKind,
    Endpoint,
    HostTable,
    Miss,
    Target,
    cluster_name,
    inbound_cluster,
    passthrough,
    split_authority,
)
from meshproxy.errors import BlackHole, NoRoute
from meshproxy.layers.route import Router

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.prod.svc.cluster.local"


def bootstrap(policy: str) -> str:
    return f"""\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {{name: app-v1, namespace: default}}
spec:
  outbound: {{address: 127.0.0.1:0}}
  outboundTrafficPolicy: {policy}
"""


RESOURCES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, ports: {http: 9081}, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: "fd00::3", ports: {http: 9083}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: prod}
spec:
  hosts: [ratings]
  ports: [{number: 9080, name: http, targetPort: 8080}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.1.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: details}
spec:
  hosts: [details.default.svc.cluster.local]
  ports:
  - {number: 8080, name: admin}
  - {number: 80, name: http}
  resolution: STATIC
  endpoints:
  - {address: 10.0.2.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay}
spec:
  hosts: [pay]
  ports:
  - {number: 8443, name: https}
  - {number: 9000, name: grpc}
  resolution: STATIC
  endpoints:
  - {address: 10.0.3.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: example-wildcard}
spec:
  hosts: ["*.example.com"]
  ports: [{number: 80, name: http}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api-wildcard}
spec:
  hosts: ["*.api.example.com"]
  ports: [{number: 80, name: http}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: www}
spec:
  hosts: [www.example.com]
  ports: [{number: 80, name: http, targetPort: 8080}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: search}
spec:
  hosts: [search.external.io]
  ports: [{number: 443, name: tls}]
  resolution: DNS
  endpoints:
  - {address: a.search.external.io}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 250ms}
      http: {idleTimeout: 30s, maxRequestsPerConnection: 5}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: prod}
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 2s, idleTimeout: 90s}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details}
spec:
  host: details.default.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {idleTimeout: 90s}
      http: {idleTimeout: 15s}
"""


def table(policy: str = "REGISTRY_ONLY") -> HostTable:
    config = load_texts([("mesh.yaml", bootstrap(policy) + "---\n" + RESOURCES)])
    return HostTable(config)


@pytest.fixture(scope="module")
def registry_only() -> HostTable:
    return table("REGISTRY_ONLY")


@pytest.fixture(scope="module")
def allow_any() -> HostTable:
    return table("ALLOW_ANY")


def target(found: Target | Miss) -> Target:
    assert isinstance(found, Target), found
    return found


# ---------------------------------------------------------------------------------------------
# split_authority


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("reviews", ("reviews", None)),
        ("reviews:9080", ("reviews", 9080)),
        ("Reviews.Default:9080", ("reviews.default", 9080)),
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[::1]:80", ("::1", 80)),
        ("[::1]", ("::1", None)),
        ("[FD00::1]:8080", ("fd00::1", 8080)),
        ("host:", ("host", None)),
        ("host:0", ("host", None)),
        ("host:65535", ("host", 65535)),
        ("host:65536", ("host", None)),
        ("host:abc", ("host", None)),
        ("host:+80", ("host", None)),
        ("host: 80", ("host", None)),
        ("[::1]x", ("::1", None)),
        ("", ("", None)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority, None) == expected


def test_split_authority_default_port() -> None:
    assert split_authority("a", 80) == ("a", 80)
    assert split_authority("a:bad", 443) == ("a", 443)
    assert split_authority("[::1]", 80) == ("::1", 80)
    assert split_authority("a:81", 80) == ("a", 81)


@pytest.mark.parametrize(
    "port",
    ["\xb2", "\xb3", "\xb9", "1" * 5000],
    ids=["superscript-2", "superscript-3", "superscript-1", "5000-digits"],
)
def test_split_authority_bad_port_gives_default_never_raises(port: str) -> None:
    # Host headers reach here decoded as latin-1: `Host: a:\xb2` is accepted by h11, and
    # "\xb2".isdigit() is True while int("\xb2") raises; a digit run over 4300 digits makes int()
    # raise too. The docstring: "a missing or bad port gives default_port".
    assert split_authority("a:" + port, 80) == ("a", 80)
    assert split_authority("[::1]:" + port, None) == ("::1", None)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_HOSTNAME = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_PORT = st.integers(min_value=1, max_value=65535)


@settings(max_examples=200, deadline=None)
@given(_HOSTNAME | st.ip_addresses(v=4).map(str), _PORT, st.booleans())
def test_split_authority_round_trips_names(host: str, port: int, upper: bool) -> None:
    shown = host.upper() if upper else host
    assert split_authority(f"{shown}:{port}", None) == (host, port)
    assert split_authority(shown, port) == (host, port)


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=6), _PORT)
def test_split_authority_round_trips_ipv6(ip: ipaddress.IPv6Address, port: int) -> None:
    assert split_authority(f"[{ip}]:{port}", None) == (str(ip), port)
    assert split_authority(f"[{ip.exploded.upper()}]:{port}", None) == (ip.exploded, port)
    assert split_authority(f"[{ip}]", 80) == (str(ip), 80)
    endpoint = Endpoint(address=str(ip), port=port)
    assert split_authority(endpoint.key, None) == (str(ip), port)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40))
@example("a:\xb2")
def test_split_authority_total_on_header_text(authority: str) -> None:
    host, port = split_authority(authority, 80)
    assert host == host.lower()
    assert port is not None
    assert 0 < port < 65536


# ---------------------------------------------------------------------------------------------
# HostTable: name forms, ports, namespaces


@pytest.mark.parametrize(
    "authority",
    [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        REVIEWS,
        "reviews:9080",
        "reviews.default:9080",
        "reviews.default.svc:9080",
        f"{REVIEWS}:9080",
        "REVIEWS.Default.SVC.cluster.local:9080",
    ],
)
def test_same_namespace_name_forms_resolve(registry_only: HostTable, authority: str) -> None:
    found = target(registry_only.resolve(authority))
    assert found.cluster.name == f"outbound|9080||{REVIEWS}"
    assert found.cluster.service == REVIEWS
    assert found.cluster.kind is ClusterKind.SERVICE
    assert found.port == 9080
    assert found.host == authority.lower().rsplit(":9080", 1)[0]


@pytest.mark.parametrize(
    "authority", ["ratings.prod", "ratings.prod.svc", RATINGS, "ratings.prod:9080"]
)
def test_other_namespace_reachable_by_namespaced_forms(
    registry_only: HostTable, authority: str
) -> None:
    found = target(registry_only.resolve(authority))
    assert found.cluster.name == f"outbound|9080||{RATINGS}"


@pytest.mark.parametrize("authority", ["ratings", "ratings:9080", "details.prod"])
def test_other_namespace_short_name_is_not_registered(
    registry_only: HostTable, allow_any: HostTable, authority: str
) -> None:
    assert registry_only.resolve(authority) is Miss.BLACKHOLE
    assert allow_any.resolve(authority) is Miss.PASSTHROUGH


def test_service_declared_by_fqdn_gets_short_aliases(registry_only: HostTable) -> None:
    for authority in ("details", "details.default", "details.default.svc"):
        found = target(registry_only.resolve(authority))
        assert found.cluster.service == "details.default.svc.cluster.local"


@pytest.mark.parametrize(
    ("authority", "port"),
    [
        ("reviews", 9080),  # the only port
        ("details", 80),  # several ports, one of them 80
        ("details:80", 80),
        ("details:8080", 8080),
        ("pay", 8443),  # several ports, none 80: the first
        ("pay:9000", 9000),
    ],
)
def test_port_selection(registry_only: HostTable, authority: str, port: int) -> None:
    found = target(registry_only.resolve(authority))
    assert found.port == port
    assert found.cluster.port == port
    assert found.cluster.name.startswith(f"outbound|{port}||")


@pytest.mark.parametrize("authority", ["reviews:1234", f"{REVIEWS}:80", "pay:80", "details:9080"])
def test_known_host_on_undeclared_port(
    registry_only: HostTable, allow_any: HostTable, authority: str
) -> None:
    assert registry_only.resolve(authority) is Miss.BLACKHOLE
    assert allow_any.resolve(authority) is Miss.PASSTHROUGH


@pytest.mark.parametrize("authority", ["unknown", "unknown:80", "reviews.other", "10.9.9.9:8080"])
def test_unknown_host(registry_only: HostTable, allow_any: HostTable, authority: str) -> None:
    assert registry_only.resolve(authority) is Miss.BLACKHOLE
    assert allow_any.resolve(authority) is Miss.PASSTHROUGH


# ---------------------------------------------------------------------------------------------
# Wildcards


@pytest.mark.parametrize(
    ("authority", "service"),
    [
        ("foo.example.com", "*.example.com"),
        ("FOO.Example.com:80", "*.example.com"),
        ("a.b.example.com", "*.example.com"),
        ("x.api.example.com", "*.api.example.com"),  # the longest suffix wins
        ("y.x.api.example.com:80", "*.api.example.com"),
        ("www.example.com", "www.example.com"),  # exact beats wildcard
        ("api.example.com", "*.example.com"),
    ],
)
def test_wildcards(registry_only: HostTable, authority: str, service: str) -> None:
    found = target(registry_only.resolve(authority))
    assert found.cluster.service == service
    assert found.port == 80


def test_wildcard_clusters_send_to_the_requested_host(registry_only: HostTable) -> None:
    found = target(registry_only.resolve("foo.example.com"))
    assert found.cluster.kind is ClusterKind.ORIGINAL_DST
    assert found.cluster.endpoints == ()
    assert found.host == "foo.example.com"


@pytest.mark.parametrize("authority", ["example.com", "notexample.com", "example.com.evil"])
def test_wildcard_needs_a_label_before_the_suffix(registry_only: HostTable, authority: str) -> None:
    assert registry_only.resolve(authority) is Miss.BLACKHOLE


def test_wildcard_on_undeclared_port(registry_only: HostTable) -> None:
    assert registry_only.resolve("foo.example.com:8080") is Miss.BLACKHOLE


# ---------------------------------------------------------------------------------------------
# Endpoints and DestinationRule settings reaching the Cluster


def test_endpoint_ports_from_ports_map_else_service_port(registry_only: HostTable) -> None:
    cluster = target(registry_only.resolve("reviews")).cluster
    assert [(e.address, e.port) for e in cluster.endpoints] == [
        ("10.0.0.1", 9081),
        ("10.0.0.2", 9080),
        ("fd00::3", 9083),
    ]
    assert dict(cluster.endpoints[0].labels) == {"version": "v1"}
    assert dict(cluster.endpoints[2].labels) == {}
    assert [e.key for e in cluster.endpoints] == [
        "10.0.0.1:9081",
        "10.0.0.2:9080",
        "[fd00::3]:9083",
    ]


def test_endpoint_port_from_target_port(registry_only: HostTable) -> None:
    cluster = target(registry_only.resolve("ratings.prod")).cluster
    assert [(e.address, e.port) for e in cluster.endpoints] == [("10.0.1.1", 8080)]
    assert cluster.port == 9080


def test_dns_service_without_endpoints_is_its_own_endpoint(registry_only: HostTable) -> None:
    cluster = target(registry_only.resolve("www.example.com")).cluster
    assert cluster.kind is ClusterKind.SERVICE
    assert [(e.address, e.port) for e in cluster.endpoints] == [("www.example.com", 8080)]


def test_dns_service_with_endpoints(registry_only: HostTable) -> None:
    cluster = target(registry_only.resolve("search.external.io")).cluster
    assert [(e.address, e.port) for e in cluster.endpoints] == [("a.search.external.io", 443)]


def test_destination_rule_pool_settings_reach_cluster(registry_only: HostTable) -> None:
    cluster = target(registry_only.resolve("reviews")).cluster
    assert cluster.connect_timeout == pytest.approx(0.25)
    assert cluster.idle_timeout == pytest.approx(30.0)
    assert cluster.max_requests_per_connection == 5


def test_destination_rule_in_other_namespace_by_short_host(registry_only: HostTable) -> None:
    cluster = target(registry_only.resolve("ratings.prod")).cluster
    assert cluster.connect_timeout == pytest.approx(2.0)
    assert cluster.idle_timeout == pytest.approx(90.0)  # tcp.idleTimeout
    assert cluster.max_requests_per_connection == 0


def test_http_idle_timeout_beats_tcp_idle_timeout(registry_only: HostTable) -> None:
    for port in (80, 8080):
        cluster = target(registry_only.resolve(f"details:{port}")).cluster
        assert cluster.idle_timeout == pytest.approx(15.0)
        assert cluster.connect_timeout == DEFAULT_CONNECT_TIMEOUT


def test_defaults_without_destination_rule(registry_only: HostTable) -> None:
    cluster = target(registry_only.resolve("pay")).cluster
    assert cluster.connect_timeout == DEFAULT_CONNECT_TIMEOUT == 10.0
    assert cluster.idle_timeout == DEFAULT_IDLE_TIMEOUT == 3600.0
    assert cluster.max_requests_per_connection == 0


def test_every_port_is_a_named_cluster(registry_only: HostTable) -> None:
    names = set(registry_only.clusters)
    assert {
        cluster_name(9080, REVIEWS),
        cluster_name(9080, RATINGS),
        cluster_name(80, "details.default.svc.cluster.local"),
        cluster_name(8080, "details.default.svc.cluster.local"),
        cluster_name(8443, "pay.default.svc.cluster.local"),
        cluster_name(9000, "pay.default.svc.cluster.local"),
        cluster_name(80, "*.example.com"),
        cluster_name(80, "www.example.com"),
    } <= names
    assert cluster_name(9080, REVIEWS, "v1") == f"outbound|9080|v1|{REVIEWS}"
    for name, cluster in registry_only.clusters.items():
        assert cluster.name == name


# ---------------------------------------------------------------------------------------------
# The lookup cache


def test_lookup_cache_is_bounded_and_stays_correct() -> None:
    hosts = table()
    for i in range(10_000):
        assert hosts.resolve(f"h{i}.unknown:{i % 60000 + 1}") is Miss.BLACKHOLE
        assert len(hosts._cache) <= 4096
    found = target(hosts.resolve("reviews"))
    assert found.cluster.service == REVIEWS
    assert hosts.resolve("reviews") is found  # cached: the same object back


def test_lookup_is_case_insensitive_but_cached_per_spelling(registry_only: HostTable) -> None:
    a = target(registry_only.resolve("Reviews:9080"))
    b = target(registry_only.resolve("reviews:9080"))
    assert a.cluster is b.cluster
    assert a.host == b.host == "reviews"


# ---------------------------------------------------------------------------------------------
# The route step


def route_layer(hosts: HostTable) -> Callable[[str], Target]:
    """The route step for hosts without a VirtualService: authority -> target."""
    router = Router(hosts, None, random.Random(0))

    def route(authority: str) -> Target:
        head = RequestHead(
            method=b"GET", target=b"/", headers=[(b"host", authority.encode("latin-1"))]
        )
        record = RequestRecord(Direction.OUTBOUND, 0.0, "127.0.0.1:1")
        return router.route(head, authority, record).target

    return route


def test_route_known_host(registry_only: HostTable) -> None:
    route = route_layer(registry_only)
    found = route("reviews:9080")
    assert found.cluster.name == f"outbound|9080||{REVIEWS}"


def test_route_without_host_is_no_route(registry_only: HostTable) -> None:
    with pytest.raises(NoRoute) as info:
        route_layer(registry_only)("")
    assert info.value.status_hint == 404
    assert info.value.flag == "NR"


@pytest.mark.parametrize("authority", ["unknown", "reviews:1234", "ratings"])
def test_route_registry_only_miss_is_black_hole(registry_only: HostTable, authority: str) -> None:
    with pytest.raises(BlackHole) as info:
        route_layer(registry_only)(authority)
    assert info.value.status_hint == 502
    assert info.value.flag == ""


@pytest.mark.parametrize(
    ("authority", "host", "port"),
    [
        ("example.org", "example.org", 80),
        ("Example.org:8080", "example.org", 8080),
        ("reviews:1234", "reviews", 1234),
        ("[::1]:8080", "::1", 8080),
        ("[::1]", "::1", 80),
        ("10.1.2.3:bad", "10.1.2.3", 80),
    ],
)
def test_route_allow_any_miss_is_passthrough(
    allow_any: HostTable, authority: str, host: str, port: int
) -> None:
    found = route_layer(allow_any)(authority)
    assert found.cluster.name == PASSTHROUGH_NAME
    assert found.cluster.kind is ClusterKind.ORIGINAL_DST
    assert found.cluster.port == port
    assert (found.host, found.port) == (host, port)


def test_route_bad_port_from_header_is_a_passthrough_not_a_crash(allow_any: HostTable) -> None:
    # `Host: example.org:\xb2` passes h11 and reaches the route step as latin-1 text.
    found = route_layer(allow_any)("example.org:\xb2")
    assert (found.host, found.port) == ("example.org", 80)


def test_passthrough_and_inbound_clusters() -> None:
    found = passthrough("svc.ext", 8443, connect_timeout=2.0)
    assert found.cluster.name == PASSTHROUGH_NAME
    assert found.cluster.connect_timeout == 2.0
    assert found.cluster.service == ""
    assert (found.host, found.port) == ("svc.ext", 8443)
    inbound = inbound_cluster(15006, "127.0.0.1", 8080)
    assert inbound.name == "inbound|15006||"
    assert inbound.kind is ClusterKind.INBOUND
    assert [(e.address, e.port) for e in inbound.endpoints] == [("127.0.0.1", 8080)]
