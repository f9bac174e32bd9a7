"""Endpoint choice: Envoy's load-balancing policies as pure state machines.

Owns the decision "which endpoint of a cluster gets this request", for each ``loadBalancer`` policy
Istio can ask for (reference §1.3, ``destination_rule.proto``):

- ``LEAST_REQUEST`` (:class:`LeastRequestBalancer`), Istio's default: Istio leaves ``loadBalancer``
  unset to mean LEAST_REQUEST (``cluster_traffic_policy.go defaultLBAlgorithm``); with equal weights
  Envoy picks two endpoints at random and keeps the less loaded one (``choice_count`` 2).
- ``ROUND_ROBIN`` (:class:`RoundRobinBalancer`) and ``RANDOM`` (:class:`RandomBalancer`).
- ``consistentHash`` with ``ringHash`` (:class:`RingHash`, Envoy's ketama ring) or ``maglev``
  (:class:`Maglev`, Envoy's Maglev lookup table); :func:`hash64` hashes both the endpoint keys that
  place endpoints and the request keys (header, cookie, source IP, query parameter) that look them up.

The caller supplies how many endpoints there are (and, for LEAST_REQUEST, how loaded each is) and a
seeded ``random.Random``; each choice is a pure function of those and the object's own state.
Endpoints are named by their index in the caller's endpoint list. Weights are not modelled: every
endpoint counts the same, as Envoy does when all ``load_balancing_weight`` values are equal.

Rules: no clocks, sockets or module-level random; O(1) per pick, except a consistent-hash ring
lookup, which is O(log ring size). The consistent-hash structures are built once, when the endpoint
set is loaded, and are immutable after; an endpoint change builds a new one.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Sequence

# Envoy ``RingHashLbConfig`` (api/envoy/config/cluster/v3/cluster.proto): minimum_ring_size defaults
# to 1024 (Istio's ``ringHash.minimumRingSize`` default too), maximum_ring_size to 8M, and both are
# validated ``lte: 8388608``.
DEFAULT_MINIMUM_RING_SIZE = 1024
MAX_RING_SIZE = 8 * 1024 * 1024
# Envoy ``MaglevLbConfig.table_size``: "must be prime number limited to 5000011. If it is not
# specified, the default is 65537." (api/envoy/extensions/load_balancing_policies/maglev/v3).
DEFAULT_MAGLEV_TABLE_SIZE = 65537
MAX_MAGLEV_TABLE_SIZE = 5000011

_MASK64 = (1 << 64) - 1


def hash64(data: bytes | str) -> int:
    """A stable unsigned 64-bit hash of ``data`` (``str`` is hashed as its UTF-8 bytes).

    Envoy uses xxHash64; any well-mixed, process-independent hash gives the same properties, and
    BLAKE2b from the standard library needs no extra dependency. Never Python's ``hash()``, which is
    salted per process (PYTHONHASHSEED), so two proxies would disagree about where a key lands.
    """
    if isinstance(data, str):
        data = data.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class LeastRequestBalancer:
    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, count: int, load: Callable[[int], int], exclude: int = -1) -> int:
        """Index of the chosen endpoint among ``count`` (``exclude`` one, if others exist)."""
        if count <= 1:
            return 0
        if 0 <= exclude < count:
            if count == 2:
                return 1 - exclude
            a = self._pick_other(count, exclude)
            b = self._pick_other(count, exclude)
        else:
            a = self._rng.randrange(count)
            b = self._rng.randrange(count - 1)
            if b >= a:
                b += 1
        return a if load(a) <= load(b) else b

    def _pick_other(self, count: int, exclude: int) -> int:
        i = self._rng.randrange(count - 1)
        return i + 1 if i >= exclude else i


class RoundRobinBalancer:
    """``ROUND_ROBIN``: each endpoint in turn, starting at a random one.

    Envoy's unweighted round robin returns ``hosts[rr_index++ % hosts.size()]`` and seeds the index
    from the random generator (``EdfLoadBalancerBase`` ``seed_``, source/common/upstream/
    load_balancer_impl.cc) so that workers, and here proxies, do not all start on the first host.
    The index keeps counting while the endpoint count changes, as Envoy's does.
    """

    __slots__ = ("_next",)

    def __init__(self, rng: random.Random) -> None:
        self._next = rng.getrandbits(32)

    def pick(self, count: int, exclude: int = -1) -> int:
        """Index of the next endpoint among ``count`` (skipping ``exclude``, if others exist).

        ``count`` must be at least 1; an empty cluster is the caller's business (Envoy: no healthy
        upstream, flag ``UH``), and ``count`` 1 always gives 0.
        """
        if count <= 1:
            return 0
        i = self._next % count
        self._next += 1
        if i == exclude:
            # The excluded endpoint's turn goes to the next one in the rotation, which then is not
            # picked again on the following call: the order stays a rotation.
            i = self._next % count
            self._next += 1
        return i


class RandomBalancer:
    """``RANDOM``: a uniformly random endpoint (Envoy ``RandomLoadBalancer``: ``random() % size``)."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, count: int, exclude: int = -1) -> int:
        """Index of a random endpoint among ``count`` (never ``exclude``, if others exist).

        ``count`` must be at least 1; ``count`` 1 always gives 0.
        """
        if count <= 1:
            return 0
        if 0 <= exclude < count:
            i = self._rng.randrange(count - 1)
            return i + 1 if i >= exclude else i
        return self._rng.randrange(count)


class RingHash:
    """``consistentHash.ringHash``: Envoy's ketama-style hash ring (``ring_hash_lb.cc``).

    The ring size is ``minimum_ring_size`` rounded up so every endpoint gets the same whole number of
    entries, ``ceil(minimum_ring_size / n)``, and capped at ``maximum_ring_size`` (Envoy: "scale up
    the number of hashes per host such that the least-weighted host gets a whole number of hashes on
    the ring ... In the case where this number exceeds the max_ring_size, it's scaled back down to
    fit"). Endpoint ``k``'s ``i``-th entry sits at ``hash64(f"{key}_{i}")``, Envoy's hash key
    ``address + "_" + i``. A request hash picks the first entry at or after it, wrapping around.

    Adding or removing one of ``n`` endpoints moves the keys that land on its entries, about ``1/n``
    of them, plus a few more because every endpoint's entry count ``ceil(minimum_ring_size / n)``
    changes with ``n`` (as in Envoy). Keys should be unique (Envoy uses the endpoint address).
    """

    __slots__ = ("_owners", "_points")

    def __init__(
        self,
        keys: Sequence[str],
        minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE,
        maximum_ring_size: int = MAX_RING_SIZE,
    ) -> None:
        n = len(keys)
        if n == 0:
            raise ValueError("ring hash: no endpoints to place on the ring")
        if not 1 <= minimum_ring_size <= MAX_RING_SIZE:
            raise ValueError(f"ring hash: minimum_ring_size must be 1..{MAX_RING_SIZE}")
        if not 1 <= maximum_ring_size <= MAX_RING_SIZE:
            raise ValueError(f"ring hash: maximum_ring_size must be 1..{MAX_RING_SIZE}")
        if minimum_ring_size > maximum_ring_size:
            # Envoy's own message (RingHashLoadBalancer constructor).
            raise ValueError(
                f"ring hash: minimum_ring_size ({minimum_ring_size}) > "
                f"maximum_ring_size ({maximum_ring_size})"
            )
        scale = min(math.ceil(minimum_ring_size / n) * n, maximum_ring_size)
        entries: list[tuple[int, int]] = []
        current = 0
        for index, key in enumerate(keys):
            # Envoy keeps running sums so a capped ring still splits evenly: host ``index`` tops the
            # ring up to ``scale * (index + 1) / n`` entries. ``current < x`` for an integer
            # ``current`` and real ``x`` is ``current < ceil(x)``, so integers give the same counts.
            target = -(-scale * (index + 1) // n)
            i = 0
            while current < target:
                entries.append((hash64(f"{key}_{i}"), index))
                i += 1
                current += 1
        # Ties between equal hashes break on endpoint index so that the ring is deterministic.
        entries.sort()
        self._points = tuple(point for point, _ in entries)
        self._owners = tuple(owner for _, owner in entries)

    @property
    def size(self) -> int:
        """Number of entries on the ring (Envoy stat ``ring_hash_lb.size``)."""
        return len(self._points)

    def pick(self, h: int, attempt: int = 0) -> int:
        """Index of the endpoint that owns the first ring entry at or after ``h`` (wrapping).

        ``h`` is a request hash from :func:`hash64`. On a retry that must avoid the last host,
        ``attempt`` > 0 steps that many entries further round the ring, as Envoy does ("behave as
        if this host was not in the ring"); that may still land on the same endpoint.
        """
        points = self._points
        i = bisect_left(points, h)
        if attempt:
            i += attempt
        return self._owners[i % len(points)]


class Maglev:
    """``consistentHash.maglev``: the Maglev lookup table (Eisenbud et al., NSDI 2016, §3.4).

    Each endpoint's key gives an ``offset`` in ``[0, M)`` and a ``skip`` in ``[1, M)``; its
    preference list is ``(offset + j * skip) % M``, a permutation of the table because ``M`` is
    prime. Endpoints take turns claiming their next unclaimed slot until the table is full, so each
    owns ``M / n`` slots, give or take one. Envoy (``maglev_lb.cc``) hashes the endpoint address with
    xxHash64 seeds 0 and 1 for the offset and skip; here both come from one 128-bit BLAKE2b digest.
    A request hash ``h`` picks ``table[h % M]``.

    Adding or removing one of ``n`` endpoints moves a little more than ``1/n`` of the keys (Envoy:
    "Maglev aims for minimal disruption rather than an absolute guarantee ... Increasing the table
    size reduces the amount of disruption"). Keys must be non-empty and should be unique.
    """

    __slots__ = ("_size", "_table")

    def __init__(self, keys: Sequence[str], table_size: int = DEFAULT_MAGLEV_TABLE_SIZE) -> None:
        if not keys:
            raise ValueError("maglev: no endpoints to place in the table")
        if not 2 <= table_size <= MAX_MAGLEV_TABLE_SIZE or not _is_prime(table_size):
            # Envoy: "The table size of maglev must be prime number" (and proto ``lte: 5000011``).
            raise ValueError(
                f"maglev: table_size {table_size} must be a prime number no larger than "
                f"{MAX_MAGLEV_TABLE_SIZE}"
            )
        size = table_size
        # Each endpoint's next position in its preference list; advancing by ``skip`` mod ``size``
        # is the paper's ``permutation[i][next[i]]`` without the multiplication.
        positions: list[int] = []
        skips: list[int] = []
        for key in keys:
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            positions.append(int.from_bytes(digest[:8], "little") % size)
            skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
        table = [-1] * size
        filled = 0
        count = len(keys)
        while filled < size:
            for index in range(count):
                c = positions[index]
                skip = skips[index]
                while table[c] >= 0:
                    c += skip
                    if c >= size:
                        c -= size
                table[c] = index
                c += skip
                positions[index] = c - size if c >= size else c
                filled += 1
                if filled == size:
                    break
        self._table = tuple(table)
        self._size = size

    @property
    def size(self) -> int:
        """The lookup table's size ``M``."""
        return self._size

    def pick(self, h: int, attempt: int = 0) -> int:
        """Index of the endpoint in slot ``h % M``; ``h`` is a request hash from :func:`hash64`.

        On a retry (``attempt`` > 0) Envoy flips most bits of the hash, ``hash ^= ~0ULL - attempt
        + 1``, so that retries spread over other slots; it may still land on the same endpoint.
        """
        if attempt:
            h ^= (_MASK64 - attempt + 1) & _MASK64
        return self._table[h % self._size]


def _is_prime(n: int) -> bool:
    """Trial division; table sizes are at most ``MAX_MAGLEV_TABLE_SIZE``, so ~2,200 divisions."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))
