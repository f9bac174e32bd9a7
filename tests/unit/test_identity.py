"""core/identity.py: Istio SPIFFE IDs, strict parsing, and the AuthorizationPolicy principal form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.core.identity import (
    SpiffeId,
    parse_principal,
    parse_spiffe,
    spiffe_uri,
)
from meshproxy.telemetry.metrics import spiffe_id


def test_uri_and_principal_forms() -> None:
    sid = SpiffeId(trust_domain="cluster.local", namespace="shop", service_account="reviews")
    assert sid.uri == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert sid.principal == "cluster.local/ns/shop/sa/reviews"
    assert spiffe_uri("cluster.local", "shop", "reviews") == sid.uri


def test_metrics_helper_keeps_its_name_and_output() -> None:
    assert spiffe_id("example.org", "default", "app") == "spiffe://example.org/ns/default/sa/app"


def test_parse_round_trip() -> None:
    sid = parse_spiffe("spiffe://td.example/ns/default/sa/bookinfo-productpage")
    assert sid == SpiffeId(
        trust_domain="td.example", namespace="default", service_account="bookinfo-productpage"
    )
    assert parse_principal("td.example/ns/default/sa/bookinfo-productpage") == sid


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/ns/default/sa",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/ns//sa/app",
        "spiffe:///ns/default/sa/app",  # empty trust domain
        "SPIFFE://cluster.local/ns/default/sa/app",  # scheme is lower case
        "https://cluster.local/ns/default/sa/app",
        "cluster.local/ns/default/sa/app",  # a principal is not a URI
        "spiffe://Cluster.Local/ns/default/sa/app",  # trust domain is lower case
        "spiffe://cluster.local:443/ns/default/sa/app",  # no port
        "spiffe://user@cluster.local/ns/default/sa/app",  # no user info
        "spiffe://cluster.local/ns/default/sa/app/extra",
        "spiffe://cluster.local/sa/app/ns/default",  # order matters
        "spiffe://cluster.local/ns/default/sa/app?x=1",
        "spiffe://cluster.local/ns/default/sa/app#frag",
        "spiffe://cluster.local/ns/de%2Ffault/sa/app",  # no percent-encoding
        "spiffe://cluster.local/ns/../sa/app",
        "spiffe://cluster.local/ns/default/sa/.",
        "spiffe://cluster.local/workload/x",  # a SPIFFE ID, but not an Istio one
        "spiffe://cluster.local/ns/default/sa/app\n",
    ],
)
def test_parse_rejects(uri: str) -> None:
    assert parse_spiffe(uri) is None


@pytest.mark.parametrize("principal", ["", "*", "spiffe://td/ns/a/sa/b", "td/ns/a", "td/ns/a/sa/"])
def test_parse_principal_rejects(principal: str) -> None:
    assert parse_principal(principal) is None


SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))
TRUST_DOMAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=30)


@given(TRUST_DOMAIN, SEGMENT, SEGMENT)
def test_every_valid_identity_round_trips(td: str, ns: str, sa: str) -> None:
    sid = SpiffeId(trust_domain=td, namespace=ns, service_account=sa)
    assert parse_spiffe(sid.uri) == sid
    assert parse_principal(sid.principal) == sid
    assert sid.uri == "spiffe://" + sid.principal
