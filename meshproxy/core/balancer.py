"""Endpoint choice: Envoy's LEAST_REQUEST (power of two choices), Istio's default policy.

Owns the decision "which endpoint of a cluster gets this request". The caller supplies how loaded
each endpoint is (its active requests) and a seeded ``random.Random``; the choice is a pure function
of those. Istio leaves ``loadBalancer`` unset to mean LEAST_REQUEST
(``cluster_traffic_policy.go defaultLBAlgorithm``); with equal weights Envoy picks two endpoints at
random and keeps the less loaded one (``choice_count`` 2).

Rules: no clocks, no module-level random; O(1) per pick.
"""

from __future__ import annotations

import random
from collections.abc import Callable


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
