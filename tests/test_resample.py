"""rtns.resample: exact output counts, chunking invariance, delay, pass band, stop band."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from rtns.resample import Resampler, lowpass_fir


def tone(freq: float, rate: int, n: int, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / rate
    return np.stack([np.sin(2 * np.pi * freq * t + c) for c in range(channels)], axis=1).astype(
        np.float32
    )


@pytest.mark.parametrize(
    "rin, rout",
    [
        (48_000, 16_000),
        (16_000, 48_000),
        (44_100, 16_000),
        (16_000, 44_100),
        (8_000, 16_000),
        (16_000, 22_050),
    ],
)
def test_counts_and_chunking(rin, rout):
    x = (np.random.default_rng(0).standard_normal((3 * rin // 2, 2)) * 0.1).astype(np.float32)
    whole = Resampler(rin, rout, 2).process(x)
    r = Resampler(rin, rout, 2)
    assert whole.shape == (r.count_out(x.shape[0]), 2)
    parts, i, sizes = [], 0, [1, 0, 17, 333, 4096, 5]
    while i < x.shape[0]:
        n = sizes[len(parts) % len(sizes)]
        parts.append(r.process(x[i : i + n]))
        i += n
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    r.reset()
    np.testing.assert_array_equal(r.process(x), whole)


@pytest.mark.parametrize("rin, rout", [(48_000, 16_000), (16_000, 44_100)])
def test_delay_and_passband(rin, rout):
    """A 1 kHz tone comes out at unit gain, delayed by exactly delay_s."""
    r = Resampler(rin, rout)
    x = tone(1000.0, rin, rin)
    y = r.process(x)[:, 0]
    t = np.arange(y.shape[0]) / rout - r.delay_s
    want = np.sin(2 * np.pi * 1000.0 * t)
    sl = slice(rout // 10, -rout // 10)
    err = y[sl] - want[sl]
    assert 10 * np.log10(np.sum(want[sl] ** 2) / np.sum(err**2)) > 60


def test_stop_band_rejects_aliases():
    """12 kHz at 48 kHz would alias to 4 kHz at 16 kHz: it must be 65 dB down."""
    y = Resampler(48_000, 16_000).process(tone(12_000.0, 48_000, 48_000))[1000:, 0]
    assert 20 * np.log10(np.sqrt(np.mean(y**2)) / np.sqrt(0.5)) < -65


def test_min_delay_is_exact():
    r = Resampler(16_000, 44_100, min_delay_s=Fraction(1, 500))
    assert r.delay == Fraction(1, 500)
    plain = Resampler(16_000, 44_100)
    assert plain.delay < Fraction(1, 500)


def test_lowpass_fir_unit_dc_and_cutoff():
    h = lowpass_fir(145, 0.25)
    assert abs(h.sum() - 1) < 1e-12
    assert np.allclose(h, h[::-1])
    with pytest.raises(ValueError):
        lowpass_fir(11, 0.6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="positive"):
        Resampler(0, 16_000)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        Resampler(48_000, 16_000, 2).process(np.zeros((10, 1), np.float32))


def test_resample_signal_is_time_aligned_with_exact_length():
    from rtns.resample import resample_signal

    x = tone(440.0, 44_100, 44_100, channels=2)
    y = resample_signal(x, 44_100, 16_000)
    assert y.shape == (16_000, 2)
    want = tone(440.0, 16_000, 16_000, channels=2)
    np.testing.assert_allclose(y[200:-200], want[200:-200], atol=2e-3)
    assert resample_signal(x, 44_100, 44_100) is x
