"""The route step: which cluster serves a request, from its authority.

Owns the outbound decision "Host header -> cluster" over the ``HostTable`` and the outbound traffic
policy: a registered host goes to its cluster; an unknown one is passed through to itself under
``ALLOW_ANY`` (Istio's PassthroughCluster) and answered 502 under ``REGISTRY_ONLY`` (Istio's
BlackHoleCluster). VirtualService rules slot in here, before the host lookup's fallback.

Rules: pure; raises ``ProxyError`` for a local reply; never sees a socket.
"""

from __future__ import annotations

from collections.abc import Callable

from meshproxy.core.routing import HostTable, Miss, Target, passthrough, split_authority
from meshproxy.errors import BlackHole, NoRoute


def route_layer(table: HostTable) -> Callable[[str], Target]:
    resolve = table.resolve

    def route(authority: str) -> Target:
        if not authority:
            raise NoRoute("request without a host")
        found = resolve(authority)
        if type(found) is Target:
            return found
        if found is Miss.BLACKHOLE:
            raise BlackHole(f"{authority} is not in the registry (REGISTRY_ONLY)")
        host, port = split_authority(authority, 80)
        return passthrough(host, port or 80)

    return route
