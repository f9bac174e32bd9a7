"""LEAST_REQUEST endpoint choice (core/balancer.py) and the balance step (layers/balance.py).

Every test seeds its own ``random.Random``, so the picks, and the tolerances on the frequency checks
below, are deterministic.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.core.balancer import LeastRequestBalancer
from meshproxy.core.routing import Cluster, ClusterKind
from meshproxy.errors import NoHealthyUpstream
from meshproxy.layers.balance import EndpointPicker, balance_layer


def loads(values: Sequence[int]) -> Callable[[int], int]:
    def load(i: int) -> int:
        assert 0 <= i < len(values), f"load() asked about index {i} of {len(values)}"
        return values[i]

    return load


def picks(
    balancer: LeastRequestBalancer, values: Sequence[int], n: int, exclude: int = -1
) -> Counter[int]:
    load = loads(values)
    return Counter(balancer.pick(len(values), load, exclude) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# LeastRequestBalancer


@pytest.mark.parametrize("count", [0, 1])
def test_zero_or_one_endpoint_is_index_zero(count: int) -> None:
    balancer = LeastRequestBalancer(random.Random(1))
    assert balancer.pick(count, loads([0] * count)) == 0
    assert balancer.pick(count, loads([0] * count), exclude=0) == 0


def test_one_endpoint_does_not_consume_randomness() -> None:
    rng = random.Random(7)
    state = rng.getstate()
    LeastRequestBalancer(rng).pick(1, loads([3]))
    assert rng.getstate() == state


@pytest.mark.parametrize(("values", "expected"), [([5, 0], 1), ([0, 5], 0), ([1, 2], 0)])
def test_two_endpoints_always_the_less_loaded(values: list[int], expected: int) -> None:
    # With two endpoints the two choices are both of them.
    balancer = LeastRequestBalancer(random.Random(2))
    assert picks(balancer, values, 200) == Counter({expected: 200})


def test_two_endpoints_equal_load_spread() -> None:
    counts = picks(LeastRequestBalancer(random.Random(3)), [4, 4], 4000)
    assert set(counts) == {0, 1}
    assert 1800 < counts[0] < 2200


@pytest.mark.parametrize("exclude", [0, 1])
def test_two_endpoints_exclude_gives_the_other(exclude: int) -> None:
    # Even when the other one is far busier: a retry goes elsewhere.
    values = [100, 100]
    values[1 - exclude] = 1000
    counts = picks(LeastRequestBalancer(random.Random(4)), values, 100, exclude=exclude)
    assert counts == Counter({1 - exclude: 100})


def test_prefers_the_less_loaded_of_two_choices() -> None:
    # One idle endpoint among five busy ones wins whenever it is one of the two choices:
    # P = 1 - (4/5 * 3/4) = 2/5, against 1/5 for a uniform pick.
    counts = picks(LeastRequestBalancer(random.Random(5)), [0, 9, 9, 9, 9], 10_000)
    assert 0.37 < counts[0] / 10_000 < 0.43


def test_the_busiest_endpoint_is_never_chosen() -> None:
    # Two distinct choices: the single most loaded endpoint always loses its comparison.
    for count in range(2, 8):
        values = [1] * count
        values[count // 2] = 50
        counts = picks(LeastRequestBalancer(random.Random(count)), values, 1000)
        assert count // 2 not in counts
        assert len(counts) == count - 1


@pytest.mark.parametrize("count", [3, 5, 10])
def test_equal_load_spreads_across_all_endpoints(count: int) -> None:
    n = 2000 * count
    counts = picks(LeastRequestBalancer(random.Random(count)), [0] * count, n)
    assert set(counts) == set(range(count))
    for i in range(count):
        assert 0.85 * 2000 < counts[i] < 1.15 * 2000, counts


@pytest.mark.parametrize("exclude", [0, 2, 4])
def test_exclude_is_never_chosen(exclude: int) -> None:
    values = [0] * 5
    values[exclude] = -100  # the least loaded of all, and still excluded
    counts = picks(LeastRequestBalancer(random.Random(6)), values, 5000, exclude=exclude)
    assert exclude not in counts
    assert set(counts) == set(range(5)) - {exclude}
    for i in counts:
        assert 0.8 * 1250 < counts[i] < 1.2 * 1250


def test_exclude_still_prefers_less_loaded() -> None:
    counts = picks(LeastRequestBalancer(random.Random(8)), [0, 0, 9, 9, 9], 10_000, exclude=0)
    # Endpoint 1 is the only idle one left: chosen whenever drawn (with replacement over four).
    assert counts[1] / 10_000 > 0.35
    assert 0 not in counts


@pytest.mark.parametrize("exclude", [-1, 3, 99])
def test_exclude_out_of_range_is_ignored(exclude: int) -> None:
    counts = picks(LeastRequestBalancer(random.Random(9)), [0, 0, 0], 3000, exclude=exclude)
    assert set(counts) == {0, 1, 2}


def test_same_seed_same_choices() -> None:
    values = [3, 1, 4, 1, 5, 9, 2, 6]
    a = LeastRequestBalancer(random.Random(42))
    b = LeastRequestBalancer(random.Random(42))
    load = loads(values)
    assert [a.pick(8, load) for _ in range(100)] == [b.pick(8, load) for _ in range(100)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=30),
    st.integers(min_value=-1, max_value=30),
    st.integers(min_value=0, max_value=2**32),
)
def test_pick_is_in_range_and_respects_exclude(values: list[int], exclude: int, seed: int) -> None:
    balancer = LeastRequestBalancer(random.Random(seed))
    count = len(values)
    for _ in range(20):
        chosen = balancer.pick(count, loads(values), exclude)
        assert 0 <= chosen < count
        if count > 1 and 0 <= exclude < count:
            assert chosen != exclude
        if count > 1 and exclude == -1 and values.count(max(values)) == 1:
            assert values[chosen] < max(values)


# ---------------------------------------------------------------------------------------------
# The balance step


CLUSTER = Cluster(name="c", service="svc", port=80, kind=ClusterKind.SERVICE)  # LEAST_REQUEST


@dataclass
class FakeEndpoint:
    name: str
    active_requests: int = 0


def test_no_endpoint_is_no_healthy_upstream() -> None:
    picker = balance_layer(random.Random(1))
    assert isinstance(picker, EndpointPicker)
    empty: list[FakeEndpoint] = []
    with pytest.raises(NoHealthyUpstream) as info:
        picker.pick(CLUSTER, empty)
    assert info.value.status_hint == 503
    assert info.value.flag == "UH"
    assert info.value.body == b"no healthy upstream"


def test_single_endpoint_is_chosen_even_when_excluded() -> None:
    only = FakeEndpoint("a", active_requests=99)
    picker = EndpointPicker(random.Random(1))
    assert picker.pick(CLUSTER, [only]) is only
    assert picker.pick(CLUSTER, [only], exclude=0) is only


def test_picker_reads_active_requests() -> None:
    busy, idle = FakeEndpoint("busy", 10), FakeEndpoint("idle", 0)
    picker = EndpointPicker(random.Random(2))
    assert all(picker.pick(CLUSTER, [busy, idle]) is idle for _ in range(50))
    idle.active_requests = 20  # the load is read at each pick, not cached
    assert all(picker.pick(CLUSTER, [busy, idle]) is busy for _ in range(50))


def test_picker_exclude() -> None:
    endpoints = [FakeEndpoint(str(i)) for i in range(4)]
    picker = EndpointPicker(random.Random(3))
    chosen = Counter(picker.pick(CLUSTER, endpoints, exclude=1).name for _ in range(2000))
    assert set(chosen) == {"0", "2", "3"}


def test_picker_spreads_equal_load() -> None:
    endpoints = [FakeEndpoint(str(i)) for i in range(3)]
    picker = EndpointPicker(random.Random(4))
    chosen = Counter(picker.pick(CLUSTER, endpoints).name for _ in range(3000))
    assert all(800 < chosen[e.name] < 1200 for e in endpoints)
