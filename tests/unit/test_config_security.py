"""config/security.py via the loader: every PeerAuthentication / AuthorizationPolicy error, located.

One case per message: the document is well-formed YAML of a known kind, and the failure is one of
meaning (Istio's ValidatePeerAuthentication / ValidateAuthorizationPolicy rules, or a feature
meshproxy does not support: CUSTOM ext_authz, JWT). Each error names the file, the line of the
offending value and its field path. Lines are 1-based.
"""

from __future__ import annotations

import textwrap

import pytest
from config_helpers import BOOT, doc, docs, issues_of, line_of, located, only_issue

from meshproxy.config.load import load_texts
from meshproxy.config.model import AuthorizationAction, MtlsMode


def security_doc(kind: str, spec: str, *, meta: str = "{name: p}") -> str:
    return (
        "apiVersion: security.istio.io/v1\n"
        f"kind: {kind}\n"
        f"metadata: {meta}\n"
        "spec:\n" + textwrap.indent(doc(spec).rstrip("\n") + "\n", "  ")
    )


def check(kind: str, spec: str, needle: str, path: str, message: str) -> None:
    text = docs(BOOT, security_doc(kind, spec))
    issue = only_issue(("sec.yaml", text))
    assert located(issue) == ("sec.yaml", line_of(text, needle), f"{kind} p", path)
    assert issue.message == message


# ---------------------------------------------------------------------------------------------
# Valid documents load


def test_valid_security_documents_load() -> None:
    pa = security_doc(
        "PeerAuthentication",
        """
        selector:
          matchLabels: {app: reviews}
        mtls: {mode: STRICT}
        portLevelMtls:
          "8080": {mode: DISABLE}
        """,
    )
    ap = security_doc(
        "AuthorizationPolicy",
        """
        action: ALLOW
        rules:
        - from:
          - source:
              principals: ["cluster.local/ns/shop/sa/productpage"]
              ipBlocks: ["10.0.0.0/8", "::1"]
              notRemoteIpBlocks: ["192.168.0.1/16"]
          - source:
              serviceAccounts: ["shop/ratings", "reviews"]
          to:
          - operation:
              hosts: ["reviews", "*.example.com"]
              ports: ["9080", "0"]
              methods: ["GET"]
              paths: ["/api/{*}/items", "/static/{**}", "*.png", "/exact", "/pre*", "*"]
          when:
          - key: request.headers[x-user]
            values: ["alice"]
          - key: source.ip
            notValues: ["10.1.0.0/16"]
          - key: destination.port
            values: ["9080"]
          - key: source.serviceAccount
            values: ["shop/productpage"]
          - key: connection.sni
            values: ["*"]
        """,
    )
    audit = security_doc("AuthorizationPolicy", "action: AUDIT", meta="{name: audit}")
    nothing = security_doc("AuthorizationPolicy", "{}", meta="{name: allow-nothing}")
    config = load_texts([("sec.yaml", docs(BOOT, pa, ap, audit, nothing))])
    assert config.peer_authentications[0].spec.port_level_mtls["8080"].mode is MtlsMode.DISABLE
    assert [p.spec.action for p in config.authorization_policies] == [
        AuthorizationAction.ALLOW,
        AuthorizationAction.AUDIT,
        AuthorizationAction.ALLOW,
    ]
    assert config.authorization_policies[0].metadata.namespace == "default"


# ---------------------------------------------------------------------------------------------
# PeerAuthentication

PA_CASES = [
    (
        """
        mtls: {mode: STRICT}
        portLevelMtls:
          "8080": {mode: DISABLE}
        """,
        '"8080": {mode: DISABLE}',  # a block value's line is that of its first entry
        "spec.portLevelMtls",
        "portLevelMtls needs a workload selector (mesh- and namespace-wide PeerAuthentications "
        "cannot have port-level mTLS)",
    ),
    (
        """
        selector:
          matchLabels: {}
        portLevelMtls:
          "8080": {mode: DISABLE}
        """,
        '"8080": {mode: DISABLE}',  # a block value's line is that of its first entry
        "spec.portLevelMtls",
        "portLevelMtls needs a workload selector (mesh- and namespace-wide PeerAuthentications "
        "cannot have port-level mTLS)",
    ),
    (
        """
        selector:
          matchLabels: {app: reviews}
        portLevelMtls:
          "0": {mode: DISABLE}
        """,
        '"0": {mode',
        'spec.portLevelMtls["0"]',
        "port must be a number in 1..65535, got '0'",
    ),
    (
        """
        selector:
          matchLabels: {app: reviews}
        portLevelMtls:
          "65536": {mode: DISABLE}
        """,
        '"65536"',
        'spec.portLevelMtls["65536"]',
        "port must be a number in 1..65535, got '65536'",
    ),
    (
        """
        selector:
          matchLabels: {app: reviews}
        portLevelMtls:
          http: {mode: DISABLE}
        """,
        "http: {mode",
        "spec.portLevelMtls.http",
        "port must be a number in 1..65535, got 'http'",
    ),
    (
        """
        selector:
          matchLabels:
            app: "rev*"
        """,
        'app: "rev*"',
        "spec.selector.matchLabels.app",
        "wildcard is not supported in a selector: app=rev*",
    ),
    (
        """
        selector:
          matchLabels:
            "": reviews
        """,
        '"": reviews',
        'spec.selector.matchLabels[""]',
        "empty label key is not supported in a selector",
    ),
]


@pytest.mark.parametrize(("spec", "needle", "path", "message"), PA_CASES)
def test_peer_authentication_errors(spec: str, needle: str, path: str, message: str) -> None:
    check("PeerAuthentication", spec, needle, path, message)


# ---------------------------------------------------------------------------------------------
# AuthorizationPolicy: policy level

JWT = "needs RequestAuthentication (JWT), not supported"

AP_CASES = [
    (
        """
        action: CUSTOM
        provider: {name: opa}
        rules: [{}]
        """,
        "action: CUSTOM",
        "spec.action",
        "action CUSTOM delegates to an ext_authz provider; external authorization providers "
        "are not supported by meshproxy",
    ),
    (
        """
        action: ALLOW
        provider: {name: opa}
        """,
        "provider: {name: opa}",
        "spec.provider",
        "provider is only allowed with action CUSTOM, not ALLOW",
    ),
    (
        "action: DENY",
        "action: DENY",
        "spec.action",
        "DENY without rules never matches; add an empty rule ({}) to deny every request",
    ),
    (
        """
        selector:
          matchLabels: {app: reviews}
        targetRefs:
        - {kind: Service, name: reviews}
        """,
        "- {kind: Service, name: reviews}",
        "spec.targetRefs",
        "only one of targetRefs or selector can be set",
    ),
    (
        """
        selector:
          matchLabels:
            version: "*"
        """,
        'version: "*"',
        "spec.selector.matchLabels.version",
        "wildcard is not supported in a selector: version=*",
    ),
    # ---- sources
    (
        """
        rules:
        - from:
          - source: {}
        """,
        "source: {}",
        "spec.rules[0].from[0].source",
        "a source must set at least one field",
    ),
    (
        """
        rules:
        - from:
          - source:
              requestPrincipals: ["https://issuer/sub"]
        """,
        '["https://issuer/sub"]',
        "spec.rules[0].from[0].source.requestPrincipals",
        f"requestPrincipals {JWT}",
    ),
    (
        """
        rules:
        - from:
          - source:
              notRequestPrincipals: ["*"]
        """,
        "notRequestPrincipals",
        "spec.rules[0].from[0].source.notRequestPrincipals",
        f"notRequestPrincipals {JWT}",
    ),
    (
        """
        rules:
        - from:
          - source:
              namespaces: [shop]
              serviceAccounts: [shop/productpage]
        """,
        "serviceAccounts: [shop/productpage]",
        "spec.rules[0].from[0].source.serviceAccounts",
        "cannot set serviceAccounts with namespaces or principals",
    ),
    (
        """
        rules:
        - from:
          - source:
              notPrincipals: [x]
              notServiceAccounts: [shop/productpage]
        """,
        "notServiceAccounts",
        "spec.rules[0].from[0].source.notServiceAccounts",
        "cannot set serviceAccounts with namespaces or principals",
    ),
    (
        """
        rules:
        - from:
          - source:
              principals:
              - cluster.local/ns/shop/sa/productpage
              - ""
        """,
        '- ""',
        "spec.rules[0].from[0].source.principals[1]",
        "empty value not allowed",
    ),
    (
        """
        rules:
        - from:
          - source:
              serviceAccounts:
              - "shop/*"
        """,
        '- "shop/*"',
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "wildcard not allowed in service account 'shop/*'",
    ),
    (
        """
        rules:
        - from:
          - source:
              serviceAccounts:
              - a/b/c
        """,
        "- a/b/c",
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "expected 'serviceAccount' or 'namespace/serviceAccount', got 'a/b/c'",
    ),
    (
        """
        rules:
        - from:
          - source:
              notServiceAccounts:
              - /productpage
        """,
        "- /productpage",
        "spec.rules[0].from[0].source.notServiceAccounts[0]",
        "expected 'serviceAccount' or 'namespace/serviceAccount', got '/productpage'",
    ),
    (
        f"""
        rules:
        - from:
          - source:
              serviceAccounts:
              - {"s" * 321}
        """,
        "s" * 321,
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "a service account must not exceed 320 characters",
    ),
    (
        f"""
        rules:
        - from:
          - source:
              serviceAccounts: [{", ".join(f"sa{i}" for i in range(17))}]
        """,
        "serviceAccounts: [sa0",
        "spec.rules[0].from[0].source.serviceAccounts",
        "at most 16 service accounts",
    ),
    (
        """
        rules:
        - from:
          - source:
              ipBlocks:
              - 10.0.0.0/8
              - 10.0.0.300
        """,
        "- 10.0.0.300",
        "spec.rules[0].from[0].source.ipBlocks[1]",
        "invalid IP address or CIDR range '10.0.0.300'",
    ),
    (
        """
        rules:
        - from:
          - source:
              notRemoteIpBlocks:
              - 10.0.0.0/33
        """,
        "- 10.0.0.0/33",
        "spec.rules[0].from[0].source.notRemoteIpBlocks[0]",
        "invalid IP address or CIDR range '10.0.0.0/33'",
    ),
    (
        """
        rules:
        - from:
          - source:
              ipBlocks: ["10.0.0.0/8", ""]
        """,
        'ipBlocks: ["10.0.0.0/8", ""]',
        "spec.rules[0].from[0].source.ipBlocks[1]",
        "empty value not allowed",  # once: an empty value is not also an invalid address
    ),
    # ---- operations
    (
        """
        rules:
        - to:
          - operation: {}
        """,
        "operation: {}",
        "spec.rules[0].to[0].operation",
        "an operation must set at least one field",
    ),
    (
        """
        rules:
        - to:
          - operation:
              methods: [GET, ""]
        """,
        'methods: [GET, ""]',
        "spec.rules[0].to[0].operation.methods[1]",
        "empty value not allowed",
    ),
    (
        """
        rules:
        - to:
          - operation:
              ports:
              - http
        """,
        "- http",
        "spec.rules[0].to[0].operation.ports[0]",
        "invalid port 'http' (a number in 0..65535)",
    ),
    (
        """
        rules:
        - to:
          - operation:
              notPorts:
              - "70000"
        """,
        '- "70000"',
        "spec.rules[0].to[0].operation.notPorts[0]",
        "invalid port '70000' (a number in 0..65535)",
    ),
    (
        """
        rules:
        - to:
          - operation:
              paths:
              - api/v1
        """,
        "- api/v1",
        "spec.rules[0].to[0].operation.paths[0]",
        "invalid path 'api/v1': must start with '/' or '*'",
    ),
    (
        """
        rules:
        - to:
          - operation:
              notPaths:
              - /api/*/items
        """,
        "- /api/*/items",
        "spec.rules[0].to[0].operation.notPaths[0]",
        "invalid path '/api/*/items': '*' must appear only once, be at the start, end, or be '*'",
    ),
    (
        """
        rules:
        - to:
          - operation:
              paths:
              - "*api*"
        """,
        '- "*api*"',
        "spec.rules[0].to[0].operation.paths[0]",
        "invalid path '*api*': '*' must appear only once, be at the start, end, or be '*'",
    ),
    (
        """
        rules:
        - to:
          - operation:
              paths:
              - /api/{**}/{*}
        """,
        "- /api/{**}/{*}",
        "spec.rules[0].to[0].operation.paths[0]",
        "invalid path '/api/{**}/{*}': {**} must be the last operator",
    ),
    (
        """
        rules:
        - to:
          - operation:
              paths:
              - /api/{id}
        """,
        "- /api/{id}",
        "spec.rules[0].to[0].operation.paths[0]",
        "invalid path '/api/{id}': '{' or '}' outside a {*} or {**} segment",
    ),
    (
        """
        rules:
        - to:
          - operation:
              paths:
              - /api/v*/{*}
        """,
        "- /api/v*/{*}",
        "spec.rules[0].to[0].operation.paths[0]",
        "invalid path '/api/v*/{*}': segment 'v*' is not a valid literal",
    ),
    (
        """
        rules:
        - to:
          - operation:
              paths:
              - "/a//{*}"
        """,
        '- "/a//{*}"',
        "spec.rules[0].to[0].operation.paths[0]",
        "invalid path '/a//{*}': segment '' is not a valid literal",
    ),
    (
        """
        rules:
        - to:
          - operation:
              paths:
              - "*/{*}"
        """,
        '- "*/{*}"',
        "spec.rules[0].to[0].operation.paths[0]",
        "invalid path '*/{*}': a template must start with '/'",
    ),
    # ---- conditions
    (
        """
        rules:
        - when:
          - key: ""
            values: [x]
        """,
        'key: ""',
        "spec.rules[0].when[0].key",
        "must not be empty",
    ),
    (
        """
        rules:
        - when:
          - key: source.ip
        """,
        "- key: source.ip",
        "spec.rules[0].when[0]",
        "at least one of values or notValues must be set for key source.ip",
    ),
    (
        """
        rules:
        - when:
          - key: request.auth.claims[groups]
            values: [admin]
        """,
        "request.auth.claims",
        "spec.rules[0].when[0].key",
        f"request.auth.claims[groups] {JWT}",
    ),
    (
        """
        rules:
        - when:
          - key: request.headers
            values: [admin]
        """,
        "key: request.headers",
        "spec.rules[0].when[0].key",
        "bad key 'request.headers': should have the form request.headers[<header name>]",
    ),
    (
        """
        rules:
        - when:
          - key: request.headers[]
            values: [admin]
        """,
        "key: request.headers[]",
        "spec.rules[0].when[0].key",
        "bad key 'request.headers[]': should have the form request.headers[<header name>]",
    ),
    (
        """
        rules:
        - when:
          - key: experimental.envoy.filters.network.mysql_proxy[db.table]
            values: ["[update]"]
        """,
        "key: experimental",
        "spec.rules[0].when[0].key",
        "experimental.envoy.filters.network.mysql_proxy[db.table]: Envoy filter metadata is "
        "not supported",
    ),
    (
        """
        rules:
        - when:
          - key: destination.namespace
            values: [default]
        """,
        "destination.namespace",
        "spec.rules[0].when[0].key",
        "attribute destination.namespace is replaced by the metadata.namespace",
    ),
    (
        """
        rules:
        - when:
          - key: destination.labels[app]
            values: [reviews]
        """,
        "destination.labels",
        "spec.rules[0].when[0].key",
        "attribute destination.labels[app] is replaced by the workload selector",
    ),
    (
        """
        rules:
        - when:
          - key: destination.user
            values: [reviews]
        """,
        "destination.user",
        "spec.rules[0].when[0].key",
        "deprecated attribute destination.user: only supported in v1alpha1",
    ),
    (
        """
        rules:
        - when:
          - key: source.region
            values: [eu]
        """,
        "source.region",
        "spec.rules[0].when[0].key",
        "unknown attribute 'source.region'",
    ),
    (
        """
        rules:
        - when:
          - key: request.headers[x-user]
            notValues: [alice, ""]
        """,
        'notValues: [alice, ""]',
        "spec.rules[0].when[0].notValues[1]",
        "empty value not allowed",
    ),
    (
        """
        rules:
        - when:
          - key: remote.ip
            values:
            - 1.2.3.4/99
        """,
        "- 1.2.3.4/99",
        "spec.rules[0].when[0].values[0]",
        "invalid IP address or CIDR range '1.2.3.4/99'",
    ),
    (
        """
        rules:
        - when:
          - key: destination.port
            notValues:
            - "-1"
        """,
        '- "-1"',
        "spec.rules[0].when[0].notValues[0]",
        "invalid port '-1' (a number in 0..65535)",
    ),
    (
        """
        rules:
        - when:
          - key: source.serviceAccount
            values:
            - "*"
        """,
        '- "*"',
        "spec.rules[0].when[0].values[0]",
        "wildcard not allowed in service account '*'",
    ),
]


@pytest.mark.parametrize(("spec", "needle", "path", "message"), AP_CASES)
def test_authorization_policy_errors(spec: str, needle: str, path: str, message: str) -> None:
    check("AuthorizationPolicy", spec, needle, path, message)


def test_every_problem_of_a_policy_is_reported_in_file_order() -> None:
    spec = """
        action: ALLOW
        provider: {name: opa}
        rules:
        - from:
          - source:
              ipBlocks: [bad-ip]
          to:
          - operation:
              ports: [http]
    """
    text = docs(BOOT, security_doc("AuthorizationPolicy", spec))

    found = issues_of(("sec.yaml", text))
    assert [(i.line, i.path) for i in found] == [
        (line_of(text, "provider: {name: opa}"), "spec.provider"),
        (line_of(text, "ipBlocks: [bad-ip]"), "spec.rules[0].from[0].source.ipBlocks[0]"),
        (line_of(text, "ports: [http]"), "spec.rules[0].to[0].operation.ports[0]"),
    ]
