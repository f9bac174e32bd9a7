"""AuthorizationPolicy, compiled once at config load and evaluated per inbound request.

Owns Istio's authorization semantics for a sidecar (reference §1.5; istio/api
``security/v1beta1/authorization_policy.proto``; istio/istio ``pilot/pkg/security/authz``):

Which policies apply. Those in this workload's namespace or in the root namespace
(``istio-system``) whose ``selector.matchLabels`` all equal this workload's labels; no selector
(or an empty one) selects every workload of that namespace, and of the whole mesh in the root
namespace. Policies with ``targetRefs`` attach to gateways and services, never to a sidecar.

Decision, in Envoy's filter order (istio/istio ``pilot/pkg/security/authz/builder``):
AUDIT policies are evaluated first and never change the outcome (the decision reports the first
that matched). CUSTOM is not supported (validation rejects it; a config that skipped validation
raises here). Then: any DENY policy matches ⇒ deny; there is no ALLOW policy ⇒ allow; any ALLOW
policy matches ⇒ allow; otherwise deny. A policy matches iff one of its rules does; a policy with
no rules matches nothing (so ``spec: {}`` is Istio's allow-nothing).

A rule matches iff (it has no ``from`` or one ``from.source`` matches) AND (no ``to`` or one
``to.operation`` matches) AND every ``when`` condition holds. A source / operation matches iff
every field set in it matches: a positive field (``principals``) matches if one of its values
does, a negative one (``notPrincipals``) if none does. A condition holds iff (no ``values`` or one
matches) and (no ``notValues`` or none matches).

Value forms (istio/istio ``pilot/pkg/security/authz/matcher``): ``"*"`` = any non-empty value
(for headers: the header is present), ``"abc*"`` prefix, ``"*abc"`` suffix, anything else exact.
Per field:

- ``principals`` / ``source.principal``: the peer's ``td/ns/NS/sa/SA`` (no ``spiffe://``).
  A request without a peer identity (plaintext, or a certificate with no Istio SPIFFE ID)
  matches no ``principals`` value and therefore every ``notPrincipals``. The same holds for
  ``namespaces`` and ``serviceAccounts``, which Istio also derives from the peer certificate.
- ``namespaces`` / ``source.namespace``: the peer's namespace; ``*`` is a glob anywhere
  (Istio turns it into ``.*`` inside a regex).
- ``serviceAccounts`` / ``source.serviceAccount`` (Istio 1.23+): ``ns/sa`` or ``sa`` (the
  policy's namespace), exact.
- ``ipBlocks`` / ``source.ip``: CIDR or single address against the downstream peer address
  (IPv4-mapped IPv6 addresses compare as IPv4). ``remoteIpBlocks`` / ``remote.ip`` are Envoy's
  "remote address", which is the peer address unless the XFF header is trusted; meshproxy never
  trusts XFF (``xff_num_trusted_hops`` 0, Istio's sidecar default), so remote == source here.
- ``hosts``: case-insensitive, against the Host / ``:authority`` both as sent and without its
  port (so ``example.com`` matches ``example.com:8080``).
- ``ports`` / ``destination.port``: the destination port, exact. In Istio this is the workload
  (container) port the client addressed, i.e. the original destination of the redirected
  connection; the stack passes that when it knows it, else the inbound listener's port.
- ``methods``: Istio's header matcher on ``:method`` (the forms above; ``*`` = any).
- ``paths``: the path without query string and fragment. A value containing ``{*}`` or ``{**}``
  is an Envoy URI template: ``{*}`` is one non-empty segment of RFC 3986 pchars, ``{**}`` any run
  of them including ``/`` (and the empty one). The stack passes the path it routes on; Istio
  normalizes paths before RBAC (meshConfig ``pathNormalization`` BASE), which is the stack's job.
- ``request.headers[<name>]``: all values of the header joined with ``,`` (Envoy's header
  matcher); ``destination.ip``: the local address the connection arrived on; ``connection.sni``:
  the TLS server name (``""`` for plaintext).

Hot path: everything is compiled at build time into sets, prefix/suffix tuples, network lists and
precompiled template regexes; ``check`` makes one small context per request and calls predicates.

How the inbound stack uses it (``stacks/inbound.py`` ``InboundStack._authorize``): the
``Authorizer`` is built once per config (``App._build``, so a reload rebuilds it); a stack whose
authorizer is ``inactive`` skips the step entirely; otherwise each request's ``AuthzRequest`` is
filled from the record (the peer's SPIFFE ID without ``spiffe://``, the downstream address, the
workload port, Host, method, path and headers) and a denial is raised as ``errors.AccessDenied``:
Envoy's RBAC local reply, 403 ``RBAC: access denied`` with no response flag.
``decision.audited`` names the AUDIT policy that matched; the stack logs it.

Rules: pure and synchronous; no regex compiled after build; ``check`` raises nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import assert_never

from meshproxy.config.istio import ROOT_NAMESPACE
from meshproxy.config.model import (
    AuthorizationAction,
    AuthorizationOperation,
    AuthorizationPolicy,
    AuthorizationRule,
    AuthorizationSource,
    Condition,
    MeshConfig,
)
from meshproxy.config.security import (
    MATCH_ANY,
    MATCH_ONE,
    PCHAR,
    Attribute,
    condition_attribute,
    ip_block,
    is_path_template,
    parse_port,
    path_template_segments,
)
from meshproxy.core.identity import parse_principal

# An address as (IP version, integer value); a network as (version, network, mask) integers, so a
# membership test is one AND and one compare instead of ipaddress objects per request.
Address = tuple[int, int]
Network = tuple[int, int, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzRequest:
    """What authorization reads of one request."""

    principal: str  # the peer's "td/ns/NS/sa/SA"; "" when it has no identity (plaintext)
    source_ip: str  # the downstream peer address
    destination_port: int  # the port the connection arrived on
    destination_ip: str  # the local address the connection arrived on
    host: str  # Host / :authority, as sent
    method: str
    path: str  # the request target; a query string or fragment is ignored
    headers: Sequence[tuple[bytes, bytes]] = ()  # names lower-cased
    sni: str = ""  # TLS server name; "" for plaintext


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzDecision:
    allowed: bool
    policy: str = ""  # "ns/name" of the policy that decided; "" for the defaults
    audited: str = ""  # "ns/name" of the first AUDIT policy that matched, or ""


# ---------------------------------------------------------------------------------------------
# The per-request view the predicates read


class _Ctx:
    """One request, with the derived values computed once."""

    __slots__ = (
        "destination_ip",
        "headers",
        "host",
        "host_no_port",
        "method",
        "path",
        "peer_ns",
        "peer_sa",
        "port",
        "principal",
        "sni",
        "source_ip",
    )

    def __init__(self, req: AuthzRequest, *, needs_peer: bool) -> None:
        self.principal = req.principal
        peer = parse_principal(req.principal) if needs_peer and req.principal else None
        self.peer_ns = peer.namespace if peer is not None else ""
        self.peer_sa = peer.service_account if peer is not None else ""
        # Parsed on first use (``source()``, ``destination()``): most policies never read them.
        self.source_ip: Address | str | None = req.source_ip
        self.destination_ip: Address | str | None = req.destination_ip
        self.port = req.destination_port
        host = req.host.lower()
        self.host = host
        colon = host.rfind(":")
        if colon > host.rfind("]") and host[colon + 1 :].isdigit():
            self.host_no_port = host[:colon]
        else:
            self.host_no_port = host
        self.method = req.method
        path = req.path
        for sep in ("?", "#"):
            cut = path.find(sep)
            if cut >= 0:
                path = path[:cut]
        self.path = path
        self.headers = req.headers
        self.sni = req.sni

    def source(self) -> Address | None:
        addr = self.source_ip
        if isinstance(addr, str):
            addr = self.source_ip = _address(addr)
        return addr

    def destination(self) -> Address | None:
        addr = self.destination_ip
        if isinstance(addr, str):
            addr = self.destination_ip = _address(addr)
        return addr

    def header(self, name: bytes) -> str | None:
        """All values of header ``name`` joined with ``,`` (Envoy's header matcher), or None."""
        found: list[bytes] | None = None
        for key, value in self.headers:
            if key == name:
                if found is None:
                    found = [value]
                else:
                    found.append(value)
        if found is None:
            return None
        return (found[0] if len(found) == 1 else b",".join(found)).decode("latin-1")


def _address(text: str) -> Address | None:
    """A peer address as (version, int); ``None`` when it is not an IP (a Unix socket peer).
    Dotted-quad IPv4, what the kernel reports for nearly every peer, is parsed by hand: it is
    ten times cheaper than ``ipaddress``; anything else (IPv6, odd forms) goes to ``ipaddress``,
    and an IPv4-mapped IPv6 address compares as its IPv4 address."""
    if not text:
        return None
    parts = text.split(".")
    if len(parts) == 4:
        value = 0
        for part in parts:
            if (
                not (part.isascii() and part.isdigit())
                or len(part) > 3
                or (len(part) > 1 and part[0] == "0")
            ):
                break
            octet = int(part)
            if octet > 255:
                break
            value = (value << 8) | octet
        else:
            return (4, value)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:  # not an IP peer: matches no ipBlocks
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return (4, int(addr.ipv4_mapped))
    return (addr.version, int(addr))


Predicate = Callable[[_Ctx], bool]

# ---------------------------------------------------------------------------------------------
# Value matchers


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """Istio's string forms for one field's list of values, merged: one set lookup, one
    ``startswith(tuple)``, one ``endswith(tuple)`` and the precompiled regexes (globs, templates).
    ``star``: a ``"*"`` value (any non-empty string)."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    star: bool

    def matches(self, value: str) -> bool:
        if value in self.exact:
            return True
        if self.star and value:
            return True
        if self.prefixes and value.startswith(self.prefixes):
            return True
        if self.suffixes and value.endswith(self.suffixes):
            return True
        for pattern in self.patterns:  # noqa: SIM110 - hot path: a plain loop beats any(genexpr)
            if pattern.fullmatch(value):
                return True
        return False


def compile_strings(
    values: Iterable[str], *, lower: bool = False, glob: bool = False, paths: bool = False
) -> StringMatcher:
    """Compile a list of Istio match values. ``lower``: case-insensitive (hosts). ``glob``:
    a ``*`` anywhere is a wildcard (Istio's namespaces). ``paths``: ``{*}``/``{**}`` templates."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    patterns: list[re.Pattern[str]] = []
    star = False
    for raw in values:
        v = raw.lower() if lower else raw
        if paths and is_path_template(v):
            patterns.append(_template_regex(v))
        elif v == "*":
            star = True
        elif glob and (v.count("*") > 1 or "*" in v.strip("*")):
            patterns.append(re.compile(".*".join(re.escape(part) for part in v.split("*"))))
        elif v.startswith("*"):
            suffixes.append(v[1:])
        elif v.endswith("*"):
            prefixes.append(v[:-1])
        else:
            exact.add(v)
    return StringMatcher(frozenset(exact), tuple(prefixes), tuple(suffixes), tuple(patterns), star)


_ONE_SEGMENT = f"[{PCHAR}]+"
_ANY_SEGMENTS = f"[{PCHAR}/]*"


def _template_regex(path: str) -> re.Pattern[str]:
    """Envoy's uri_template as a regex (``uri_template_internal.cc`` toRegexPattern): ``"/"``
    then the segments joined by ``"/"``; ``*`` -> ``[pchar]+``, ``**`` -> ``[pchar/]*``."""
    parts = []
    for seg in path_template_segments(path):
        if seg == MATCH_ONE:
            parts.append(_ONE_SEGMENT)
        elif seg == MATCH_ANY:
            parts.append(_ANY_SEGMENTS)
        else:
            parts.append(re.escape(seg))
    return re.compile("/" + "/".join(parts))


def compile_networks(values: Iterable[str]) -> tuple[Network, ...]:
    out = []
    for v in values:
        net = ip_block(v)
        out.append((net.version, int(net.network_address), int(net.netmask)))
    return tuple(out)


def _in_networks(addr: Address | None, networks: tuple[Network, ...]) -> bool:
    if addr is None:
        return False
    version, value = addr
    for net_version, network, mask in networks:  # noqa: SIM110 - hot path
        if net_version == version and value & mask == network:
            return True
    return False


def _service_accounts(values: Iterable[str], namespace: str) -> frozenset[tuple[str, str]]:
    """``ns/sa`` or ``sa`` (the policy's namespace): istio/istio serviceAccountRegex."""
    out: set[tuple[str, str]] = set()
    for v in values:
        ns, sep, sa = v.partition("/")
        out.add((ns, sa) if sep else (namespace, v))
    return frozenset(out)


# ---------------------------------------------------------------------------------------------
# Field predicates. Each returns "the request's value matches one of the field's values";
# a not* field negates it.


def _principal_pred(values: Sequence[str]) -> Predicate:
    m = compile_strings(values)
    return lambda c: c.principal != "" and m.matches(c.principal)


def _namespace_pred(values: Sequence[str], needs: _Needs) -> Predicate:
    needs.peer = True
    m = compile_strings(values, glob=True)
    return lambda c: c.peer_ns != "" and m.matches(c.peer_ns)


def _service_account_pred(values: Sequence[str], namespace: str, needs: _Needs) -> Predicate:
    needs.peer = True
    accounts = _service_accounts(values, namespace)
    return lambda c: c.peer_ns != "" and (c.peer_ns, c.peer_sa) in accounts


def _source_ip_pred(values: Sequence[str]) -> Predicate:
    nets = compile_networks(values)
    return lambda c: _in_networks(c.source(), nets)


def _destination_ip_pred(values: Sequence[str]) -> Predicate:
    nets = compile_networks(values)
    return lambda c: _in_networks(c.destination(), nets)


def _host_pred(values: Sequence[str]) -> Predicate:
    m = compile_strings(values, lower=True)
    return lambda c: m.matches(c.host) or m.matches(c.host_no_port)


def _port_pred(values: Sequence[str]) -> Predicate:
    ports = frozenset(parse_port(v) for v in values)
    return lambda c: c.port in ports


def _method_pred(values: Sequence[str]) -> Predicate:
    m = compile_strings(values)
    return lambda c: m.matches(c.method)


def _path_pred(values: Sequence[str]) -> Predicate:
    m = compile_strings(values, paths=True)
    return lambda c: m.matches(c.path)


def _sni_pred(values: Sequence[str]) -> Predicate:
    m = compile_strings(values)
    return lambda c: m.matches(c.sni)


def _header_pred(name: str, values: Sequence[str]) -> Predicate:
    key = name.encode("latin-1")
    m = compile_strings(v for v in values if v != "*")
    present = "*" in values  # Envoy present_match: the header exists, even empty

    def test(c: _Ctx) -> bool:
        value = c.header(key)
        if value is None:
            return False
        return present or m.matches(value)

    return test


def _negate(pred: Predicate) -> Predicate:
    return lambda c: not pred(c)


def _all(preds: Sequence[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    items = tuple(preds)

    def test(c: _Ctx) -> bool:
        for p in items:  # noqa: SIM110 - hot path: a plain loop beats all(genexpr)
            if not p(c):
                return False
        return True

    return test


def _any(preds: Sequence[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    items = tuple(preds)

    def test(c: _Ctx) -> bool:
        for p in items:  # noqa: SIM110 - hot path
            if p(c):
                return True
        return False

    return test


def _always(_: _Ctx) -> bool:
    return True


def _never(_: _Ctx) -> bool:
    return False


class _Needs:
    """What the compiled predicates read, so the context computes only that."""

    __slots__ = ("peer",)

    def __init__(self) -> None:
        self.peer = False  # the peer's namespace and service account, parsed


def _pair(
    out: list[Predicate],
    values: Sequence[str],
    not_values: Sequence[str],
    make: Callable[[Sequence[str]], Predicate],
) -> None:
    if values:
        out.append(make(values))
    if not_values:
        out.append(_negate(make(not_values)))


def _source(src: AuthorizationSource, namespace: str, needs: _Needs) -> Predicate:
    if src.request_principals or src.not_request_principals:
        raise ValueError("requestPrincipals need RequestAuthentication (JWT), not supported")
    out: list[Predicate] = []
    _pair(out, src.principals, src.not_principals, _principal_pred)
    _pair(out, src.namespaces, src.not_namespaces, lambda v: _namespace_pred(v, needs))
    _pair(
        out,
        src.service_accounts,
        src.not_service_accounts,
        lambda v: _service_account_pred(v, namespace, needs),
    )
    # remote == source: meshproxy never trusts X-Forwarded-For (module docstring).
    _pair(out, src.ip_blocks, src.not_ip_blocks, _source_ip_pred)
    _pair(out, src.remote_ip_blocks, src.not_remote_ip_blocks, _source_ip_pred)
    return _all(out) if out else _always


def _operation(op: AuthorizationOperation) -> Predicate:
    out: list[Predicate] = []
    _pair(out, op.hosts, op.not_hosts, _host_pred)
    _pair(out, op.ports, op.not_ports, _port_pred)
    _pair(out, op.methods, op.not_methods, _method_pred)
    _pair(out, op.paths, op.not_paths, _path_pred)
    return _all(out) if out else _always


def _condition(cond: Condition, namespace: str, needs: _Needs) -> Predicate:
    attr, header = condition_attribute(cond.key)
    make: Callable[[Sequence[str]], Predicate]
    match attr:
        case Attribute.REQUEST_HEADER:
            make = lambda v: _header_pred(header, v)  # noqa: E731
        case Attribute.SOURCE_IP | Attribute.REMOTE_IP:
            make = _source_ip_pred
        case Attribute.DESTINATION_IP:
            make = _destination_ip_pred
        case Attribute.SOURCE_NAMESPACE:
            make = lambda v: _namespace_pred(v, needs)  # noqa: E731
        case Attribute.SOURCE_SERVICE_ACCOUNT:
            make = lambda v: _service_account_pred(v, namespace, needs)  # noqa: E731
        case Attribute.SOURCE_PRINCIPAL:
            make = _principal_pred
        case Attribute.DESTINATION_PORT:
            make = _port_pred
        case Attribute.CONNECTION_SNI:
            make = _sni_pred
        case _:
            assert_never(attr)
    out: list[Predicate] = []
    _pair(out, cond.values, cond.not_values, make)
    return _all(out) if out else _always


def _rule(rule: AuthorizationRule, namespace: str, needs: _Needs) -> Predicate:
    parts: list[Predicate] = []
    if rule.from_:
        parts.append(_any([_source(f.source, namespace, needs) for f in rule.from_]))
    if rule.to:
        parts.append(_any([_operation(t.operation) for t in rule.to]))
    parts.extend(_condition(c, namespace, needs) for c in rule.when)
    return _all(parts) if parts else _always


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str  # "ns/name"
    action: AuthorizationAction
    matches: Predicate


def compile_policy(ap: AuthorizationPolicy, namespace: str, needs: _Needs) -> CompiledPolicy:
    """One policy as a predicate; no rules matches nothing (ALLOW: allow-nothing)."""
    ns = ap.metadata.namespace or namespace
    rules = [_rule(r, ns, needs) for r in ap.spec.rules]
    return CompiledPolicy(
        f"{ns}/{ap.metadata.name}", ap.spec.action, _any(rules) if rules else _never
    )


# ---------------------------------------------------------------------------------------------
# Applicability and the decision


def applies(ap: AuthorizationPolicy, namespace: str, labels: Mapping[str, str]) -> bool:
    """Does ``ap`` apply to the sidecar of a workload in ``namespace`` with ``labels``?"""
    spec = ap.spec
    if spec.target_refs:  # gateways and services (Gateway API), never a sidecar
        return False
    ns = ap.metadata.namespace or namespace
    if ns != namespace and ns != ROOT_NAMESPACE:
        return False
    selector = spec.selector.match_labels if spec.selector is not None else {}
    return all(labels.get(k) == v for k, v in selector.items())


_ALLOW_NO_POLICY = AuthzDecision(allowed=True)
_DENY_NO_MATCH = AuthzDecision(allowed=False)


class Authorizer:
    """The AuthorizationPolicies that apply to this workload, compiled. Immutable after build."""

    __slots__ = ("_allow", "_audit", "_deny", "_needs_peer", "inactive", "policies")

    def __init__(
        self, policies: Iterable[AuthorizationPolicy], *, namespace: str, labels: Mapping[str, str]
    ) -> None:
        needs = _Needs()
        compiled: list[CompiledPolicy] = []
        for ap in policies:
            if not applies(ap, namespace, labels):
                continue
            if ap.spec.action is AuthorizationAction.CUSTOM:
                raise ValueError(
                    f"AuthorizationPolicy {ap.metadata.name}: CUSTOM (ext_authz) is not supported"
                )
            compiled.append(compile_policy(ap, namespace, needs))
        self.policies: tuple[str, ...] = tuple(p.name for p in compiled)
        by = {a: tuple(p for p in compiled if p.action is a) for a in AuthorizationAction}
        self._deny = by[AuthorizationAction.DENY]
        self._allow = by[AuthorizationAction.ALLOW]
        self._audit = by[AuthorizationAction.AUDIT]
        self._needs_peer = needs.peer
        # No applicable policy: Istio installs no RBAC filter and the stack skips this step.
        self.inactive: bool = not compiled

    @classmethod
    def from_config(cls, config: MeshConfig) -> Authorizer:
        meta = config.bootstrap.metadata
        return cls(config.authorization_policies, namespace=meta.namespace, labels=meta.labels)

    def check(self, req: AuthzRequest) -> AuthzDecision:
        if self.inactive:
            return _ALLOW_NO_POLICY
        ctx = _Ctx(req, needs_peer=self._needs_peer)
        audited = ""
        for p in self._audit:
            if p.matches(ctx):
                audited = p.name
                break
        for p in self._deny:
            if p.matches(ctx):
                return AuthzDecision(allowed=False, policy=p.name, audited=audited)
        if not self._allow:
            return AuthzDecision(allowed=True, audited=audited) if audited else _ALLOW_NO_POLICY
        for p in self._allow:
            if p.matches(ctx):
                return AuthzDecision(allowed=True, policy=p.name, audited=audited)
        return AuthzDecision(allowed=False, audited=audited) if audited else _DENY_NO_MATCH
