"""Events that signal handlers may set.

Python runs a signal handler on the main thread between two bytecodes, which may fall
inside :meth:`threading.Event.wait` while that thread holds the event's internal lock.
``Event.set()`` in the handler then waits for ever on a lock its own thread holds: `rtns run`
polls ``stop.wait(0.1)`` on its main thread, so a SIGTERM that lands in that window hangs it
(a stub `rtns run` ignored SIGTERM for 120 s once, in the test suite with four busy processes
beside it; tests/test_signals.py shows the window within seconds by signalling a loop that
waits on a ``threading.Event``).
"""

from __future__ import annotations

import threading


class SignalSafeEvent(threading.Event):
    """A :class:`threading.Event` whose ``set()`` may run in a signal handler.

    Its condition sits on a re-entrant lock, so a handler that interrupts the main thread
    inside ``wait()`` (lock held) takes the lock again instead of blocking on it; ``set()``
    then wakes that very ``wait()``. Everything else is ``threading.Event``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.RLock())
