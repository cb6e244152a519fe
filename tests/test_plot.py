"""rtns enhance --plot: the picture's panels are the input's and output's spectrograms (decoded
back from its colours and compared with the audio files), and the per-band numbers."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from cli_helpers import run_rtns

pytest.importorskip("matplotlib")


def _panels(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) pixel bounds inside each axes frame, top to bottom: the
    rows and columns that are (nearly) all dark are the frames' lines."""
    dark = img.max(axis=2) < 0.15
    mid = img.shape[1] // 2
    rows = np.flatnonzero(dark[:, mid - 200 : mid + 200].mean(axis=1) > 0.98)
    frames = [(a, b) for a, b in zip(rows[::2], rows[1::2], strict=False)]
    cols = np.flatnonzero(dark[frames[0][0] + 2 : frames[0][1] - 2].mean(axis=0) > 0.98)
    left, right = cols[0], cols[1]
    return [(a + 1, b, left + 1, right) for a, b in frames]


def _levels(img: np.ndarray, bounds: tuple[int, int, int, int]) -> np.ndarray:
    """Colour range position 0..1 of every pixel of a spectrogram panel (nearest magma
    colour), [rows from the top, columns]."""
    import matplotlib

    lut = matplotlib.colormaps["magma"](np.linspace(0, 1, 256))[:, :3]
    a, b, c, d = bounds
    px = img[a:b, c:d]
    dist = ((px[..., None, :] - lut[None, None]) ** 2).sum(-1)
    assert np.sqrt(dist.min(-1)).mean() < 0.02  # the panel is drawn in the colour map
    return dist.argmin(-1) / 255.0


def test_enhance_plot_shows_the_input_and_output_spectrograms(tmp_path):
    """The panels are the spectrograms of IN and OUT: decoded back from the picture's
    colours (80 dB over the colour map), the 440 Hz tone shows in the input while it
    sounds (gated 0.25 s on, 0.25 s off), and the noise the model removed shows as the
    level the audio files measure between input and output."""
    import matplotlib.image as mpimg

    from rtns.plot import RANGE_DB, power_spectrogram

    rng = np.random.default_rng(0)
    rate = 48_000
    t = np.arange(2 * rate) / rate
    x = 0.2 * np.sin(2 * np.pi * 440 * t) * (t % 0.5 < 0.25) + 0.05 * rng.standard_normal(t.size)
    sf.write(tmp_path / "in.wav", x.astype(np.float32), rate, subtype="FLOAT")
    r = run_rtns("enhance", "in.wav", "out.wav", "--plot", "pic.png", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    img = mpimg.imread(tmp_path / "pic.png")[..., :3]
    assert img.shape[:2] == (750, 1000)
    bounds = _panels(img)
    assert len(bounds) == 3  # input, output, bands
    inp, out = (RANGE_DB * _levels(img, b) for b in bounds[:2])  # dB, up to one offset

    def axes(panel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row centres (Hz), and the columns where the tone sounds / is off."""
        rows, cols = panel.shape
        phase = (np.arange(cols) + 0.5) / cols * 2.0 % 0.5
        freq = (rows - 0.5 - np.arange(rows)) / rows * rate / 2
        return freq, (phase > 0.05) & (phase < 0.2), (phase > 0.3) & (phase < 0.45)

    y = sf.read(tmp_path / "out.wav", dtype="float64")[0]
    px, ft, ff = power_spectrogram(x, rate)
    py, _, _ = power_spectrogram(y, rate)
    aon, aoff = (ft % 0.5 > 0.05) & (ft % 0.5 < 0.2), (ft % 0.5 > 0.3) & (ft % 0.5 < 0.45)

    # The tone: in the audio its peak bin stands 32 dB over the gaps' noise; a picture row
    # averages the power of up to 5 bins (<= 7 dB lower for a one-bin peak; the window's
    # main lobe spans 2 bins), colours step by 0.3 dB.
    freq, on, off = axes(inp)
    tone, atone = (freq > 300) & (freq < 600), (ff > 300) & (ff < 600)
    audio = 10 * np.log10(px[aon][:, atone].max(1)).mean()
    audio -= 10 * np.log10(px[aoff][:, atone].max(1)).mean()
    shown = inp[tone][:, on].max(0).mean() - inp[tone][:, off].max(0).mean()
    assert shown > audio - 10 * np.log10(5) - 1.0, (shown, audio)

    # The noise removed, 2-20 kHz in the gaps: the picture's output-minus-input level is the
    # audio's, to 1 dB (the mean of dB over the same cells, pooled or not).
    levels = []
    for panel in (out, inp):
        freq, _, off = axes(panel)
        levels.append(panel[(freq > 2000) & (freq < 20000)][:, off].mean())
    pictured = levels[0] - levels[1]
    aband = (ff > 2000) & (ff < 20000)
    measured = 10 * np.log10(py[aoff][:, aband]).mean() - 10 * np.log10(px[aoff][:, aband]).mean()
    assert measured < -10  # the model removed noise (else the check below says little)
    assert abs(pictured - measured) < 1.0, (pictured, measured)


def test_plot_removed_per_band_numbers():
    from rtns.plot import removed_per_band

    rate = 16_000
    x = np.random.default_rng(1).standard_normal(rate)
    centres, db = removed_per_band(x, 0.1 * x, rate)
    assert centres.shape == db.shape and np.nanmax(np.abs(db - 20.0)) < 1e-6
