"""rtns enhance --plot: a real picture (size, not blank, the panels differ where noise went)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from cli_helpers import run_rtns

pytest.importorskip("matplotlib")


def test_enhance_plot_draws_both_spectrograms_and_the_bands(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    rate = 48_000
    t = np.arange(2 * rate) / rate
    x = 0.2 * np.sin(2 * np.pi * 440 * t) * (t % 0.5 < 0.25) + 0.05 * rng.standard_normal(t.size)
    sf.write(tmp_path / "in.wav", x.astype(np.float32), rate, subtype="FLOAT")
    r = run_rtns("enhance", "in.wav", "out.wav", "--plot", "pic.png", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    img = mpimg.imread(tmp_path / "pic.png")
    assert img.shape[:2] == (750, 1000)
    rgb = img[..., :3]
    assert rgb.std() > 0.1  # not blank
    top, middle = rgb[40:225, 80:885], rgb[290:475, 80:885]  # input / output panels
    assert top.std() > 0.05 and middle.std() > 0.05
    assert np.abs(top - middle).mean() > 0.02  # the output differs: noise went


def test_plot_removed_per_band_numbers():
    from rtns.plot import removed_per_band

    rate = 16_000
    x = np.random.default_rng(1).standard_normal(rate)
    centres, db = removed_per_band(x, 0.1 * x, rate)
    assert centres.shape == db.shape and np.nanmax(np.abs(db - 20.0)) < 1e-6
