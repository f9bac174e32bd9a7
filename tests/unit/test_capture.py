"""Transparent capture, the pure parts: istio-iptables' nat rules (core/capture.py), the
``SO_ORIGINAL_DST`` bytes, and the host table's lookup by ServiceEntry address (core/routing.py).

The expected rule lists are istio/istio ``tools/istio-iptables/pkg/capture/testdata/*.golden``
(REDIRECT mode), with the sidecar injector's arguments where a golden file leaves them out.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import sys

import pytest
from config_helpers import line_of, only_issue
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.config.load import load_texts
from meshproxy.core.capture import (
    CaptureSpec,
    Family,
    format_address,
    parse_exclude_ips,
    parse_inbound_ports,
    parse_include_ips,
    parse_networks,
    parse_original_dst,
    parse_owners,
    parse_ports,
    restore_text,
    rules,
)
from meshproxy.core.http1 import RequestHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import ClusterKind, HostTable, split_authority
from meshproxy.layers.route import Router

# The injector's defaults: -p 15001 -z 15006 -u 1337 (-g = -u) -m REDIRECT -i '*' -x "" -b '*'
# -d 15090,15021,15020 (istio/istio manifests/charts/istio-control/istio-discovery/files/
# injection-template.yaml); cf. testdata/inbound-ports-wildcard.golden.
INJECTOR_DEFAULT = [
    "-N ISTIO_INBOUND",
    "-N ISTIO_REDIRECT",
    "-N ISTIO_IN_REDIRECT",
    "-N ISTIO_OUTPUT",
    "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A PREROUTING -p tcp -j ISTIO_INBOUND",
    "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
    "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337"
    " -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337"
    " -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
]


def nets(*items: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(i) for i in items)


# -- rules ----------------------------------------------------------------------------------------


def test_default_spec_is_the_injectors_rules() -> None:
    assert rules(CaptureSpec()) == INJECTOR_DEFAULT


def test_restore_text_is_one_nat_table_committed_once() -> None:
    text = restore_text(CaptureSpec())
    assert text.startswith("* nat\n-N ISTIO_INBOUND\n")
    assert text.endswith("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n")
    assert text.count("COMMIT") == 1
    assert text.splitlines()[1:-1] == INJECTOR_DEFAULT


def test_ipv6_golden_without_interface_rules() -> None:
    # testdata/ipv6-ipnets.golden, the ip6tables half, less the kube-virt interface rules
    # (-I PREROUTING 1 -i eth0 ...) that meshproxy does not write.
    spec = CaptureSpec(
        inbound_ports=(4000, 5000),
        exclude_inbound_ports=(6000, 7000),  # ignored: only '*' reads the exclusions
        exclude_outbound_ips=nets("2001:db8::/32"),
        include_outbound_ips=nets("2001:db8::/32"),
    )
    assert rules(spec, Family.IPV6) == [
        "-N ISTIO_INBOUND",
        "-N ISTIO_REDIRECT",
        "-N ISTIO_IN_REDIRECT",
        "-N ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 4000 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_INBOUND -p tcp --dport 5000 -j ISTIO_IN_REDIRECT",
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --uid-owner 1337"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --gid-owner 1337"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d ::1/128 -j RETURN",
        "-A ISTIO_OUTPUT -d 2001:db8::/32 -j RETURN",
        "-A ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT",
    ]
    # The same spec for IPv4 has no IPv6 range in it, so it captures no outbound destination.
    v4 = rules(spec, Family.IPV4)
    assert not any("2001:db8" in r for r in v4)
    assert not any(r.endswith("-j ISTIO_REDIRECT") and "ISTIO_OUTPUT" in r for r in v4)


def test_no_inbound_ports_means_no_prerouting_jump() -> None:
    out = rules(CaptureSpec(inbound_ports=()))
    assert not any("PREROUTING" in r for r in out)
    # The chain and its tunnel-port rule are still written (testdata/empty.golden).
    assert "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN" in out
    assert "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" not in out


def test_listed_inbound_ports_ignore_the_exclusions() -> None:
    out = rules(CaptureSpec(inbound_ports=(8080,), exclude_inbound_ports=(8080, 15090)))
    inbound = [r for r in out if r.startswith("-A ISTIO_INBOUND")]
    assert inbound == [
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT",
    ]


def test_wildcard_inbound_returns_each_excluded_port_before_the_redirect() -> None:
    out = rules(CaptureSpec(exclude_inbound_ports=(22, 15090)))
    start = out.index("-A PREROUTING -p tcp -j ISTIO_INBOUND")
    assert out[start + 1 : start + 4] == [
        "-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    ]


def test_custom_ports_and_owners() -> None:
    spec = CaptureSpec(
        outbound_port=16001,
        inbound_port=16006,
        tunnel_port=16008,
        proxy_uids=("1337", "0"),
        proxy_gids=("7",),
    )
    out = rules(spec)
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in out
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in out
    assert "-A ISTIO_INBOUND -p tcp --dport 16008 -j RETURN" in out
    owners = [r for r in out if "-m owner" in r]
    # Per id, in order: loop back through inbound, lo from others returns, own traffic returns.
    assert owners == [
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 16008 -m owner --uid-owner 1337"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 16008 -m owner --uid-owner 0"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 0 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 0 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 16008 -m owner --gid-owner 7"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 7 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 7 -j RETURN",
    ]


def test_outbound_port_exclusions_come_before_the_loopback_rules() -> None:
    out = rules(CaptureSpec(exclude_outbound_ports=(5432, 6379)))
    jump = out.index("-A OUTPUT -p tcp -j ISTIO_OUTPUT")
    assert out[jump + 1 : jump + 4] == [
        "-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A ISTIO_OUTPUT -p tcp --dport 6379 -j RETURN",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    ]


def test_ip_exclusions_then_inclusions_each_family_its_own() -> None:
    spec = CaptureSpec(
        exclude_outbound_ips=nets("10.1.0.0/16", "fd00::/8"),
        include_outbound_ips=nets("10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"),
    )
    v4 = rules(spec, Family.IPV4)
    assert v4[-4:] == [
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -d 10.1.0.0/16 -j RETURN",
        "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "-A ISTIO_OUTPUT -d 192.168.1.7/32 -j ISTIO_REDIRECT",
    ]
    # No catch-all: only the included ranges are captured.
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" not in v4
    v6 = rules(spec, Family.IPV6)
    assert v6[-3:] == [
        "-A ISTIO_OUTPUT -d ::1/128 -j RETURN",
        "-A ISTIO_OUTPUT -d fd00::/8 -j RETURN",
        "-A ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT",
    ]


def test_a_loopback_include_keeps_the_apps_own_lo_traffic_captured() -> None:
    # run.go: "If loopback explicitly set via OutboundIPRangesInclude, then don't return."
    out = rules(CaptureSpec(include_outbound_ips=nets("127.1.2.3/32")))
    assert not any("! --uid-owner" in r or "! --gid-owner" in r for r in out)
    assert out[-1] == "-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT"


@given(
    st.lists(st.integers(1, 65535), max_size=5, unique=True),
    st.lists(st.integers(1, 65535), max_size=5, unique=True),
    st.booleans(),
)
def test_every_rule_is_in_a_known_chain_and_chains_are_declared_first(
    inbound: list[int], excluded: list[int], wildcard: bool
) -> None:
    spec = CaptureSpec(
        inbound_ports=None if wildcard else tuple(inbound),
        exclude_outbound_ports=tuple(excluded),
    )
    for family in Family:
        out = rules(spec, family)
        assert out[:4] == [
            "-N ISTIO_INBOUND",
            "-N ISTIO_REDIRECT",
            "-N ISTIO_IN_REDIRECT",
            "-N ISTIO_OUTPUT",
        ]
        for rule in out[4:]:
            chain = rule.split()[1]
            assert rule.startswith("-A ")
            assert chain in {"PREROUTING", "OUTPUT", "ISTIO_INBOUND", "ISTIO_REDIRECT"} | {
                "ISTIO_IN_REDIRECT",
                "ISTIO_OUTPUT",
            }
        # The proxy's own traffic returns before anything can send it to ISTIO_REDIRECT.
        own = out.index("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN")
        redirect = out.index("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
        assert own < redirect
        for port in excluded:
            assert out.index(f"-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN") < own


# -- parsing options ------------------------------------------------------------------------------


def test_parse_ports() -> None:
    assert parse_ports("-o", "80, 443,,80,") == (80, 443)
    assert parse_ports("-o", "") == ()
    assert parse_ports("-o", "1,65535") == (1, 65535)


@pytest.mark.parametrize("bad", ["0", "65536", "http", "-1", "8080-8090", "\uff18\uff10", "1.5"])
def test_parse_ports_rejects_non_ports(bad: str) -> None:
    with pytest.raises(ValueError, match=r"--exclude-outbound-ports: .* is not a port"):
        parse_ports("--exclude-outbound-ports", f"80,{bad}")


def test_parse_inbound_ports() -> None:
    assert parse_inbound_ports("*") is None
    assert parse_inbound_ports(" * ") is None
    assert parse_inbound_ports("") == ()
    assert parse_inbound_ports("9080,9081") == (9080, 9081)
    with pytest.raises(ValueError, match="--inbound-ports: '\\*x' is not a port"):
        parse_inbound_ports("*x")


def test_parse_networks() -> None:
    assert parse_networks("-x", "10.0.0.0/8, 10.1.2.3,fd00::/8") == nets(
        "10.0.0.0/8", "10.1.2.3/32", "fd00::/8"
    )
    # iptables reads a host part as the network it lies in.
    assert parse_networks("-x", "10.1.2.3/16") == nets("10.1.0.0/16")
    assert parse_include_ips("*") is None
    assert parse_include_ips("10.0.0.0/8") == nets("10.0.0.0/8")
    assert parse_exclude_ips("") == ()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.com", "10.0.0", "::g"])
def test_parse_networks_rejects_non_addresses(bad: str) -> None:
    with pytest.raises(
        ValueError, match=r"--exclude-outbound-ips: .* is not an IP address or CIDR"
    ):
        parse_exclude_ips(bad)
    with pytest.raises(ValueError, match=r"--include-outbound-ips: .* is not an IP address"):
        parse_include_ips(bad)


def test_exclude_everything_is_refused() -> None:
    with pytest.raises(ValueError, match="--exclude-outbound-ips: '\\*' would capture nothing"):
        parse_exclude_ips("*")


def test_parse_owners() -> None:
    assert parse_owners("-u", "1337,0,1337") == ("1337", "0")
    assert parse_owners("-u", "istio-proxy") == ("istio-proxy",)
    with pytest.raises(ValueError, match="--proxy-uid: at least one id is needed"):
        parse_owners("--proxy-uid", " , ")
    with pytest.raises(ValueError, match="--proxy-gid: '1 -j ACCEPT' is not a user or group id"):
        parse_owners("--proxy-gid", "1 -j ACCEPT")


# -- the original destination ---------------------------------------------------------------------


def sockaddr_in(ip: str, port: int) -> bytes:
    # struct sockaddr_in as the kernel writes it: family in host order, port in network order.
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_aton(ip)
        + b"\0" * 8
    )


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, 0)
        + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", 0)
    )


def test_parse_original_dst_ipv4() -> None:
    assert parse_original_dst(sockaddr_in("10.254.0.2", 8080)) == ("10.254.0.2", 8080)
    # getsockopt with a sockaddr_in6-sized buffer returns just the 16 bytes it wrote.
    assert parse_original_dst(sockaddr_in("192.0.2.1", 1)[:16]) == ("192.0.2.1", 1)


def test_parse_original_dst_ipv6_and_mapped() -> None:
    assert parse_original_dst(sockaddr_in6("fd00::2", 443)) == ("fd00::2", 443)
    assert parse_original_dst(sockaddr_in6("::ffff:10.0.0.1", 80)) == ("10.0.0.1", 80)


def test_parse_original_dst_unreadable() -> None:
    assert parse_original_dst(b"") is None
    assert parse_original_dst(b"\x02\x00\x1f") is None
    assert parse_original_dst(struct.pack("=H", 1) + b"\0" * 14) is None  # AF_UNIX
    assert parse_original_dst(sockaddr_in6("fd00::2", 443)[:20]) is None  # truncated


def test_byte_order_is_the_hosts() -> None:
    raw = sockaddr_in("10.0.0.1", 80)
    assert int.from_bytes(raw[:2], sys.byteorder) == socket.AF_INET


def test_format_address() -> None:
    assert format_address("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_address("fd00::2", 443) == "[fd00::2]:443"
    assert split_authority(format_address("fd00::2", 443), None) == ("fd00::2", 443)


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_parse_original_dst_round_trips_ipv4(ip: ipaddress.IPv4Address, port: int) -> None:
    assert parse_original_dst(sockaddr_in(str(ip), port)) == (str(ip), port)


# -- routing by ServiceEntry address --------------------------------------------------------------

CONFIG = """\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {name: app, namespace: default}
spec:
  outbound: {address: 127.0.0.1:0}
  outboundTrafficPolicy: ALLOW_ANY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc, namespace: default}
spec:
  hosts: [svc.example, alias.example]
  addresses: [10.254.0.2]
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: admin}]
  resolution: STATIC
  endpoints: [{address: 10.254.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide, namespace: default}
spec:
  hosts: [wide.example]
  addresses: [10.254.0.0/16, "fd00:254::/64"]
  ports: [{number: 8080, name: http}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: narrow, namespace: default}
spec:
  hosts: [narrow.example]
  addresses: [10.254.1.0/24]
  ports: [{number: 7070, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.254.1.9}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc, namespace: default}
spec:
  hosts: [svc.example]
  http:
  - name: to-admin
    route: [{destination: {host: svc.example, port: {number: 9090}}}]
"""


@pytest.fixture(scope="module")
def hosts() -> HostTable:
    return HostTable(load_texts([("capture.yaml", CONFIG)]))


def test_by_address_exact_vip(hosts: HostTable) -> None:
    found = hosts.by_address("10.254.0.2:8080")
    assert found is not None
    # The SE's first host answers for its addresses.
    assert (found.cluster.name, found.host, found.port) == (
        "outbound|8080||svc.example",
        "svc.example",
        8080,
    )
    assert hosts.by_address("10.254.0.2:9090") is not None


def test_by_address_falls_back_to_a_range_with_the_port(hosts: HostTable) -> None:
    # 10.254.0.2 is svc's VIP, but svc has no port 7070 and the /24 is not its range either.
    assert hosts.by_address("10.254.0.2:7070") is None
    # A VIP without the port: the widest range that has it (wide /16 declares 8080).
    found = hosts.by_address("10.254.9.9:8080")
    assert found is not None and found.cluster.service == "wide.example"
    assert found.cluster.kind is ClusterKind.ORIGINAL_DST  # resolution NONE


def test_by_address_most_specific_range_first(hosts: HostTable) -> None:
    found = hosts.by_address("10.254.1.5:7070")
    assert found is not None and found.cluster.service == "narrow.example"
    # In the /24 but on the /16's port: the /16 still answers.
    found = hosts.by_address("10.254.1.5:8080")
    assert found is not None and found.cluster.service == "wide.example"


def test_by_address_ipv6(hosts: HostTable) -> None:
    found = hosts.by_address("[fd00:254::7]:8080")
    assert found is not None and found.cluster.service == "wide.example"
    assert hosts.by_address("[fd00:255::7]:8080") is None


@pytest.mark.parametrize(
    "dst", ["192.0.2.1:8080", "10.254.0.2", "svc.example:8080", "", "[zz::1]:80", "10.254.0.2:x"]
)
def test_by_address_misses(hosts: HostTable, dst: str) -> None:
    assert hosts.by_address(dst) is None
    assert hosts.by_address(dst) is None  # and the cached answer is the same


def test_by_address_cache_is_bounded(hosts: HostTable) -> None:
    for i in range(5000):
        hosts.by_address(f"192.0.{i // 256}.{i % 256}:80")
    assert len(hosts._dst_cache) <= 4096
    assert hosts.by_address("10.254.0.2:8080") is not None


def test_knows(hosts: HostTable) -> None:
    assert hosts.knows("svc.example")
    assert hosts.knows("alias.example")
    assert not hosts.knows("10.254.0.2")
    assert not hosts.knows("elsewhere.example")


def test_an_address_that_is_not_an_ip_or_cidr_is_a_config_error() -> None:
    text = CONFIG.replace('"fd00:254::/64"]', '"fd00:254::/64", not-an-address]')
    issue = only_issue(("capture.yaml", text))
    assert (issue.file, issue.line, issue.where, issue.path) == (
        "capture.yaml",
        line_of(text, "not-an-address"),
        "ServiceEntry wide",
        "spec.addresses[2]",
    )
    assert issue.message == "'not-an-address' is not an IP address or CIDR"


def test_no_addresses_no_lookup() -> None:
    table = HostTable(load_texts([("c.yaml", CONFIG.split("---")[0])]))
    assert table.by_address("10.254.0.2:8080") is None


def _route(by: str, authority: str) -> tuple[str, str]:
    config = load_texts([("capture.yaml", CONFIG)])
    table = HostTable(config)
    router = Router(table, RouteTable(config, table), random.Random(1))
    head = RequestHead(method=b"GET", target=b"/", headers=[(b"host", authority.encode())])
    record = RequestRecord(Direction.OUTBOUND, 0.0, "10.254.0.1:5000")
    decision = router.route(head, authority, record, by)
    return decision.target.cluster.name, record.route_name


def test_route_by_the_service_applies_its_virtual_service() -> None:
    # Host is the VIP (no registered host): routed as svc.example:8080, whose VS sends to 9090.
    assert _route("svc.example:8080", "10.254.0.2:8080") == (
        "outbound|9090||svc.example",
        "to-admin",
    )
    # Without it, the same Host is passed through.
    assert _route("", "10.254.0.2:8080") == ("PassthroughCluster", "")


def test_route_by_a_service_without_virtual_service() -> None:
    assert _route("narrow.example:7070", "10.254.1.9:7070") == ("outbound|7070||narrow.example", "")
