"""The edge of transparent capture: applying the nat rules, and reading a redirected connection's
original destination.

Owns the one ``getsockopt`` per accepted connection that asks netfilter where the app meant to
connect before ``iptables -t nat ... -j REDIRECT`` sent it to the outbound listener
(``SO_ORIGINAL_DST`` on ``SOL_IP``; ``IP6T_SO_ORIGINAL_DST`` on ``SOL_IPV6`` for IPv6), as Envoy's
``original_dst`` listener filter does. The bytes are parsed by ``core/capture.py``. It also runs
``iptables-restore`` on the rules ``core/capture.py`` writes (``meshproxy iptables --apply``).

Rules: ``original_destination`` never raises: a connection that was not redirected gives "" (the
kernel answers ENOENT when conntrack has no entry, ENOPROTOOPT without conntrack for the family, or
the local address itself when nothing rewrote it); ``apply_rules`` raises ``IptablesError`` only.
"""

from __future__ import annotations

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


class _Socket(Protocol):
    """What we need of a socket (uvloop hands out a ``PseudoSocket`` that has these)."""

    @property
    def family(self) -> int: ...

    def getsockname(self) -> tuple[str, int] | tuple[str, int, int, int]: ...

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def original_destination(sock: _Socket) -> str:
    """``"ip:port"`` for a redirected connection; "" when it was not redirected or the kernel
    cannot say. One ``getsockopt`` for an IPv4 socket (plus a ``getsockname`` when it answers)."""
    try:
        if sock.family == socket.AF_INET:
            level = socket.SOL_IP
        else:
            # A dual-stack IPv6 socket accepting an IPv4 connection asks the IPv4 table.
            v4 = sock.getsockname()[0].startswith("::ffff:")
            level = socket.SOL_IP if v4 else socket.IPPROTO_IPV6  # SOL_IPV6 == IPPROTO_IPV6
        raw = sock.getsockopt(level, SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
        parsed = parse_original_dst(raw)
        if parsed is None:
            return ""
        local = sock.getsockname()
    except OSError:
        # ENOENT: conntrack has no entry (nothing redirected it); ENOPROTOOPT: no conntrack for
        # this family. Either way there is no other destination to route by.
        return ""
    ip, port = parsed
    host = local[0]
    if ip == (host[7:] if host.startswith("::ffff:") else host) and port == local[1]:
        return ""  # conntrack knows the connection, but nothing rewrote its destination
    return format_address(ip, port)


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
