"""One multi-channel stream at any sample rate: what files, the live device, the daemon's
sessions and the client all use around the 16 kHz engine.

:class:`ChannelStream` takes interleaved samples ``[n, channels]`` at ``rate`` Hz and returns
enhanced samples at the same rate. Each channel is a slot of a :class:`rtns.bank.StreamBank`
(its own, or one shared with other streams).

At the model's rate the output is exactly the engine's. At any other rate the model sees
the signal resampled to 16 kHz, and only *what it changed* travels back::

    x --> down (R -> 16k) --> engine --> y16 ; e16 = y16 - dry16   (dry16: x16, model latency)
    out = x delayed by D  +  up(e16)  +  (g - 1) * highband(x) delayed by D

* ``up(e16)`` carries the model's work below 8 kHz;
* ``highband`` (rates above 16 kHz): x minus a linear-phase low-pass at the crossover the
  resamplers use (7.6 kHz), so nothing above 8 kHz is thrown away; ``g`` is a gain per hop
  measured from what the model did to its own top band (4-8 kHz: output energy over dry
  energy, square root), clamped to [attenuation-limit floor, 1], and travels through the same
  up-sampler as ``e16`` so it is time-aligned with it;
* with bypass, or an attenuation limit of 0 dB, ``e16`` is 0 and ``g`` is 1 exactly, so the
  output is the input delayed by D, to float rounding, at every rate.

``D`` (:attr:`ChannelStream.latency`) is a whole number of samples at ``rate``: the
up-sampler's filter is lengthened so that resampling down, the model's latency and
resampling up add up exactly, which keeps ``x`` and ``up(e16)`` aligned to the sample.

End of stream: after ``n`` input frames, :meth:`flush` returns what is still owed so that the
total output is exactly ``n + latency`` frames; :func:`aligned` then cuts the first
``latency`` frames to give an output time-aligned with the input and of its length.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from rtns import dsp
from rtns.atten import AttenLimit
from rtns.bank import BankFull, StreamBank
from rtns.engine import Model
from rtns.framing import SAMPLE_RATE
from rtns.resample import ATTEN_DB, CUTOFF, HALF_WIDTH_S, Resampler, lowpass_fir

#: Band of the model's output (at 16 kHz) whose energy change sets the high-band gain.
GAIN_BAND_HZ = (4000.0, 8000.0)


class _Fifo:
    """A FIFO of [n, channels] float32 frames (append at the back, take from the front)."""

    def __init__(self, channels: int, prefill: int = 0) -> None:
        self.channels = channels
        self._chunks: deque[np.ndarray] = deque()
        self.size = 0
        if prefill:
            self.append(np.zeros((prefill, channels), np.float32))

    def append(self, x: np.ndarray) -> None:
        if x.shape[0]:
            self._chunks.append(x)
            self.size += x.shape[0]

    def take(self, n: int) -> np.ndarray:
        """The next n frames (a view when they lie in one stored chunk: do not keep it)."""
        if n > self.size:
            raise ValueError(f"FIFO holds {self.size} frames, {n} asked")
        if n and self._chunks[0].shape[0] >= n:
            front = self._chunks[0]
            if front.shape[0] == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = front[n:]
            self.size -= n
            return front[:n]
        out = np.empty((n, self.channels), np.float32)
        got = 0
        while got < n:
            front = self._chunks[0]
            k = min(n - got, front.shape[0])
            out[got : got + k] = front[:k]
            got += k
            if k == front.shape[0]:
                self._chunks.popleft()
            else:
                self._chunks[0] = front[k:]
        self.size -= n
        return out


class ChannelStream:
    """``channels`` channels at ``rate`` Hz through one model (see the module docstring).

    Its channels are slots of a :class:`rtns.bank.StreamBank`: a private bank (one slot per
    channel, one row per model call: the same bits as a :class:`rtns.engine.Stream` per
    channel, for any pack), or the ``bank`` given (the daemon's, shared by its sessions).

    Two ways to drive it:

    * :meth:`push` / :meth:`flush`: samples in, enhanced samples out (inference inside);
    * for the owner of a shared bank that steps many streams at once (the daemon):
      :meth:`put` queues input, :meth:`fill` moves it into the slots' input rings, the owner
      runs ``bank.step(..., collect=True)``, :meth:`take` returns the output of the hops
      finished so far, :meth:`end` queues the end-of-stream padding, :meth:`close` gives
      the slots back.
    """

    def __init__(
        self,
        model: Model,
        channels: int = 1,
        rate: int | None = None,
        bank: StreamBank | None = None,
    ) -> None:
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.model = model
        self.channels = channels
        self.rate = int(model.sample_rate if rate is None else rate)
        if self.rate <= 0:
            raise ValueError(f"sample rate must be positive, got {rate}")
        if bank is None:
            bank = StreamBank(model, channels, max_batch=1)
        elif bank.model is not model:
            raise ValueError("the bank runs another model")
        self.bank = bank
        #: The bank slots of the channels (channel c is slots[c]); empty once closed.
        self.slots = _open_slots(bank, channels)
        #: The first slot as an int, read on every message and tick. All slots of a stream
        #: are fed and stepped together: their rings always hold the same count.
        self._first = int(self.slots[0])
        #: The slots as Python ints (the per-message paths index with them).
        self._slot_ints: tuple[int, ...] = tuple(self.slots.tolist())
        self._open = True
        self._bypass = False
        self._atten_lim = bank.atten_lim(self._first)
        sr = model.sample_rate
        self.resampling = self.rate != sr
        self.full_band = self.rate > sr
        self._down: Resampler | None = None
        self._up: Resampler | None = None
        #: Output frame k estimates input frame k - latency (at ``rate``).
        self.latency = self._make_resamplers() if self.resampling else model.latency
        self._hf: dsp.FirFilter | None = None
        if self.full_band:
            self._make_crossover()
        self._reset_buffers()

    def _make_resamplers(self) -> int:
        """The down- and up-samplers; returns the latency in whole samples at ``rate``."""
        sr, model, channels = self.model.sample_rate, self.model, self.channels
        self._down = Resampler(self.rate, sr, channels)
        model_delay = Fraction(model.latency, sr)
        natural_up = Resampler(sr, self.rate, 1).delay
        total = math.ceil((self._down.delay + model_delay + natural_up) * self.rate)
        up_channels = 2 * channels if self.full_band else channels
        self._up = Resampler(
            sr,
            self.rate,
            up_channels,
            min_delay_s=Fraction(total, self.rate) - self._down.delay - model_delay,
        )
        exact = (self._down.delay + model_delay + self._up.delay) * self.rate
        assert exact == total, (exact, total)
        return total

    def _make_crossover(self) -> None:
        """The high band's filter and the band-gain analysis (rates above the model's)."""
        sr = self.model.sample_rate
        half = math.ceil(HALF_WIDTH_S * self.rate)
        lp = lowpass_fir(2 * half + 1, CUTOFF * sr / 2 / self.rate, ATTEN_DB)
        hp = -lp
        hp[half] += 1.0  # delta(half) - lowpass: the exact complement, delay `half`
        self._hf = dsp.FirFilter(hp, self.channels)
        self._hf_delay = half
        lo, hi = GAIN_BAND_HZ
        n = self.model.block_len
        self._gain_bins = slice(round(lo * n / sr), round(hi * n / sr) + 1)
        self._gain_win = np.sqrt(dsp.hann_periodic(n)).astype(np.float32)

    # -- controls ------------------------------------------------------------------------
    @property
    def bypass(self) -> bool:
        return self._bypass

    @bypass.setter
    def bypass(self, on: bool) -> None:
        self._bypass = bool(on)
        self.bank.bypass[self.slots] = self._bypass

    @property
    def atten_lim(self) -> AttenLimit:
        """At most this much noise reduction; a new stream starts with its pack's limit."""
        return self._atten_lim

    @atten_lim.setter
    def atten_lim(self, value: AttenLimit | str | float) -> None:
        self._atten_lim = AttenLimit.parse(value)
        for slot in self.slots:
            self.bank.set_atten_lim(int(slot), self._atten_lim)

    # -- state ----------------------------------------------------------------------------
    def _reset_buffers(self) -> None:
        c, lat = self.channels, self.model.latency
        self.samples_in = 0
        self.samples_out = 0
        #: Hops run (each: one model call per channel).
        self.hops = 0
        #: Input samples clipped to +-dsp.CLIP_LEVEL so far.
        self.clipped = 0
        self._backlog = _Fifo(c)  # 16 kHz input that did not fit the slots' input rings
        self._y16: list[np.ndarray] = []  # finished hops' output, [shift, c] each
        if self.resampling:
            self._dry16 = _Fifo(c, prefill=lat)  # the engine's dry signal, aligned with y16
            self._dry = _Fifo(c, prefill=self.latency)
        if self.full_band:
            self._hf.reset()
            self._high = _Fifo(c, prefill=self.latency - self._hf_delay)
            n = self.model.block_len
            self._y_hist = np.zeros((n, c), np.float32)
            self._d_hist = np.zeros((n, c), np.float32)
            self._g_prev = np.ones(c, np.float32)

    def reset(self) -> None:
        """Back to a new stream (controls are kept)."""
        for slot in self.slots:
            self.bank.reset(int(slot))
        if self._down is not None:
            self._down.reset()
            self._up.reset()
        self._reset_buffers()

    def close(self) -> None:
        """Give the bank slots back: the stream can still :meth:`take` what it produced
        (with the controls it had), but no longer run hops. Idempotent."""
        if not self._open:
            return
        self.collect()
        for slot in self.slots:
            self.bank.close(int(slot))
        self.slots = np.zeros(0, np.int64)
        self._slot_ints = ()
        self._open = False

    # -- input side -----------------------------------------------------------------------
    def _frames(self, x: np.ndarray) -> np.ndarray:
        given = x
        x, clipped = dsp.to_float_pcm(x)
        if x.ndim == 1 and self.channels == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected samples of shape [n, {self.channels}], got {tuple(x.shape)}"
            )
        self.clipped += clipped
        # The queues keep these frames: never hold on to the caller's (reusable) buffer.
        if np.shares_memory(x, given):
            x = x.copy()
        return x

    def put(self, x: np.ndarray, owned: bool = False) -> int:
        """Queue input frames [n, channels] (or [n] for mono); returns the 16 kHz frames it
        added to the queue. Raises ValueError (nothing queued) for NaN/Inf or a bad shape.

        ``owned``: x is a float32 [n, channels] array of finite samples within
        +-dsp.CLIP_LEVEL that nobody will change (the daemon's decoded PCM, possibly a
        read-only view of the received message): no check, no copy."""
        if owned and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == self.channels:
            pass  # the caller checked: finite and within +-CLIP_LEVEL (decode_pcm does)
        else:
            x = self._frames(x)
        self.samples_in += x.shape[0]
        if not self.resampling:
            self._queue(x)
            return x.shape[0]
        x16 = self._down.process(x)
        self._queue(x16)
        self._dry16.append(x16)
        self._dry.append(x)
        if self._hf is not None:
            self._high.append(self._hf.process(x))
        return x16.shape[0]

    def _queue(self, x16: np.ndarray) -> None:
        """Straight into the slots' input rings as far as they have room, the rest (in
        order, after whatever already waits there) into the backlog."""
        took = 0 if self._backlog.size else self._feed(x16)
        if took < x16.shape[0]:
            self._backlog.append(x16[took:])

    def _feed(self, x16: np.ndarray) -> int:
        """Feed the same leading frames of ``x16`` [n, channels] to every slot's input ring,
        as many as the rings have room for (equal in every slot: they are always fed and
        stepped together); returns how many. 0 once closed."""
        if not self._open:
            return 0
        take = min(self.bank.room(self._first), x16.shape[0])
        if take:
            feed = self.bank.feed
            for c, slot in enumerate(self._slot_ints):
                feed(slot, x16[:take, c])
        return take

    def _in_rings(self) -> int:
        """16 kHz frames in the slots' input rings, not yet stepped (0 once closed)."""
        return int(self.bank.n_in[self._first]) if self._open else 0

    @property
    def queued(self) -> int:
        """16 kHz frames queued whose hop is complete and not yet run: the backlog and the
        complete hops in the slots' input rings (an incomplete hop is not counted)."""
        n = self._in_rings()
        return self._backlog.size + n - n % self.model.block_shift

    @property
    def backlog(self) -> int:
        """16 kHz frames queued beyond the slots' input rings (0 unless a chunk larger than
        the rings arrived); :meth:`fill` moves them in."""
        return self._backlog.size

    @property
    def hop_ready(self) -> bool:
        """A complete hop waits in the input rings to be run."""
        return self._in_rings() >= self.model.block_shift

    def fill(self) -> bool:
        """Move backlog into the slots' input rings as far as they have room; True if a
        complete hop waits there (then the bank's owner steps the slots with
        ``collect=True``, and :meth:`collect` or :meth:`take` picks the output up)."""
        if self._backlog.size and self._open:
            take = min(self.bank.room(self._first), self._backlog.size)
            self._feed(self._backlog.take(take))
        return self.hop_ready

    def collect(self) -> None:
        """Move what ``bank.step(collect=True)`` left in the slots' output buffers to this
        stream's output (the bank's owner calls it at least every 32 hops)."""
        if not self._open:
            return
        m = int(self.bank.n_out[self._first])
        if not m:
            return
        y = np.empty((m, self.channels), np.float32)
        take = self.bank.take
        for c, slot in enumerate(self._slot_ints):
            y[:, c] = take(slot)
        self._y16.append(y)
        self.hops += m // self.model.block_shift

    def _run_hops(self) -> None:
        """Run every complete hop (the private bank's way; a shared bank's owner steps)."""
        while self.fill():
            self.bank.step(self.slots, collect=True)
            self.collect()

    # -- output side ----------------------------------------------------------------------
    def take(self) -> np.ndarray:
        """Output of every hop finished so far, float32 [m, channels] at ``rate``."""
        self.collect()
        if not self._y16:
            return np.zeros((0, self.channels), np.float32)
        y16 = self._y16[0] if len(self._y16) == 1 else np.concatenate(self._y16)
        self._y16.clear()
        if not self.resampling:
            self.samples_out += y16.shape[0]
            return y16
        e16 = y16 - self._dry16.take(y16.shape[0])
        if self.full_band:
            g16 = self._band_gain(y16, y16 - e16)
            u = self._up.process(np.concatenate([e16, g16 - 1.0], axis=1))
            c = self.channels
            out = self._dry.take(u.shape[0]) + u[:, :c] + u[:, c:] * self._high.take(u.shape[0])
        else:
            u = self._up.process(e16)
            out = self._dry.take(u.shape[0]) + u
        self.samples_out += out.shape[0]
        return out

    def _band_gain(self, y16: np.ndarray, d16: np.ndarray) -> np.ndarray:
        """Per-sample gain [m, channels] for the high band, from the energy the model left in
        its top band over the last block of each hop (linear ramps between hops)."""
        n, shift = self.model.block_len, self.model.block_shift
        hops = y16.shape[0] // shift
        ys = np.concatenate([self._y_hist, y16])
        ds = np.concatenate([self._d_hist, d16])
        self._y_hist, self._d_hist = ys[-n:].copy(), ds[-n:].copy()
        ends = shift * np.arange(1, hops + 1) + n  # window h ends after hop h
        idx = ends[:, None] - n + np.arange(n)[None, :]  # [hops, n]
        w = self._gain_win[None, :, None]
        band = self._gain_bins
        ey = np.sum(np.abs(np.fft.rfft(ys[idx] * w, axis=1)[:, band]) ** 2, axis=1)
        ed = np.sum(np.abs(np.fft.rfft(ds[idx] * w, axis=1)[:, band]) ** 2, axis=1)
        eps = 1e-12 * n
        g = np.sqrt((ey + eps) / (ed + eps)).astype(np.float32)  # [hops, channels]
        floor = np.float32(self.atten_lim.dry_gain)
        g = np.clip(g, floor, 1.0)
        if self.bypass:
            g[:] = 1.0
        prev = np.concatenate([self._g_prev[None, :], g[:-1]])
        self._g_prev = g[-1].copy()
        ramp = (np.arange(1, shift + 1, dtype=np.float32) / shift)[None, :, None]
        out = prev[:, None, :] + (g - prev)[:, None, :] * ramp  # [hops, shift, channels]
        return out.reshape(hops * shift, self.channels)

    # -- the simple path ------------------------------------------------------------------
    def push(self, x: np.ndarray) -> np.ndarray:
        """Enhance the next chunk [n, channels] (any n); returns float32 [m, channels]."""
        self.put(x)
        self._run_hops()
        return self.take()

    def count_out(self, n_in: int) -> int:
        """Output frames that exist after ``n_in`` input frames (whatever the chunking)."""
        shift = self.model.block_shift
        if not self.resampling:
            return n_in // shift * shift
        n16 = self._down.count_out(n_in)
        return self._up.count_out(n16 // shift * shift)

    def end(self) -> int:
        """Queue the silence that brings the output to ``samples_in + latency`` frames;
        returns how many frames (at ``rate``) were added. Call once, at the end."""
        owed = self.samples_in + self.latency
        n_in, z = self.samples_in, 0
        step = max(1, self.model.block_shift * self.rate // self.model.sample_rate)
        while self.count_out(n_in + z) < owed:
            z += step
        while z > 0 and self.count_out(n_in + z - 1) >= owed:
            z -= 1
        if z:
            before = self.samples_in
            self.put(np.zeros((z, self.channels), np.float32))
            self.samples_in = before  # padding is not input
        return z

    @property
    def owed(self) -> int:
        """Output frames still due before the stream is complete (after :meth:`end`)."""
        return self.samples_in + self.latency - self.samples_out

    def flush(self) -> np.ndarray:
        """End the stream: returns the frames still owed so that the total output is
        ``samples_in + latency``, then resets."""
        owed = self.samples_in + self.latency - self.samples_out
        self.end()
        self._run_hops()
        tail = self.take()[: max(owed, 0)]
        self.reset()
        return tail


def aligned(y: np.ndarray, latency: int, n: int) -> np.ndarray:
    """The time-aligned output of a stream: drop the first ``latency`` frames of the total
    output ``y`` [frames, ...] and cut (or zero-pad) to the input's ``n`` frames."""
    y = y[latency : latency + n]
    if y.shape[0] < n:
        pad = np.zeros((n - y.shape[0], *y.shape[1:]), y.dtype)
        y = np.concatenate([y, pad])
    return y


def enhance_frames(
    model: Model,
    x: np.ndarray,
    rate: int | None = None,
    atten_lim: AttenLimit | str | float | None = None,
    chunk: int = SAMPLE_RATE,
    progress: Callable[[int], None] | None = None,
    bypass: bool = False,
) -> np.ndarray:
    """Enhance a whole signal float32 [n, channels] at ``rate`` (default: the model's);
    returns [n, channels], time-aligned. ``atten_lim`` None keeps the pack's default.
    ``progress(frames_done)`` is called after every chunk."""
    cs = ChannelStream(model, x.shape[1], rate)
    cs.bypass = bypass
    if atten_lim is not None:
        cs.atten_lim = atten_lim
    n = x.shape[0]
    out = np.empty((n + cs.latency, x.shape[1]), np.float32)
    filled = 0
    for a in range(0, n, chunk):
        y = cs.push(x[a : a + chunk])
        out[filled : filled + y.shape[0]] = y
        filled += y.shape[0]
        if progress is not None:
            progress(min(a + chunk, n))
    tail = cs.flush()
    out[filled : filled + tail.shape[0]] = tail
    filled += tail.shape[0]
    assert filled == n + cs.latency, (filled, n, cs.latency)
    return out[cs.latency : cs.latency + n]


def _open_slots(bank: StreamBank, channels: int) -> np.ndarray:
    """``channels`` fresh slots of ``bank`` (int64 [channels]); none taken if it is full."""
    taken: list[int] = []
    try:
        for _ in range(channels):
            taken.append(bank.open())
    except BankFull:
        for slot in taken:
            bank.close(slot)
        raise
    return np.asarray(taken, np.int64)
