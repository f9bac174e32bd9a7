"""The balance step: which endpoint of the chosen cluster gets the request.

Owns endpoint choice over whatever the edge uses to represent an endpoint (anything with an
``active_requests`` count), with Istio's default LEAST_REQUEST from ``core/balancer.py``. An empty
cluster is Envoy's ``no healthy upstream`` (503 UH).

Rules: synchronous; no I/O; the random source is injected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from meshproxy.core.balancer import LeastRequestBalancer
from meshproxy.errors import NoHealthyUpstream


class Loaded(Protocol):
    @property
    def active_requests(self) -> int: ...


E = TypeVar("E", bound=Loaded)


class EndpointPicker:
    __slots__ = ("_balancer",)

    def __init__(self, rng: random.Random) -> None:
        self._balancer = LeastRequestBalancer(rng)

    def pick(self, endpoints: Sequence[E], exclude: int = -1) -> E:
        count = len(endpoints)
        if count == 0:
            raise NoHealthyUpstream("cluster has no endpoints")
        if count == 1:
            return endpoints[0]
        index = self._balancer.pick(count, lambda i: endpoints[i].active_requests, exclude)
        return endpoints[index]


def balance_layer(rng: random.Random) -> EndpointPicker:
    return EndpointPicker(rng)
