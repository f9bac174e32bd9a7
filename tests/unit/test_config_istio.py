"""config/istio.py: Istio semantics across documents, each error located to file, line and path.

The documents here are well-formed; every failure is one of meaning (a dangling host, a subset no
DestinationRule defines, exclusive fields set together, ...). Lines are 1-based.
"""

from __future__ import annotations

import textwrap

import pytest
from config_helpers import BOOT, doc, docs, issues_of, line_of, located, only_issue

from meshproxy.config.istio import fqdn
from meshproxy.config.load import load_texts

SE = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata:
      name: reviews
    spec:
      hosts: [reviews]
      ports:
      - number: 9080
        name: http
        protocol: HTTP
      resolution: STATIC
      endpoints:
      - address: 127.0.0.1
        ports: {http: 9080}
        labels: {version: v1}
      - address: 127.0.0.2
        ports: {http: 9080}
        labels: {version: v2}
    """
)

DR = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata:
      name: reviews
    spec:
      host: reviews
      subsets:
      - name: v1
        labels: {version: v1}
      - name: v2
        labels: {version: v2}
    """
)

BASE = docs(BOOT, SE, DR)


def with_base(*parts: str) -> str:
    return docs(BASE, *parts)


def vs_with(http: str, *, name: str = "reviews", namespace: str = "") -> str:
    """A VirtualService for host reviews whose ``http:`` list is ``http`` (unindented YAML)."""
    meta = f"metadata: {{name: {name}" + (f", namespace: {namespace}}}" if namespace else "}")
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        f"{meta}\n"
        "spec:\n"
        "  hosts: [reviews]\n"
        "  http:\n" + textwrap.indent(doc(http).rstrip("\n") + "\n", "  ")
    )


def test_base_config_is_valid() -> None:
    config = load_texts(
        [("m.yaml", with_base(vs_with("- route:\n  - destination: {host: reviews}")))]
    )
    assert len(config.virtual_services) == 1


# ---------------------------------------------------------------------------------------------
# The issue's own example, byte for byte

MESH_YAML = (
    "apiVersion: networking.istio.io/v1\n"  # 1
    "kind: VirtualService\n"  # 2
    "metadata:\n"  # 3
    "  name: reviews\n"  # 4
    "  namespace: default\n"  # 5
    "spec:\n"  # 6
    "  hosts:\n"  # 7
    "  - reviews\n"  # 8
    "  http:\n"  # 9
    "  - name: canary\n"  # 10
    "    route:\n"  # 11
    "    - destination:\n"  # 12
    "        host: reviews\n"  # 13
    "        subset: v9\n"  # 14
    "---\n" + BASE
)


def test_undefined_subset_message_matches_the_issue() -> None:
    issue = only_issue(("mesh.yaml", MESH_YAML))
    assert str(issue) == (
        "mesh.yaml:14: VirtualService reviews: spec.http[0].route[0].destination.subset: "
        'subset "v9" is not defined for host reviews'
    )


def test_subset_of_another_hosts_rule_is_not_enough() -> None:
    ratings = SE.replace("reviews", "ratings").replace("127.0.0", "127.0.1")
    ratings_dr = DR.replace("reviews", "ratings").replace("name: v2", "name: v3")
    vs = vs_with("- route:\n  - destination: {host: reviews, subset: v3}")
    text = docs(BASE, ratings, ratings_dr, vs)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "subset: v3}"),
        "VirtualService reviews",
        "spec.http[0].route[0].destination.subset",
    )
    assert issue.message == 'subset "v3" is not defined for host reviews'


def test_subset_defined_through_a_fully_qualified_rule_host() -> None:
    dr = DR.replace("host: reviews", "host: reviews.default.svc.cluster.local").replace(
        "name: reviews", "name: reviews-fq"
    )
    vs = vs_with("- route:\n  - destination: {host: reviews, subset: v1}")
    config = load_texts([("m.yaml", docs(BOOT, SE, dr, vs))])
    assert config.virtual_services[0].spec.http[0].route[0].destination.subset == "v1"


# ---------------------------------------------------------------------------------------------
# Names and hosts


def test_duplicate_name_across_files_names_the_first_definition() -> None:
    first = docs(BOOT, SE)
    second = SE.replace("hosts: [reviews]", "hosts: [reviews-copy]")
    found = issues_of(("a.yaml", first), ("b.yaml", second))
    assert [located(i) for i in found] == [
        ("b.yaml", line_of(second, "name: reviews"), "ServiceEntry reviews", "metadata.name")
    ]
    assert found[0].message == (
        f"duplicate ServiceEntry 'reviews' (first defined at a.yaml:{line_of(first, 'name: reviews')})"
    )


def test_same_name_in_another_namespace_or_kind_is_not_a_duplicate() -> None:
    other_ns = SE.replace("name: reviews\n", "name: reviews\n  namespace: other\n").replace(
        "hosts: [reviews]", "hosts: [reviews.other.svc.cluster.local]"
    )
    config = load_texts([("a.yaml", with_base(other_ns))])
    assert [se.metadata.namespace for se in config.service_entries] == ["default", "other"]
    assert config.destination_rules[0].metadata.name == "reviews"  # same name, other kind


def test_duplicate_virtual_service_in_the_same_file() -> None:
    vs = vs_with("- route:\n  - destination: {host: reviews}")
    text = with_base(vs, vs)
    found = issues_of(("m.yaml", text))
    starts = [i for i, line in enumerate(text.splitlines(), 1) if line == "kind: VirtualService"]
    assert [located(i) for i in found] == [
        ("m.yaml", starts[1] + 1, "VirtualService reviews", "metadata.name")
    ]
    assert (
        found[0].message
        == f"duplicate VirtualService 'reviews' (first defined at m.yaml:{starts[0] + 1})"
    )


def test_dangling_destination_host() -> None:
    text = with_base(vs_with("- route:\n  - destination:\n      host: ratings"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "host: ratings"),
        "VirtualService reviews",
        "spec.http[0].route[0].destination.host",
    )
    assert issue.message == "host 'ratings' is not defined by any ServiceEntry"


def test_short_host_resolves_in_the_virtual_services_own_namespace() -> None:
    # reviews in namespace "other" is reviews.other.svc.cluster.local: not the ServiceEntry's host.
    text = with_base(
        vs_with("- route:\n  - destination: {host: reviews}", name="r2", namespace="other")
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "destination: {host: reviews}"),
        "VirtualService r2",
        "spec.http[0].route[0].destination.host",
    )


def test_fully_qualified_and_wildcard_hosts_resolve() -> None:
    wildcard = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: external}
        spec:
          hosts: ["*.example.com"]
          ports: [{number: 443, name: tls, protocol: TLS}]
          resolution: NONE
        """
    )
    vs = vs_with(
        """
        - route:
          - destination: {host: reviews.default.svc.cluster.local}
            weight: 50
          - destination: {host: api.example.com}
            weight: 50
        """
    )
    config = load_texts([("m.yaml", with_base(wildcard, vs))])
    assert len(config.service_entries) == 2


def test_dangling_mirror_host() -> None:
    text = with_base(
        vs_with("- route:\n  - destination: {host: reviews}\n  mirror: {host: shadow}")
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "mirror:"),
        "VirtualService reviews",
        "spec.http[0].mirror.host",
    )
    assert issue.message == "host 'shadow' is not defined by any ServiceEntry"


def test_destination_port_not_a_port_of_the_service() -> None:
    text = with_base(
        vs_with("- route:\n  - destination:\n      host: reviews\n      port: {number: 8080}")
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "port: {number: 8080}"),
        "VirtualService reviews",
        "spec.http[0].route[0].destination.port.number",
    )
    assert issue.message == "port 8080 is not a port of reviews"


def test_destination_rule_for_an_undefined_host() -> None:
    dr = DR.replace("name: reviews", "name: ratings").replace("host: reviews", "host: ratings")
    text = with_base(dr)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "host: ratings"),
        "DestinationRule ratings",
        "spec.host",
    )
    assert issue.message == "host 'ratings' is not defined by any ServiceEntry"


def test_duplicate_subset_name() -> None:
    dr = DR.replace("name: v2", "name: v1")
    text = docs(BOOT, SE, dr)
    issue = only_issue(("m.yaml", text))
    lines = [i for i, line in enumerate(text.splitlines(), 1) if line == "  - name: v1"]
    assert located(issue) == ("m.yaml", lines[1], "DestinationRule reviews", "spec.subsets[1].name")


# ---------------------------------------------------------------------------------------------
# Matches


def test_string_match_with_two_kinds() -> None:
    text = with_base(
        vs_with(
            """
            - match:
              - uri: {exact: /a, prefix: /b}
              route:
              - destination: {host: reviews}
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "uri: {exact: /a"),
        "VirtualService reviews",
        "spec.http[0].match[0].uri",
    )
    assert issue.message == "set only one of exact, prefix and regex"


def test_string_match_with_all_three_kinds_in_a_header() -> None:
    text = with_base(
        vs_with(
            """
            - match:
              - headers:
                  end-user: {exact: a, prefix: b, regex: c}
              route:
              - destination: {host: reviews}
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "end-user:"),
        "VirtualService reviews",
        'spec.http[0].match[0].headers["end-user"]',
    )
    assert issue.message == "set only one of exact, prefix and regex"


def test_invalid_regex() -> None:
    text = with_base(
        vs_with(
            """
            - match:
              - uri:
                  regex: "/api/(v1"
              route:
              - destination: {host: reviews}
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "regex:"),
        "VirtualService reviews",
        "spec.http[0].match[0].uri.regex",
    )
    assert issue.message.startswith("invalid regex '/api/(v1': ")


def test_invalid_regex_in_cors_origin() -> None:
    text = with_base(
        vs_with(
            """
            - route:
              - destination: {host: reviews}
              corsPolicy:
                allowOrigins:
                - regex: "*.example.com"
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "- regex:"),
        "VirtualService reviews",
        "spec.http[0].corsPolicy.allowOrigins[0].regex",
    )


@pytest.mark.parametrize("group", ["headers", "withoutHeaders"])
def test_uppercase_header_match_key(group: str) -> None:
    text = with_base(
        vs_with(
            f"""
            - match:
              - {group}:
                  x-ok: {{exact: a}}
                  X-User: {{exact: b}}
              route:
              - destination: {{host: reviews}}
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    # Same path form and line as the loader's own errors for this key.
    assert located(issue) == (
        "m.yaml",
        line_of(text, "X-User:"),
        "VirtualService reviews",
        f'spec.http[0].match[0].{group}["X-User"]',
    )
    assert issue.message == "header name 'X-User' must be lower case"


def test_uppercase_query_param_is_allowed() -> None:
    text = with_base(
        vs_with(
            """
            - match:
              - queryParams:
                  UserId: {exact: "7"}
              route:
              - destination: {host: reviews}
            """
        )
    )
    config = load_texts([("m.yaml", text)])
    assert "UserId" in config.virtual_services[0].spec.http[0].match[0].query_params


# ---------------------------------------------------------------------------------------------
# Routes and weights


def test_all_zero_weights() -> None:
    text = with_base(
        vs_with(
            """
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 0
              - destination: {host: reviews, subset: v2}
                weight: 0
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "subset: v1}"),
        "VirtualService reviews",
        "spec.http[0].route",
    )
    assert issue.message == "all weights are zero"


def test_one_nonzero_weight_is_enough() -> None:
    text = with_base(
        vs_with(
            """
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 0
              - destination: {host: reviews, subset: v2}
                weight: 100
            """
        )
    )
    assert load_texts([("m.yaml", text)]).virtual_services[0].spec.http[0].route[1].weight == 100


def test_negative_weight() -> None:
    text = with_base(
        vs_with(
            """
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 110
              - destination: {host: reviews, subset: v2}
                weight: -10
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "weight: -10"),
        "VirtualService reviews",
        "spec.http[0].route[1].weight",
    )
    assert issue.message == "must not be negative"


def test_redirect_and_route_together() -> None:
    text = with_base(
        vs_with(
            """
            - name: both
              redirect: {uri: /new}
              route:
              - destination: {host: reviews}
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "- name: both"),
        "VirtualService reviews",
        "spec.http[0]",
    )
    assert issue.message == "route, redirect, directResponse and delegate are exclusive"


def test_route_with_no_action() -> None:
    text = with_base(
        vs_with(
            """
            - route:
              - destination: {host: reviews}
            - name: nothing
              match:
              - uri: {prefix: /x}
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "- name: nothing"),
        "VirtualService reviews",
        "spec.http[1]",
    )
    assert issue.message == "one of route, redirect, directResponse or delegate is required"


@pytest.mark.parametrize("code", [200, 304, 399, 500])
def test_bad_redirect_code(code: int) -> None:
    text = with_base(vs_with(f"- redirect:\n    uri: /new\n    redirectCode: {code}"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "redirectCode"),
        "VirtualService reviews",
        "spec.http[0].redirect.redirectCode",
    )
    assert issue.message == f"invalid redirect code {code}"


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_good_redirect_codes(code: int) -> None:
    text = with_base(vs_with(f"- redirect: {{uri: /new, redirectCode: {code}}}"))
    redirect = load_texts([("m.yaml", text)]).virtual_services[0].spec.http[0].redirect
    assert redirect is not None and redirect.redirect_code == code


@pytest.mark.parametrize("status", [100, 199, 600, 0])
def test_direct_response_status_out_of_range(status: int) -> None:
    text = with_base(vs_with(f"- directResponse:\n    status: {status}"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "status:"),
        "VirtualService reviews",
        "spec.http[0].directResponse.status",
    )
    assert issue.message == "must be an HTTP status 200..599"


@pytest.mark.parametrize("kind", ["delay", "abort"])
def test_fault_percentage_over_100(kind: str) -> None:
    action = "fixedDelay: 1s" if kind == "delay" else "httpStatus: 503"
    text = with_base(
        vs_with(
            f"""
            - route:
              - destination: {{host: reviews}}
              fault:
                {kind}:
                  {action}
                  percentage:
                    value: 100.5
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "value: 100.5"),
        "VirtualService reviews",
        f"spec.http[0].fault.{kind}.percentage.value",
    )
    assert issue.message == "must be 0..100"


def test_fault_percentage_of_exactly_100_is_valid() -> None:
    text = with_base(
        vs_with(
            """
            - route:
              - destination: {host: reviews}
              fault:
                abort: {httpStatus: 503, percentage: {value: 100}}
            """
        )
    )
    load_texts([("m.yaml", text)])


# ---------------------------------------------------------------------------------------------
# ServiceEntry


def test_service_entry_duplicate_port_number() -> None:
    se = SE.replace(
        "    protocol: HTTP\n", "    protocol: HTTP\n  - number: 9080\n    name: http-alt\n"
    )
    text = docs(BOOT, se)
    issue = only_issue(("m.yaml", text))
    line = line_of(text, "  - number: 9080\n    name: http-alt")
    assert located(issue) == ("m.yaml", line, "ServiceEntry reviews", "spec.ports[1].number")
    assert issue.message == "duplicate port 9080"


def test_service_entry_duplicate_port_name() -> None:
    se = SE.replace(
        "    protocol: HTTP\n", "    protocol: HTTP\n  - number: 9081\n    name: http\n"
    )
    text = docs(BOOT, se)
    issue = only_issue(("m.yaml", text))
    line = line_of(text, "  - number: 9081\n    name: http\n") + 1
    assert located(issue) == ("m.yaml", line, "ServiceEntry reviews", "spec.ports[1].name")
    assert issue.message == "duplicate port name 'http'"


@pytest.mark.parametrize(
    ("port_name", "path"),
    [("web", "spec.endpoints[1].ports.web"), ("grpc-web", 'spec.endpoints[1].ports["grpc-web"]')],
)
def test_endpoint_port_name_not_in_spec_ports(port_name: str, path: str) -> None:
    se = SE.replace(
        "  - address: 127.0.0.2\n    ports: {http: 9080}",
        f"  - address: 127.0.0.2\n    ports: {{{port_name}: 9080}}",
    )
    text = docs(BOOT, se)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, f"{{{port_name}: 9080}}"),
        "ServiceEntry reviews",
        path,
    )
    assert issue.message == f"port name {port_name!r} is not one of spec.ports"


@pytest.mark.parametrize("number", [0, 65536])
def test_service_entry_port_out_of_range(number: int) -> None:
    se = SE.replace("  - number: 9080\n", f"  - number: {number}\n")
    text = docs(BOOT, se.replace("ports: {http: 9080}", "ports: {}"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, f"number: {number}"),
        "ServiceEntry reviews",
        "spec.ports[0].number",
    )
    assert issue.message == f"invalid port {number}"


def test_static_endpoint_with_a_hostname() -> None:
    se = SE.replace("address: 127.0.0.2", "address: reviews-2.example.com")
    text = docs(BOOT, se)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "reviews-2.example.com"),
        "ServiceEntry reviews",
        "spec.endpoints[1].address",
    )
    assert issue.message == (
        "'reviews-2.example.com' is not an IP address (resolution STATIC; use DNS for names)"
    )


def test_dns_endpoint_with_a_hostname_is_valid() -> None:
    se = SE.replace("address: 127.0.0.2", "address: reviews-2.example.com").replace(
        "resolution: STATIC", "resolution: DNS"
    )
    config = load_texts([("m.yaml", docs(BOOT, se))])
    assert config.service_entries[0].spec.endpoints[1].address == "reviews-2.example.com"


def test_static_endpoint_may_be_ipv6() -> None:
    se = SE.replace("address: 127.0.0.2", 'address: "::1"')
    load_texts([("m.yaml", docs(BOOT, se))])


def test_static_with_no_endpoints_is_valid() -> None:
    # Istio accepts it (endpoints may be added later); the proxy answers 503 UH until then.
    se = SE[: SE.index("  endpoints:")]
    config = load_texts([("m.yaml", docs(BOOT, se))])
    assert config.service_entries[0].spec.endpoints == ()


def test_wildcard_host_with_static_resolution() -> None:
    se = SE.replace("hosts: [reviews]", 'hosts: ["*.example.com"]')
    text = docs(BOOT, se)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "resolution: STATIC"),
        "ServiceEntry reviews",
        "spec.resolution",
    )
    assert issue.message == "wildcard hosts need resolution NONE or DNS"


def test_host_defined_by_two_service_entries() -> None:
    other = SE.replace("name: reviews", "name: reviews-2").replace(
        "hosts: [reviews]", "hosts: [reviews.default.svc.cluster.local]"
    )
    text = docs(BOOT, SE, other)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "hosts: [reviews.default"),
        "ServiceEntry reviews-2",
        "spec.hosts[0]",
    )
    assert issue.message == (
        "host 'reviews.default.svc.cluster.local' is already defined by ServiceEntry reviews"
    )


# ---------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_empty_service_account() -> None:
    text = BOOT.replace("serviceAccount: app", 'serviceAccount: ""')
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "serviceAccount"),
        "MeshProxy app-v1",
        "spec.serviceAccount",
    )
    assert issue.message == "must not be empty"


def test_bootstrap_without_any_listener() -> None:
    text = BOOT.replace("  outbound: {address: 127.0.0.1:0}\n", "")
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "serviceAccount"),
        "MeshProxy app-v1",
        "spec",
    )
    assert issue.message == "define at least one of outbound and inbound"


def test_bootstrap_with_only_inbound_is_valid() -> None:
    text = BOOT.replace(
        "  outbound: {address: 127.0.0.1:0}\n",
        "  inbound: {address: 127.0.0.1:0, app: 127.0.0.1:8080}\n",
    )
    config = load_texts([("boot.yaml", text)])
    assert config.bootstrap.spec.outbound is None


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        (
            "  admin: 127.0.0.1:15000\n  outbound: {address: 127.0.0.1:15000}\n",
            "spec.outbound.address",
            "address 127.0.0.1:15000 is already used by spec.admin",
        ),
        (
            "  admin: 127.0.0.1:15000\n"
            "  outbound: {address: 127.0.0.1:15001}\n"
            "  inbound: {address: 127.0.0.1:15001, app: 127.0.0.1:8080}\n",
            "spec.inbound.address",
            "address 127.0.0.1:15001 is already used by spec.outbound.address",
        ),
    ],
)
def test_bootstrap_address_used_twice(spec: str, path: str, message: str) -> None:
    text = BOOT.replace("  admin: 127.0.0.1:0\n  outbound: {address: 127.0.0.1:0}\n", spec)
    issue = only_issue(("boot.yaml", text))
    listener = path.split(".")[1]
    line = line_of(text, f"  {listener}:")
    assert located(issue) == ("boot.yaml", line, "MeshProxy app-v1", path)
    assert issue.message == message


def test_bootstrap_port_zero_may_repeat() -> None:
    text = BOOT.replace(
        "  outbound: {address: 127.0.0.1:0}\n",
        "  outbound: {address: 127.0.0.1:0}\n  inbound: {address: 127.0.0.1:0, app: 127.0.0.1:80}\n",
    )
    load_texts([("boot.yaml", text)])


# ---------------------------------------------------------------------------------------------
# Every semantic error is reported, sorted by file and line


def test_every_semantic_error_across_files_is_reported_in_order() -> None:
    a = docs(BOOT, SE.replace("address: 127.0.0.2", "address: db.example.com"))
    b = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: ratings}
        spec:
          host: ratings
        """
    )
    c = docs(
        DR,
        vs_with(
            """
            - route:
              - destination: {host: reviews, subset: v9}
            - directResponse: {status: 700}
            """
        ),
    )
    found = issues_of(("c.yaml", c), ("a.yaml", a), ("b.yaml", b))
    assert [(i.file, i.line, i.path) for i in found] == [
        ("a.yaml", line_of(a, "db.example.com"), "spec.endpoints[1].address"),
        ("b.yaml", line_of(b, "host: ratings"), "spec.host"),
        ("c.yaml", line_of(c, "subset: v9"), "spec.http[0].route[0].destination.subset"),
        ("c.yaml", line_of(c, "status: 700"), "spec.http[1].directResponse.status"),
    ]


# ---------------------------------------------------------------------------------------------
# fqdn


@pytest.mark.parametrize(
    ("host", "namespace", "expected"),
    [
        ("reviews", "default", "reviews.default.svc.cluster.local"),
        ("reviews", "bookinfo", "reviews.bookinfo.svc.cluster.local"),
        ("Reviews", "default", "reviews.default.svc.cluster.local"),
        ("reviews.bookinfo", "default", "reviews.bookinfo"),
        ("reviews.bookinfo.svc.cluster.local", "x", "reviews.bookinfo.svc.cluster.local"),
        ("api.example.com", "default", "api.example.com"),
        ("*", "default", "*"),
        ("*.example.com", "default", "*.example.com"),
        ("10.0.0.1", "default", "10.0.0.1"),
        # Istio's ResolveShortnameToFQDN leaves IP addresses alone; an IPv6 one has no dot.
        ("::1", "default", "::1"),
        ("2001:db8::1", "default", "2001:db8::1"),
    ],
)
def test_fqdn(host: str, namespace: str, expected: str) -> None:
    assert fqdn(host, namespace) == expected


def test_lookaround_regex_is_rejected_with_its_location() -> None:
    text = with_base(
        vs_with(
            """
            - match:
              - headers:
                  end-user:
                    regex: "(?!jason).*"
              route:
              - destination: {host: reviews}
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "regex:"),
        "VirtualService reviews",
        'spec.http[0].match[0].headers["end-user"].regex',
    )
    assert "RE2 does not support" in issue.message


@pytest.mark.parametrize(
    "pattern",
    [r"(a)\1", r"(?=a)b", r"(?!a)b", r"(?<=a)b", r"(?<!a)b", r"(?P<n>a)(?P=n)"],
)
def test_regex_features_re2_lacks_are_rejected_at_validation(pattern: str) -> None:
    from meshproxy.config.istio import re2_problem

    assert re2_problem(pattern) is not None
    assert re2_problem(r"^/api/v[0-9]+/(\w+)$") is None


def test_unknown_retry_condition_is_rejected() -> None:
    text = with_base(
        vs_with(
            """
            - route:
              - destination: {host: reviews}
              retries:
                attempts: 2
                retryOn: "5xx,503,connect-failures"
            """
        )
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "retryOn:"),
        "VirtualService reviews",
        "spec.http[0].retries.retryOn",
    )
    assert "'connect-failures'" in issue.message
