"""core/authz.py: Istio AuthorizationPolicy semantics, synchronous, table-driven.

Every Source / Operation field and its ``not*`` twin, the value forms (exact, prefix, suffix,
``*``, path templates), ``when`` conditions, the evaluation order (AUDIT, DENY, no-ALLOW, ALLOW),
allow-nothing, and which policies apply to a workload. The request used throughout comes from
``cluster.local/ns/shop/sa/productpage`` at 10.0.0.5 to 10.0.0.9:9080.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import pytest
from config_helpers import doc
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.config.load import load_texts
from meshproxy.config.model import (
    AuthorizationAction,
    AuthorizationOperation,
    AuthorizationPolicy,
    AuthorizationPolicySpec,
    AuthorizationRule,
    AuthorizationSource,
    Condition,
    ExtensionProvider,
    Metadata,
    PolicyTargetReference,
    RuleFrom,
    RuleTo,
    WorkloadSelector,
)
from meshproxy.core.authz import (
    Authorizer,
    AuthzDecision,
    AuthzRequest,
    compile_strings,
)

PRINCIPAL = "cluster.local/ns/shop/sa/productpage"
LABELS = MappingProxyType({"app": "reviews", "version": "v1"})


def request(**overrides: Any) -> AuthzRequest:
    base: dict[str, Any] = {
        "principal": PRINCIPAL,
        "source_ip": "10.0.0.5",
        "destination_port": 9080,
        "destination_ip": "10.0.0.9",
        "host": "reviews.default.svc.cluster.local:9080",
        "method": "GET",
        "path": "/api/v1/items?page=2",
        "headers": ((b"x-user", b"alice"), (b"accept", b"*/*")),
        "sni": "",
    }
    base.update(overrides)
    return AuthzRequest(**base)


def policy(
    name: str = "p",
    *,
    action: AuthorizationAction = AuthorizationAction.ALLOW,
    rules: Sequence[AuthorizationRule] = (),
    namespace: str = "default",
    selector: Mapping[str, str] | None = None,
    target_refs: tuple[PolicyTargetReference, ...] = (),
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        metadata=Metadata(name=name, namespace=namespace),
        spec=AuthorizationPolicySpec(
            selector=None if selector is None else WorkloadSelector(match_labels=selector),
            target_refs=target_refs,
            rules=tuple(rules),
            action=action,
        ),
    )


def authorizer(*policies: AuthorizationPolicy, labels: Mapping[str, str] = LABELS) -> Authorizer:
    return Authorizer(policies, namespace="default", labels=labels)


def rule(
    *,
    sources: Sequence[AuthorizationSource] = (),
    operations: Sequence[AuthorizationOperation] = (),
    when: Sequence[Condition] = (),
) -> AuthorizationRule:
    return AuthorizationRule(
        from_=tuple(RuleFrom(source=s) for s in sources),
        to=tuple(RuleTo(operation=o) for o in operations),
        when=tuple(when),
    )


def allows(r: AuthorizationRule, **req: Any) -> bool:
    """One ALLOW policy with rule ``r``: allowed iff the rule matches."""
    return authorizer(policy(rules=[r])).check(request(**req)).allowed


# ---------------------------------------------------------------------------------------------
# Source fields

SOURCE_CASES: list[tuple[dict[str, tuple[str, ...]], dict[str, Any], bool]] = [
    # principals: td/ns/NS/sa/SA, no scheme; no identity matches nothing
    ({"principals": (PRINCIPAL,)}, {}, True),
    ({"principals": ("cluster.local/ns/shop/sa/ratings",)}, {}, False),
    ({"principals": ("spiffe://" + PRINCIPAL,)}, {}, False),
    ({"principals": ("*",)}, {}, True),
    ({"principals": ("*",)}, {"principal": ""}, False),
    ({"principals": ("cluster.local/ns/shop/*",)}, {}, True),
    ({"principals": ("cluster.local/ns/other/*",)}, {}, False),
    ({"principals": ("*/sa/productpage",)}, {}, True),
    ({"principals": ("*/sa/ratings",)}, {}, False),
    ({"principals": ("x", PRINCIPAL)}, {}, True),
    ({"not_principals": (PRINCIPAL,)}, {}, False),
    ({"not_principals": ("cluster.local/ns/other/*",)}, {}, True),
    ({"not_principals": (PRINCIPAL,)}, {"principal": ""}, True),
    ({"not_principals": ("*",)}, {"principal": ""}, True),
    ({"not_principals": ("*",)}, {}, False),
    # namespaces: from the peer identity; "*" is a glob anywhere (Istio's regex)
    ({"namespaces": ("shop",)}, {}, True),
    ({"namespaces": ("default",)}, {}, False),
    ({"namespaces": ("sh*",)}, {}, True),
    ({"namespaces": ("*op",)}, {}, True),
    ({"namespaces": ("s*p",)}, {}, True),
    ({"namespaces": ("x*y*z",)}, {}, False),
    ({"namespaces": ("*",)}, {}, True),
    ({"namespaces": ("*",)}, {"principal": ""}, False),
    ({"namespaces": ("*",)}, {"principal": "cluster.local/workload/x"}, False),
    ({"not_namespaces": ("shop",)}, {}, False),
    ({"not_namespaces": ("shop",)}, {"principal": ""}, True),
    # serviceAccounts: ns/sa, or sa in the policy's namespace
    ({"service_accounts": ("shop/productpage",)}, {}, True),
    ({"service_accounts": ("shop/ratings",)}, {}, False),
    ({"service_accounts": ("productpage",)}, {}, False),  # = default/productpage
    (
        {"service_accounts": ("productpage",)},
        {"principal": "cluster.local/ns/default/sa/productpage"},
        True,
    ),
    ({"service_accounts": ("shop/productpage",)}, {"principal": ""}, False),
    ({"not_service_accounts": ("shop/productpage",)}, {}, False),
    ({"not_service_accounts": ("shop/productpage",)}, {"principal": ""}, True),
    # ipBlocks: CIDR (host bits allowed) or one address
    ({"ip_blocks": ("10.0.0.0/24",)}, {}, True),
    ({"ip_blocks": ("10.0.0.7/24",)}, {}, True),
    ({"ip_blocks": ("10.0.1.0/24",)}, {}, False),
    ({"ip_blocks": ("10.0.0.5",)}, {}, True),
    ({"ip_blocks": ("10.0.0.6",)}, {}, False),
    ({"ip_blocks": ("::1/128",)}, {"source_ip": "::1"}, True),
    ({"ip_blocks": ("10.0.0.0/8",)}, {"source_ip": "::1"}, False),
    ({"ip_blocks": ("10.0.0.0/8",)}, {"source_ip": "::ffff:10.0.0.5"}, True),
    ({"ip_blocks": ("0.0.0.0/0",)}, {"source_ip": ""}, False),
    ({"ip_blocks": ("0.0.0.0/0",)}, {"source_ip": "not-an-ip"}, False),
    ({"ip_blocks": ("0.0.0.0/0",)}, {"source_ip": "010.0.0.5"}, False),  # ipaddress: no leading 0
    ({"ip_blocks": ("0.0.0.0/0",)}, {"source_ip": "10.0.0.256"}, False),
    ({"ip_blocks": ("0.0.0.0/0",)}, {"source_ip": "a.b.c.d"}, False),
    ({"ip_blocks": ("::/0",)}, {"source_ip": "10.0.0.5"}, False),  # a v4 peer is not in v6
    ({"ip_blocks": ("2001:db8::/32",)}, {"source_ip": "2001:db8::7"}, True),
    ({"ip_blocks": ("2001:db8::/32",)}, {"source_ip": "2001:db9::7"}, False),
    ({"ip_blocks": ("10.0.0.5/32",)}, {"source_ip": "10.0.0.5"}, True),
    ({"ip_blocks": ("255.255.255.255",)}, {"source_ip": "255.255.255.255"}, True),
    ({"not_ip_blocks": ("10.0.0.0/8",)}, {}, False),
    ({"not_ip_blocks": ("192.168.0.0/16",)}, {}, True),
    ({"not_ip_blocks": ("0.0.0.0/0",)}, {"source_ip": ""}, True),
    # remoteIpBlocks: XFF is never trusted, so remote == the peer address
    ({"remote_ip_blocks": ("10.0.0.0/24",)}, {}, True),
    (
        {"remote_ip_blocks": ("10.0.0.0/24",)},
        {"headers": ((b"x-forwarded-for", b"1.2.3.4"),)},
        True,
    ),
    ({"remote_ip_blocks": ("1.2.3.4",)}, {"headers": ((b"x-forwarded-for", b"1.2.3.4"),)}, False),
    ({"not_remote_ip_blocks": ("10.0.0.0/24",)}, {}, False),
    # several fields: all must match
    ({"principals": (PRINCIPAL,), "ip_blocks": ("10.0.0.0/24",)}, {}, True),
    ({"principals": (PRINCIPAL,), "ip_blocks": ("10.0.1.0/24",)}, {}, False),
    ({"principals": ("*",), "not_principals": (PRINCIPAL,)}, {}, False),
]


@pytest.mark.parametrize(("fields", "req", "expected"), SOURCE_CASES)
def test_source_field(
    fields: dict[str, tuple[str, ...]], req: dict[str, Any], expected: bool
) -> None:
    assert allows(rule(sources=[AuthorizationSource(**fields)]), **req) is expected


# ---------------------------------------------------------------------------------------------
# Operation fields

OPERATION_CASES: list[tuple[dict[str, tuple[str, ...]], dict[str, Any], bool]] = [
    # hosts: case-insensitive, with and without the port
    ({"hosts": ("reviews.default.svc.cluster.local",)}, {}, True),
    ({"hosts": ("REVIEWS.default.svc.cluster.local:9080",)}, {}, True),
    ({"hosts": ("reviews.default.svc.cluster.local:80",)}, {}, False),
    ({"hosts": ("reviews",)}, {}, False),
    ({"hosts": ("reviews",)}, {"host": "Reviews"}, True),
    ({"hosts": ("*.svc.cluster.local",)}, {}, True),
    ({"hosts": ("*:9080",)}, {}, True),
    ({"hosts": ("reviews.*",)}, {}, True),
    ({"hosts": ("ratings.*",)}, {}, False),
    ({"hosts": ("*",)}, {}, True),
    ({"hosts": ("*",)}, {"host": ""}, False),
    ({"hosts": ("[::1]",)}, {"host": "[::1]:9080"}, True),
    ({"hosts": ("[::1]",)}, {"host": "[::1]"}, True),
    ({"not_hosts": ("reviews*",)}, {}, False),
    ({"not_hosts": ("ratings*",)}, {}, True),
    # ports: the destination port
    ({"ports": ("9080",)}, {}, True),
    ({"ports": ("80", "9080")}, {}, True),
    ({"ports": ("80",)}, {}, False),
    ({"not_ports": ("9080",)}, {}, False),
    ({"not_ports": ("80",)}, {}, True),
    # methods: exact (case-sensitive) plus Istio's header-matcher forms
    ({"methods": ("GET",)}, {}, True),
    ({"methods": ("get",)}, {}, False),
    ({"methods": ("POST", "PUT")}, {}, False),
    ({"methods": ("*",)}, {}, True),
    ({"methods": ("G*",)}, {}, True),
    ({"not_methods": ("GET",)}, {}, False),
    ({"not_methods": ("DELETE",)}, {}, True),
    # paths: without the query string or fragment
    ({"paths": ("/api/v1/items",)}, {}, True),
    ({"paths": ("/api/v1/items?page=2",)}, {}, False),
    ({"paths": ("/api",)}, {}, False),
    ({"paths": ("/api/*",)}, {}, True),
    ({"paths": ("/admin/*",)}, {}, False),
    ({"paths": ("*/items",)}, {}, True),
    ({"paths": ("*",)}, {}, True),
    ({"paths": ("/a",)}, {"path": "/a#frag"}, True),
    ({"paths": ("/a",)}, {"path": "/a?x#y"}, True),
    ({"not_paths": ("/admin*",)}, {}, True),
    ({"not_paths": ("/api*",)}, {}, False),
    # path templates: {*} one segment, {**} the rest (Envoy uri_template)
    ({"paths": ("/api/{*}/items",)}, {}, True),
    ({"paths": ("/api/{*}",)}, {}, False),
    ({"paths": ("/api/{**}",)}, {}, True),
    ({"paths": ("/{**}",)}, {}, True),
    ({"paths": ("/{*}/v1/{*}",)}, {}, True),
    ({"paths": ("/api/{*}/{*}/x",)}, {}, False),
    ({"paths": ("/api/{**}/items",)}, {}, True),
    ({"paths": ("/api/{**}/items",)}, {"path": "/api/a/b/c/items"}, True),
    ({"paths": ("/api/v1/items/{**}",)}, {}, False),
    ({"paths": ("/api/v1/items/{**}",)}, {"path": "/api/v1/items/"}, True),
    ({"paths": ("/api/{*}",)}, {"path": "/api/"}, False),
    ({"paths": ("/api/{*}/items",)}, {"path": "/api/v 1/items"}, False),
    ({"paths": ("/api/{*}/items",)}, {"path": "/api/v1.2~x/items"}, True),
    ({"paths": ("/a.c/{*}",)}, {"path": "/abc/x"}, False),  # literals are escaped
    ({"not_paths": ("/api/{**}",)}, {}, False),
    # several fields: all must match
    ({"methods": ("GET",), "paths": ("/api/*",), "ports": ("9080",)}, {}, True),
    ({"methods": ("GET",), "paths": ("/api/*",), "ports": ("80",)}, {}, False),
]


@pytest.mark.parametrize(("fields", "req", "expected"), OPERATION_CASES)
def test_operation_field(
    fields: dict[str, tuple[str, ...]], req: dict[str, Any], expected: bool
) -> None:
    assert allows(rule(operations=[AuthorizationOperation(**fields)]), **req) is expected


# ---------------------------------------------------------------------------------------------
# `when` conditions

WHEN_CASES: list[tuple[str, tuple[str, ...], tuple[str, ...], dict[str, Any], bool]] = [
    ("request.headers[x-user]", ("alice",), (), {}, True),
    ("request.headers[X-User]", ("alice",), (), {}, True),  # header names are case-insensitive
    ("request.headers[x-user]", ("bob",), (), {}, False),
    ("request.headers[x-user]", ("al*",), (), {}, True),
    ("request.headers[x-user]", ("*ice",), (), {}, True),
    ("request.headers[x-user]", ("*",), (), {}, True),
    ("request.headers[x-user]", ("*",), (), {"headers": ()}, False),
    ("request.headers[x-user]", ("*",), (), {"headers": ((b"x-user", b""),)}, True),
    ("request.headers[x-user]", ("alice",), (), {"headers": ()}, False),
    ("request.headers[x-user]", (), ("alice",), {}, False),
    ("request.headers[x-user]", (), ("bob",), {}, True),
    ("request.headers[x-user]", (), ("alice",), {"headers": ()}, True),
    ("request.headers[x-user]", ("al*",), ("alice",), {}, False),
    ("request.headers[x-user]", ("al*",), ("bob",), {}, True),
    (
        "request.headers[x-user]",
        ("a,b",),
        (),
        {"headers": ((b"x-user", b"a"), (b"other", b"z"), (b"x-user", b"b"))},
        True,
    ),
    ("request.experimental.inline.headers[x-user]", ("alice",), (), {}, True),
    ("source.ip", ("10.0.0.0/8",), (), {}, True),
    ("source.ip", ("10.0.0.6",), (), {}, False),
    ("source.ip", (), ("10.0.0.5",), {}, False),
    ("remote.ip", ("10.0.0.5",), (), {}, True),
    ("destination.ip", ("10.0.0.9",), (), {}, True),
    ("destination.ip", ("10.0.0.8",), (), {}, False),
    ("destination.ip", ("fe80::/10",), (), {"destination_ip": "fe80::1"}, True),
    ("source.namespace", ("shop",), (), {}, True),
    ("source.namespace", ("default",), (), {}, False),
    ("source.namespace", (), ("shop",), {"principal": ""}, True),
    ("source.principal", (PRINCIPAL,), (), {}, True),
    ("source.principal", ("*",), (), {"principal": ""}, False),
    ("source.serviceAccount", ("shop/productpage",), (), {}, True),
    ("source.serviceAccount", ("productpage",), (), {}, False),
    ("destination.port", ("9080",), (), {}, True),
    ("destination.port", ("80",), (), {}, False),
    ("destination.port", (), ("80",), {}, True),
    (
        "connection.sni",
        ("outbound_.9080_._.reviews*",),
        (),
        {"sni": "outbound_.9080_._.reviews.default.svc.cluster.local"},
        True,
    ),
    ("connection.sni", ("*",), (), {"sni": ""}, False),
    ("connection.sni", ("*",), (), {"sni": "x"}, True),
]


@pytest.mark.parametrize(("key", "values", "not_values", "req", "expected"), WHEN_CASES)
def test_when_condition(
    key: str,
    values: tuple[str, ...],
    not_values: tuple[str, ...],
    req: dict[str, Any],
    expected: bool,
) -> None:
    cond = Condition(key=key, values=values, not_values=not_values)
    assert allows(rule(when=[cond]), **req) is expected


# ---------------------------------------------------------------------------------------------
# Rule structure


ME = AuthorizationSource(principals=(PRINCIPAL,))
OTHER = AuthorizationSource(principals=("cluster.local/ns/x/sa/y",))
GET = AuthorizationOperation(methods=("GET",))
POST = AuthorizationOperation(methods=("POST",))
ALICE = Condition(key="request.headers[x-user]", values=("alice",))
BOB = Condition(key="request.headers[x-user]", values=("bob",))


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (rule(), True),  # the empty rule matches every request
        (rule(sources=[ME], operations=[GET]), True),
        (rule(sources=[ME], operations=[POST]), False),  # from AND to
        (rule(sources=[OTHER], operations=[GET]), False),
        (rule(sources=[OTHER, ME]), True),  # any from
        (rule(sources=[OTHER, OTHER]), False),
        (rule(operations=[POST, GET]), True),  # any to
        (rule(operations=[POST, POST]), False),
        (rule(sources=[ME], when=[ALICE]), True),
        (rule(sources=[ME], when=[ALICE, BOB]), False),  # every when
        (rule(operations=[GET], when=[BOB]), False),
    ],
)
def test_rule_structure(r: AuthorizationRule, expected: bool) -> None:
    assert allows(r) is expected


def test_any_rule_of_a_policy_matches() -> None:
    p = policy(rules=[rule(operations=[POST]), rule(sources=[ME])])
    assert authorizer(p).check(request()) == AuthzDecision(allowed=True, policy="default/p")


# ---------------------------------------------------------------------------------------------
# Evaluation order: AUDIT (never decides) -> DENY -> no ALLOW policy -> ALLOW -> deny

MATCHES = [rule(sources=[ME])]
NO_MATCH = [rule(sources=[OTHER])]
DENY = AuthorizationAction.DENY
AUDIT = AuthorizationAction.AUDIT


def test_no_policy_allows_and_is_inactive() -> None:
    az = authorizer()
    assert az.inactive
    assert az.policies == ()
    assert az.check(request()) == AuthzDecision(allowed=True, policy="", audited="")


def test_deny_wins_over_allow() -> None:
    az = authorizer(policy("allow", rules=MATCHES), policy("deny", action=DENY, rules=MATCHES))
    assert az.check(request()) == AuthzDecision(allowed=False, policy="default/deny")


def test_first_matching_deny_in_config_order_is_reported() -> None:
    az = authorizer(
        policy("d0", action=DENY, rules=NO_MATCH),
        policy("d1", action=DENY, rules=MATCHES),
        policy("d2", action=DENY, rules=MATCHES),
    )
    assert az.check(request()) == AuthzDecision(allowed=False, policy="default/d1")


def test_deny_policies_only_and_none_matches_allows() -> None:
    az = authorizer(policy("deny", action=DENY, rules=NO_MATCH))
    assert not az.inactive
    assert az.check(request()) == AuthzDecision(allowed=True, policy="")


def test_allow_policy_matching_allows() -> None:
    az = authorizer(policy("deny", action=DENY, rules=NO_MATCH), policy("allow", rules=MATCHES))
    assert az.check(request()) == AuthzDecision(allowed=True, policy="default/allow")


def test_allow_policies_none_matching_denies() -> None:
    az = authorizer(policy("a", rules=NO_MATCH), policy("b", rules=NO_MATCH))
    assert az.check(request()) == AuthzDecision(allowed=False, policy="")


def test_allow_nothing() -> None:
    """``spec: {}``: an ALLOW policy without rules allows nothing, so everything is denied..."""
    az = authorizer(policy("allow-nothing"))
    assert az.check(request()) == AuthzDecision(allowed=False)
    assert az.check(request(principal="", path="/")).allowed is False


def test_allow_nothing_plus_a_matching_allow() -> None:
    """...unless another ALLOW policy matches."""
    az = authorizer(policy("allow-nothing"), policy("get", rules=[rule(operations=[GET])]))
    assert az.check(request()) == AuthzDecision(allowed=True, policy="default/get")
    assert az.check(request(method="POST")) == AuthzDecision(allowed=False)


def test_deny_or_audit_without_rules_matches_nothing() -> None:
    """Validation rejects a DENY without rules; built directly it is a no-op, like AUDIT."""
    az = authorizer(policy("d", action=DENY), policy("a", action=AUDIT))
    assert az.check(request()) == AuthzDecision(allowed=True)


def test_audit_never_changes_the_decision_but_is_reported() -> None:
    audit = policy("audit", action=AUDIT, rules=MATCHES)
    assert authorizer(audit).check(request()) == AuthzDecision(
        allowed=True, audited="default/audit"
    )
    assert not authorizer(audit).inactive
    denied = authorizer(audit, policy("deny", action=DENY, rules=MATCHES)).check(request())
    assert denied == AuthzDecision(allowed=False, policy="default/deny", audited="default/audit")
    allowed = authorizer(audit, policy("allow", rules=MATCHES)).check(request())
    assert allowed == AuthzDecision(allowed=True, policy="default/allow", audited="default/audit")
    default_deny = authorizer(audit, policy("allow", rules=NO_MATCH)).check(request())
    assert default_deny == AuthzDecision(allowed=False, audited="default/audit")


def test_audit_not_matching_reports_nothing() -> None:
    az = authorizer(
        policy("audit", action=AUDIT, rules=NO_MATCH), policy("a2", action=AUDIT, rules=MATCHES)
    )
    assert az.check(request()) == AuthzDecision(allowed=True, audited="default/a2")
    assert az.check(request(principal="")) == AuthzDecision(allowed=True)


def test_custom_is_refused_at_build() -> None:
    p = policy("ext", action=AuthorizationAction.CUSTOM, rules=[rule()])
    p = dataclasses.replace(
        p, spec=dataclasses.replace(p.spec, provider=ExtensionProvider(name="opa"))
    )
    with pytest.raises(ValueError, match="CUSTOM"):
        authorizer(p)


def test_request_principals_are_refused_at_build() -> None:
    src = AuthorizationSource(request_principals=("iss/sub",))
    with pytest.raises(ValueError, match="JWT"):
        authorizer(policy(rules=[rule(sources=[src])]))


def test_check_is_repeatable_and_independent_of_request_order() -> None:
    az = authorizer(policy(rules=[rule(operations=[GET])]))
    results = [az.check(request(method=m)).allowed for m in ("GET", "POST", "GET", "POST")]
    assert results == [True, False, True, False]


# ---------------------------------------------------------------------------------------------
# Which policies apply to this workload (namespace "default", labels app=reviews,version=v1)


@pytest.mark.parametrize(
    ("p", "applies"),
    [
        (policy(), True),  # own namespace, no selector: namespace-wide
        (policy(namespace="istio-system"), True),  # root namespace, no selector: mesh-wide
        (policy(namespace="shop"), False),  # another namespace
        (policy(selector={"app": "reviews"}), True),
        (policy(selector={"app": "reviews", "version": "v1"}), True),
        (policy(selector={"app": "reviews", "version": "v2"}), False),
        (policy(selector={"app": "ratings"}), False),
        (policy(selector={"tier": "backend"}), False),  # a label the workload lacks
        (policy(selector={}), True),  # empty matchLabels: the whole namespace
        (policy(namespace="istio-system", selector={"app": "reviews"}), True),
        (policy(namespace="istio-system", selector={"app": "ratings"}), False),
        (policy(namespace="shop", selector={"app": "reviews"}), False),
        (policy(namespace=""), True),  # unset: the bootstrap's namespace
        (
            policy(target_refs=(PolicyTargetReference(kind="Gateway", name="gw"),)),
            False,  # targetRefs attach to gateways / services, never to a sidecar
        ),
    ],
)
def test_applicability(p: AuthorizationPolicy, applies: bool) -> None:
    # The allow-nothing form makes "applies" visible as a denial.
    az = authorizer(p)
    assert az.inactive is not applies
    assert az.check(request()).allowed is not applies
    assert az.policies == ((f"{p.metadata.namespace or 'default'}/p",) if applies else ())


# ---------------------------------------------------------------------------------------------
# From YAML, through the loader and validation, to a decision

BOOT = doc(
    """
    apiVersion: meshproxy.io/v1alpha1
    kind: MeshProxy
    metadata:
      name: reviews-v1
      namespace: default
      labels: {app: reviews, version: v1}
    spec:
      serviceAccount: reviews
      admin: 127.0.0.1:0
      inbound: {address: 127.0.0.1:0, app: 127.0.0.1:9080}
    """
)

POLICIES = doc(
    """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: istio-system}
    spec:
      action: DENY
      rules:
      - to:
        - operation: {paths: ["/admin/{**}"]}
    ---
    apiVersion: security.istio.io/v1beta1
    kind: AuthorizationPolicy
    metadata: {name: reviews-viewer}
    spec:
      selector:
        matchLabels: {app: reviews}
      action: ALLOW
      rules:
      - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/productpage"]
        to:
        - operation:
            methods: ["GET"]
        when:
        - key: request.headers[x-user]
          notValues: ["mallory"]
    """
)


def test_from_yaml_config() -> None:
    config = load_texts([("boot.yaml", BOOT), ("authz.yaml", POLICIES)])
    az = Authorizer.from_config(config)
    assert az.policies == ("istio-system/deny-admin", "default/reviews-viewer")
    assert az.check(request()) == AuthzDecision(allowed=True, policy="default/reviews-viewer")
    assert az.check(request(path="/admin/users")) == AuthzDecision(
        allowed=False, policy="istio-system/deny-admin"
    )
    assert az.check(request(method="DELETE")) == AuthzDecision(allowed=False)
    assert az.check(request(principal="")).allowed is False
    assert az.check(request(headers=((b"x-user", b"mallory"),))).allowed is False


def test_from_yaml_config_without_policies_is_inactive() -> None:
    az = Authorizer.from_config(load_texts([("boot.yaml", BOOT)]))
    assert az.inactive
    assert az.check(request(principal="")).allowed


@given(
    st.lists(
        st.one_of(
            st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "", "x", "1e1"])
        ),
        min_size=3,
        max_size=5,
    ),
    st.integers(0, 32),
)
def test_hand_parsed_ipv4_agrees_with_ipaddress(parts: list[str], prefix: int) -> None:
    """The IPv4 fast path accepts exactly what ``ipaddress`` accepts, with the same value."""
    text = ".".join(parts)
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    net = ipaddress.ip_network(f"10.20.30.40/{prefix}", strict=False)
    az = authorizer(policy(rules=[rule(sources=[AuthorizationSource(ip_blocks=(str(net),))])]))
    assert az.check(request(source_ip=text)).allowed is (addr is not None and addr in net)


# ---------------------------------------------------------------------------------------------
# Property: the merged matcher (set + prefix tuple + suffix tuple) means "any value matches"

ALPHABET = "abc/.-*"
VALUE = st.text(alphabet=ALPHABET, min_size=1, max_size=6)


def one(pattern: str, s: str) -> bool:
    """The reference meaning of one Istio match value (istio/istio matcher.StringMatcher)."""
    if pattern == "*":
        return s != ""
    if pattern.startswith("*"):
        return s.endswith(pattern[1:])
    if pattern.endswith("*"):
        return s.startswith(pattern[:-1])
    return s == pattern


@given(st.lists(VALUE, min_size=1, max_size=5), st.text(alphabet=ALPHABET, max_size=8))
def test_merged_string_matcher_is_any_of_its_values(patterns: list[str], s: str) -> None:
    assert compile_strings(patterns).matches(s) is any(one(p, s) for p in patterns)


@given(
    st.lists(st.sampled_from(["a", "b", "{*}", "v1.2", "x~y"]), min_size=1, max_size=5), st.data()
)
def test_template_one_segment_matches_exactly_one_segment(
    segments: list[str], data: st.DataObject
) -> None:
    template = "/" + "/".join(segments)
    filled = [
        data.draw(st.text(alphabet="abcXYZ019-._~", min_size=1, max_size=4)) if s == "{*}" else s
        for s in segments
    ]
    matcher = compile_strings([template], paths=True)
    assert matcher.matches("/" + "/".join(filled))
    assert not matcher.matches("/" + "/".join(filled) + "/extra")
    if "{*}" in segments:
        # A {*} never spans two segments or matches an empty one.
        i = segments.index("{*}")
        assert not matcher.matches("/" + "/".join([*filled[:i], "p/q", *filled[i + 1 :]]))
        assert not matcher.matches("/" + "/".join([*filled[:i], "", *filled[i + 1 :]]))


# ---------------------------------------------------------------------------------------------
# Property: the decision is Istio's order over any mix of policies

ACTIONS = st.sampled_from([AuthorizationAction.ALLOW, DENY, AUDIT])
# (action, has rules, its rule matches the request)
POLICY_SHAPE = st.tuples(ACTIONS, st.booleans(), st.booleans())


def expected_decision(shapes: list[tuple[AuthorizationAction, bool, bool]]) -> AuthzDecision:
    """Istio's order, written out plainly: AUDIT reports, DENY, no ALLOW, ALLOW, deny."""
    names = [f"default/p{i}" for i in range(len(shapes))]
    matching = [has_rules and hit for _, has_rules, hit in shapes]

    def first(action: AuthorizationAction) -> str:
        return next(
            (
                n
                for n, (a, _, _), m in zip(names, shapes, matching, strict=True)
                if a is action and m
            ),
            "",
        )

    audited = first(AUDIT)
    if first(DENY):
        return AuthzDecision(allowed=False, policy=first(DENY), audited=audited)
    if not any(a is AuthorizationAction.ALLOW for a, _, _ in shapes):
        return AuthzDecision(allowed=True, audited=audited)
    if first(AuthorizationAction.ALLOW):
        return AuthzDecision(allowed=True, policy=first(AuthorizationAction.ALLOW), audited=audited)
    return AuthzDecision(allowed=False, audited=audited)


@given(st.lists(POLICY_SHAPE, max_size=6))
def test_decision_follows_istio_order(shapes: list[tuple[AuthorizationAction, bool, bool]]) -> None:
    policies = [
        policy(f"p{i}", action=action, rules=(MATCHES if hit else NO_MATCH) if has_rules else ())
        for i, (action, has_rules, hit) in enumerate(shapes)
    ]
    az = authorizer(*policies)
    assert az.inactive is (not shapes)
    assert az.check(request()) == expected_decision(shapes)


def test_deny_with_an_empty_rule_from_yaml_denies_everything() -> None:
    deny_all = doc(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-all}
        spec:
          action: DENY
          rules: [{}]
        """
    )
    az = Authorizer.from_config(load_texts([("boot.yaml", BOOT), ("d.yaml", deny_all)]))
    assert az.check(request()) == AuthzDecision(allowed=False, policy="default/deny-all")
    assert az.check(request(principal="", method="OPTIONS")).allowed is False


def test_check_compiles_no_regex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates and namespace globs are compiled at build; a request compiles nothing."""
    az = authorizer(
        policy(
            rules=[
                rule(
                    sources=[AuthorizationSource(namespaces=("s*p",))],
                    operations=[AuthorizationOperation(paths=("/api/{*}/items", "/x/{**}"))],
                    when=[Condition(key="source.principal", values=("*",))],
                )
            ]
        )
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("regex compiled on the request path")

    monkeypatch.setattr(re, "compile", refuse)
    monkeypatch.setattr(re, "_compile", refuse)
    assert az.check(request()).allowed
    assert not az.check(request(path="/api/a/b/items")).allowed
    assert not az.check(request(principal="cluster.local/ns/default/sa/x")).allowed
