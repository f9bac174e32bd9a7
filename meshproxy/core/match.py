"""VirtualService request matching, compiled once at config load.

Owns the meaning of ``HTTPMatchRequest`` (reference §1.1, §1.7): blocks are ORed, conditions inside
a block ANDed; ``uri``/``scheme``/``method``/``authority`` are StringMatches (exact / prefix /
regex, regex a full match as in Envoy's RE2); ``headers`` with ``{}`` test presence; a missing header
evaluated by ``withoutHeaders`` is the empty string; ``queryParams`` exact (``""`` matches a bare
key) or regex; ``ignoreUriCase`` lowers exact and prefix URI matches only; ``port`` compares the
destination port. Each condition is compiled into a predicate with a human description, so the same
objects answer "does it match?" on the hot path and "why not?" in the route explainer.

Rules: pure; no regex compiled after load; matching allocates nothing but the request view.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from meshproxy.config.model import HTTPMatchRequest, StringMatch


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestView:
    """What matching reads of a request; header names lower-case, repeated values comma-joined."""

    method: str
    path: str  # with the query string
    authority: str
    scheme: str
    port: int
    headers: Mapping[str, str]
    path_only: str = ""  # the path without its query string; derived when not given

    def __post_init__(self) -> None:
        if not self.path_only:
            object.__setattr__(self, "path_only", self.path.split("?", 1)[0])

    def query(self) -> dict[str, str]:
        _, sep, query = self.path.partition("?")
        if not sep:
            return {}
        out: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            out.setdefault(key, value)
        return out


Predicate = Callable[[RequestView], bool]


@dataclass(frozen=True, slots=True)
class Condition:
    description: str  # e.g. 'uri prefix "/api"'
    test: Predicate


@dataclass(frozen=True, slots=True)
class MatchBlock:
    name: str
    conditions: tuple[Condition, ...]
    uri_prefix: str | None  # the prefix a prefix ``rewrite.uri`` replaces
    ignore_uri_case: bool
    # For the rule index: the case-sensitive URI this block requires, if any.
    uri_exact: str | None = None
    uri_required_prefix: str | None = None
    index: int = 0  # its position in the rule's ``match[]`` (blocks for other proxies are dropped)

    def matches(self, req: RequestView) -> bool:
        for cond in self.conditions:  # noqa: SIM110 - hot path: a plain loop beats all(genexpr)
            if not cond.test(req):
                return False
        return True

    def first_failure(self, req: RequestView) -> Condition | None:
        for cond in self.conditions:
            if not cond.test(req):
                return cond
        return None


def string_test(sm: StringMatch, ignore_case: bool = False) -> tuple[str, Callable[[str], bool]]:
    """A compiled test for one StringMatch; an empty StringMatch matches anything present."""
    if sm.exact is not None:
        want = sm.exact.lower() if ignore_case else sm.exact
        if ignore_case:
            return f"exact {sm.exact!r} (any case)", lambda v: v.lower() == want
        return f"exact {sm.exact!r}", lambda v: v == want
    if sm.prefix is not None:
        want = sm.prefix.lower() if ignore_case else sm.prefix
        if ignore_case:
            return f"prefix {sm.prefix!r} (any case)", lambda v: v.lower().startswith(want)
        return f"prefix {sm.prefix!r}", lambda v: v.startswith(want)
    if sm.regex is not None:
        if sm.regex == "*":  # Istio accepts "*" as a presence test
            return "present", lambda v: True
        pattern = re.compile(sm.regex)
        return f"regex {sm.regex!r}", lambda v: pattern.fullmatch(v) is not None
    return "present", lambda v: True


def _field(name: str, sm: StringMatch, get: Callable[[RequestView], str], ic: bool) -> Condition:
    text, test = string_test(sm, ic)
    return Condition(f"{name} {text}", lambda r: test(get(r)))


def _header(name: str, sm: StringMatch) -> Condition:
    text, test = string_test(sm)

    def check(r: RequestView) -> bool:
        value = r.headers.get(name)
        return value is not None and test(value)

    return Condition(f"header {name} {text}", check)


def _without_header(name: str, sm: StringMatch) -> Condition:
    text, test = string_test(sm)

    def check(r: RequestView) -> bool:
        # Istio: a missing header is evaluated as the empty string (reference §1.7).
        return not test(r.headers.get(name, ""))

    return Condition(f"without header {name} {text}", check)


def _query(name: str, sm: StringMatch) -> Condition:
    text, test = string_test(sm)

    def check(r: RequestView) -> bool:
        value = r.query().get(name)
        return value is not None and test(value)

    return Condition(f"query {name} {text}", check)


def compile_block(m: HTTPMatchRequest, index: int = 0) -> MatchBlock:
    """Compile ``match[index]`` of a rule (the index is kept for explanations)."""
    conds: list[Condition] = []
    ic = m.ignore_uri_case
    if m.uri is not None:
        # Envoy matches the path without the query string; regex is case-sensitive always.
        uri_ic = ic and m.uri.regex is None
        conds.append(_field("uri", m.uri, lambda r: r.path_only, uri_ic))
    if m.scheme is not None:
        conds.append(_field("scheme", m.scheme, lambda r: r.scheme, False))
    if m.method is not None:
        conds.append(_field("method", m.method, lambda r: r.method, False))
    if m.authority is not None:
        conds.append(_field("authority", m.authority, lambda r: r.authority, False))
    for name, sm in m.headers.items():
        if name in ("uri", "scheme", "method", "authority"):
            continue  # Istio ignores these keys in `headers`
        conds.append(_header(name, sm))
    for name, sm in m.without_headers.items():
        conds.append(_without_header(name, sm))
    for name, sm in m.query_params.items():
        conds.append(_query(name, sm))
    if m.port is not None:
        port = m.port
        conds.append(Condition(f"port {port}", lambda r: r.port == port))
    prefix = m.uri.prefix if m.uri is not None else None
    indexable = m.uri is not None and not ic
    return MatchBlock(
        index=index,
        name=m.name,
        conditions=tuple(conds),
        uri_prefix=prefix,
        ignore_uri_case=ic,
        uri_exact=m.uri.exact if indexable and m.uri is not None else None,
        uri_required_prefix=prefix if indexable else None,
    )
