"""Transparent capture: the nat rules Istio's init container writes, and the original destination.

Owns two pure pieces of the sidecar's traffic capture (issue #8 §2):

1. ``restore_text(spec, family)``: the ``iptables-restore`` input that sends the app's outbound TCP to
   the outbound listener (15001) and inbound TCP to the inbound listener (15006), as
   ``istio-iptables`` does in REDIRECT mode. The rule list and its order follow istio/istio
   ``tools/istio-iptables/pkg/capture/run.go`` (``Run``, ``handleInboundPortsInclude``,
   ``handleOutboundIncludeRules``) and its golden files (``testdata/inbound-ports-wildcard.golden``,
   ``testdata/ipv6-ipnets.golden``); defaults are the sidecar injector's arguments
   (``-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020``, GID defaulting
   to the UID as ``istio-iptables`` does). Left out: TPROXY mode, DNS capture (``ISTIO_OUTPUT_DNS``),
   interface exclusions and kube-virt interfaces. Since no UDP is captured, the ``OUTPUT`` jump
   matches ``-p tcp`` (as Istio's rule did before DNS capture needed UDP in the chain) and the
   outbound port exclusions are TCP only.
2. ``parse_original_dst(raw)``: the ``struct sockaddr_in``/``sockaddr_in6`` that
   ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` returns for a redirected connection, as ``(ip, port)``.

Rules: pure; bad input raises ``ValueError`` with a message naming the option and the value; the
I/O (running ``iptables-restore``, the ``getsockopt`` call) is the caller's.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass

# Istio's ports (reference §1.6; istio/istio tools/istio-iptables/pkg/constants).
OUTBOUND_PORT = 15001  # -p: ENVOY_PORT, the outbound capture listener
INBOUND_PORT = 15006  # -z: INBOUND_CAPTURE_PORT
TUNNEL_PORT = 15008  # HBONE; always returned from ISTIO_INBOUND and never looped back
PROXY_UID = "1337"  # -u: the istio-proxy user
# The injector's -d: Envoy's Prometheus port, the readiness port and the agent's status port.
RESERVED_INBOUND_PORTS = (15090, 15021, 15020)
# Where Istio's inbound passthrough cluster binds its upstream connections from (never captured).
_INBOUND_PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}
# HostIPv4LoopbackCidr default and its IPv6 counterpart.
_LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}

# Chain names, as istio-iptables names them.
INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
CHAINS = (INBOUND, REDIRECT, IN_REDIRECT, OUTPUT)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Family(enum.IntEnum):
    """Which table set the rules are for: ``iptables`` (4) or ``ip6tables`` (6)."""

    IPV4 = 4
    IPV6 = 6


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureSpec:
    """What to capture; every field has ``istio-iptables``' meaning and the injector's default."""

    proxy_uids: tuple[str, ...] = (PROXY_UID,)  # -u: traffic from these users is never captured
    proxy_gids: tuple[str, ...] = (PROXY_UID,)  # -g: nor from these groups (default: the uids)
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    tunnel_port: int = TUNNEL_PORT
    # -b: None captures every inbound port ('*'); an empty tuple captures no inbound traffic.
    inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = RESERVED_INBOUND_PORTS  # -d (only with '*')
    exclude_outbound_ports: tuple[int, ...] = ()  # -o
    # -i: None captures every outbound destination ('*'); otherwise only these ranges.
    include_outbound_ips: tuple[Network, ...] | None = None
    exclude_outbound_ips: tuple[Network, ...] = ()  # -x


# -- parsing command-line values ---------------------------------------------------------------


def _items(text: str) -> list[str]:
    # istio-iptables splits on commas and ignores empty items ("6000,7000," is two ports).
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_ports(option: str, text: str) -> tuple[int, ...]:
    """A comma-separated port list; ``ValueError`` names the option and the bad item."""
    out: list[int] = []
    for item in _items(text):
        if not (item.isascii() and item.isdigit()) or not 0 < int(item) < 65536:
            raise ValueError(f"{option}: {item!r} is not a port (1-65535)")
        port = int(item)
        if port not in out:
            out.append(port)
    return tuple(out)


def parse_inbound_ports(text: str) -> tuple[int, ...] | None:
    """``'*'`` (every port: None) or a port list; an empty string captures no inbound traffic."""
    if text.strip() == "*":
        return None
    return parse_ports("--inbound-ports", text)


def parse_networks(option: str, text: str) -> tuple[Network, ...]:
    """A comma-separated list of IPs or CIDRs (a bare IP is a /32 or /128)."""
    out: list[Network] = []
    for item in _items(text):
        try:
            # strict=False: "10.1.2.3/16" means 10.1.0.0/16, as iptables reads it.
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not an IP address or CIDR") from None
    return tuple(out)


def parse_include_ips(text: str) -> tuple[Network, ...] | None:
    if text.strip() == "*":
        return None
    return parse_networks("--include-outbound-ips", text)


def parse_exclude_ips(text: str) -> tuple[Network, ...]:
    if text.strip() == "*":
        # istio-iptables: "invalid value for OUTBOUND_IP_RANGES_EXCLUDE".
        raise ValueError("--exclude-outbound-ips: '*' would capture nothing; omit -i instead")
    return parse_networks("--exclude-outbound-ips", text)


def parse_owners(option: str, text: str) -> tuple[str, ...]:
    """User or group ids (numbers or names, as ``-m owner`` takes them)."""
    out: list[str] = []
    for item in _items(text):
        if not all(c.isalnum() or c in "._-" for c in item) or not item.isascii():
            raise ValueError(f"{option}: {item!r} is not a user or group id")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"{option}: at least one id is needed")
    return tuple(out)


# -- the rules ------------------------------------------------------------------------------------


def _of_family(nets: Iterable[Network], family: Family) -> list[str]:
    return [str(n) for n in nets if n.version == family]


def rules(spec: CaptureSpec, family: Family = Family.IPV4) -> list[str]:
    """The nat table's commands, in istio-iptables' order (``-N`` chains first, then ``-A``)."""
    loopback = _LOOPBACK[family]
    out = [f"-N {chain}" for chain in CHAINS]
    # HBONE tunnel port: never captured inbound (run.go: "hit tunnel port directly").
    out.append(f"-A {INBOUND} -p tcp --dport {spec.tunnel_port} -j RETURN")
    out.append(f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {spec.outbound_port}")
    out.append(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {spec.inbound_port}")

    # Inbound (handleInboundPortsInclude, REDIRECT mode): nothing when no port is captured.
    if spec.inbound_ports is None or spec.inbound_ports:
        out.append(f"-A PREROUTING -p tcp -j {INBOUND}")
        if spec.inbound_ports is None:
            for port in spec.exclude_inbound_ports:
                out.append(f"-A {INBOUND} -p tcp --dport {port} -j RETURN")
            out.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
        else:
            for port in spec.inbound_ports:
                out.append(f"-A {INBOUND} -p tcp --dport {port} -j {IN_REDIRECT}")

    out.append(f"-A OUTPUT -p tcp -j {OUTPUT}")
    # Port exclusions come before the loopback rules (run.go: "Must be applied before
    # connections back to self are redirected").
    for port in spec.exclude_outbound_ports:
        out.append(f"-A {OUTPUT} -p tcp --dport {port} -j RETURN")
    # The inbound passthrough cluster's own connections to the app.
    out.append(f"-A {OUTPUT} -o lo -s {_INBOUND_PASSTHROUGH_SOURCE[family]} -j RETURN")
    include = spec.include_outbound_ips
    loopback_included = include is not None and any(n.is_loopback for n in include)
    for match in [f"--uid-owner {u}" for u in spec.proxy_uids] + [
        f"--gid-owner {g}" for g in spec.proxy_gids
    ]:
        # The proxy calling the pod's own address (app -> VIP -> proxy -> pod IP over lo) goes
        # through the inbound listener: appN => Envoy (client) => Envoy (server) => appN.
        out.append(
            f"-A {OUTPUT} -o lo ! -d {loopback} -p tcp ! --dport {spec.tunnel_port} "
            f"-m owner {match} -j {IN_REDIRECT}"
        )
        # The app calling itself over lo by its own address is not captured, unless the
        # include list names a loopback range.
        if not loopback_included:
            out.append(f"-A {OUTPUT} -o lo -m owner ! {match} -j RETURN")
        # The proxy's own upstream connections are never captured (no loop).
        out.append(f"-A {OUTPUT} -m owner {match} -j RETURN")
    # Localhost: Envoy-aware apps and container-to-container traffic.
    out.append(f"-A {OUTPUT} -d {loopback} -j RETURN")
    for net in _of_family(spec.exclude_outbound_ips, family):
        out.append(f"-A {OUTPUT} -d {net} -j RETURN")
    if include is None:
        out.append(f"-A {OUTPUT} -j {REDIRECT}")
    else:
        for net in _of_family(include, family):
            out.append(f"-A {OUTPUT} -d {net} -j {REDIRECT}")
    return out


def restore_text(spec: CaptureSpec, family: Family = Family.IPV4) -> str:
    """The ``iptables-restore --noflush`` input (one ``*nat`` table, committed once)."""
    return "* nat\n" + "\n".join(rules(spec, family)) + "\nCOMMIT\n"


# -- the original destination ---------------------------------------------------------------------

SO_ORIGINAL_DST = (
    80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6) is 80 too
)
SOCKADDR_IN6_SIZE = 28  # the buffer getsockopt needs for either family
_AF_INET = 2  # linux socket.h; stable ABI values, so the pure core needs no socket import
_AF_INET6 = 10


def parse_original_dst(raw: bytes) -> tuple[str, int] | None:
    """``struct sockaddr_in`` / ``sockaddr_in6`` bytes -> ``(ip, port)``; None when unreadable.

    The family is in host byte order, the port in network order (netinet/in.h).
    """
    if len(raw) < 8:
        return None
    family = int.from_bytes(raw[:2], sys.byteorder)
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == _AF_INET:
        return str(ipaddress.IPv4Address(raw[4:8])), port
    if family == _AF_INET6 and len(raw) >= 24:
        addr = ipaddress.IPv6Address(raw[8:24])
        mapped = addr.ipv4_mapped
        return (str(mapped) if mapped is not None else str(addr)), port
    return None


def format_address(ip: str, port: int) -> str:
    """``host:port``; an IPv6 address in brackets (as endpoint keys are written)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
