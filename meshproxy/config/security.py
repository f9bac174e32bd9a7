"""Istio security config semantics: what a valid PeerAuthentication / AuthorizationPolicy is.

Owns the validation rules of the two security kinds and the small syntax pieces both validation
and the runtime evaluator (``core/authz.py``) need, so the two can never disagree:

- ``condition_attribute``: which ``when`` keys exist and which meshproxy supports;
- ``ip_block``: an ``ipBlocks`` / ``source.ip`` value (a CIDR or a single address);
- ``path_template_segments``: Istio's ``{*}`` / ``{**}`` path templates.

The rules follow istio/istio ``pkg/config/validation/validation.go`` (ValidatePeerAuthentication,
ValidateAuthorizationPolicy) and ``pkg/config/security/security.go`` (ValidateAttribute,
CheckValidPathTemplate, CheckServiceAccount, ValidateIPs, ValidatePorts), plus meshproxy's own
"not supported" answers: CUSTOM (ext_authz) and anything that needs a JWT (RequestAuthentication).

Each check yields ``(field path, message)``; ``config/istio.py`` turns them into located errors.

Rules: pure functions over the frozen model; no YAML, no sockets.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence

from meshproxy.config.model import (
    AuthorizationAction,
    AuthorizationOperation,
    AuthorizationPolicy,
    AuthorizationSource,
    Condition,
    PeerAuthentication,
    WorkloadSelector,
    yaml_key,
)

Problem = tuple[str, str]  # (field path, message)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ---------------------------------------------------------------------------------------------
# `when` condition keys (istio/istio pkg/config/security/security.go attr* constants)


class Attribute(enum.Enum):
    REQUEST_HEADER = "request.headers"
    SOURCE_IP = "source.ip"
    REMOTE_IP = "remote.ip"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
    SOURCE_PRINCIPAL = "source.principal"
    DESTINATION_IP = "destination.ip"
    DESTINATION_PORT = "destination.port"
    CONNECTION_SNI = "connection.sni"


_PLAIN_ATTRIBUTES = {a.value: a for a in Attribute if a is not Attribute.REQUEST_HEADER}
# Envoy's "inline headers" are a performance detail of its header map; the value is the header.
_HEADER_PREFIXES = ("request.headers", "request.experimental.inline.headers")


def condition_attribute(key: str) -> tuple[Attribute, str]:
    """The attribute a ``when`` key names and, for ``request.headers[<name>]``, the lower-cased
    header name (``""`` otherwise). Raises ``ValueError`` with the reason for keys that Istio
    rejects or meshproxy does not support."""
    attr = _PLAIN_ATTRIBUTES.get(key)
    if attr is not None:
        return attr, ""
    for prefix in _HEADER_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            # Istio's validateMapKey: "a[b]" with a non-empty b.
            if len(rest) > 2 and rest[0] == "[" and rest[-1] == "]":
                return Attribute.REQUEST_HEADER, rest[1:-1].lower()
            raise ValueError(f"bad key {key!r}: should have the form {prefix}[<header name>]")
    if key.startswith("request.auth."):
        raise ValueError(f"{key} needs RequestAuthentication (JWT), not supported")
    if key.startswith("experimental.envoy.filters."):
        raise ValueError(f"{key}: Envoy filter metadata is not supported")
    if key == "destination.namespace":
        raise ValueError(f"attribute {key} is replaced by the metadata.namespace")
    if key.startswith("destination.labels"):
        raise ValueError(f"attribute {key} is replaced by the workload selector")
    if key in ("destination.name", "destination.user"):
        raise ValueError(f"deprecated attribute {key}: only supported in v1alpha1")
    raise ValueError(f"unknown attribute {key!r}")


# ---------------------------------------------------------------------------------------------
# Values


def ip_block(text: str) -> IPNetwork:
    """An ``ipBlocks`` / ``source.ip`` value: ``10.0.0.0/8`` or ``10.1.2.3`` (a /32). Host bits
    under the mask are allowed, as Go's ``netip.ParsePrefix`` (Istio's parser) allows them.
    Raises ``ValueError``."""
    if "/" in text:
        return ipaddress.ip_network(text, strict=False)
    addr = ipaddress.ip_address(text)
    return ipaddress.ip_network(addr)


def parse_port(text: str) -> int:
    """An operation ``ports`` / ``destination.port`` value: Istio's ValidatePorts, 0..65535."""
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise ValueError(f"invalid port {text!r} (a number in 0..65535)")
    return int(text)


MATCH_ONE = "{*}"
MATCH_ANY = "{**}"
# RFC 3986 pchar without "/" (Istio's validLiteral; Envoy's uri_template kLiteral).
PCHAR = "A-Za-z0-9\\-._~%!$&'()+,;:@="
_LITERAL = re.compile(f"[{PCHAR}]+")


def is_path_template(path: str) -> bool:
    """Istio's ContainsPathTemplate: the path uses ``{*}`` or ``{**}``."""
    return MATCH_ONE in path or MATCH_ANY in path


def path_template_segments(path: str) -> tuple[str, ...]:
    """The ``/``-separated segments of a path template, checked as Istio's
    CheckValidPathTemplate does: each is ``{*}``, ``{**}`` (only as the last operator) or a
    literal of RFC 3986 pchars. Raises ``ValueError``."""
    if not path.startswith("/"):
        raise ValueError(f"invalid path {path!r}: a template must start with '/'")
    segments = tuple(path[1:].split("/"))
    # Istio trims leading and trailing slashes before checking, so "/a/{*}/" is a valid template.
    checked = path.strip("/").split("/")
    seen_any = False
    for seg in checked:
        if seg in (MATCH_ONE, MATCH_ANY):
            if seen_any:
                raise ValueError(f"invalid path {path!r}: {{**}} must be the last operator")
            seen_any = seg == MATCH_ANY
            continue
        if "{" in seg or "}" in seg:
            raise ValueError(
                f"invalid path {path!r}: '{{' or '}}' outside a {{*}} or {{**}} segment"
            )
        if not _LITERAL.fullmatch(seg):
            raise ValueError(f"invalid path {path!r}: segment {seg!r} is not a valid literal")
    return segments


def path_problem(path: str) -> str | None:
    """Why an operation ``paths`` value is invalid, or ``None``."""
    if not path.startswith(("/", "*")):
        return f"invalid path {path!r}: must start with '/' or '*'"
    if "{" in path or "}" in path:
        try:
            path_template_segments(path)
        except ValueError as exc:
            return str(exc)
        return None
    if path.count("*") > 1 or (
        "*" in path and path != "*" and not path.startswith("*") and not path.endswith("*")
    ):
        return f"invalid path {path!r}: '*' must appear only once, be at the start, end, or be '*'"
    return None


def service_account_problem(value: str) -> str | None:
    """Istio's CheckServiceAccount: ``<sa>`` or ``<namespace>/<sa>``, no wildcard."""
    if "*" in value:
        return f"wildcard not allowed in service account {value!r}"
    if value.count("/") > 1:
        return f"expected 'serviceAccount' or 'namespace/serviceAccount', got {value!r}"
    ns, sep, sa = value.partition("/")
    if sep and (not ns or not sa):
        return f"expected 'serviceAccount' or 'namespace/serviceAccount', got {value!r}"
    if len(value) > 320:
        return "a service account must not exceed 320 characters"
    return None


# Istio's CheckServiceAccount: "Arbitrary limit to avoid unbounded configuration sizes".
MAX_SERVICE_ACCOUNTS = 16

# ---------------------------------------------------------------------------------------------
# Validation


def _selector_problems(selector: WorkloadSelector | None) -> Iterator[Problem]:
    """Istio's validateWorkloadSelector."""
    if selector is None:
        return
    for key, value in selector.match_labels.items():
        path = _key_path("spec.selector.matchLabels", key)
        if not key:
            yield path, "empty label key is not supported in a selector"
        elif "*" in key or "*" in value:
            yield path, f"wildcard is not supported in a selector: {key}={value}"


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_path(parent: str, key: str) -> str:
    """The same rendering as ``config.istio.key_path`` (which imports this module)."""
    return f"{parent}.{key}" if _IDENT.fullmatch(key) else f'{parent}["{key}"]'


def peer_authentication_problems(pa: PeerAuthentication) -> Iterator[Problem]:
    """istio/istio ValidatePeerAuthentication."""
    spec = pa.spec
    yield from _selector_problems(spec.selector)
    if spec.port_level_mtls and (spec.selector is None or not spec.selector.match_labels):
        yield (
            "spec.portLevelMtls",
            "portLevelMtls needs a workload selector (mesh- and namespace-wide "
            "PeerAuthentications cannot have port-level mTLS)",
        )
    for port in spec.port_level_mtls:
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            yield (
                _key_path("spec.portLevelMtls", port),
                f"port must be a number in 1..65535, got {port!r}",
            )


def authorization_policy_problems(ap: AuthorizationPolicy) -> Iterator[Problem]:
    """istio/istio ValidateAuthorizationPolicy, plus meshproxy's unsupported features."""
    spec = ap.spec
    if spec.selector is not None and spec.target_refs:
        yield "spec.targetRefs", "only one of targetRefs or selector can be set"
    yield from _selector_problems(spec.selector)
    if spec.action is AuthorizationAction.CUSTOM:
        yield (
            "spec.action",
            "action CUSTOM delegates to an ext_authz provider; external authorization providers "
            "are not supported by meshproxy",
        )
    elif spec.provider is not None:
        yield (
            "spec.provider",
            f"provider is only allowed with action CUSTOM, not {spec.action.value}",
        )
    if spec.action is AuthorizationAction.DENY and not spec.rules:
        yield (
            "spec.action",
            "DENY without rules never matches; add an empty rule ({}) to deny every request",
        )
    for i, rule in enumerate(spec.rules):
        base = f"spec.rules[{i}]"
        for j, rf in enumerate(rule.from_):
            yield from _source_problems(f"{base}.from[{j}].source", rf.source)
        for j, rt in enumerate(rule.to):
            yield from _operation_problems(f"{base}.to[{j}].operation", rt.operation)
        for j, cond in enumerate(rule.when):
            yield from _condition_problems(f"{base}.when[{j}]", cond)


def _empty_values(path: str, values: Sequence[str]) -> Iterator[Problem]:
    for k, value in enumerate(values):
        if not value:
            yield f"{path}[{k}]", "empty value not allowed"


def _fields(obj: AuthorizationSource | AuthorizationOperation) -> Mapping[str, tuple[str, ...]]:
    return {yaml_key(f.name): getattr(obj, f.name) for f in dataclasses.fields(obj)}


_JWT = "needs RequestAuthentication (JWT), not supported"


def _source_problems(path: str, src: AuthorizationSource) -> Iterator[Problem]:
    fields = _fields(src)
    if not any(fields.values()):
        yield path, "a source must set at least one field"
    for name in ("requestPrincipals", "notRequestPrincipals"):
        if fields[name]:
            yield f"{path}.{name}", f"{name} {_JWT}"
    if (src.service_accounts or src.not_service_accounts) and (
        src.principals or src.not_principals or src.namespaces or src.not_namespaces
    ):
        name = "serviceAccounts" if src.service_accounts else "notServiceAccounts"
        yield f"{path}.{name}", "cannot set serviceAccounts with namespaces or principals"
    for name, values in fields.items():
        yield from _empty_values(f"{path}.{name}", values)
    for name in ("serviceAccounts", "notServiceAccounts"):
        values = fields[name]
        if len(values) > MAX_SERVICE_ACCOUNTS:
            yield f"{path}.{name}", f"at most {MAX_SERVICE_ACCOUNTS} service accounts"
        for k, value in enumerate(values):
            problem = service_account_problem(value) if value else None
            if problem:
                yield f"{path}.{name}[{k}]", problem
    for name in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
        for k, value in enumerate(fields[name]):
            yield from _ip_problem(f"{path}.{name}[{k}]", value)


def _ip_problem(path: str, value: str) -> Iterator[Problem]:
    if not value:
        return
    try:
        ip_block(value)
    except ValueError:
        yield path, f"invalid IP address or CIDR range {value!r}"


def _operation_problems(path: str, op: AuthorizationOperation) -> Iterator[Problem]:
    fields = _fields(op)
    if not any(fields.values()):
        yield path, "an operation must set at least one field"
    for name, values in fields.items():
        yield from _empty_values(f"{path}.{name}", values)
    for name in ("ports", "notPorts"):
        for k, value in enumerate(fields[name]):
            if value:
                try:
                    parse_port(value)
                except ValueError as exc:
                    yield f"{path}.{name}[{k}]", str(exc)
    for name in ("paths", "notPaths"):
        for k, value in enumerate(fields[name]):
            problem = path_problem(value) if value else None
            if problem:
                yield f"{path}.{name}[{k}]", problem


def _condition_problems(path: str, cond: Condition) -> Iterator[Problem]:
    if not cond.key:
        yield f"{path}.key", "must not be empty"
        return
    try:
        attr, _ = condition_attribute(cond.key)
    except ValueError as exc:
        yield f"{path}.key", str(exc)
        return
    if not cond.values and not cond.not_values:
        yield path, f"at least one of values or notValues must be set for key {cond.key}"
    for name, values in (("values", cond.values), ("notValues", cond.not_values)):
        yield from _empty_values(f"{path}.{name}", values)
        for k, value in enumerate(values):
            if not value:
                continue
            where = f"{path}.{name}[{k}]"
            if attr in (Attribute.SOURCE_IP, Attribute.REMOTE_IP, Attribute.DESTINATION_IP):
                yield from _ip_problem(where, value)
            elif attr is Attribute.DESTINATION_PORT:
                try:
                    parse_port(value)
                except ValueError as exc:
                    yield where, str(exc)
            elif attr is Attribute.SOURCE_SERVICE_ACCOUNT:
                problem = service_account_problem(value)
                if problem:
                    yield where, problem
