"""File-descriptor helpers shared by the threads that sleep on a wake pipe."""

from __future__ import annotations

import os


def close_quietly(*fds: int) -> None:
    """Close each descriptor, ignoring one that is already closed (idempotent teardown)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
