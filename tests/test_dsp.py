"""rtns.dsp: windows, framing, overlap-add and spectra, checked against numbers."""

from __future__ import annotations

import numpy as np
import pytest

from rtns import dsp
from rtns.framing import BLOCK_LEN, BLOCK_SHIFT, N_BINS


def test_hann_periodic_values():
    w = dsp.hann_periodic(4)
    np.testing.assert_allclose(w, [0.0, 0.5, 1.0, 0.5], atol=1e-15)
    # Periodic, not symmetric: the copy at n would be w[0] again.
    assert dsp.hann_periodic(512)[0] == 0.0 and dsp.hann_periodic(512)[256] == 1.0


@pytest.mark.parametrize("n, expect", [(512, 1), (513, 1), (640, 2), (1023, 4), (1024, 5)])
def test_frame_signal_shape(n, expect):
    x = np.arange(n, dtype=np.float32)
    f = dsp.frame_signal(x, BLOCK_LEN, BLOCK_SHIFT)
    assert f.shape == (expect, BLOCK_LEN)
    assert not f.flags.writeable  # a view on x, not a copy


def test_frame_signal_values():
    x = np.arange(10, dtype=np.float32)
    f = dsp.frame_signal(x, 4, 2)
    np.testing.assert_array_equal(f, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]])


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 600), np.float32), "1-D"),
        (np.zeros(511, np.float32), "shorter than one block"),
    ],
)
def test_frame_signal_rejects(x, match):
    with pytest.raises(ValueError, match=match):
        dsp.frame_signal(x, BLOCK_LEN, BLOCK_SHIFT)


def test_overlap_add_values():
    frames = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]], dtype=np.float32)
    y = dsp.overlap_add(frames, 2)
    np.testing.assert_array_equal(y, [1, 1, 3, 3, 5, 5, 3, 3])
    assert y.dtype == np.float32 and y.shape == ((3 - 1) * 2 + 4,)


def test_overlap_add_rejects_1d():
    with pytest.raises(ValueError, match=r"\[T, L\]"):
        dsp.overlap_add(np.zeros(8, np.float32), 2)


def test_frame_then_overlap_add_of_rect_frames_counts_overlaps():
    x = np.ones(512 + 128 * 9, np.float32)
    y = dsp.overlap_add(np.array(dsp.frame_signal(x, 512, 128)), 128)
    # Fully overlapped region: 4 frames cover each sample.
    np.testing.assert_array_equal(y[384:-384], 4.0)
    np.testing.assert_array_equal(y[:128], 1.0)


def test_sqrt_hann_pair_reconstructs_offline():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16_000).astype(np.float32)
    wa = dsp.analysis_window("sqrt_hann", BLOCK_LEN)
    ws = dsp.synthesis_window("sqrt_hann", BLOCK_LEN, BLOCK_SHIFT)
    spec = dsp.spectrum(np.array(dsp.frame_signal(x, BLOCK_LEN, BLOCK_SHIFT)), wa)
    assert spec.shape[-1] == N_BINS
    y = dsp.overlap_add(dsp.inverse_spectrum(spec, BLOCK_LEN, ws), BLOCK_SHIFT)
    # Away from the edges (where fewer than block_len / shift frames overlap) y == x.
    edge = BLOCK_LEN - BLOCK_SHIFT
    np.testing.assert_allclose(y[edge : y.shape[0] - edge], x[edge : y.shape[0] - edge], atol=1e-5)


def test_sqrt_hann_window_values():
    wa = dsp.analysis_window("sqrt_hann", BLOCK_LEN)
    ws = dsp.synthesis_window("sqrt_hann", BLOCK_LEN, BLOCK_SHIFT)
    assert wa.dtype == ws.dtype == np.float32 and wa.shape == ws.shape == (BLOCK_LEN,)
    # Hann at 75 % overlap sums to 2, so the synthesis window is the analysis one halved.
    np.testing.assert_allclose(ws, wa / 2.0, atol=1e-7)
    assert dsp.ola_gain(dsp.hann_periodic(BLOCK_LEN), BLOCK_SHIFT) == pytest.approx(2.0)


def test_no_window_is_none():
    assert dsp.analysis_window("none", BLOCK_LEN) is None
    assert dsp.synthesis_window("none", BLOCK_LEN, BLOCK_SHIFT) is None


def test_ola_gain_raises_for_bad_window():
    # The symmetric Hann (numpy's) is not COLA at a quarter of its length.
    with pytest.raises(ValueError, match="constant overlap-add"):
        dsp.ola_gain(np.hanning(BLOCK_LEN), BLOCK_SHIFT)
    # A rectangular window of 512 at hop 100 is not COLA either.
    with pytest.raises(ValueError, match="constant overlap-add"):
        dsp.ola_gain(np.ones(BLOCK_LEN), 100)


def test_ola_gain_rect():
    assert dsp.ola_gain(np.ones(BLOCK_LEN), BLOCK_SHIFT) == pytest.approx(4.0)


def test_window_errors():
    with pytest.raises(ValueError, match="unknown window"):
        dsp.analysis_window("hamming", BLOCK_LEN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of block_shift"):
        dsp.synthesis_window("sqrt_hann", 500, 128)


def test_spectrum_round_trip_without_window():
    rng = np.random.default_rng(1)
    blocks = rng.standard_normal((3, BLOCK_LEN)).astype(np.float32)
    spec = dsp.spectrum(blocks, None)
    assert spec.shape == (3, N_BINS)
    back = dsp.inverse_spectrum(spec, BLOCK_LEN, None)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, blocks, atol=1e-5)
    # DC bin is the block sum.
    np.testing.assert_allclose(spec[:, 0].real, blocks.sum(axis=1), rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 127, 128, 300])
def test_complex_mask_rows_equal_each_row_alone(rows):
    # 128 rows of 257 complex64 bins are the first batch over numpy's 256 KiB temporary
    # elision threshold, where a mask built as a temporary changed rows in the last bit.
    rng = np.random.default_rng(rows)
    spec = rng.standard_normal((rows, N_BINS)) + 1j * rng.standard_normal((rows, N_BINS))
    spec = spec.astype(np.complex64)
    mask = rng.standard_normal((rows, 2, N_BINS)).astype(np.float32)
    y = dsp.apply_complex_mask(spec, mask)
    assert y.dtype == np.complex64 and y.shape == (rows, N_BINS)
    alone = np.concatenate(
        [dsp.apply_complex_mask(spec[i : i + 1], mask[i : i + 1]) for i in range(rows)]
    )
    np.testing.assert_array_equal(y, alone)
    exact = spec.astype(np.complex128) * (mask[:, 0] + 1j * mask[:, 1])
    np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("db, gain", [(0.0, 1.0), (-20.0, 0.1), (6.0206, 2.0)])
def test_db_to_gain(db, gain):
    assert dsp.db_to_gain(db) == pytest.approx(gain, rel=1e-4)
