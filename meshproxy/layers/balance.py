"""The balance step: which endpoint of the chosen cluster gets the request.

Owns endpoint choice under the cluster's DestinationRule ``loadBalancer`` (reference §1.3):
LEAST_REQUEST (power of two choices; Istio's default when unset), ROUND_ROBIN, RANDOM, and
``consistentHash`` on a header, a cookie, the source IP or a query parameter over a ring hash or a
Maglev table (``core/balancer.py``). The hash key is taken from the request here; when a cookie
policy has a ``ttl`` and the request carries no cookie, a value is generated and returned so the
response can set it (Envoy's generated cookie). A request without a hash key is balanced at random,
as Envoy does. An empty cluster is ``no healthy upstream`` (503 UH).

Rules: synchronous; per-cluster balancer state (round-robin position, rings) is built once per
cluster and kept; the random source is injected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie
from typing import Protocol, TypeVar

from meshproxy.core.balancer import (
    LeastRequestBalancer,
    Maglev,
    RandomBalancer,
    RingHash,
    RoundRobinBalancer,
    hash64,
)
from meshproxy.core.http1 import Header, RequestHead
from meshproxy.core.routing import Cluster, LbKind
from meshproxy.errors import NoHealthyUpstream


class Loaded(Protocol):
    @property
    def active_requests(self) -> int: ...


E = TypeVar("E", bound=Loaded)


def _header(head: RequestHead, name: bytes) -> bytes | None:
    for n, v in head.headers:
        if n == name:
            return v
    return None


def _cookie(head: RequestHead, name: str) -> str | None:
    raw = _header(head, b"cookie")
    if raw is None:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw.decode("latin-1"))
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _query(head: RequestHead, name: str) -> str | None:
    from urllib.parse import parse_qsl

    _, sep, query = head.target.decode("latin-1").partition("?")
    if not sep:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None


class HashKey:
    """The consistent-hash key of a request, and a cookie to set when one was generated."""

    __slots__ = ("key", "set_cookie")

    def __init__(self, key: int | None, set_cookie: Header | None = None) -> None:
        self.key = key
        self.set_cookie = set_cookie


NO_KEY = HashKey(None)


class EndpointPicker:
    __slots__ = ("_least", "_random", "_rings", "_rng", "_round_robin")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._least = LeastRequestBalancer(rng)
        self._random = RandomBalancer(rng)
        self._round_robin: dict[str, RoundRobinBalancer] = {}
        self._rings: dict[str, RingHash | Maglev] = {}

    def prepare(self, clusters: Sequence[Cluster]) -> None:
        """Build round-robin state and hash rings at config load, not on the first request."""
        for cluster in clusters:
            self._state_for(cluster)

    def _state_for(self, cluster: Cluster) -> RoundRobinBalancer | RingHash | Maglev | None:
        kind = cluster.lb.kind
        if kind is LbKind.ROUND_ROBIN:
            rr = self._round_robin.get(cluster.name)
            if rr is None:
                rr = self._round_robin[cluster.name] = RoundRobinBalancer(self._rng)
            return rr
        if kind in (LbKind.RING_HASH, LbKind.MAGLEV) and cluster.endpoints:
            ring = self._rings.get(cluster.name)
            if ring is None:
                keys = [e.key for e in cluster.endpoints]
                ring = (
                    RingHash(keys, minimum_ring_size=cluster.lb.ring_size)
                    if kind is LbKind.RING_HASH
                    else Maglev(keys, table_size=cluster.lb.table_size)
                )
                self._rings[cluster.name] = ring
            return ring
        return None

    def hash_key(self, cluster: Cluster, head: RequestHead, source_ip: str) -> HashKey:
        policy = cluster.lb.hash
        if policy is None or cluster.lb.kind not in (LbKind.RING_HASH, LbKind.MAGLEV):
            return NO_KEY
        if policy.http_header_name is not None:
            value = _header(head, policy.http_header_name.lower().encode("latin-1"))
            return HashKey(hash64(value)) if value is not None else NO_KEY
        if policy.http_cookie is not None:
            cookie = policy.http_cookie
            found = _cookie(head, cookie.name)
            if found is not None:
                return HashKey(hash64(found))
            if cookie.ttl is None:
                return NO_KEY
            # Envoy generates the cookie when absent and a ttl is set; the same value routes
            # this request and, via the cookie, the client's next ones.
            generated = f"{self._rng.getrandbits(64):016x}"
            attrs = [f"{cookie.name}={generated}"]
            if cookie.path:
                attrs.append(f"Path={cookie.path}")
            if cookie.ttl > 0:
                attrs.append(f"Max-Age={int(cookie.ttl)}")
            attrs.append("HttpOnly")
            return HashKey(hash64(generated), (b"set-cookie", "; ".join(attrs).encode("latin-1")))
        if policy.use_source_ip:
            return HashKey(hash64(source_ip)) if source_ip else NO_KEY
        if policy.http_query_parameter_name is not None:
            param = _query(head, policy.http_query_parameter_name)
            return HashKey(hash64(param)) if param is not None else NO_KEY
        return NO_KEY

    def pick(
        self, cluster: Cluster, endpoints: Sequence[E], key: HashKey = NO_KEY, exclude: int = -1
    ) -> E:
        count = len(endpoints)
        if count == 0:
            raise NoHealthyUpstream(f"cluster {cluster.name} has no endpoints")
        if count == 1:
            return endpoints[0]
        kind = cluster.lb.kind
        if kind is LbKind.LEAST_REQUEST:
            index = self._least.pick(count, lambda i: endpoints[i].active_requests, exclude)
        elif kind is LbKind.ROUND_ROBIN:
            rr = self._state_for(cluster)
            assert isinstance(rr, RoundRobinBalancer)
            index = rr.pick(count, exclude)
        elif kind in (LbKind.RING_HASH, LbKind.MAGLEV) and key.key is not None:
            ring = self._state_for(cluster)
            assert isinstance(ring, RingHash | Maglev)
            index = ring.pick(key.key)
        else:  # RANDOM, or a hash policy with no key in this request (Envoy: random)
            index = self._random.pick(count, exclude)
        return endpoints[index]


def balance_layer(rng: random.Random) -> EndpointPicker:
    return EndpointPicker(rng)
