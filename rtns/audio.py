"""Live duplex audio around a :class:`rtns.engine.Stream`: the engine side of ``rtns run``.

Threads and data flow (device rate R, engine rate 16 kHz, hop 128)::

    PortAudio callback (R)  --in ring-->  worker: ChannelStream.push (resample R->16k,
                            <--out ring--         Stream, back to R, full band above 8 kHz)

* The callback (:meth:`LiveRunner.callback`) only copies samples between PortAudio's
  arrays and two preallocated :class:`~rtns.ringbuffer.RingBuffer` objects, bumps integer
  counters and writes one byte to a non-blocking pipe to wake the worker. It never
  allocates an array, takes a lock, waits or prints.
* The worker thread owns the engine stream and the resamplers. Control changes (bypass,
  attenuation limit) reach it through a queue and are applied between pushes.
* Timeline: the output ring is prefilled with silence once, and from then on output
  sample ``m`` of the stream is always ring sample ``m``. When the worker is late the
  callback plays silence for what is missing, counts an under-run and remembers the
  shortfall (``debt``); the late samples are discarded when they arrive. So the
  input-to-output delay never drifts: it is exactly :class:`LatencyBreakdown` whatever
  the scheduling.

Latency terms (all reported by :class:`LatencyBreakdown`):

* algorithmic: the pack's ``latency_samples`` (384 samples = 24 ms for 512/128 framing).
* worker: one 8 ms hop of output buffering, rounded up to whole device blocks, so the
  worker has at least one hop of time to process a hop (0 if it ran inside the callback).
* hop alignment: extra buffering when device blocks do not line up with 128-sample hops
  at 16 kHz (0 at 16 kHz with 128-frame blocks; 256 frames at 48 kHz with 128 frames).
* resampling: group delay of the two polyphase filters, made a whole number of device
  samples by :class:`~rtns.streams.ChannelStream` (0 at 16 kHz). Above 16 kHz the band the
  model cannot see passes through a complementary crossover with the same delay.
* PortAudio in / out: ``stream.latency`` (driver/server buffering outside the process).
"""

from __future__ import annotations

import math
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from rtns.atten import OFF, AttenLimit, AttenLimitError
from rtns.engine import Model
from rtns.errors import RtnsError, UserInputError
from rtns.fdutil import close_quietly
from rtns.ringbuffer import RingBuffer
from rtns.streams import ChannelStream

#: Ring capacity in seconds; far more than any scheduling hiccup the stream survives.
RING_SECONDS = 2.0
#: Python switches threads every 5 ms by default, so a worker holding the GIL could delay
#: the callback by 5 ms; 0.5 ms keeps the callback on time (measured: AUDIO_TESTING.md).
SWITCH_INTERVAL_S = 0.0005
#: A running stream whose callback has not run for this long (or for
#: :data:`DEAD_AFTER_BLOCKS` device blocks, whichever is longer) is dead: the sound
#: server is gone or the device was removed. 0.5 s is 62 hops at 16 kHz: no scheduling
#: hiccup a live stream survives lasts that long.
DEAD_AFTER_S = 0.5
DEAD_AFTER_BLOCKS = 4
#: SCHED_FIFO priority asked for the worker: below JACK's client threads (5 with jackd's
#: default -P 10) so the callback still preempts it, above every normal process so that
#: background load cannot starve inference. Needs root, CAP_SYS_NICE or RLIMIT_RTPRIO.
WORKER_RT_PRIORITY = 4
#: SCHED_FIFO priority of the live process's other Python threads (main loop, terminal
#: controls) while audio runs: they wake rarely and briefly, but must not be preempted by
#: other processes while they hold the GIL (see :func:`set_thread_scheduling`).
CONTROL_RT_PRIORITY = 1

PORTAUDIO_MISSING = (
    "the PortAudio library is not installed; install the system package libportaudio2 "
    "(e.g. `apt-get install libportaudio2`)"
)


# -- latency plan -----------------------------------------------------------------------
class BufferPlan(BaseModel):
    """Output prefill of a live stream, in device frames."""

    model_config = ConfigDict(frozen=True)

    block_frames: int
    alignment_frames: int
    worker_frames: int
    #: Extra prefill against a host API that delivers blocks in bursts (0 for ``rtns run``;
    #: ``--virtual-mic`` adds two blocks: PulseAudio's ALSA plugin hands blocks over unevenly).
    margin_frames: int = 0

    @property
    def prefill_frames(self) -> int:
        return self.alignment_frames + self.worker_frames + self.margin_frames


def plan_buffering(
    block_frames: int,
    device_rate: int,
    rate: int,
    hop: int,
    count_out: Callable[[int], int] | None = None,
    seconds: float = 4.0,
    margin_frames: int = 0,
) -> BufferPlan:
    """The smallest prefill that never starves the callback with ``block_frames`` blocks.

    alignment: assuming each block were processed the instant it arrived, the largest
    shortfall ``(j + 1) * B - produced_j`` over callbacks ``j``; ``count_out(n)`` is the
    output a stream has produced after n device frames (:meth:`ChannelStream.count_out`:
    hops complete only every 128 engine samples, and resamplers emit at their own pace;
    default: whole hops at the engine rate). worker: one hop at the device rate rounded up
    to whole blocks, the time the worker gets for each hop. ``margin_frames`` is added as
    it stands (see :attr:`BufferPlan.margin_frames`).
    """
    if block_frames <= 0:
        raise ValueError(f"block size must be positive, got {block_frames}")
    worst = 0
    n_blocks = max(64, math.ceil(seconds * device_rate / block_frames))
    for j in range(1, n_blocks + 1):
        total = j * block_frames
        produced = count_out(total) if count_out else total // hop * hop
        worst = max(worst, total - produced)
    hop_frames = hop * device_rate / rate
    worker = block_frames * math.ceil(hop_frames / block_frames - 1e-9)
    return BufferPlan(
        block_frames=block_frames,
        alignment_frames=worst,
        worker_frames=worker,
        margin_frames=max(0, int(margin_frames)),
    )


class LatencyBreakdown(BaseModel):
    """Input-to-output delay of a live stream and its terms, in seconds."""

    model_config = ConfigDict(frozen=True)

    device_rate: int
    block_frames: int
    algorithmic_s: float
    worker_s: float
    alignment_s: float
    resampling_s: float
    portaudio_in_s: float
    portaudio_out_s: float
    #: :attr:`BufferPlan.margin_frames` in seconds (0 for ``rtns run``).
    margin_s: float = 0.0

    @property
    def in_process_s(self) -> float:
        """From the callback's input to its output: everything but PortAudio's buffering."""
        return (
            self.algorithmic_s
            + self.worker_s
            + self.alignment_s
            + self.resampling_s
            + self.margin_s
        )

    @property
    def total_s(self) -> float:
        return self.in_process_s + self.portaudio_in_s + self.portaudio_out_s

    def describe(self) -> str:
        ms = 1e3
        return (
            f"latency {self.total_s * ms:.3f} ms = algorithmic {self.algorithmic_s * ms:.3f}"
            f" + worker {self.worker_s * ms:.3f} + hop alignment {self.alignment_s * ms:.3f}"
            f" + resampling {self.resampling_s * ms:.3f}"
            + (f" + jitter margin {self.margin_s * ms:.3f}" if self.margin_s else "")
            + f" + PortAudio in {self.portaudio_in_s * ms:.3f} + out {self.portaudio_out_s * ms:.3f}"
            f" (device {self.device_rate} Hz, {self.block_frames}-frame blocks)"
        )


# -- the runner ---------------------------------------------------------------------------
class Stats(BaseModel):
    """A snapshot of a runner's counters."""

    seconds: float
    callbacks: int
    underruns: int
    underrun_frames: int
    input_dropped: int
    output_dropped: int
    pa_input_overflow: int
    pa_input_underflow: int
    pa_output_underflow: int
    pa_output_overflow: int
    hops: int
    #: Engine audio processed by the worker (hops * hop / engine rate), seconds.
    processed_s: float
    busy_s: float
    max_hop_s: float
    bypass: bool
    atten_lim_db: float | None

    @property
    def rtf(self) -> float:
        """Worker compute time / audio time it processed."""
        return self.busy_s / self.processed_s if self.processed_s else 0.0


class LiveRunner:
    """Callback, rings, worker thread and counters of one live duplex stream (mono).

    Usage: ``runner.start()``; give ``runner.callback`` to a PortAudio duplex stream of
    ``device_rate`` Hz, float32, one channel each way; ``runner.stop()``. Without
    PortAudio, call :meth:`callback` with arrays ``[frames, 1]`` and drive the worker with
    :meth:`step` (or :meth:`start`).
    """

    def __init__(
        self,
        model: Model,
        device_rate: int,
        ring_seconds: float = RING_SECONDS,
        rt_priority: int = WORKER_RT_PRIORITY,
        margin_blocks: int = 0,
    ) -> None:
        self.model = model
        self.rt_priority = rt_priority
        #: Device blocks of extra prefill (:attr:`BufferPlan.margin_frames`).
        self.margin_blocks = int(margin_blocks)
        #: How the worker thread is scheduled ("SCHED_FIFO 4" or why it is not real-time).
        self.worker_scheduling = "not started"
        self.rate = model.sample_rate
        self.hop = model.block_shift
        self.device_rate = int(device_rate)
        if self.device_rate <= 0:
            raise ValueError(f"device sample rate must be positive, got {device_rate}")
        #: The one stream plumbing (resampling, full band above 16 kHz, exact counts).
        self.cs = ChannelStream(model, 1, self.device_rate)
        capacity = int(ring_seconds * self.device_rate)
        self.in_ring = RingBuffer(capacity)
        self.out_ring = RingBuffer(capacity)
        self._work = np.zeros(capacity, dtype=np.float32)
        # Written by the callback thread only.
        self.callbacks = 0
        self.frames = 0
        self.underruns = 0
        self.underrun_frames = 0
        self.input_dropped = 0
        self.pa_input_overflow = 0
        self.pa_input_underflow = 0
        self.pa_output_underflow = 0
        self.pa_output_overflow = 0
        self._debt = 0
        self._first_frames = 0
        # Written by the worker only.
        self._primed = False
        self.plan: BufferPlan | None = None
        self.hops = 0
        self.busy_s = 0.0
        self.max_hop_s = 0.0
        self.output_dropped = 0
        self.error: str | None = None
        self.bypass = False
        self.atten_lim_db: float | None = self.cs.atten_lim.optional()  # the pack's default
        # Plumbing.
        self.primed = threading.Event()
        self.failed = threading.Event()
        self._controls: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._old_switch: float | None = None
        #: Worker passes completed (each drains the rings); tests wait on it.
        self.passes = 0
        # Liveness, as seen by the thread that calls :meth:`dead` (the CLI's main thread).
        self._seen_callbacks = -1
        self._seen_at = 0.0

    # -- audio thread ---------------------------------------------------------------------
    def callback(
        self, indata: np.ndarray, outdata: np.ndarray, frames: int, time_info: Any, status: Any
    ) -> None:
        """PortAudio duplex callback: indata/outdata float32 [frames, 1]. Never blocks."""
        self.callbacks += 1
        if status:
            self._count_status(status)
        if not self._primed:
            # The worker sizes the prefill from the first block size; until then both
            # directions stay idle, so the timeline starts at the first primed callback.
            outdata.fill(0.0)
            if self._first_frames == 0:
                self._first_frames = frames
                self._wake()
            return
        taken = self.in_ring.write(indata[:, 0])
        if taken < frames:
            self.input_dropped += frames - taken
        self._wake()
        out = outdata[:, 0]
        got = 0
        if self._debt:
            self._debt -= self.out_ring.discard(self._debt)
        if not self._debt:
            got = self.out_ring.read_into(out)
        if got < frames:
            out[got:] = 0.0
            self._debt += frames - got
            self.underruns += 1
            self.underrun_frames += frames - got
        self.frames += frames

    def _count_status(self, status: Any) -> None:
        if status.input_overflow:
            self.pa_input_overflow += 1
        if status.input_underflow:
            self.pa_input_underflow += 1
        if status.output_underflow:
            self.pa_output_underflow += 1
        if status.output_overflow:
            self.pa_output_overflow += 1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the worker has wake-ups pending anyway
            pass

    # -- worker ---------------------------------------------------------------------------
    def step(self) -> int:
        """One worker pass: apply controls, prime once, process what the rings hold.

        Returns the number of device frames written to the output ring.
        """
        self._apply_controls()
        if not self._primed:
            if self._first_frames:
                self._prime(self._first_frames)
            return 0
        n = self.in_ring.read_into(self._work)
        if n == 0:
            return 0
        t0 = time.perf_counter()
        x = self._work[:n]
        hops_before = self.cs.hops
        y = self.cs.push(x[:, None])[:, 0]
        dt = time.perf_counter() - t0
        hops = self.cs.hops - hops_before
        if hops:
            self.hops += hops
            self.busy_s += dt
            self.max_hop_s = max(self.max_hop_s, dt / hops)
        written = self.out_ring.write(y)
        if written < y.shape[0]:
            self.output_dropped += y.shape[0] - written
        return written

    def _prime(self, block_frames: int) -> None:
        self.plan = plan_buffering(
            block_frames,
            self.device_rate,
            self.rate,
            self.hop,
            self.cs.count_out,
            margin_frames=self.margin_blocks * block_frames,
        )
        if self.plan.prefill_frames + 4 * block_frames > self.out_ring.capacity:
            raise RtnsError(f"device blocks of {block_frames} frames are too large for rtns run")
        self.out_ring.write_zeros(self.plan.prefill_frames)
        self._primed = True
        self.primed.set()

    def _apply_controls(self) -> None:
        while True:
            try:
                what, value = self._controls.get_nowait()
            except queue.Empty:
                return
            if what == "bypass":
                self.bypass = not self.bypass if value is None else bool(value)
                self.cs.bypass = self.bypass
            elif what == "atten":
                self.cs.atten_lim = value
                self.atten_lim_db = self.cs.atten_lim.optional()  # off reads back as None

    def _make_realtime(self) -> None:
        """Ask for SCHED_FIFO on the calling (worker) thread; record the outcome."""
        self.worker_scheduling = set_thread_scheduling(self.rt_priority)

    def _run(self) -> None:
        self._make_realtime()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._wake_r], [], [], 0.1)
                if ready:
                    os.read(self._wake_r, 4096)
                while self.step():
                    pass
                self.passes += 1
        except Exception as e:  # reported by the main thread, which stops the stream
            self.error = f"{type(e).__name__}: {e}"
            self.failed.set()

    # -- controls (any thread) ----------------------------------------------------------------
    def _control(self, what: str, value: Any) -> None:
        """Queue a control for the worker; before :meth:`start` apply it at once, so the
        settings read back (a banner, :meth:`stats`) are the ones in force."""
        self._controls.put((what, value))
        if self._thread is None:
            self._apply_controls()

    def set_bypass(self, on: bool | None = None) -> None:
        """Bypass on/off (None toggles): the output becomes the input, same latency."""
        self._control("bypass", on)

    def set_atten_lim(self, limit: AttenLimit | str | float | None) -> None:
        """At most this much noise reduction (None, ``math.inf`` or 'off': unlimited)."""
        try:
            value = OFF if limit is None else AttenLimit.parse(limit)
        except AttenLimitError as e:
            raise UserInputError(str(e)) from None
        self._control("atten", value)

    # -- liveness ---------------------------------------------------------------------------
    @property
    def dead_after_s(self) -> float:
        """How long without a callback makes a started stream dead (see :data:`DEAD_AFTER_S`)."""
        block = self.plan.block_frames if self.plan else self._first_frames
        return max(DEAD_AFTER_S, DEAD_AFTER_BLOCKS * block / self.device_rate)

    def dead(self, active: bool = True, now: float | None = None) -> str | None:
        """Why the running stream is dead, or None while it is alive.

        Call it periodically from one thread once the stream has started: it notes when
        the callback count last moved. ``active``: PortAudio's ``stream.active`` (False once
        the host API stopped calling back, e.g. when the JACK server quit).
        """
        now = time.monotonic() if now is None else now
        if not active:
            return "the audio stream stopped (sound server gone or device removed)"
        if self.callbacks != self._seen_callbacks:
            self._seen_callbacks, self._seen_at = self.callbacks, now
            return None
        quiet = now - self._seen_at
        if quiet >= self.dead_after_s:
            return (
                f"no audio callback for {quiet:.1f} s (sound server gone, device removed or "
                "stream stalled)"
            )
        return None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (and shorten Python's thread switch interval)."""
        if self._thread is not None:
            return
        self._old_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._stop.clear()
        thread = threading.Thread(target=self._run, name="rtns-worker", daemon=True)
        self._thread = thread  # from here on controls go through the queue
        thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake()
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    def close(self) -> None:
        self.stop()
        close_quietly(self._wake_r, self._wake_w)

    def __enter__(self) -> LiveRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reporting ------------------------------------------------------------------------
    def latency(self, portaudio: Sequence[float] = (0.0, 0.0)) -> LatencyBreakdown:
        """The delay from device input to device output (needs the plan: after priming)."""
        if self.plan is None:
            raise RuntimeError("the latency is known once the first callback has run")
        r = self.device_rate
        # Resampling and band split, exactly: the stream's latency beyond the model's.
        resampling = self.cs.latency / r - self.model.latency / self.rate
        return LatencyBreakdown(
            device_rate=r,
            block_frames=self.plan.block_frames,
            algorithmic_s=self.model.latency / self.rate,
            worker_s=self.plan.worker_frames / r,
            alignment_s=self.plan.alignment_frames / r,
            resampling_s=resampling,
            portaudio_in_s=float(portaudio[0]),
            portaudio_out_s=float(portaudio[1]),
            margin_s=self.plan.margin_frames / r,
        )

    def stats(self) -> Stats:
        return Stats(
            seconds=self.frames / self.device_rate,
            callbacks=self.callbacks,
            underruns=self.underruns,
            underrun_frames=self.underrun_frames,
            input_dropped=self.input_dropped,
            output_dropped=self.output_dropped,
            pa_input_overflow=self.pa_input_overflow,
            pa_input_underflow=self.pa_input_underflow,
            pa_output_underflow=self.pa_output_underflow,
            pa_output_overflow=self.pa_output_overflow,
            hops=self.hops,
            processed_s=self.hops * self.hop / self.rate,
            busy_s=self.busy_s,
            max_hop_s=self.max_hop_s,
            bypass=self.bypass,
            atten_lim_db=self.atten_lim_db,
        )


# -- scheduling ------------------------------------------------------------------------------
def set_thread_scheduling(priority: int) -> str:
    """SCHED_FIFO ``priority`` for the calling thread (0: back to normal scheduling);
    returns how the thread is now scheduled, e.g. "SCHED_FIFO 4" or why it is not.

    Every thread of a live process that takes the GIL while audio runs should be real-time:
    a normal thread preempted by other processes while it holds (or is being handed) the
    GIL stalls the worker and the callback behind it for a whole scheduler slice.
    """
    if not hasattr(os, "sched_setscheduler"):
        return "normal (no real-time scheduling on this OS)"
    try:
        # pid 0 = the calling thread on Linux.
        if priority <= 0:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            return "normal (real-time priority not requested)"
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return f"SCHED_FIFO {priority}"
    except OSError as e:
        return f"normal (no permission for real-time priority: {e.strerror})"


# -- devices ---------------------------------------------------------------------------------
def import_sounddevice():  # -> module sounddevice
    """``import sounddevice`` with a one-line error when PortAudio is missing."""
    try:
        import sounddevice
    except OSError as e:  # the wheel loads libportaudio at import
        if "PortAudio" in str(e):
            raise RtnsError(PORTAUDIO_MISSING) from None
        raise
    return sounddevice


def resolve_device(spec: str, devices: Sequence[dict], kind: str) -> int:
    """A device index from ``spec``: an index, or a unique case-insensitive name substring.

    devices: dicts as ``sounddevice.query_devices()`` gives them (``name``,
    ``max_input_channels``, ``max_output_channels``); kind: "input" or "output".
    """
    key = f"max_{kind}_channels"
    hint = "run `rtns devices` to list them"
    spec = spec.strip()
    if spec.lstrip("-").isdigit():
        idx = int(spec)
        if not 0 <= idx < len(devices):
            raise UserInputError(f"no audio device with index {idx}; {hint}")
        dev = devices[idx]
        if dev[key] < 1:
            raise UserInputError(f"device {idx} ({dev['name']}) has no {kind} channels; {hint}")
        return idx
    low = spec.lower()
    named = [i for i, d in enumerate(devices) if low in d["name"].lower()]
    usable = [i for i in named if devices[i][key] >= 1]
    exact = [i for i in usable if devices[i]["name"].lower() == low]
    if len(exact) == 1:
        return exact[0]
    if len(usable) == 1:
        return usable[0]
    if not usable:
        if named:
            which = ", ".join(f"[{i}] {devices[i]['name']}" for i in named)
            raise UserInputError(f"device {spec!r} has no {kind} channels ({which}); {hint}")
        raise UserInputError(f"no {kind} device matches {spec!r}; {hint}")
    which = ", ".join(f"[{i}] {devices[i]['name']}" for i in usable)
    raise UserInputError(
        f"{spec!r} matches several {kind} devices: {which}; give the index or more of the name"
    )


def format_devices(
    devices: Sequence[dict], hostapis: Sequence[dict], default: Sequence[int]
) -> str:
    """The device table of ``rtns devices`` (default: (input index, output index))."""
    if not devices:
        return (
            "no audio devices found (no sound card, or no sound server running: "
            "PulseAudio/PipeWire via ALSA, or JACK)"
        )
    rows = [("idx", "name", "host API", "in", "out", "rate", "default")]
    for i, d in enumerate(devices):
        flags = [w for w, j in (("input", default[0]), ("output", default[1])) if j == i]
        rows.append(
            (
                str(i),
                d["name"],
                hostapis[d["hostapi"]]["name"],
                str(d["max_input_channels"]),
                str(d["max_output_channels"]),
                f"{d['default_samplerate']:.0f}",
                ", ".join(flags),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    right = {0, 3, 4, 5}
    lines = []
    for r in rows:
        cells = [
            r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]) for c in range(len(r))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
