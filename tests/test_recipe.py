"""The small-data recipe: compressed-spectrum losses, speed perturbation, image-method early
reverberation, mixing against reverberant speech, held-out urban validation noise and the
mixed-kind validation set. Every check asserts numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rtns_export import augment  # noqa: E402
from rtns_export.data import (  # noqa: E402
    DataError,
    Mixer,
    active_rms,
    mix_at,
    split_holdout,
    validation_set,
)
from rtns_export.losses import (  # noqa: E402
    LOSSES,
    CombinedLoss,
    cc_mse,
    cmag_mse,
    compressed_stft,
)
from rtns_export.train_config import (  # noqa: E402
    AugmentConfig,
    ConfigError,
    DataConfig,
    load_config,
)

SR = 16_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def speechlike(n: int = 16_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f0 = 130 + 30 * np.sin(2 * np.pi * 0.9 * t)
    ph = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * ph) / k for k in range(1, 15)) * np.clip(np.sin(2 * np.pi * 3 * t), 0, 1)
    return (0.1 * x + 0.003 * rng.standard_normal(n)).astype(np.float32)


# -- losses -------------------------------------------------------------------------------------
def test_compressed_stft_of_a_bin_centred_sine():
    """A cosine of amplitude A on bin 32: the periodic-Hann-windowed 512-point frame gives
    |X| = A * sum(hann) / 2 = 128 A at that bin, so the compressed magnitude is (128 A)^0.3
    and the compressed real part carries the phase (cos: positive real)."""
    a = 0.05
    n = np.arange(4096)
    x = torch.from_numpy((a * np.cos(2 * np.pi * 32 * n / 512)).astype(np.float32))[None]
    mag, re, im = compressed_stft(x)
    assert mag.shape == (1, 1 + (4096 - 512) // 128, 257)
    np.testing.assert_allclose(mag[0, :, 32].numpy(), (128 * a) ** 0.3, rtol=1e-4)
    np.testing.assert_allclose(re[0, :, 32].numpy(), (128 * a) ** 0.3, rtol=1e-4)
    assert float(im[0, :, 32].abs().max()) < 1e-3
    # far from the tone only float32 rounding is left (|X| ~ 1e-6, compressed ~ 0.016)
    assert float(mag[0, :, 40].max()) < 0.03


def test_cc_and_cmag_mse_values():
    x = torch.from_numpy(np.stack([speechlike(8000, 0), speechlike(8000, 1)]))
    assert float(cc_mse(x, x)) == 0.0 and float(cmag_mse(x, x)) == 0.0
    mag, _, _ = compressed_stft(x)
    # a sign flip keeps magnitudes, reverses the compressed complex spectrum
    assert float(cmag_mse(-x, x)) < 1e-10
    np.testing.assert_allclose(float(cc_mse(-x, x)), 4 * float(torch.mean(mag**2)), rtol=1e-4)
    # a gain g scales compressed magnitudes by g^0.3
    g = 0.5
    want = (g**0.3 - 1) ** 2 * float(torch.mean(mag**2))
    np.testing.assert_allclose(float(cmag_mse(g * x, x)), want, rtol=1e-3)
    np.testing.assert_allclose(float(cc_mse(g * x, x)), want, rtol=1e-3)


def test_compressed_losses_match_a_numpy_reference():
    rng = np.random.default_rng(3)
    e = rng.standard_normal((2, 2048)).astype(np.float32) * 0.1
    r = rng.standard_normal((2, 2048)).astype(np.float32) * 0.1
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)

    def comp(x):
        fr = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), 512, axis=-1)[:, ::128]
        s = np.fft.rfft(fr * win, axis=-1)
        m = np.sqrt(s.real**2 + s.imag**2 + 1e-12)
        return m**0.3, s.real * m**-0.7, s.imag * m**-0.7

    me, ree, ime = comp(e)
    mr, rer, imr = comp(r)
    et, rt = torch.from_numpy(e), torch.from_numpy(r)
    np.testing.assert_allclose(float(cmag_mse(et, rt)), np.mean((me - mr) ** 2), rtol=1e-4)
    want = np.mean((ree - rer) ** 2) + np.mean((ime - imr) ** 2)
    np.testing.assert_allclose(float(cc_mse(et, rt)), want, rtol=1e-4)


def test_recipe_loss_is_weighted_and_descends():
    assert "cc_mse" in LOSSES and "cmag_mse" in LOSSES
    loss = CombinedLoss([("cc_mse", 30.0), ("cmag_mse", 70.0), ("sisnr", 0.1)])
    ref = torch.from_numpy(np.stack([speechlike(6000, 4)]))
    est = (ref + 0.02 * torch.randn_like(ref)).requires_grad_(True)
    total, parts = loss(est, ref)
    np.testing.assert_allclose(
        float(total.detach()),
        30 * parts["cc_mse"] + 70 * parts["cmag_mse"] + 0.1 * parts["sisnr"],
        rtol=1e-5,
    )
    total.backward()
    assert torch.isfinite(est.grad).all()
    with torch.no_grad():
        after, _ = loss(est - 1e-3 * est.grad / est.grad.norm() * est.norm(), ref)
    assert float(after) < float(total.detach())


# -- speed perturbation -------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_moves_a_tone(factor):
    n = 32_000
    x = np.sin(2 * np.pi * 1000 * np.arange(n) / SR).astype(np.float32)
    y = augment.speed_perturb(x, factor)
    assert abs(y.shape[0] - round(n / factor)) <= 1
    spec = np.abs(np.fft.rfft(y[2000:-2000] * np.hanning(y.shape[0] - 4000)))
    peak = np.argmax(spec) * SR / (y.shape[0] - 4000)
    assert abs(peak - 1000 * factor) < 5
    np.testing.assert_allclose(np.std(y[2000:-2000]), np.std(x), rtol=0.02)
    assert np.array_equal(augment.speed_perturb(x, 1.0), x)


# -- early reverberation ------------------------------------------------------------------------
def test_direct_path_index_matches_an_anechoic_room():
    import pyroomacoustics as pra

    room = pra.ShoeBox([6, 5, 3], fs=SR, max_order=0)
    src, mic = np.array([1.0, 1.5, 1.2]), np.array([4.2, 3.1, 1.6])
    room.add_source(src)
    room.add_microphone(mic)
    room.compute_rir()
    h = room.rir[0][0]
    d = float(np.linalg.norm(src - mic))
    assert int(np.argmax(np.abs(h))) == augment.direct_path_index(d)


def test_image_method_rir_decays_at_its_rt60():
    rng = np.random.default_rng(0)
    for _ in range(2):
        h, rt = augment.image_method_rir(rng, rt60=(0.4, 0.4))
        assert rt == 0.4 and h.dtype == np.float32
        lead = augment.RIR_LEAD
        # nothing arrives before the direct path (its fractional-delay filter aside)
        assert np.max(np.abs(h[: lead - 8])) < 0.05 * np.abs(h[lead])
        # Schroeder backward integration: T20 (-5 to -25 dB) extrapolated to 60 dB
        e = np.cumsum(h[::-1].astype(np.float64) ** 2)[::-1]
        edb = 10 * np.log10(e / e[0])
        t20 = 3 * (np.argmax(edb < -25) - np.argmax(edb < -5)) / SR
        assert 0.25 < t20 < 0.6, t20


def test_early_rir_keeps_direct_path_and_early_reflections_only():
    h = np.ones(4000, dtype=np.float32)
    e = augment.early_rir(h, early_ms=50.0, fade_ms=5.0)
    end = augment.RIR_LEAD + 800  # 50 ms
    assert np.all(e[:end] == 1.0)
    assert np.all(e[end + 80 :] == 0.0)
    ramp = e[end : end + 80]
    assert np.all(np.diff(ramp) <= 0) and 0 < ramp[0] < 1 and ramp[-1] == 0.0


def test_reverberate_target_and_observation():
    x = speechlike(8000, 2)
    delta = np.zeros(3000, dtype=np.float32)
    delta[augment.RIR_LEAD] = 1.0
    full, early = augment.reverberate(x, delta)
    lead = augment.RIR_LEAD
    np.testing.assert_allclose(full[lead:], x[:-lead], atol=1e-6)
    np.testing.assert_allclose(early, full, atol=1e-6)
    # a late echo (100 ms) is in the observation only
    h = delta.copy()
    h[lead + 1600] = 0.5
    full, early = augment.reverberate(x, h, early_ms=50.0)
    np.testing.assert_allclose(early[lead:], x[:-lead], atol=1e-6)
    np.testing.assert_allclose(
        full - early, np.r_[np.zeros(lead + 1600), 0.5 * x[: -lead - 1600]], atol=1e-6
    )


def test_rir_bank_is_cached_and_deterministic(tmp_path):
    a = augment.rir_bank(3, 5, (0.2, 0.3), str(tmp_path))
    assert len(list(tmp_path.glob("rirs_*.npz"))) == 1
    b = augment.rir_bank(3, 5, (0.2, 0.3), str(tmp_path))  # from the cache
    c = augment.rir_bank(3, 5, (0.2, 0.3), None)  # regenerated
    for x, y, z in zip(a, b, c, strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    assert not np.array_equal(a[0], a[1])


# -- mixing ---------------------------------------------------------------------------------
def test_mix_at_measures_snr_against_the_observed_speech():
    rng = np.random.default_rng(0)
    target = speechlike(16000, 5)
    observed = 2.0 * target + 0.01 * rng.standard_normal(16000).astype(np.float32)
    noise = rng.standard_normal(16000).astype(np.float32)
    clean, noisy, _ = mix_at(target, noise, 5.0, -25.0, observed)
    g = float(np.dot(clean, target) / np.dot(target, target))  # the common scale
    n_part = noisy - g * observed
    snr = 20 * np.log10(active_rms(g * observed) / active_rms(n_part))
    assert abs(snr - 5.0) < 0.01
    np.testing.assert_allclose(clean, g * target, rtol=1e-5, atol=1e-7)
    rms_db = 20 * np.log10(np.sqrt(np.mean(noisy.astype(np.float64) ** 2)))
    assert abs(rms_db + 25.0) < 0.01


def _pools():
    speech = [speechlike(24000, s) * (1 + s / 10) for s in range(6)]
    rng = np.random.default_rng(9)
    noise = [rng.standard_normal(20000).astype(np.float32) * 0.1 for _ in range(3)]
    return speech, noise


def test_mixer_with_speed_and_reverb(tmp_path):
    speech, noise = _pools()
    aug = AugmentConfig(
        speed=True, speed_prob=1.0, reverb=True, reverb_prob=1.0, rir_count=2, rt60=(0.3, 0.5)
    )
    cfg = DataConfig(segment_seconds=1.0, augment=aug, cache_dir=str(tmp_path))
    m1 = Mixer(speech, noise, cfg, np.random.default_rng(1))
    m2 = Mixer(speech, noise, cfg, np.random.default_rng(1))
    c1, n1 = m1.batch(4)
    c2, n2 = m2.batch(4)
    assert c1.shape == n1.shape == (4, 16000)
    assert np.array_equal(c1, c2) and np.array_equal(n1, n2)  # deterministic
    assert m1.stats.sources["reverb"] == 4 and len(m1.rirs) == 2
    # off: the old behaviour and the old random stream
    cfg0 = DataConfig(segment_seconds=1.0, augment=AugmentConfig(), cache_dir=str(tmp_path))
    m0 = Mixer(speech, noise, cfg0, np.random.default_rng(1))
    assert m0.rirs == [] and "reverb" not in m0.stats.sources
    c0, _ = m0.batch(4)
    assert not np.array_equal(c0, c1)


def test_speed_perturbed_speech_excerpt_has_the_segment_length(tmp_path):
    speech, noise = _pools()
    aug = AugmentConfig(speed=True, speed_prob=1.0, speed_range=(1.1, 1.1))
    cfg = DataConfig(segment_seconds=0.5, augment=aug, cache_dir=str(tmp_path))
    m = Mixer(speech, noise, cfg, np.random.default_rng(0))
    seg = m._speech(0, 8000)
    assert seg.shape == (8000,) and np.std(seg) > 0.01
    # a 1 s utterance sped up 1.1x and cut to 0.5 s is still all speech (no padding)
    short = Mixer(
        [speechlike(16000, 1), speechlike(16000, 2)], noise, cfg, np.random.default_rng(0)
    )
    seg = short._speech(0, 8000)
    assert np.mean(np.abs(seg[-400:])) > 1e-3


def test_split_holdout_and_mixed_validation_set():
    speech, noise = _pools()
    names = ["street/a.flac", "rain/b.flac", "street/c.flac"]
    train, held = split_holdout(noise, names, "street", 0.25)
    assert [len(a) for a in train] == [15000, 20000, 15000]
    assert [len(a) for a in held] == [5000, 5000]
    assert np.array_equal(np.concatenate([train[0], held[0]]), noise[0])
    with pytest.raises(DataError):
        split_holdout(noise, names, "office", 0.25)
    cfg = DataConfig(segment_seconds=1.0)
    kinds = ["file", "colored", "urban", "babble"]
    c, n = validation_set(speech, noise, cfg, 8, 1.0, 3, kinds, held)
    c2, n2 = validation_set(speech, noise, cfg, 8, 1.0, 3, kinds, held)
    assert c.shape == (8, 16000) and np.array_equal(n, n2)
    # the coloured-noise items are stationary: their noise has a flat envelope
    resid = n[1] - c[1]
    env = np.sqrt(np.mean(resid.reshape(16, 1000).astype(np.float64) ** 2, axis=1))
    assert env.max() / env.min() < 1.5
    with pytest.raises(DataError):
        validation_set(speech, noise, cfg, 4, 1.0, 3, kinds, None)
    # without kinds: the original validation set
    c0, n0 = validation_set(speech, noise, cfg, 4, 1.0, 3)
    assert c0.shape == (4, 16000)


def test_config_checks(tmp_path):
    with pytest.raises(ValueError):
        AugmentConfig(speed_range=(1.2, 0.9))
    with pytest.raises(ValueError):
        AugmentConfig(rt60=(0.01, 0.5))
    p = tmp_path / "c.json"
    p.write_text('{"name": "x", "valid": {"kinds": ["file", "office"]}}')
    with pytest.raises(ConfigError, match="kinds"):
        load_config(p)
    # The flagship's config loads as written: every value in the file is the loaded one
    # (tuples compared as lists), the rest are the defaults.
    path = Path(__file__).resolve().parents[1] / "configs" / "gtcrn_s10_b.json"
    raw = json.loads(path.read_text())
    loaded = json.loads(load_config(path).model_dump_json())

    def leaves(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    want, got = leaves(raw), leaves(loaded)
    assert want and {k: got.get(k) for k in want} == want
