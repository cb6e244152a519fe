"""Training losses: known values, invariances, monotonic growth with distortion, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rtns_export import losses  # noqa: E402
from rtns_export.pmsqe import pmsqe, pmsqe_frames  # noqa: E402

SR = 16_000


def speechlike(n: int = 32_000, seed: int = 0, batch: int = 2) -> torch.Tensor:
    """Voiced harmonics with a moving pitch and a syllable envelope, [batch, n]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    out = []
    for b in range(batch):
        f0 = 110 + 30 * b + 25 * np.sin(2 * np.pi * 0.8 * t + rng.uniform(0, 6))
        ph = 2 * np.pi * np.cumsum(f0) / SR
        x = sum(np.sin(k * ph) / k for k in range(1, 25))
        env = np.clip(np.sin(2 * np.pi * 2.7 * t + b), 0, None) ** 2
        out.append(0.1 * x * env)
    return torch.tensor(np.stack(out), dtype=torch.float32)


def noise_like(x: torch.Tensor, snr_db: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(x.shape, generator=g)
    n = n * (x.pow(2).mean(1, keepdim=True) / n.pow(2).mean(1, keepdim=True)).sqrt()
    return n * 10 ** (-snr_db / 20)


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return speechlike()


def test_neg_snr_known_value(clean):
    noisy = clean + noise_like(clean, 10.0)
    assert losses.neg_snr(noisy, clean).item() == pytest.approx(-10.0, abs=0.05)
    # scale-dependent: halving the estimate costs SNR
    assert losses.neg_snr(0.5 * clean, clean).item() == pytest.approx(
        -10 * math.log10(1 / 0.25), abs=1e-3
    )


def test_sisnr_known_value_and_scale_invariance(clean):
    noisy = clean + noise_like(clean, 10.0)
    v = losses.sisnr(noisy, clean).item()
    assert v == pytest.approx(-10.0, abs=0.2)
    assert losses.sisnr(3.0 * noisy, clean).item() == pytest.approx(v, abs=1e-3)
    assert losses.sisnr(noisy + 0.3, clean).item() == pytest.approx(v, abs=1e-3)  # zero-mean
    assert losses.sisnr(clean, clean).item() < -60


def test_mse_losses_zero_for_identical_and_grow(clean):
    for fn in (losses.mse, losses.spectral_mse, losses.lms):
        assert fn(clean, clean).item() == pytest.approx(0.0, abs=1e-6)
        vals = [fn(clean + noise_like(clean, s), clean).item() for s in (30, 10, 0)]
        assert vals[0] < vals[1] < vals[2], fn.__name__


def test_mel_bank_is_triangular():
    for m in (16, 32, 64):
        fb = losses.mel_bank(m)
        assert fb.shape == (257, m)
        assert torch.all(fb >= 0)
        assert torch.all(fb.max(0).values > 0.5)  # every band has a peak near 1
        peaks = fb.argmax(0)
        assert torch.all(peaks[1:] >= peaks[:-1])  # centres increase


def test_lms_is_scale_sensitive(clean):
    # LMS sees levels (unlike SI-SNR): 6 dB down gives |log 0.5| in every active mel band
    v = losses.lms(0.5 * clean, clean).item()
    assert 0.3 < v <= math.log(2) + 1e-3


def test_pmsqe_zero_for_identical_and_gain_invariant(clean):
    assert pmsqe(clean, clean).item() == pytest.approx(0.0, abs=1e-6)
    assert pmsqe(2.5 * clean, clean).item() == pytest.approx(0.0, abs=1e-5)


def test_pmsqe_grows_with_distortion(clean):
    vals = [pmsqe(clean + noise_like(clean, s), clean).item() for s in (40, 20, 10, 0, -5)]
    assert all(a < b for a, b in zip(vals, vals[1:], strict=False)), vals
    assert vals[0] < 0.3 * vals[-1]


def test_pmsqe_frames_shape(clean):
    f = pmsqe_frames(clean + noise_like(clean, 5), clean)
    assert f.shape == (2, 1 + (clean.shape[1] - 512) // 256)
    assert torch.all(f >= 0)


def test_pmsqe_differentiable_and_descends(clean):
    est = (clean + noise_like(clean, 5)).clone().requires_grad_(True)
    loss = pmsqe(est, clean)
    loss.backward()
    assert est.grad is not None and torch.isfinite(est.grad).all()
    assert est.grad.abs().sum() > 0
    # one small gradient step lowers the loss
    step = 1e-3 * est.grad / est.grad.abs().max()
    with torch.no_grad():
        after = pmsqe(est - step * est.detach().abs().max(), clean).item()
    assert after < loss.item()


@pytest.mark.parametrize("name", ["mse", "spectral_mse", "sisnr", "neg_snr", "lms", "pmsqe"])
def test_every_loss_backpropagates(clean, name):
    est = (clean + noise_like(clean, 5)).clone().requires_grad_(True)
    losses.LOSSES[name](est, clean).backward()
    assert torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0


def test_combined_loss_is_weighted_sum(clean):
    noisy = clean + noise_like(clean, 5)
    comb = losses.CombinedLoss([("sisnr", 1.0), ("lms", 2.0)])
    total, parts = comb(noisy, clean)
    expect = losses.sisnr(noisy, clean) + 2.0 * losses.lms(noisy, clean)
    assert total.item() == pytest.approx(expect.item(), rel=1e-5)
    assert set(parts) == {"sisnr", "lms"}
    assert comb.describe() == "1*sisnr + 2*lms"


def test_combined_loss_rejects_unknown():
    with pytest.raises(ValueError, match="unknown loss"):
        losses.CombinedLoss([("pesq", 1.0)])


def test_shape_mismatch_is_refused(clean):
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        losses.sisnr(clean[:, :-1], clean)
