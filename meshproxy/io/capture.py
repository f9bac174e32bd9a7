"""The edge of transparent capture: applying the nat rules, and reading a redirected connection's
original destination.

Owns the one ``getsockopt`` per accepted connection that asks netfilter where the app meant to
connect before ``iptables -t nat ... -j REDIRECT`` sent it to the outbound listener
(``SO_ORIGINAL_DST`` on ``SOL_IP``; ``IP6T_SO_ORIGINAL_DST`` on ``SOL_IPV6`` for IPv6), as Envoy's
``original_dst`` listener filter does. The bytes are parsed by ``core/capture.py``. It also runs
``iptables-restore`` on the rules ``core/capture.py`` writes (``meshproxy iptables --apply``).

Rules: never raises; a connection that was not redirected gives "" (the kernel answers ENOENT when
conntrack has no entry, or the local address itself when it has one); ENOPROTOOPT (no netfilter
conntrack for that family) makes the caller stop asking, since it cannot change while running.
"""

from __future__ import annotations

import errno
import socket
import subprocess
from typing import Protocol

from meshproxy.core.capture import (
    SO_ORIGINAL_DST,
    SOCKADDR_IN6_SIZE,
    Family,
    format_address,
    parse_original_dst,
)

# The kernel cannot answer for this socket family at all (nf_conntrack not there): stop asking.
UNSUPPORTED = errno.ENOPROTOOPT


class _Socket(Protocol):
    """What we need of a socket (uvloop hands out a ``PseudoSocket`` that has these)."""

    @property
    def family(self) -> int: ...

    def getsockname(self) -> tuple[str, int] | tuple[str, int, int, int]: ...

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def original_destination(sock: _Socket) -> tuple[str, int]:
    """``("ip:port", 0)`` for a redirected connection, ``("", 0)`` when it was not redirected,
    ``("", errno)`` when the kernel refused the question (the caller may stop asking)."""
    family = sock.family
    try:
        local = sock.getsockname()
        host = local[0]
        # A dual-stack IPv6 socket accepting IPv4 connections asks the IPv4 table.
        v4 = family == socket.AF_INET or host.startswith("::ffff:")
        level = socket.SOL_IP if v4 else socket.IPPROTO_IPV6  # SOL_IPV6 == IPPROTO_IPV6 (41)
        raw = sock.getsockopt(level, SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
    except OSError as exc:
        return "", exc.errno or 0
    parsed = parse_original_dst(raw)
    if parsed is None:
        return "", 0
    ip, port = parsed
    local_ip = host[7:] if host.startswith("::ffff:") else host
    if ip == local_ip and port == local[1]:
        return "", 0  # conntrack knows the connection, but nothing rewrote it
    return format_address(ip, port), 0


# -- applying the rules ---------------------------------------------------------------------------

_RESTORE = {Family.IPV4: "iptables-restore", Family.IPV6: "ip6tables-restore"}


class IptablesError(RuntimeError):
    """``iptables-restore`` is missing or refused the rules; the message says which and why."""


def apply_rules(text: str, family: Family, *, timeout: float = 30.0) -> None:
    """Feed ``text`` to ``iptables-restore --noflush`` (``ip6tables-restore`` for IPv6), as
    ``istio-iptables`` does; other rules in the table are kept. Raises ``IptablesError``."""
    binary = _RESTORE[family]
    try:
        done = subprocess.run(
            [binary, "--noflush"],
            input=text.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise IptablesError(
            f"{binary} not found: install the iptables package (Debian: apt-get install iptables)"
        ) from None
    except PermissionError as exc:
        raise IptablesError(f"{binary} cannot run: {exc}") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{binary} did not finish in {timeout:g}s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()
        hint = ""
        if "exists" in detail.lower():
            hint = " (the capture chains are already there: capture was applied before)"
        elif "permission" in detail.lower() or "not permitted" in detail.lower():
            hint = " (needs root or CAP_NET_ADMIN in the network namespace)"
        raise IptablesError(f"{binary} refused the rules (exit {done.returncode}){hint}: {detail}")
