"""The metric-discriminator stage (rtns_export.metric_disc, issue 30): the true scores it
learns are PESQ-WB mapped to [0, 1]; on a fixed set of pairs it learns to rank them as PESQ
does; in the trainer it adds its columns to train.csv, its state to last.pt, and a resumed
run goes on exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pesq")

from test_train_smoke import tiny_config  # noqa: E402

from rtns_export import metric_disc  # noqa: E402
from rtns_export.metric_disc import (  # noqa: E402
    PESQ_HI,
    PESQ_LO,
    MetricDiscriminator,
    MetricStage,
    normalize_pesq,
    pesq_targets,
)
from rtns_export.train import run_training  # noqa: E402

SR = 16_000


SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "valid" / "speech"
needs_speech = pytest.mark.skipif(
    not SPEECH.exists(), reason="PESQ needs real speech: ../shared/data/valid/speech"
)


def _speech_and_noisy(
    n: int, snrs: list[float], seed: int = 0, seconds: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` utterances of the validation speech (``seconds`` each), each in white noise at
    its SNR."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    files = sorted(SPEECH.rglob("*.flac"))[:n]
    clean = np.stack([sf.read(f, dtype="float32")[0][: int(seconds * SR)] for f in files])
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    gain = np.sqrt((clean**2).mean(1) / (noise**2).mean(1) / 10 ** (np.asarray(snrs) / 10))
    return clean, (clean + gain[:, None] * noise).astype(np.float32)


@needs_speech
def test_targets_are_pesq_on_the_unit_scale():
    assert normalize_pesq(PESQ_HI) == 1.0 and normalize_pesq(PESQ_LO) == 0.0
    assert normalize_pesq(9.0) == 1.0 and normalize_pesq(-1.0) == 0.0
    clean, noisy = _speech_and_noisy(3, [15.0, 30.0, 45.0])
    q = pesq_targets(noisy, clean)
    assert q.dtype == np.float32 and q.shape == (3,)
    assert q[0] < q[1] < q[2] <= 1.0  # more noise, lower score
    assert pesq_targets(clean[:1], clean[:1])[0] > 0.95
    silent = np.zeros((1, clean.shape[1]), np.float32)
    assert pesq_targets(silent, silent)[0] == 0.0  # nothing to score: the bottom


@needs_speech
def test_discriminator_learns_to_rank_by_pesq(monkeypatch):
    torch.manual_seed(0)
    clean, noisy = _speech_and_noisy(6, [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], 1, seconds=1.0)
    stage = MetricStage(1.0, 2e-3, 8, noisy=False, device=torch.device("cpu"))
    est, ref = torch.from_numpy(noisy), torch.from_numpy(clean)
    q = pesq_targets(noisy, clean)
    # Every step judges the same batch: its PESQ once, not 60 times (the suite's budget).
    real = metric_disc.pesq_targets

    def once(e: np.ndarray, r: np.ndarray) -> np.ndarray:
        if np.array_equal(e, noisy) and np.array_equal(r, clean):
            return q.copy()
        return real(e, r)

    monkeypatch.setattr(metric_disc, "pesq_targets", once)
    for _ in range(60):
        stage.step(est, ref, est)
    with torch.no_grad():
        pred = stage.disc(est, ref).numpy()
        top = stage.disc(ref, ref).numpy()
    # An untrained one already ranks these by noise level (correlation 0.88) but predicts
    # nearly one value for all (spread 0.002 on the unit scale): it must also fit the values.
    print(
        "correlation with PESQ:", np.corrcoef(pred, q)[0, 1], "mean error:", np.abs(pred - q).mean()
    )
    assert np.corrcoef(pred, q)[0, 1] > 0.95, (pred, q)
    assert np.abs(pred - q).mean() < 0.1, (pred, q)
    assert np.all(top > pred.min())


def test_generator_term_moves_only_the_generator():
    d = MetricDiscriminator(8)
    stage = MetricStage(0.5, 1e-3, 8, noisy=True, device=torch.device("cpu"))
    stage.disc = d
    x = torch.randn(2, 8000, requires_grad=True)
    term = stage.generator_term(x, torch.randn(2, 8000))
    term.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert term.item() >= 0


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_trainer_stage_logs_checkpoints_and_resumes(synth_data, tmp_path):
    md = {"weight": 0.5, "lr": 1e-3, "channels": 8}
    cfg = tiny_config(synth_data, tmp_path / "a", steps=8, metric_disc=md)
    tr, _ = run_training(cfg, threads=1, progress=False)
    rows = _rows(cfg.run_dir / "train.csv")
    assert len(rows) == 8
    for r in rows:
        assert float(r["metric_adv"]) >= 0 and float(r["disc_loss"]) >= 0
        assert PESQ_LO <= float(r["batch_pesq"]) <= PESQ_HI
    ck = torch.load(cfg.run_dir / "last.pt", weights_only=False)
    assert set(ck["metric"]) == {"disc", "opt"}
    # 4 steps, stop, resume for 4 more: the same discriminator and generator as the 8 at
    # once above (whose export does not touch its checkpoint)
    half = tiny_config(synth_data, tmp_path / "b", steps=4, metric_disc=md)
    run_training(half, threads=1, progress=False, export=False)
    rest = tiny_config(synth_data, tmp_path / "b", steps=8, metric_disc=md)
    run_training(rest, threads=1, progress=False, export=False)
    ca = torch.load(cfg.run_dir / "last.pt", weights_only=False)
    cb = torch.load(rest.run_dir / "last.pt", weights_only=False)
    for part in ("model", "metric"):
        wa, wb = ca[part], cb[part]
        if part == "metric":
            wa, wb = wa["disc"], wb["disc"]
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (part, k)
