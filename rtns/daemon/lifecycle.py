"""The life cycle one daemon loop shows its signals and probes: stop, drain, alive, ready.

Shared by :class:`rtns.daemon.server.Server` (one loop) and
:class:`rtns.daemon.workers.Supervisor` (the front of ``--workers``), which differ in what a
drain does once it is asked for, not in how it is asked or reported.
"""

from __future__ import annotations

import threading
import time

from rtns.signals import SignalSafeEvent

#: /healthz fails when the loop has not turned for this long (it waits at most its poll
#: interval per turn).
ALIVE_S = 10.0


class Lifecycle:
    """Events set from signal handlers or other threads; read by the loop and /readyz."""

    def __init__(self) -> None:
        # Set from signal handlers (SIGTERM, SIGINT), which run on the loop's own thread.
        self._stop = SignalSafeEvent()
        self._draining = SignalSafeEvent()
        self.bound = threading.Event()  # models loaded and the socket bound
        self.heartbeat = time.monotonic()  # the loop writes it every turn

    def stop(self) -> None:
        """Ask the loop to flush every session and return (thread- and signal-safe)."""
        self._stop.set()

    def drain(self) -> None:
        """Stop taking sessions (``draining``), let the open ones run for up to
        ``drain_seconds``, then flush them and return (thread- and signal-safe; SIGTERM)."""
        self._draining.set()

    def draining(self) -> bool:
        """A drain was asked for (the ``rtns_draining`` gauge)."""
        return self._draining.is_set()

    def alive(self) -> bool:
        """The loop turned within the last :data:`ALIVE_S` seconds."""
        return time.monotonic() - self.heartbeat < ALIVE_S

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /readyz: models loaded, bound, not draining."""
        if self._draining.is_set() or self._stop.is_set():
            return False, "draining"
        if not self.bound.is_set():
            return False, "starting"
        return True, "ready"
