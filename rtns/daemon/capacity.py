"""How many channel streams one daemon loop carries in real time, measured, and whether a
new session fits (admission control: ``busy``).

A channel stream at 16 kHz needs one hop (one bank row) every 8 ms. The loop's cost per hop
(``hop_s``: wall time of its work, messaging and Python included, per row) gives the
capacity ``streams = headroom * 8 ms / hop_s``: with ``headroom`` 0.7 the loop is busy at
most 70 % of the time when full, which leaves the slack that keeps every answer within a
hop or two of its message.

``hop_s`` starts from a start-up probe (:func:`probe_hop_s`: a scratch bank of the model
steps ``rows`` rows at a time; that costs per row the inference, FFTs and overlap-add, and
the daemon's messaging and Python work per hop was measured at 0.6-0.9 times that again, so
the prior is 1.9 times the probe) and is then measured from the loop itself, in windows of a
second that carry enough work (busy at least a quarter of the time: below that the fixed
cost per tick and the small batches make the figure pessimistic). A window with a late
answer also stops admission at the streams open until the next window says otherwise.
Wall time, not CPU time: a core shared with another process makes the loop slower, and
the capacity drops with it.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np

from rtns.daemon.logs import log_event

#: Seconds of audio per hop at 16 kHz (128 samples).
HOP_PERIOD_S = 0.008
#: The loop's cost per hop over the bank step alone (measured 2026-12-05: 39-45 µs per hop
#: in the load benchmark at 140-200 clients, against 24.3 µs for the bank step at 64 rows:
#: 1.6-1.9 times; the first build measured 72.6 against 28, 2.6 times).
PRIOR_OVERHEAD = 1.9
#: A window updates the estimate only when the loop was busy this much of it.
MIN_BUSY = 0.25


def probe_hop_s(model, rows: int = 64, repeats: int = 12) -> float:
    """Wall seconds per row of one bank step of ``rows`` rows (the median of ``repeats``)."""
    from rtns.bank import StreamBank

    bank = StreamBank(model, capacity=rows, max_batch=rows)
    slots = np.array([bank.open() for _ in range(rows)])
    x = (0.01 * np.random.default_rng(0).standard_normal(model.block_shift)).astype(np.float32)
    times = []
    for _ in range(repeats + 2):
        for s in slots.tolist():
            bank.feed(s, x)
        t0 = time.perf_counter()
        bank.step(bank.ready())
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:])) / rows


class Capacity:
    """The loop's capacity in channel streams. ``mode``: "auto" (measured), "off" (admit
    everything up to --max-sessions) or a fixed number of streams."""

    def __init__(
        self, mode: int | Literal["auto", "off"], headroom: float, prior_hop_s: float
    ) -> None:
        self.mode = mode
        self.headroom = headroom
        self.hop_s = prior_hop_s * PRIOR_OVERHEAD
        self.source = f"start-up probe ({1e6 * prior_hop_s:.1f} us/row x {PRIOR_OVERHEAD})"
        #: Streams open when a late answer was last seen (admission stops there); or None.
        self.late_cap: int | None = None
        self._busy = 0.0
        self._rows = 0
        self._late = 0
        self._window = time.monotonic()
        self._logged = 0

    @property
    def estimate(self) -> int:
        """Streams the measured cost allows (whatever the mode)."""
        return max(1, math.floor(self.headroom * HOP_PERIOD_S / self.hop_s))

    @property
    def streams(self) -> int | None:
        """Streams admitted at most (None: no limit)."""
        if self.mode == "off":
            return None
        n = self.estimate if self.mode == "auto" else int(self.mode)
        return n if self.late_cap is None else min(n, self.late_cap)

    def admits(self, open_streams: int, new: int) -> bool:
        cap = self.streams
        return cap is None or open_streams + new <= cap

    def work(self, busy_s: float, rows: int) -> None:
        self._busy += busy_s
        self._rows += rows

    def late(self) -> None:
        self._late += 1

    def update(self, now: float, open_streams: int) -> None:
        """Close the window (call about once a second): re-measure ``hop_s``."""
        span = now - self._window
        if span < 1.0:
            return
        busy, rows, late = self._busy, self._rows, self._late
        self._busy, self._rows, self._late, self._window = 0.0, 0, 0, now
        if rows and busy >= MIN_BUSY * span:
            measured = busy / rows
            self.hop_s = 0.5 * self.hop_s + 0.5 * measured
            self.source = f"measured ({rows} hops in {span:.1f} s, busy {busy / span:.0%})"
        self.late_cap = open_streams if late else None
        if late or abs(self.estimate - self._logged) > 0.1 * max(1, self._logged):
            self.log(late=late)

    def log(self, **extra: object) -> None:
        """The estimate as a log event (loud: at start and whenever it moves > 10 %)."""
        self._logged = self.estimate
        log_event(
            "capacity",
            mode=self.mode,
            streams=self.streams,
            estimate=self.estimate,
            hop_us=round(1e6 * self.hop_s, 1),
            headroom=self.headroom,
            source=self.source,
            **extra,
        )

    def stats(self, open_streams: int) -> dict:
        return {
            "mode": self.mode,
            "streams": self.streams,
            "estimate": self.estimate,
            "open_streams": open_streams,
            "hop_us": round(1e6 * self.hop_s, 2),
            "headroom": self.headroom,
            "source": self.source,
            "late_cap": self.late_cap,
        }
