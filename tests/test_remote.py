"""export/remote.py: packing the training data for a lent machine and pointing configs at it."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from rtns_export import remote
from rtns_export.train_config import load_config

SR = 16_000


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 20 * seed
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 20))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.1 * x * env + 0.001 * rng.standard_normal(t.shape)).astype(np.float32)


def test_pack_then_prepare(tmp_path):
    data = tmp_path / "shared"
    for i, folder in enumerate(["train/speech", "train/speech", "valid/speech", "valid/speech"]):
        (data / folder).mkdir(parents=True, exist_ok=True)
        sf.write(data / folder / f"u{i}.flac", _speechlike(2.0, i), SR)
    rng = np.random.default_rng(0)
    for folder in ["train/noise/street", "valid/noise"]:
        (data / folder).mkdir(parents=True, exist_ok=True)
        sf.write(data / folder / "n.wav", 0.05 * rng.standard_normal(3 * SR), SR)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"name": "t", "data": {"cache_dir": str(tmp_path / "c0")}}))
    out = tmp_path / "pack"
    assert (
        remote.main(
            [
                "pack",
                "--data",
                str(data),
                "--out",
                str(out),
                "--config",
                str(cfg),
                "--jobs",
                "1",
                "--check-files",
                "2",
            ]
        )
        == 0
    )
    info = json.loads((out / "PACK.json").read_text())
    assert info["folders"]["train/speech"]["files"] == 2 and info["rirs"] is None
    assert info["speech_fidelity"]["pesq_wb_min"] > 3.5  # the codec keeps the speech
    y, sr = sf.read(out / "train/speech/u0.ogg")
    assert sr == SR and abs(len(y) - 2 * SR) < 10

    runs, cfgs = tmp_path / "runs", tmp_path / "cfgs"
    assert (
        remote.main(
            [
                "prepare",
                str(cfg),
                "--data",
                str(out),
                "--runs",
                str(runs),
                "--configs-out",
                str(cfgs),
                "--set",
                "optim.batch=3",
                "--set",
                'name="other"',
                "--jobs",
                "1",
            ]
        )
        == 0
    )
    c = load_config(cfgs / "cfg.json")
    assert c.name == "other" and c.optim.batch == 3
    assert c.data.train_noise == str((out / "train/noise").resolve())
    assert c.data.cache_dir == str(runs.resolve() / "cache") and c.out_dir == str(runs.resolve())
    assert len(list((runs / "cache").glob("*.npy"))) == 6  # every file decoded once
