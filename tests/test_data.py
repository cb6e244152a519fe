"""The training data pipeline: loading/caching, mixing (SNR, level, no clipping),
augmentation generators, determinism, the config, and make-testset."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtns_export import augment, data
from rtns_export.train_config import AugmentConfig, ConfigError, DataConfig, load_config

SR = 16_000


def tone(freq: float, seconds: float, amp: float = 0.3, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t)
    return (amp * env * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.shape[0], 1 / SR)
    return float(spec[(f >= lo) & (f < hi)].sum())


# -- loading ---------------------------------------------------------------------------
def test_load_folder_resamples_mixes_down_and_caches(tmp_path):
    src = tmp_path / "audio"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "a.wav", tone(440, 1.0, sr=8000), 8000)
    stereo = np.stack([tone(300, 2.0, sr=44100), tone(300, 2.0, sr=44100)], axis=1)
    sf.write(src / "sub" / "b.flac", stereo, 44100)
    sf.write(src / "short.wav", tone(440, 0.1), SR)  # below min_seconds: skipped
    (src / "notes.txt").write_text("not audio")
    cache = tmp_path / "cache"
    arrays, names = data.load_folder(src, cache)
    assert names == ["a.wav", "sub/b.flac"]
    assert abs(arrays[0].shape[0] - SR) <= 2 and abs(arrays[1].shape[0] - 2 * SR) <= 2
    assert all(a.dtype == np.float32 for a in arrays)
    # the 440 Hz tone survives resampling
    assert band_energy(arrays[0], 400, 480) > 0.9 * band_energy(arrays[0], 0, 8000)
    cached = sorted(cache.glob("*.npy"))
    assert len(cached) == 3
    again, _ = data.load_folder(src, cache)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again, strict=True))


def test_load_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no audio files"):
        data.load_folder(tmp_path / "empty")


# -- mixing ----------------------------------------------------------------------------
@pytest.mark.parametrize("snr", [-5.0, 0.0, 12.0, 25.0])
def test_mix_at_hits_snr_and_level(snr):
    rng = np.random.default_rng(0)
    clean = tone(200, 2.0) + 0.3 * tone(900, 2.0)
    noise = rng.standard_normal(clean.shape[0]).astype(np.float32)
    c, y, rescaled = data.mix_at(clean, noise, snr, -30.0)
    n = y - c
    got = 10 * np.log10(data.active_rms(c) ** 2 / data.active_rms(n) ** 2)
    assert got == pytest.approx(snr, abs=0.05)
    assert not rescaled
    assert 20 * np.log10(np.sqrt(np.mean(y.astype(np.float64) ** 2))) == pytest.approx(
        -30, abs=0.01
    )


def test_mix_at_scales_down_instead_of_clipping():
    clean = tone(200, 1.0, amp=0.9)
    clean[1000] = 5.0  # a huge spike
    noise = np.random.default_rng(1).standard_normal(clean.shape[0]).astype(np.float32)
    c, y, rescaled = data.mix_at(clean, noise, 10.0, -3.0)
    assert rescaled
    assert np.max(np.abs(y)) == pytest.approx(data.PEAK, abs=1e-4)
    # one gain scaled both (nothing clipped, nothing scaled apart): clean is g * clean and
    # the noise in the mix is g * k * noise, sample for sample
    g = float(np.dot(c, clean) / np.dot(clean, clean))
    np.testing.assert_allclose(c, g * clean, rtol=0, atol=1e-6)
    k = float(np.dot(y - c, noise) / np.dot(noise, noise))
    np.testing.assert_allclose(y - c, k * noise, rtol=0, atol=1e-5)
    # the pair keeps its SNR
    ratio = data.active_rms(c) / data.active_rms(y - c)
    assert 20 * np.log10(ratio) == pytest.approx(10.0, abs=0.1)


def _pools(n_speech: int = 6, n_noise: int = 3):
    # speech i is a tone at 300 + 50 i Hz, noise j is band noise; identifiable by spectrum
    speech = [tone(300 + 50 * i, 3.0 + 0.5 * i) for i in range(n_speech)]
    rng = np.random.default_rng(5)
    noise = [rng.standard_normal(int(SR * (1.0 + j))).astype(np.float32) for j in range(n_noise)]
    return speech, noise


def test_mixer_shapes_ranges_and_determinism():
    speech, noise = _pools()
    cfg = DataConfig(segment_seconds=1.5, snr_db=(0, 10), level_dbfs=(-30, -20))
    m1 = data.Mixer(speech, noise, cfg, np.random.default_rng(7))
    m2 = data.Mixer(speech, noise, cfg, np.random.default_rng(7))
    c1, y1 = m1.batch(12)
    c2, y2 = m2.batch(12)
    assert c1.shape == y1.shape == (12, 24_000) and c1.dtype == np.float32
    assert np.array_equal(c1, c2) and np.array_equal(y1, y2)
    assert np.max(np.abs(y1)) <= data.PEAK + 1e-6
    levels = 20 * np.log10(np.sqrt(np.mean(y1.astype(np.float64) ** 2, axis=1)))
    assert np.all(levels <= -20 + 1e-3) and np.all(levels >= -30 - 1e-3)
    c3, _ = data.Mixer(speech, noise, cfg, np.random.default_rng(8)).batch(12)
    assert not np.array_equal(c1, c3)
    assert m1.stats.mixes == 12 and sum(m1.stats.sources.values()) == 12


def test_batch_feeder_mixes_what_a_seeded_mixer_mixes_and_reports_a_dead_worker():
    import os
    import signal

    speech, noise = _pools()
    cfg = DataConfig(segment_seconds=0.5, snr_db=(0, 10), level_dbfs=(-30, -20))
    feeder = data.BatchFeeder(speech, noise, cfg, seed=3, start_step=40, size=4, workers=1)
    try:
        ref = data.Mixer(speech, noise, cfg, np.random.default_rng([3, 40, 0]))
        for _ in range(3):
            c, y = feeder.batch()
            rc, ry = ref.batch(4)
            assert c.shape == (4, 8000) and c.dtype == np.float32
            assert np.array_equal(c, rc) and np.array_equal(y, ry)
        os.kill(feeder.procs[0].pid, signal.SIGKILL)
        feeder.procs[0].join(timeout=30)
        with pytest.raises(data.DataError, match="rtns-feeder-0 exited"):
            while True:  # batches already queued come first
                feeder.batch()
    finally:
        feeder.close()
    assert not any(p.is_alive() for p in feeder.procs)


def test_mixer_babble_never_contains_the_target_utterance():
    speech, noise = _pools(n_speech=12)
    aug = AugmentConfig(
        babble_prob=1.0, colored=False, hum=False, clicks=False, eq=False, gain_sweep=False
    )
    cfg = DataConfig(segment_seconds=1.0, augment=aug)
    m = data.Mixer(speech, noise, cfg, np.random.default_rng(3))
    for _ in range(10):
        clean, noisy = m.sample()
        nz = noisy - clean
        f_clean = np.argmax(np.abs(np.fft.rfft(clean)))
        spec = np.abs(np.fft.rfft(nz))
        # the target's own tone is not in the babble: little energy at its frequency
        assert spec[f_clean] < 0.2 * spec.max()
    assert m.stats.sources == {"babble": 10}


def test_layer_adds_the_second_noise_at_its_relative_level():
    rng = np.random.default_rng(2)
    base = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    second = tone(1000, 1.0, amp=0.5)
    out = augment.layer(base, second, -6.0)
    assert out.dtype == np.float32 and out.shape == base.shape
    added = out.astype(np.float64) - base
    assert 20 * np.log10(augment._rms(added) / augment._rms(base)) == pytest.approx(-6.0, abs=1e-3)
    assert np.allclose(added / augment._rms(added), second / augment._rms(second), atol=1e-4)


def test_mixer_layers_two_sources_only_when_switched_on():
    speech, noise = _pools(n_speech=12)
    quiet = dict(hum=False, clicks=False, eq=False, gain_sweep=False)
    # every primary source is babble, every second source coloured noise: a layered noise
    # holds the babble's tones and a broadband floor
    aug = AugmentConfig(
        babble_prob=0.0,
        colored_prob=1.0,
        layer=True,
        layer_prob=1.0,
        layer_db=(-3.0, -3.0),
        **quiet,
    )
    m = data.Mixer(
        speech, noise, DataConfig(segment_seconds=1.0, augment=aug), np.random.default_rng(4)
    )
    for _ in range(6):
        m.sample("babble")
    assert m.stats.sources == {"babble": 6, "colored": 6, "layered": 6}
    off = data.Mixer(
        speech,
        noise,
        DataConfig(segment_seconds=1.0, augment=aug.model_copy(update={"layer": False})),
        np.random.default_rng(4),
    )
    for _ in range(6):
        off.sample("babble")
    assert off.stats.sources == {"babble": 6}
    # validation never layers
    assert aug.disabled().layer is False
    with pytest.raises(ValueError, match="layer_db"):
        AugmentConfig(layer_db=(5.0, -5.0))


def test_validation_set_is_fixed():
    speech, noise = _pools()
    cfg = DataConfig()
    a = data.validation_set(speech, noise, cfg, items=4, seconds=1.0, seed=9)
    b = data.validation_set(speech, noise, cfg, items=4, seconds=1.0, seed=9)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (4, SR)


# -- augmentation ----------------------------------------------------------------------
def _slope_db_per_octave(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.shape[0], 1 / SR)
    sel = (f > 100) & (f < 6000)
    return float(np.polyfit(np.log2(f[sel]), 10 * np.log10(spec[sel]), 1)[0])


@pytest.mark.parametrize(("color", "slope"), [("white", 0.0), ("pink", -3.0), ("brown", -6.0)])
def test_colored_noise_slopes(color, slope):
    x = augment.colored_noise(4 * SR, np.random.default_rng(0), color)
    assert _slope_db_per_octave(x) == pytest.approx(slope, abs=0.6)
    assert np.sqrt(np.mean(x**2)) == pytest.approx(1.0, rel=1e-3)


def test_hum_has_mains_harmonics():
    x = augment.hum(2 * SR, np.random.default_rng(0), mains=50.0)
    total = band_energy(x, 0, 8000)
    assert band_energy(x, 45, 55) > 0.2 * total
    assert band_energy(x, 1600, 8000) < 1e-3 * total
    assert band_energy(x, 70, 90) < 0.01 * total  # nothing between harmonics


def test_clicks_are_sparse_and_bright():
    x = augment.clicks(2 * SR, np.random.default_rng(0), rate_hz=5)
    frames = x[: 2 * SR // 160 * 160].reshape(-1, 160)
    active = np.mean(frames**2, axis=1) > 1e-4 * np.mean(x**2)
    assert active.mean() < 0.5
    assert band_energy(x, 2000, 8000) > band_energy(x, 0, 500)


def test_random_eq_keeps_level_and_changes_spectrum():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SR).astype(np.float32)
    y = augment.random_eq(x, rng)
    assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=1e-3)
    assert not np.allclose(x, y)


def test_gain_sweep_bounded():
    x = np.ones(SR, dtype=np.float32)
    y = augment.gain_sweep(x, np.random.default_rng(4), max_db=12.0)
    db = 20 * np.log10(y)
    assert db.max() <= 6.0 + 1e-6 and db.min() >= -6.0 - 1e-6
    assert db.max() - db.min() > 0.1


def test_babble_sums_talkers():
    rng = np.random.default_rng(0)
    talkers = [tone(f, 1.0) for f in (200, 400, 800)]
    b = augment.babble(talkers, rng)
    for f in (200, 400, 800):
        assert band_energy(b, f - 10, f + 10) > 0.1 * band_energy(b, 0, 8000)


# -- config ----------------------------------------------------------------------------
def test_config_validation(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"name": "x", "data": {"snr_db": [10, -5]}}')
    with pytest.raises(ConfigError, match="snr_db"):
        load_config(p)
    p.write_text('{"name": "x", "optim": {"batchsize": 3}}')
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(p)
    p.write_text('{"name": "x"}')
    cfg = load_config(p, {"optim.steps": 5, "data.segment_seconds": 2})
    assert cfg.optim.steps == 5 and cfg.data.segment_seconds == 2
    assert cfg.data.snr_db == (-5, 25) and cfg.data.level_dbfs == (-35, -15)


def _configs_named_by_shipped_packs(repo: Path) -> set[str]:
    """The config files the shipped packs' manifests name: the run each was exported from
    (``provenance.origin``: "run 'NAME'") and any ``configs/X.json`` they cite."""
    import json
    import re

    names = set()
    for manifest in sorted((repo / "models").glob("*/manifest.json")):
        prov = json.loads(manifest.read_text())["provenance"]
        names |= {f"{run}.json" for run in re.findall(r"run '([\w.-]+)'", prov["origin"])}
        names |= set(re.findall(r"configs/([\w.-]+\.json)", json.dumps(prov)))
    return names


def test_shipped_configs_are_valid():
    """Every config loads; the top of configs/ holds the shipped packs' configs (the ones
    their manifests name) and the smoke run's, and every earlier stage is under history/."""
    repo = Path(__file__).resolve().parents[1]
    root = repo / "configs"
    top = {p.name for p in root.glob("*.json")}
    named = _configs_named_by_shipped_packs(repo)
    assert len(named) >= 3, named
    assert top == named | {"tiny.json"}, top ^ (named | {"tiny.json"})
    history = sorted((root / "history").rglob("*.json"))
    assert len(history) > 30
    for p in sorted(root.glob("*.json")) + history:
        load_config(p)


# -- make-testset ----------------------------------------------------------------------
def test_make_testset(tmp_path):
    clean_dir, noise_dir = tmp_path / "clean_in", tmp_path / "noise_in"
    clean_dir.mkdir()
    noise_dir.mkdir()
    for i in range(3):
        sf.write(clean_dir / f"u{i}.wav", tone(250 + 100 * i, 1.5), SR)
    sf.write(noise_dir / "n.flac", np.random.default_rng(0).standard_normal(SR) * 0.1, SR)
    out = tmp_path / "set"
    n = data.make_testset(clean_dir, noise_dir, out, count=5, snr_db=(0, 10), seed=1)
    assert n == 5
    cn = sorted(p.name for p in (out / "clean").iterdir())
    nn = sorted(p.name for p in (out / "noisy").iterdir())
    assert cn == nn and len(cn) == 5
    rows = list(csv.DictReader((out / "mixes.csv").open()))
    assert [r["name"] for r in rows] == cn
    for r in rows:
        c, sr = sf.read(out / "clean" / r["name"], dtype="float32")
        y, _ = sf.read(out / "noisy" / r["name"], dtype="float32")
        assert sr == SR and c.shape == y.shape
        snr = 20 * np.log10(data.active_rms(c) / data.active_rms(y - c))
        assert snr == pytest.approx(float(r["snr_db"]), abs=0.3)
    with pytest.raises(data.DataError, match="not empty"):
        data.make_testset(clean_dir, noise_dir, out, count=2)
    # same seed -> same set
    out2 = tmp_path / "set2"
    data.make_testset(clean_dir, noise_dir, out2, count=5, snr_db=(0, 10), seed=1)
    a, _ = sf.read(out / "noisy" / cn[0])
    b, _ = sf.read(out2 / "noisy" / cn[0])
    assert np.array_equal(a, b)


def test_make_testset_several_folders(tmp_path):
    """Several clean folders are pooled, several noise folders are drawn equally often, and
    mixes.csv names the folder and file of every pair's speech and noise."""
    roots = {}
    for side, names in (("c1", ["a", "b"]), ("c2", ["a"]), ("n1", list("pqrstuvw")), ("n2", ["z"])):
        roots[side] = tmp_path / side
        roots[side].mkdir()
        for i, name in enumerate(names):
            if side.startswith("c"):
                x = tone(200 + 50 * i + (300 if side == "c2" else 0), 1.2)
            else:
                x = np.random.default_rng(i).standard_normal(SR) * 0.1
            sf.write(roots[side] / f"{name}.wav", x, SR)
    out = tmp_path / "set"
    clean, noise = [roots["c1"], roots["c2"]], [roots["n1"], roots["n2"]]
    assert data.make_testset(clean, noise, out, count=60, snr_db=(0, 5), seed=3) == 60
    rows = list(csv.DictReader((out / "mixes.csv").open()))
    assert list(rows[0]) == [
        "name",
        "clean_dir",
        "clean_file",
        "noise_dir",
        "noise_file",
        "snr_db",
        "level_dbfs",
        "rescaled",
    ]
    used = [(r["clean_dir"], r["clean_file"]) for r in rows]
    # every utterance once per round of three, from both folders (two files named a.wav)
    assert sorted(used[:3]) == sorted(
        [(str(roots["c1"]), "a.wav"), (str(roots["c1"]), "b.wav"), (str(roots["c2"]), "a.wav")]
    )
    # the one-file folder is as likely as the eight-file one (binomial 60, 1/2: 30 +- 12)
    n2 = sum(r["noise_dir"] == str(roots["n2"]) for r in rows)
    assert 18 <= n2 <= 42
    assert all(r["noise_file"] == "z.wav" for r in rows if r["noise_dir"] == str(roots["n2"]))
    assert {r["noise_file"] for r in rows if r["noise_dir"] == str(roots["n1"])} <= {
        f"{c}.wav" for c in "pqrstuvw"
    }
    for r in rows[:6]:  # each pair is its recorded speech at its recorded SNR
        c, _ = sf.read(out / "clean" / r["name"], dtype="float32")
        y, _ = sf.read(out / "noisy" / r["name"], dtype="float32")
        src, _ = sf.read(Path(r["clean_dir"]) / r["clean_file"], dtype="float32")
        assert abs(np.corrcoef(c, src[: c.shape[0]])[0, 1]) > 0.99
        snr = 20 * np.log10(data.active_rms(c) / data.active_rms(y - c))
        assert snr == pytest.approx(float(r["snr_db"]), abs=0.3)
    # one folder in a list is the single-folder call: the same set
    one, two = tmp_path / "one", tmp_path / "two"
    data.make_testset(roots["c1"], roots["n1"], one, count=4, seed=5)
    data.make_testset([roots["c1"]], [roots["n1"]], two, count=4, seed=5)
    for name in sorted(p.name for p in (one / "noisy").iterdir()):
        a, _ = sf.read(one / "noisy" / name)
        b, _ = sf.read(two / "noisy" / name)
        assert np.array_equal(a, b)
    with pytest.raises(data.DataError, match="given twice"):
        data.make_testset([roots["c1"], roots["c1"]], noise, tmp_path / "x", count=2)


def test_make_testset_cli(tmp_path):
    from rtns.cli import main

    clean_dir, noise_dir = tmp_path / "c", tmp_path / "n"
    clean_dir.mkdir()
    noise_dir.mkdir()
    sf.write(clean_dir / "a.wav", tone(300, 1.0), SR)
    sf.write(noise_dir / "b.wav", np.random.default_rng(0).standard_normal(SR) * 0.1, SR)
    assert (
        main(
            [
                "make-testset",
                "--clean",
                str(clean_dir),
                "--noise",
                str(noise_dir),
                "--out",
                str(tmp_path / "o"),
                "--count",
                "2",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "o" / "noisy").glob("*.wav"))) == 2
    noise2 = tmp_path / "n2"
    noise2.mkdir()
    sf.write(noise2 / "d.wav", np.random.default_rng(1).standard_normal(SR) * 0.1, SR)
    argv = ["make-testset", "--clean", str(clean_dir), "--noise", str(noise_dir)]
    argv += ["--noise", str(noise2), "--out", str(tmp_path / "o3"), "--count", "6"]
    assert main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "o3" / "mixes.csv").open()))
    assert len(rows) == 6 and {r["noise_dir"] for r in rows} <= {str(noise_dir), str(noise2)}
    assert (
        main(
            [
                "make-testset",
                "--clean",
                str(tmp_path / "missing"),
                "--noise",
                str(noise_dir),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 1
    )
