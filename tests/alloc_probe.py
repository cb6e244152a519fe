"""How many bytes a real-time callback allocates, for the tests that require none."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def callback_peak_bytes(call: Callable[[], object], calls: int = 20, rounds: int = 3) -> int:
    """Peak Python allocation (tracemalloc) above the start over ``calls`` calls of ``call``,
    the least over ``rounds`` rounds. tracemalloc counts every thread of the process (a
    thread left over by an earlier test may allocate meanwhile), so the quietest round
    judges the callback: an allocation of its own shows in every round."""
    grown = []
    tracemalloc.start()
    try:
        for _ in range(rounds):
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(calls):
                call()
            _, peak = tracemalloc.get_traced_memory()
            grown.append(peak - base)
    finally:
        tracemalloc.stop()
    return min(grown)
