"""Pure numpy DSP used around the ONNX graphs: windows, framing, spectra, overlap-add.

Every function takes and returns float32 (or complex64) arrays; shapes are stated in the
docstrings. Nothing here keeps state: the streaming buffers live in :mod:`rtns.engine`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

WindowKind = Literal["none", "sqrt_hann"]


def hann_periodic(n: int) -> np.ndarray:
    """Periodic Hann window, float64 [n] (the one whose shifted copies sum to a constant)."""
    k = np.arange(n, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)


def analysis_window(kind: WindowKind, block_len: int) -> np.ndarray | None:
    """Window applied before the rfft, float32 [block_len], or None for a raw block (DTLN)."""
    if kind == "none":
        return None
    if kind == "sqrt_hann":
        return np.sqrt(hann_periodic(block_len)).astype(np.float32)
    raise ValueError(f"unknown window kind {kind!r}")


def synthesis_window(kind: WindowKind, block_len: int, block_shift: int) -> np.ndarray | None:
    """Window applied after the irfft so that overlap-add reconstructs perfectly.

    For ``sqrt_hann`` analysis and synthesis, the product is a periodic Hann whose copies at
    ``block_shift`` sum to ``block_len / (2 * block_shift)``; the synthesis window divides
    that constant out. Returns float32 [block_len] or None (no window: DTLN's learned basis
    carries the gain).
    """
    if kind == "none":
        return None
    if kind == "sqrt_hann":
        if block_len % block_shift:
            raise ValueError("sqrt_hann needs block_len to be a multiple of block_shift")
        w = np.sqrt(hann_periodic(block_len))
        gain = ola_gain(w * w, block_shift)
        return (w / gain).astype(np.float32)
    raise ValueError(f"unknown window kind {kind!r}")


def ola_gain(window_product: np.ndarray, block_shift: int) -> float:
    """Constant sum of ``window_product`` shifted by multiples of ``block_shift``.

    Raises ValueError when the sum is not constant (the pair cannot reconstruct perfectly).
    """
    n = window_product.shape[0]
    acc = np.zeros(block_shift, dtype=np.float64)
    for start in range(0, n, block_shift):
        seg = window_product[start : start + block_shift]
        acc[: seg.shape[0]] += seg
    if not np.allclose(acc, acc[0], rtol=1e-9, atol=1e-12):
        raise ValueError("window does not satisfy the constant overlap-add condition")
    return float(acc[0])


def frame_signal(x: np.ndarray, block_len: int, block_shift: int) -> np.ndarray:
    """Split x [N] into overlapping blocks [T, block_len] with T = 1 + (N - block_len) // shift.

    Samples after the last complete block are dropped; N must be at least block_len.
    Returns a read-only strided view (no copy).
    """
    if x.ndim != 1:
        raise ValueError(f"frame_signal expects a 1-D signal, got shape {x.shape}")
    if x.shape[0] < block_len:
        raise ValueError(f"signal of {x.shape[0]} samples is shorter than one block ({block_len})")
    n_frames = 1 + (x.shape[0] - block_len) // block_shift
    view = np.lib.stride_tricks.sliding_window_view(x, block_len)
    return view[::block_shift][:n_frames]


def overlap_add(frames: np.ndarray, block_shift: int) -> np.ndarray:
    """Overlap-add blocks [T, L] at ``block_shift`` into a signal [(T - 1) * shift + L]."""
    if frames.ndim != 2:
        raise ValueError(f"overlap_add expects [T, L] frames, got shape {frames.shape}")
    n_frames, block_len = frames.shape
    out = np.zeros((n_frames - 1) * block_shift + block_len, dtype=frames.dtype)
    for t in range(n_frames):
        out[t * block_shift : t * block_shift + block_len] += frames[t]
    return out


def spectrum(blocks: np.ndarray, window: np.ndarray | None) -> np.ndarray:
    """rfft of windowed blocks: float32 [..., L] -> complex64 [..., L // 2 + 1]."""
    if window is not None:
        blocks = blocks * window
    # numpy 2.x runs a float32 rfft with the default norm through its float64 loop (casts
    # both ways; about 5 us a row at 40 rows, 6x the float32 loop). With norm="forward" it
    # takes the float32 loop; scaling back by the length (a power of two for every pack:
    # exact) gives the unnormalised spectrum. Every row runs the same loop at any batch size.
    spec = np.fft.rfft(blocks, axis=-1, norm="forward")
    spec *= spec.real.dtype.type(blocks.shape[-1])
    return spec


def inverse_spectrum(spec: np.ndarray, block_len: int, window: np.ndarray | None) -> np.ndarray:
    """irfft back to blocks: complex64 [..., L // 2 + 1] -> float32 [..., L], then windowed."""
    blocks = np.fft.irfft(spec, n=block_len, axis=-1)
    if window is not None:
        blocks *= window
    return blocks.astype(np.float32, copy=False)


def apply_complex_mask(spec: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A complex ratio mask applied: complex64 [B, F] times float32 [B, 2, F] (real,
    imaginary) -> complex64 [B, F] (new).

    The mask is built in a named complex64 array, never a temporary: numpy reuses a
    temporary of 256 KiB or more as the output of the next operation ("temporary
    elision"), and its complex multiply into that buffer rounds some products in the last
    bit differently. Written as ``spec * (re + 1j * im)``, a batch of 128 or more rows of
    257 bins gave rows that differed from the same rows alone (``rtns.bank.batch_invariant``
    failed there); this way every row is bit-identical at any batch size.
    """
    m = np.empty(spec.shape, dtype=np.complex64)
    m.real = mask[:, 0]
    m.imag = mask[:, 1]
    return spec * m


def mix_gains(dry_gain: float) -> tuple[np.float32, np.float32]:
    """The (wet, dry) float32 gains of the attenuation limit's mix for a dry gain ``g``
    (:attr:`rtns.atten.AttenLimit.dry_gain`): ``(1 - g, g)``, each rounded once from float64."""
    return np.float32(1.0 - dry_gain), np.float32(dry_gain)


def dry_wet_mix(
    wet: np.ndarray, dry: np.ndarray, wet_gain: np.ndarray, dry_gain: np.ndarray
) -> np.ndarray:
    """The attenuation limit's mix ``wet * wet_gain + dry * dry_gain`` in float32 (new array;
    gains from :func:`mix_gains`, scalars or broadcasting per row).

    The one expression behind the engine's :class:`rtns.engine.Stream` and the
    :class:`rtns.bank.StreamBank`: a bank slot equals a Stream bit for bit because both mix
    here. At ``g = 0`` it returns ``wet`` exactly (``x * 1 + y * 0``)."""
    return wet * wet_gain + dry * dry_gain


def db_to_gain(db: float) -> float:
    """Amplitude gain of ``db`` decibels."""
    return float(10.0 ** (db / 20.0))


#: Float input samples are clipped to +-this (18 dB over full scale): a level no real
#: signal reaches, low enough that squares and spectra stay finite in float32 (3e38 in a
#: block would overflow them to inf and then NaN).
CLIP_LEVEL = 8.0


def to_float_pcm(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The engine's input contract: samples -> (float32 array, number of clipped samples).

    Floats are taken as they are ([-1, 1] is full scale) and clipped to +-CLIP_LEVEL;
    signed integers are divided by their full scale (int16 32768, int32 2^31), unsigned
    ones are offset first. NaN or infinite samples raise ValueError naming the first.
    """
    x = np.asarray(x)
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        scale = float(info.max) + 1.0
        y = x.astype(np.float32)
        if x.dtype.kind == "u":
            y -= scale / 2
            scale /= 2
        return (y / np.float32(scale)).astype(np.float32, copy=False), 0
    if x.dtype.kind != "f":
        raise ValueError(f"samples must be float or integer PCM, got dtype {x.dtype}")
    # The common case in two passes: a peak within the clip level (NaN fails the test) means
    # nothing to reject and nothing to clip.
    if x.size and float(np.abs(x).max()) <= CLIP_LEVEL:
        return x.astype(np.float32, copy=False), 0
    if x.size and not np.isfinite(x).all():
        raise ValueError(_bad_sample_text(~np.isfinite(x)))
    big = np.abs(x) > CLIP_LEVEL
    n = int(np.count_nonzero(big))
    if n:
        x = np.clip(x, -CLIP_LEVEL, CLIP_LEVEL)
    return x.astype(np.float32, copy=False), n


def _bad_sample_text(bad: np.ndarray) -> str:
    first = int(np.flatnonzero(bad.reshape(-1))[0])
    return (
        f"{int(bad.sum())} input samples are NaN or infinite (the first at flat index "
        f"{first}); refusing to process them"
    )


class FirFilter:
    """Streaming FIR over [n, channels] float32 chunks (state: the last len(h) - 1 inputs).

    Output sample i is ``sum_j h[j] x[i - j]``: causal, so a linear-phase ``h`` of odd
    length L delays by (L - 1) / 2 samples.
    """

    def __init__(self, h: np.ndarray, channels: int) -> None:
        self.h = np.asarray(h, dtype=np.float64)
        self._hist = np.zeros((self.h.shape[0] - 1, channels), dtype=np.float64)

    def reset(self) -> None:
        self._hist.fill(0.0)

    def process(self, x: np.ndarray) -> np.ndarray:
        buf = np.concatenate((self._hist, x.astype(np.float64)))
        n = x.shape[0]
        y = np.empty((n, x.shape[1]), dtype=np.float32)
        for c in range(x.shape[1]):
            y[:, c] = np.convolve(buf[:, c], self.h, mode="valid")[:n]
        self._hist = buf[buf.shape[0] - self._hist.shape[0] :]
        return y
