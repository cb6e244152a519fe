"""The suite's one way to wait for another thread or process: poll for the event, with a
generous deadline, never a fixed sleep (a loaded CI box slows a test; it must not fail it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str, step: float = 0.02) -> T:
    """Poll ``cond`` until it is truthy (returns its value) or fail after ``timeout`` s,
    naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
