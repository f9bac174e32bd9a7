"""The compiled VirtualService matcher (core/match.py) against a plain reading of Istio's rules.

Semantics (reference §1.1, §1.7): ``match`` blocks are ORed, the conditions inside a block ANDed, a
rule without blocks matches everything and the first matching ``http[]`` rule wins. StringMatch is
exact / prefix / regex (RE2 full match) or ``{}`` for presence; ``ignoreUriCase`` affects exact and
prefix URI matches only; the URI is the path without its query string; a header missing from the
request never matches ``headers`` but is the empty value for ``withoutHeaders``; ``queryParams``
takes the first value of a key and a bare ``?key`` has the empty value; ``port`` is the destination
port. The reference below evaluates those sentences directly, with no compilation, and Hypothesis
checks the compiled matcher agrees with it on random rule sets and requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.config.istio import re2_problem
from meshproxy.config.model import HTTPMatchRequest, StringMatch
from meshproxy.core.match import RequestView, compile_block, string_test
from meshproxy.core.routetable import (
    ActionKind,
    CompiledVirtualService,
    Route,
    RuleIndex,
    explain,
)

# --------------------------------------------------------------------------------------------
# The reference: Istio's match semantics read literally.


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: tuple[tuple[str, str | None], ...]  # None: a bare `?key`
    scheme: str
    authority: str
    port: int
    headers: Mapping[str, str]

    @property
    def target(self) -> str:
        if not self.query:
            return self.path
        return self.path + "?" + "&".join(k if v is None else f"{k}={v}" for k, v in self.query)

    def view(self) -> RequestView:
        return RequestView(
            method=self.method,
            path=self.target,
            authority=self.authority,
            scheme=self.scheme,
            port=self.port,
            headers=self.headers,
        )


def ref_string(sm: StringMatch, value: str, *, ignore_case: bool = False) -> bool:
    """One StringMatch against a present value."""
    if sm.exact is not None:
        if ignore_case:
            return value.lower() == sm.exact.lower()
        return value == sm.exact
    if sm.prefix is not None:
        if ignore_case:
            return value.lower().startswith(sm.prefix.lower())
        return value.startswith(sm.prefix)
    if sm.regex is not None:
        if sm.regex == "*":  # Istio's presence spelling
            return True
        return re.fullmatch(sm.regex, value) is not None  # RE2 semantics: the whole value
    return True  # `{}`: present


def ref_query_value(req: Request, key: str) -> str | None:
    for k, v in req.query:
        if k == key:
            return "" if v is None else v  # the first occurrence counts
    return None


def ref_block(m: HTTPMatchRequest, req: Request) -> bool:
    if m.uri is not None:
        ignore = m.ignore_uri_case and m.uri.regex is None
        if not ref_string(m.uri, req.path, ignore_case=ignore):
            return False
    for sm, value in ((m.scheme, req.scheme), (m.method, req.method), (m.authority, req.authority)):
        if sm is not None and not ref_string(sm, value):
            return False
    for name, sm in m.headers.items():
        if name in ("uri", "scheme", "method", "authority"):
            continue  # ignored by Istio in `headers`
        value = req.headers.get(name)
        if value is None or not ref_string(sm, value):
            return False
    for name, sm in m.without_headers.items():
        if ref_string(sm, req.headers.get(name, "")):  # missing is the empty value
            return False
    for name, sm in m.query_params.items():
        value = ref_query_value(req, name)
        if value is None or not ref_string(sm, value):
            return False
    return m.port is None or m.port == req.port


def ref_rule(blocks: Sequence[HTTPMatchRequest], req: Request) -> int | None:
    """Index of the first matching block; -1 for a rule without blocks; None if none match."""
    if not blocks:
        return -1
    for i, m in enumerate(blocks):
        if ref_block(m, req):
            return i
    return None


def ref_first_rule(rules: Sequence[Sequence[HTTPMatchRequest]], req: Request) -> int | None:
    for i, blocks in enumerate(rules):
        if ref_rule(blocks, req) is not None:
            return i
    return None


def compile_rules(
    rules: Sequence[Sequence[HTTPMatchRequest]], *, indexed: bool = False
) -> CompiledVirtualService:
    """The rules as compiled routes; ``indexed`` adds the URI index long rule lists get."""
    routes = tuple(
        Route(
            vs="test.default",
            index=i,
            name=f"rule{i}",
            blocks=tuple(compile_block(m, k) for k, m in enumerate(blocks)),
            kind=ActionKind.DIRECT,
            direct_status=200,
        )
        for i, blocks in enumerate(rules)
    )
    return CompiledVirtualService(
        name="test.default",
        namespace="default",
        hosts=(),
        routes=routes,
        index=RuleIndex(routes) if indexed else None,
    )


# --------------------------------------------------------------------------------------------
# Strategies: small alphabets, so that matches and near misses are both common.

SEGMENTS = st.sampled_from(["a", "b", "A", "ab", "api", "API", "v1", "v10"])
PATHS = st.lists(SEGMENTS, max_size=3).map(lambda segs: "/" + "/".join(segs))
VALUES = st.text(alphabet="abA1", max_size=3)
HEADER_NAMES = st.sampled_from(["x-a", "x-b", "end-user", "uri"])
QUERY_KEYS = st.sampled_from(["q", "id", "z"])
AUTHORITIES = ["reviews", "reviews:9080", "ratings:9090", "Reviews"]
PORTS = [9080, 9090]


def string_matches(
    values: st.SearchStrategy[str], regexes: Sequence[str], *, empty: bool = True
) -> st.SearchStrategy[StringMatch]:
    options = [
        values.map(lambda v: StringMatch(exact=v)),
        values.map(lambda v: StringMatch(prefix=v)),
        st.sampled_from(regexes).map(lambda r: StringMatch(regex=r)),
    ]
    if empty:
        options.append(st.just(StringMatch()))
    return st.one_of(*options)


VALUE_REGEXES = ["a*", "[ab]+", ".*", "*", "a|A", r"\d", "(a|b)?1?"]
URI_MATCHES = string_matches(
    st.one_of(PATHS, st.sampled_from(["/", "/a", "/ap", "/api/v1", "/API"])),
    ["/a.*", "/[ab/]*", ".*", "/A(/.*)?", "/api/v1[0-9]*", "/a/b"],
    empty=False,
)
SCHEME_MATCHES = string_matches(st.sampled_from(["http", "https", "h", "HTTP"]), ["https?"])
METHOD_MATCHES = string_matches(st.sampled_from(["GET", "POST", "G", "get"]), ["GET|HEAD", "P.*"])
AUTHORITY_MATCHES = string_matches(
    st.sampled_from([*AUTHORITIES, "rev", "reviews:", ""]), [r"reviews(:\d+)?", "r.*", ".*:9090"]
)
VALUE_MATCHES = string_matches(VALUES, VALUE_REGEXES)
QUERY_MATCHES = st.one_of(
    VALUES.map(lambda v: StringMatch(exact=v)),
    st.sampled_from(VALUE_REGEXES[:3] + VALUE_REGEXES[4:]).map(lambda r: StringMatch(regex=r)),
)


@st.composite
def match_blocks(draw: st.DrawFn) -> HTTPMatchRequest:
    """A block with a few conditions (a real rule rarely has many), so matches stay common."""
    fields = draw(
        st.lists(
            st.sampled_from(
                [
                    "uri",
                    "uri",
                    "scheme",
                    "method",
                    "authority",
                    "headers",
                    "without",
                    "query",
                    "port",
                ]
            ),
            min_size=1,
            max_size=3,
        )
    )

    def field(name: str, strategy: st.SearchStrategy[StringMatch]) -> StringMatch | None:
        return draw(strategy) if name in fields else None

    def group(
        name: str, keys: st.SearchStrategy[str], values: st.SearchStrategy[StringMatch]
    ) -> MappingProxyType[str, StringMatch]:
        size = fields.count(name)
        return MappingProxyType(draw(st.dictionaries(keys, values, min_size=size, max_size=size)))

    return HTTPMatchRequest(
        name=draw(st.sampled_from(["", "named"])),
        uri=field("uri", URI_MATCHES),
        scheme=field("scheme", SCHEME_MATCHES),
        method=field("method", METHOD_MATCHES),
        authority=field("authority", AUTHORITY_MATCHES),
        headers=group("headers", HEADER_NAMES, VALUE_MATCHES),
        without_headers=group("without", HEADER_NAMES, VALUE_MATCHES),
        query_params=group("query", QUERY_KEYS, QUERY_MATCHES),
        ignore_uri_case=draw(st.booleans()),
        port=draw(st.sampled_from(PORTS)) if "port" in fields else None,
    )


RULES = st.lists(st.lists(match_blocks(), max_size=3), min_size=1, max_size=10)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    return Request(
        method=draw(st.sampled_from(["GET", "POST", "HEAD", "get"])),
        path=draw(PATHS),
        query=tuple(
            draw(
                st.lists(
                    st.tuples(QUERY_KEYS, st.one_of(st.none(), st.text("ab1", max_size=2))),
                    max_size=3,
                )
            )
        ),
        scheme=draw(st.sampled_from(["http", "https"])),
        authority=draw(st.sampled_from(AUTHORITIES)),
        port=draw(st.sampled_from(PORTS)),
        headers=draw(st.dictionaries(st.sampled_from(["x-a", "x-b", "end-user", "x-c"]), VALUES)),
    )


# --------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=match_blocks(), req=requests())
def test_one_block_agrees_with_the_reference(block: HTTPMatchRequest, req: Request) -> None:
    compiled = compile_block(block)
    expected = ref_block(block, req)
    assert compiled.matches(req.view()) is expected
    # The explainer's first failing condition exists exactly when the block does not match.
    assert (compiled.first_failure(req.view()) is None) is expected


def check_rule_set(
    rules: Sequence[Sequence[HTTPMatchRequest]], vs: CompiledVirtualService, req: Request
) -> None:
    expected = ref_first_rule(rules, req)
    found = vs.route(req.view())
    if expected is None:
        assert found is None
        return
    assert found is not None
    route, block = found
    assert route.index == expected
    which = ref_rule(rules[expected], req)
    if which == -1:
        assert block is None  # a rule without blocks
    else:
        assert which is not None
        assert block is route.blocks[which]  # the first matching block of the rule


def check_explain(
    rules: Sequence[Sequence[HTTPMatchRequest]], vs: CompiledVirtualService, req: Request
) -> None:
    expected = ref_first_rule(rules, req)
    verdicts = explain(vs, req.view())
    if expected is None:
        assert len(verdicts) == len(rules)
        assert not any(v.matched for v in verdicts)
    else:
        assert len(verdicts) == expected + 1  # every rule up to the first match, no further
        assert [v.matched for v in verdicts] == [False] * expected + [True]
    for v in verdicts:
        if not v.matched:
            # One reason per block, each naming the condition that failed.
            assert v.reason.count("did not match") == len(v.route.blocks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=RULES, reqs=st.lists(requests(), min_size=1, max_size=8))
def test_rule_sets_agree_with_the_reference(
    rules: list[list[HTTPMatchRequest]], reqs: list[Request]
) -> None:
    scan = compile_rules(rules)
    indexed = compile_rules(rules, indexed=True)  # the URI index long rule lists get
    for req in reqs:
        check_rule_set(rules, scan, req)
        check_rule_set(rules, indexed, req)
        check_explain(rules, scan, req)


# --------------------------------------------------------------------------------------------
# The §1.7 edge cases, one by one


def view(
    target: str = "/",
    *,
    method: str = "GET",
    authority: str = "reviews:9080",
    port: int = 9080,
    scheme: str = "http",
    **headers: str,
) -> RequestView:
    return RequestView(
        method=method,
        path=target,
        authority=authority,
        scheme=scheme,
        port=port,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


def matches(block: HTTPMatchRequest, req: RequestView) -> bool:
    return compile_block(block).matches(req)


def test_empty_block_matches_everything() -> None:
    assert matches(HTTPMatchRequest(), view("/anything?x=1", method="DELETE"))


def test_uri_is_matched_without_the_query_string() -> None:
    exact = HTTPMatchRequest(uri=StringMatch(exact="/p"))
    regex = HTTPMatchRequest(uri=StringMatch(regex=r"/p/\d+"))
    assert matches(exact, view("/p?u=1"))
    assert matches(regex, view("/p/12?x=y"))
    assert not matches(regex, view("/p/12x"))


def test_prefix_is_a_plain_string_prefix() -> None:
    block = HTTPMatchRequest(uri=StringMatch(prefix="/api/v1"))
    assert matches(block, view("/api/v10"))
    assert not matches(block, view("/api/v"))


@pytest.mark.parametrize(
    ("sm", "target", "expected"),
    [
        (StringMatch(exact="/Login"), "/LOGIN", True),
        (StringMatch(prefix="/Static"), "/static/x", True),
        (StringMatch(regex="/login"), "/LOGIN", False),  # regex stays case-sensitive
        (StringMatch(regex="/login"), "/login", True),
    ],
)
def test_ignore_uri_case_applies_to_exact_and_prefix_only(
    sm: StringMatch, target: str, expected: bool
) -> None:
    assert matches(HTTPMatchRequest(uri=sm, ignore_uri_case=True), view(target)) is expected


def test_regex_is_a_full_match() -> None:
    block = HTTPMatchRequest(query_params=MappingProxyType({"id": StringMatch(regex=r"\d+$")}))
    assert matches(block, view("/?id=123"))
    assert not matches(block, view("/?id=a123"))  # `\d+$` as a search would accept this


def test_header_presence_and_absence() -> None:
    present = HTTPMatchRequest(headers=MappingProxyType({"x-canary": StringMatch()}))
    assert matches(present, view(x_canary=""))
    assert matches(present, view(x_canary="1"))
    assert not matches(present, view())
    star = HTTPMatchRequest(headers=MappingProxyType({"x-canary": StringMatch(regex="*")}))
    assert matches(star, view(x_canary="yes"))
    assert not matches(star, view())


def test_without_headers_treats_a_missing_header_as_empty() -> None:
    jason = HTTPMatchRequest(
        without_headers=MappingProxyType({"end-user": StringMatch(exact="jason")})
    )
    assert matches(jason, view())
    assert matches(jason, view(end_user="bob"))
    assert not matches(jason, view(end_user="jason"))
    everything = HTTPMatchRequest(without_headers=MappingProxyType({"x": StringMatch(regex=".*")}))
    assert not matches(everything, view())
    assert not matches(everything, view(x="1"))
    empty_only = HTTPMatchRequest(without_headers=MappingProxyType({"x": StringMatch(exact="")}))
    assert not matches(empty_only, view())  # missing == "" == the excluded value
    assert matches(empty_only, view(x="1"))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/?debug", True),
        ("/?a=1&debug", True),
        ("/?debug=", True),
        ("/?debug=1", False),
        ("/", False),
    ],
)
def test_query_exact_empty_matches_a_bare_key(target: str, expected: bool) -> None:
    block = HTTPMatchRequest(query_params=MappingProxyType({"debug": StringMatch(exact="")}))
    assert matches(block, view(target)) is expected


def test_query_uses_the_first_value_of_a_key() -> None:
    block = HTTPMatchRequest(query_params=MappingProxyType({"v": StringMatch(exact="1")}))
    assert matches(block, view("/?v=1&v=2"))
    assert not matches(block, view("/?v=2&v=1"))


def test_pseudo_header_keys_in_headers_are_ignored() -> None:
    block = HTTPMatchRequest(
        headers=MappingProxyType(
            {name: StringMatch(exact="never") for name in ("uri", "scheme", "method", "authority")}
        )
    )
    assert matches(block, view("/x"))


def test_port_scheme_method_authority() -> None:
    assert matches(HTTPMatchRequest(port=9090), view(port=9090))
    assert not matches(HTTPMatchRequest(port=9090), view(port=9080))
    assert matches(HTTPMatchRequest(scheme=StringMatch(exact="http")), view())
    assert not matches(HTTPMatchRequest(scheme=StringMatch(exact="https")), view())
    assert not matches(HTTPMatchRequest(method=StringMatch(exact="GET")), view(method="get"))
    authority = HTTPMatchRequest(authority=StringMatch(regex=r"reviews(:\d+)?"))
    assert matches(authority, view(authority="reviews"))
    assert not matches(authority, view(authority="reviews.default:9080"))


def test_conditions_in_a_block_are_anded() -> None:
    block = HTTPMatchRequest(
        uri=StringMatch(prefix="/a"), headers=MappingProxyType({"x": StringMatch(exact="1")})
    )
    assert matches(block, view("/a", x="1"))
    assert not matches(block, view("/a"))
    assert not matches(block, view("/b", x="1"))


def test_condition_descriptions_name_what_failed() -> None:
    block = compile_block(
        HTTPMatchRequest(
            uri=StringMatch(prefix="/api"),
            headers=MappingProxyType({"end-user": StringMatch(exact="jason")}),
        )
    )
    failed = block.first_failure(view("/api/x", end_user="kim"))
    assert failed is not None
    assert failed.description == "header end-user exact 'jason'"
    assert block.uri_prefix == "/api"
    assert [c.description for c in block.conditions] == [
        "uri prefix '/api'",
        "header end-user exact 'jason'",
    ]


def test_string_test_empty_match_is_presence() -> None:
    text, test = string_test(StringMatch())
    assert text == "present"
    assert test("") and test("anything")


@pytest.mark.parametrize(
    "pattern", [r"(a)\1", r"(?=a)a", r"(?!a)b", r"(?<=a)b", r"(?<!a)b", r"(?P<n>a)(?P=n)"]
)
def test_re2_rejects_backreferences_and_lookaround(pattern: str) -> None:
    assert re2_problem(pattern) is not None


@pytest.mark.parametrize("pattern", [r"/reviews/\d+", "a|b", "[^/]+", "(?:x)y", ".*", r"\.trusted"])
def test_re2_accepts_ordinary_patterns(pattern: str) -> None:
    assert re2_problem(pattern) is None


def test_request_view_query() -> None:
    req = view("/p?a=1&flag&a=2&b=")
    assert req.path_only == "/p"
    assert req.query() == {"a": "1", "flag": "", "b": ""}
    assert view("/p").query() == {}
