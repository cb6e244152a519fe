"""benchmarks/load.py's search for the largest real-time client count (no server: a fake
load test that passes up to a capacity)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def largest_realtime():
    return load_benchmark("load").largest_realtime


def _fake(capacity: int):
    tried: list[int] = []

    def passes(n: int) -> bool:
        tried.append(n)
        return n <= capacity

    return passes, tried


@pytest.mark.parametrize("capacity", [1, 7, 37, 80, 100, 105, 150, 300])
@pytest.mark.parametrize("ns", [[120], [60, 80], [10]])
def test_search_brackets_the_capacity(largest_realtime, capacity, ns):
    passes, tried = _fake(capacity)
    got = largest_realtime(passes, ns, True, 512)
    assert got is not None and got <= capacity
    # the bracket it stopped at: within an eighth of the answer (or 2) of a failing N
    fails = [n for n in tried if n > capacity]
    assert fails and min(fails) - got <= max(2, got // 8)


def test_first_failure_searches_down(largest_realtime):
    passes, tried = _fake(100)
    assert largest_realtime(passes, [120], True, 512) in range(89, 101)
    assert tried[0] == 120 and tried[1] == 80  # down by a third, then bisection upward


def test_without_search_only_the_list_counts(largest_realtime):
    passes, tried = _fake(100)
    assert largest_realtime(passes, [80, 100, 120, 90], False, 512) == 100
    assert tried == [80, 100, 120, 90]
    assert largest_realtime(_fake(50)[0], [120], False, 512) is None


def test_nothing_real_time_at_all(largest_realtime):
    passes, _ = _fake(0)
    assert largest_realtime(passes, [5], True, 512) is None
