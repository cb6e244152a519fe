"""Pictures of what rtns removed: input and output spectrograms, time-aligned, one above the
other, and the energy removed per frequency band (``rtns enhance IN OUT --plot PNG``).

Needs matplotlib (``pip install 'rtns[plot]'``), imported only here and only when drawing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtns.errors import RtnsError

#: STFT of the pictures: 32 ms windows, 8 ms hops at any rate.
WINDOW_S = 0.032
HOP_S = 0.008
#: Spectrogram colour range below the loudest bin.
RANGE_DB = 80.0
#: At most this many rows (frequency) and columns (time) per spectrogram panel: fewer than
#: the panel's pixels (about 190 x 800), so the picture never skips a row or a column (a
#: pure tone one bin wide, or a click one frame long, would vanish between two pixels).
MAX_ROWS = 160
MAX_COLUMNS = 720


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RtnsError(
            "--plot needs matplotlib: pip install 'rtns[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def require_matplotlib() -> None:
    """Raise the one-line error now when matplotlib is missing (before any work)."""
    _pyplot()


def power_spectrogram(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Power spectrogram of mono float x [n]: (power [frames, bins], times s, freqs Hz)."""
    n = max(16, round(WINDOW_S * rate))
    hop = max(1, round(HOP_S * rate))
    if x.shape[0] < n:
        x = np.concatenate([x, np.zeros(n - x.shape[0], x.dtype)])
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[::hop]
    win = np.hanning(n).astype(np.float64)
    power = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2
    times = (np.arange(power.shape[0]) * hop + n / 2) / rate
    freqs = np.fft.rfftfreq(n, 1 / rate)
    return power, times, freqs


def pooled(
    power: np.ndarray, max_frames: int = MAX_COLUMNS, max_bins: int = MAX_ROWS
) -> np.ndarray:
    """``power`` [frames, bins] averaged over groups of adjacent frames and of adjacent bins
    (mean power: a group's energy per bin) so that it has at most ``max_frames`` x
    ``max_bins`` cells; the last group of an axis may be shorter."""
    for axis, most in ((0, max_frames), (1, max_bins)):
        n = power.shape[axis]
        k = -(-n // most)  # ceil
        if k > 1:
            starts = np.arange(0, n, k)
            sizes = np.diff(np.append(starts, n)).astype(np.float64)
            sums = np.add.reduceat(power, starts, axis=axis)
            power = sums / (sizes[:, None] if axis == 0 else sizes[None, :])
    return power


def band_levels(
    x: np.ndarray, y: np.ndarray, rate: int, bands: int = 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level (dB, relative to full-scale sine power) of x and y in ``bands`` log-spaced
    bands from 100 Hz to Nyquist: (band centres Hz, x dB, y dB)."""
    px, _, f = power_spectrogram(x, rate)
    py, _, _ = power_spectrogram(y, rate)
    edges = np.geomspace(100.0, rate / 2, bands + 1)
    centres = np.sqrt(edges[:-1] * edges[1:])
    lx, ly = np.full(bands, np.nan), np.full(bands, np.nan)
    for b in range(bands):
        sel = (f >= edges[b]) & (f < edges[b + 1])
        if sel.any():
            lx[b] = 10 * np.log10(max(px[:, sel].mean(), 1e-30))
            ly[b] = 10 * np.log10(max(py[:, sel].mean(), 1e-30))
    return centres, lx, ly


def removed_per_band(
    x: np.ndarray, y: np.ndarray, rate: int, bands: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Energy removed per band (dB, positive = removed) over the whole file, in ``bands``
    log-spaced bands from 50 Hz to Nyquist: (band centres Hz, dB)."""
    px, _, f = power_spectrogram(x, rate)
    py, _, _ = power_spectrogram(y, rate)
    edges = np.geomspace(50.0, rate / 2, bands + 1)
    centres = np.sqrt(edges[:-1] * edges[1:])
    db = np.full(bands, np.nan)
    for b in range(bands):
        sel = (f >= edges[b]) & (f < edges[b + 1])
        if sel.any():
            ex, ey = px[:, sel].sum(), py[:, sel].sum()
            if ex > 0:
                db[b] = 10 * np.log10(ex / max(ey, 1e-30))
    return centres, db


def plot_enhancement(
    x: np.ndarray, y: np.ndarray, rate: int, out: str | Path, title: str = ""
) -> Path:
    """Draw input x and output y (mono float [n], time-aligned) to a PNG at ``out``."""
    plt = _pyplot()
    out = Path(out)
    px, t, f = power_spectrogram(x, rate)
    py, _, _ = power_spectrogram(y, rate)
    px, py = pooled(px), pooled(py)
    top = 10 * np.log10(max(px.max(), py.max(), 1e-30))
    fig = plt.figure(figsize=(10, 7.5), dpi=100)
    grid = fig.add_gridspec(3, 2, width_ratios=[40, 1], height_ratios=[1, 1, 0.8])
    extent = (0.0, float(t[-1] + HOP_S / 2), 0.0, f[-1] / 1000)
    image = None
    for row, (p, label) in enumerate(((px, "input"), (py, "output"))):
        ax = fig.add_subplot(grid[row, 0])
        db = 10 * np.log10(np.maximum(p, 1e-30)).T
        image = ax.imshow(
            db,
            origin="lower",
            aspect="auto",
            extent=extent,
            vmin=top - RANGE_DB,
            vmax=top,
            cmap="magma",
            interpolation="nearest",
        )
        ax.set_ylabel(f"{label}\nkHz")
        if row == 0 and title:
            ax.set_title(title)
    ax.set_xlabel("time (s)")
    cax = fig.add_subplot(grid[0:2, 1])
    fig.colorbar(image, cax=cax, label="dB")
    # What went: the level of the removed signal (input - output) beside what stayed.
    centres, kept, removed = band_levels(y, x - y, rate)
    bx = fig.add_subplot(grid[2, 0])
    pos = np.arange(len(centres))
    floor = float(min(np.nanmin(kept), np.nanmin(removed))) - 6.0
    bx.bar(pos - 0.2, kept - floor, width=0.4, bottom=floor, color="#1b6ea5", label="output (kept)")
    bx.bar(
        pos + 0.2,
        removed - floor,
        width=0.4,
        bottom=floor,
        color="#d95f02",
        label="removed (in - out)",
    )
    bx.set_ylim(floor, max(float(np.nanmax(kept)), float(np.nanmax(removed))) + 6.0)
    bx.set_xticks(pos[::3])
    bx.set_xticklabels([f"{c / 1000:.2g}" for c in centres[::3]])
    bx.set_xlim(pos[0] - 0.6, pos[-1] + 0.6)
    bx.set_xlabel("band centre (kHz)")
    bx.set_ylabel("band level (dB)")
    bx.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out, format="png")
    except OSError as e:
        raise RtnsError(f"{out}: cannot write the picture ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out
