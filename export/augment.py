"""Synthetic augmentation for the training mixer (numpy, 16 kHz, float32 [n] signals).

What the shared training data lacks: babble (sum of 3-8 other training utterances),
stationary coloured noise (white / pink / brown), mains hum with harmonics, keyboard-like
clicks, random EQ and band-limiting (speech and noise), slow gain sweeps within a segment.
Every generator takes a ``numpy.random.Generator`` and is deterministic given its state.
Levels are arbitrary: the mixer rescales noise to the drawn SNR afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rtns.framing import SAMPLE_RATE

if TYPE_CHECKING:
    from rtns_export.train_config import AugmentConfig

EPS = 1e-10


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)) + EPS)


def choose_noise_kind(a: AugmentConfig, rng: np.random.Generator) -> str:
    """'babble', 'colored' or 'file' by the configured probabilities (one draw)."""
    u = rng.random()
    pb = a.babble_prob if a.babble else 0.0
    pc = a.colored_prob if a.colored else 0.0
    if u < pb:
        return "babble"
    if u < pb + pc:
        return "colored"
    return "file"


def babble(talkers: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Sum of talker segments [n] each at a random level within +-3 dB of each other."""
    if not talkers:
        raise ValueError("babble needs at least one talker")
    out = np.zeros_like(talkers[0], dtype=np.float64)
    for t in talkers:
        out += t / _rms(t) * 10 ** (rng.uniform(-3, 3) / 20)
    return out.astype(np.float32)


def colored_noise(
    n: int, rng: np.random.Generator, color: str | None = None, exponent: float | None = None
) -> np.ndarray:
    """Stationary Gaussian noise with power spectrum ~ 1/f^exponent (white 0, pink 1,
    brown 2); ``color`` picks one of those, otherwise a random exponent in [0, 2]. [n] f32"""
    if exponent is None:
        exponent = {"white": 0.0, "pink": 1.0, "brown": 2.0}[color] if color else rng.uniform(0, 2)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    f[0] = f[1] if n > 1 else 1.0
    x = np.fft.irfft(spec / f ** (exponent / 2), n=n)
    x -= x.mean()
    return (x / _rms(x)).astype(np.float32)


def hum(n: int, rng: np.random.Generator, mains: float | None = None) -> np.ndarray:
    """Mains hum: 50 or 60 Hz (+-0.5 %) and harmonics up to ~1.5 kHz with random decaying
    amplitudes and phases (odd harmonics stronger, as from transformer buzz). [n] f32"""
    f0 = (mains or float(rng.choice([50.0, 60.0]))) * (1 + rng.uniform(-0.005, 0.005))
    t = np.arange(n) / SAMPLE_RATE
    x = np.zeros(n)
    decay = rng.uniform(0.5, 1.5)
    for k in range(1, int(1500 // f0) + 1):
        amp = k**-decay * (1.0 if k % 2 else rng.uniform(0.1, 0.6))
        x += amp * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    return (x / _rms(x)).astype(np.float32)


def clicks(n: int, rng: np.random.Generator, rate_hz: float | None = None) -> np.ndarray:
    """Keyboard-like clicks: short (2-12 ms) exponentially decaying bursts of band-passed
    noise at random (Poisson) times, 2-10 per second, each a random level. [n] f32"""
    rate = rate_hz or rng.uniform(2, 10)
    x = np.zeros(n)
    count = rng.poisson(rate * n / SAMPLE_RATE)
    for _ in range(max(count, 1)):
        length = int(rng.uniform(0.002, 0.012) * SAMPLE_RATE)
        start = int(rng.integers(0, max(n - length, 1)))
        burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 5))
        burst = np.diff(burst, prepend=0.0)  # tilt towards high frequencies
        x[start : start + length] += burst[: n - start] * 10 ** (rng.uniform(-12, 0) / 20)
    return (x / _rms(x)).astype(np.float32)


def add_extras(noise: np.ndarray, a: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Add hum and/or clicks to a noise [n] (each with its probability, at -15..+5 dB
    relative to the noise)."""
    out = noise.astype(np.float64)
    base = _rms(noise)
    for on, prob, gen in ((a.hum, a.hum_prob, hum), (a.clicks, a.clicks_prob, clicks)):
        if on and rng.random() < prob:
            out = out + gen(noise.shape[0], rng) * base * 10 ** (rng.uniform(-15, 5) / 20)
    return out.astype(np.float32)


def layer(base: np.ndarray, second: np.ndarray, rel_db: float) -> np.ndarray:
    """``base`` [n] plus ``second`` [n] scaled to ``rel_db`` dB relative to ``base``'s RMS.
    [n] f32"""
    gain = _rms(base) / _rms(second) * 10 ** (rel_db / 20)
    return (base.astype(np.float64) + second.astype(np.float64) * gain).astype(np.float32)


def random_eq(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random smooth EQ (+-8 dB over a few bands, interpolated on a log-frequency axis) and,
    half the time, band-limiting (high-pass 50-300 Hz and/or low-pass 3.4-7.5 kHz with a
    raised-cosine transition). Applied in the frequency domain over the whole signal. [n]"""
    n = x.shape[0]
    spec = np.fft.rfft(x.astype(np.float64))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    nodes = np.geomspace(50, 8000, int(rng.integers(3, 8)))
    gains_db = rng.uniform(-8, 8, nodes.shape[0])
    g = 10 ** (np.interp(np.log(np.maximum(f, 1.0)), np.log(nodes), gains_db) / 20)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            fc = rng.uniform(50, 300)
            g *= _raised_cos(f, fc * 0.5, fc)
        if rng.random() < 0.7:
            fc = rng.uniform(3400, 7500)
            g *= 1 - _raised_cos(f, fc, min(fc * 1.15, SAMPLE_RATE / 2))
    y = np.fft.irfft(spec * g, n=n)
    return (y * _rms(x) / _rms(y)).astype(np.float32)


def _raised_cos(f: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below lo, 1 above hi, a raised-cosine ramp between."""
    t = np.clip((f - lo) / max(hi - lo, 1e-6), 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def gain_sweep(x: np.ndarray, rng: np.random.Generator, max_db: float = 12.0) -> np.ndarray:
    """Multiply by a smooth random gain curve (a ramp plus a slow wobble) spanning at most
    +-max_db/2 dB around 0 dB over the segment. [n]"""
    n = x.shape[0]
    t = np.linspace(0, 1, n)
    ramp = rng.uniform(-1, 1) * t
    wobble = rng.uniform(-0.5, 0.5) * np.sin(
        2 * np.pi * rng.uniform(0.2, 2) * t + rng.uniform(0, 6.3)
    )
    curve = ramp + wobble
    curve = curve - curve.mean()
    span = np.max(np.abs(curve)) + EPS
    db = curve / span * rng.uniform(0, max_db / 2)
    return (x * 10 ** (db / 20)).astype(np.float32)


# -- speed perturbation --------------------------------------------------------------------
def speed_perturb(x: np.ndarray, factor: float) -> np.ndarray:
    """Play ``x`` ``factor`` times faster (tempo and pitch together, as resampling does):
    y(t) = x(factor t), ``round(len(x) / factor)`` samples, soxr HQ resampling. [n] f32"""
    import soxr

    if factor <= 0:
        raise ValueError("speed factor must be positive")
    if factor == 1.0:
        return np.asarray(x, dtype=np.float32).copy()
    y = soxr.resample(np.asarray(x, dtype=np.float32), SAMPLE_RATE * factor, SAMPLE_RATE, "HQ")
    return np.ascontiguousarray(y, dtype=np.float32)


# -- early reverberation: image-method room impulse responses -------------------------------
#: Samples before the direct path kept at the start of a stored RIR (half of
#: pyroomacoustics' fractional-delay filter, so the direct path's filter is complete).
RIR_LEAD = 40


def image_method_rir(
    rng: np.random.Generator,
    rt60: tuple[float, float] = (0.2, 0.8),
    room_min: tuple[float, float, float] = (3.0, 3.0, 2.4),
    room_max: tuple[float, float, float] = (9.0, 7.0, 3.5),
    max_seconds: float = 1.0,
) -> tuple[np.ndarray, float]:
    """One shoebox room impulse response by the image method (pyroomacoustics): random room
    size, a target RT60 drawn from ``rt60`` (wall absorption by inverse Sabine), source and
    microphone at random positions at least 0.5 m from the walls and 0.5 m apart. The RIR is
    cut to start ``RIR_LEAD`` samples before the direct path (so the direct path sits at
    index ``RIR_LEAD``) and to at most ``max_seconds``. Returns (rir float32, rt60 drawn)."""
    import pyroomacoustics as pra

    dims = rng.uniform(room_min, room_max)
    target = float(rng.uniform(*rt60))
    e_abs, order = pra.inverse_sabine(target, dims)
    while True:
        src = rng.uniform(0.5, dims - 0.5)
        mic = rng.uniform(0.5, dims - 0.5)
        if np.linalg.norm(src - mic) >= 0.5:
            break
    room = pra.ShoeBox(
        dims,
        fs=SAMPLE_RATE,
        materials=pra.Material(float(e_abs)),
        max_order=int(min(order, 120)),
        air_absorption=False,
    )
    room.add_source(src)
    room.add_microphone(mic)
    room.compute_rir()
    h = np.asarray(room.rir[0][0], dtype=np.float64)
    direct = direct_path_index(float(np.linalg.norm(src - mic)))
    h = h[direct - RIR_LEAD : direct - RIR_LEAD + int(max_seconds * SAMPLE_RATE)]
    return (h / (np.max(np.abs(h)) + EPS)).astype(np.float32), target


def direct_path_index(distance_m: float) -> int:
    """Sample index of the direct path in a pyroomacoustics RIR: the propagation delay
    plus half of its 81-tap fractional-delay filter."""
    import pyroomacoustics as pra

    c = float(pra.constants.get("c"))
    half = (int(pra.constants.get("frac_delay_length")) - 1) // 2
    return int(round(distance_m / c * SAMPLE_RATE)) + half


def early_rir(h: np.ndarray, early_ms: float = 50.0, fade_ms: float = 5.0) -> np.ndarray:
    """The direct path plus the reflections within ``early_ms`` after it (a stored RIR has
    the direct path at index ``RIR_LEAD``), faded out over ``fade_ms`` with a raised cosine;
    zero afterwards. Same length as ``h``."""
    end = RIR_LEAD + int(round(early_ms * SAMPLE_RATE / 1000))
    fade = max(int(round(fade_ms * SAMPLE_RATE / 1000)), 1)
    w = np.zeros(h.shape[0])
    w[: min(end, h.shape[0])] = 1.0
    ramp = 0.5 + 0.5 * np.cos(np.pi * (np.arange(fade) + 1) / fade)
    seg = w[end : end + fade]
    seg[:] = ramp[: seg.shape[0]]
    return (h * w).astype(np.float32)


def reverberate(
    x: np.ndarray, h: np.ndarray, early_ms: float = 50.0
) -> tuple[np.ndarray, np.ndarray]:
    """(reverberant speech, early-reverberation target), both [len(x)] f32: ``x`` convolved
    with the full RIR and with its early part (:func:`early_rir`), truncated to the input
    length. Both carry the RIR's ``RIR_LEAD``-sample lead, so they stay time-aligned."""
    from scipy.signal import fftconvolve

    n = x.shape[0]
    x64 = np.asarray(x, dtype=np.float64)
    full = fftconvolve(x64, h.astype(np.float64))[:n]
    early = fftconvolve(x64, early_rir(h, early_ms).astype(np.float64))[:n]
    return full.astype(np.float32), early.astype(np.float32)


def rir_cache_name(count: int, seed: int, rt60: Sequence[float]) -> str:
    """The cache file name of :func:`rir_bank`'s bank for these arguments."""
    import hashlib

    key = hashlib.sha1(f"rirs|{count}|{seed}|{rt60[0]:g}|{rt60[1]:g}|v1".encode()).hexdigest()[:16]
    return f"rirs_{key}.npz"


def rir_bank(
    count: int,
    seed: int,
    rt60: tuple[float, float],
    cache_dir: str | None,
) -> list[np.ndarray]:
    """``count`` image-method RIRs generated once with ``seed`` (offline: cached in
    ``cache_dir`` as one .npz keyed by the arguments)."""
    from pathlib import Path

    path = Path(cache_dir) / rir_cache_name(count, seed, rt60) if cache_dir else None
    if path is not None and path.exists():
        with np.load(path) as z:
            return [z[f"r{i}"] for i in range(count)]
    rng = np.random.default_rng(seed)
    rirs = [image_method_rir(rng, rt60)[0] for _ in range(count)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"r{i}": r for i, r in enumerate(rirs)})
        tmp.replace(path)
    return rirs
