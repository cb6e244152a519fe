"""The one streaming resampler of rtns: rational polyphase FIR, causal, exact output counts.

Every path that changes sample rate (files, the live device, daemon sessions) goes through
:class:`Resampler`, so a chunked stream and a whole file give the same samples and every
stage knows exactly how many samples it will get (``count_out``) and how late they are
(``delay_s``). numpy only.

The filter is a Kaiser-windowed sinc, linear phase, with unit DC gain per phase. Its group
delay is half its length; it can be made longer on purpose (``min_delay_s``) so that a
chain of stages adds up to a whole number of samples (see :mod:`rtns.streams`).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

#: Half the length of each filter in seconds = its natural group delay (1.5 ms).
HALF_WIDTH_S = 0.0015
#: Stop-band attenuation (Kaiser design).
ATTEN_DB = 70.0
#: Cut-off (-6 dB) as a fraction of the lower Nyquist frequency: 7.6 kHz between 16 kHz and
#: any higher rate, so the transition band ends just above 8 kHz and little aliases into
#: speech.
CUTOFF = 0.95
#: Outputs computed per vectorised step (bounds the [outputs, taps, channels] gather).
_STEP = 4096


def kaiser_beta(atten_db: float) -> float:
    """Kaiser window beta for a stop-band attenuation in dB (Kaiser's formula)."""
    if atten_db > 50:
        return 0.1102 * (atten_db - 8.7)
    if atten_db >= 21:
        return 0.5842 * (atten_db - 21) ** 0.4 + 0.07886 * (atten_db - 21)
    return 0.0


def lowpass_fir(n: int, cutoff: float, atten_db: float = ATTEN_DB) -> np.ndarray:
    """Linear-phase Kaiser-windowed sinc, float64 [n], unit DC gain.

    ``cutoff``: -6 dB frequency as a fraction of the sample rate (0 < cutoff < 0.5).
    """
    if not 0.0 < cutoff < 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5) of the sample rate, got {cutoff}")
    t = np.arange(n) - (n - 1) / 2
    h = np.sinc(2 * cutoff * t) * np.kaiser(n, kaiser_beta(atten_db))
    return h / h.sum()


class Resampler:
    """Streaming rational resampler of ``channels`` interleaved channels.

    Output sample ``k`` exists once input sample ``floor(k * down / up)`` has arrived, so
    after ``n`` inputs there are exactly :meth:`count_out` ``(n)`` outputs whatever the
    chunking. Output ``k`` estimates the input at time ``k / out_rate - delay_s``.

    ``min_delay_s``: make the group delay at least this (rounded up to half a sample of the
    internal rate ``in_rate * up``); the filter grows so it stays symmetric.
    """

    def __init__(
        self,
        in_rate: int,
        out_rate: int,
        channels: int = 1,
        *,
        min_delay_s: float | Fraction = 0,
        half_width_s: float = HALF_WIDTH_S,
        atten_db: float = ATTEN_DB,
        cutoff: float = CUTOFF,
    ) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        g = math.gcd(in_rate, out_rate)
        self.in_rate, self.out_rate, self.channels = in_rate, out_rate, channels
        self.up, self.down = out_rate // g, in_rate // g
        high = in_rate * self.up  # rate of the virtual zero-stuffed signal
        taps = max(2, math.ceil(2 * half_width_s * in_rate))  # per phase, at the input rate
        # Filter centre in samples of the virtual signal (a multiple of 1/2).
        centre = Fraction(taps * self.up - 1, 2)
        wanted = Fraction(min_delay_s) * high
        if wanted > centre:
            centre = Fraction(math.ceil(2 * wanted), 2)
        n = int(2 * centre) + 1
        taps = -(-n // self.up)
        cutoff_hz = cutoff * min(in_rate, out_rate) / 2
        h = np.zeros(taps * self.up)
        h[:n] = lowpass_fir(n, cutoff_hz / high, atten_db)
        phases = h.reshape(taps, self.up).T  # phases[p, j] = h[p + j * up]
        phases = phases / phases.sum(axis=1, keepdims=True)  # unit DC gain per phase
        #: float32 [up, taps]; taps reversed in time so a window x[i-taps+1 .. i] dots it.
        self._phases = np.ascontiguousarray(phases[:, ::-1], dtype=np.float32)
        self.taps = taps
        #: Group delay, exactly (seconds as a Fraction), and as a float.
        self.delay = centre / high
        self.delay_s = float(self.delay)
        self._offsets = np.arange(taps)
        self._hist = np.zeros((taps - 1, channels), dtype=np.float32)
        self._n_in = 0
        self._n_out = 0

    def count_out(self, n_in: int) -> int:
        """Outputs that exist after ``n_in`` inputs: every k with k * down < n_in * up."""
        return -(-n_in * self.up // self.down)

    def reset(self) -> None:
        self._hist.fill(0.0)
        self._n_in = self._n_out = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        """Resample the next chunk float32 [n, channels]; returns float32 [m, channels] with
        m = count_out(total inputs so far) - outputs so far."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected [n, {self.channels}] samples, got shape {x.shape}")
        buf = np.concatenate((self._hist, x))
        base = self._n_in - (self.taps - 1)  # input index of buf[0]
        total = self._n_in + x.shape[0]
        end = self.count_out(total)
        y = np.empty((end - self._n_out, self.channels), dtype=np.float32)
        for a in range(self._n_out, end, _STEP):
            k = np.arange(a, min(a + _STEP, end))
            pos = k * self.down
            oldest = pos // self.up - base - (self.taps - 1)
            window = buf[oldest[:, None] + self._offsets[None, :]]  # [m, taps, channels]
            y[a - self._n_out : a - self._n_out + k.shape[0]] = np.einsum(
                "kj,kjc->kc", self._phases[pos % self.up], window
            )
        self._hist = buf[buf.shape[0] - (self.taps - 1) :].copy()
        self._n_in, self._n_out = total, end
        return y


#: Offline resampling (whole signals, no latency budget): a longer filter, so the pass band
#: reaches 97.5 % of the lower Nyquist frequency with the same stop band.
OFFLINE_HALF_WIDTH_S = 0.008
OFFLINE_CUTOFF = 0.975


def resample_signal(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a whole signal float32 [n, channels] offline, time-aligned: returns
    ``round(n * rate_out / rate_in)`` frames, output k at time k / rate_out (the filter's
    delay, made a whole number of output samples, is removed). Equal rates: unchanged.
    Uses the longer offline filter (benchmarks, data preparation)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected [n, channels] samples, got shape {x.shape}")
    if rate_in == rate_out:
        return x
    opts = {"half_width_s": OFFLINE_HALF_WIDTH_S, "cutoff": OFFLINE_CUTOFF}
    natural = Resampler(rate_in, rate_out, 1, **opts).delay
    d = math.ceil(natural * rate_out)
    r = Resampler(rate_in, rate_out, x.shape[1], min_delay_s=Fraction(d, rate_out), **opts)
    n_out = round(x.shape[0] * rate_out / rate_in)
    pad = 0
    while r.count_out(x.shape[0] + pad) < n_out + d:
        pad += max(1, rate_in // 100)
    y = r.process(np.concatenate([x, np.zeros((pad, x.shape[1]), np.float32)]))
    return y[d : d + n_out]
