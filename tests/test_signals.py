"""rtns.signals: an event a signal handler may set while the main thread waits on it.

A child process polls ``ev.wait()`` in a tight loop (as `rtns run` polls its stop event)
while this test signals it thousands of times; every handler sets the event. With a plain
``threading.Event`` a handler that lands while the loop holds the event's lock blocks for ever
(the ``plain`` case shows the harness catches that); with ``SignalSafeEvent`` the child
finishes and has seen the signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import select, signal, sys, threading
    from rtns.signals import SignalSafeEvent

    ev = SignalSafeEvent() if sys.argv[1] == "safe" else threading.Event()
    handled = 0

    def on_signal(signum, frame):
        global handled
        handled += 1
        ev.set()

    signal.signal(signal.SIGUSR1, on_signal)
    print("ready", flush=True)
    seen, turns = 0, 0
    while True:  # until the test writes a line
        if ev.wait(0.0001):
            ev.clear()
            seen += 1
        turns += 1
        if turns % 64 == 0 and select.select([sys.stdin], [], [], 0)[0]:
            break
    print(f"handled {handled} seen {seen}", flush=True)
    """
)


def _pummel(kind: str, seconds: float, deadline: float) -> tuple[bool, str]:
    """Signal a child that waits on an event of ``kind`` for ``seconds``; (finished, output)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # the plain event's child may die of a RecursionError
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end and proc.poll() is None:
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.0002)
        try:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        except BrokenPipeError:  # it died (a handler recursed, say): it did not finish
            pass
        try:
            out, _ = proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            return False, ""
        return proc.returncode == 0 and out.startswith("handled"), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_handler_sets_the_event_the_main_thread_waits_on():
    finished, out = _pummel("safe", seconds=3.0, deadline=60.0)
    assert finished, "the child hung: a handler blocked on the event's lock"
    handled, seen = int(out.split()[1]), int(out.split()[3])
    assert handled > 100 and seen > 0, out


def test_the_plain_event_hangs_under_the_same_signals():
    """The harness catches the bug it guards against: with ``threading.Event`` the child
    hangs, or dies when more signals interrupt the blocked handler (in each of 5 runs here,
    within 0.5 to 2.8 s)."""
    for _ in range(5):  # each try is a few seconds; the hang comes in the first, as a rule
        finished, _ = _pummel("plain", seconds=3.0, deadline=5.0)
        if not finished:
            return
    pytest.fail("threading.Event survived 15 s of signals: the harness cannot see the hang")


def test_the_events_signal_handlers_set_are_signal_safe():
    """`rtns run`'s SIGTERM/SIGINT handlers set ``stop`` (its main thread polls
    ``stop.wait``); `rtns serve`'s set the loop's stop and drain events."""
    from rtns.cli.live import _Live
    from rtns.daemon.lifecycle import Lifecycle
    from rtns.signals import SignalSafeEvent

    live = _Live(runner=None, vm=None)
    life = Lifecycle()
    for ev in (live.stop, live.stopping, life._stop, life._draining):
        assert isinstance(ev, SignalSafeEvent)
