"""Distillation from a shipped pack (rtns_export.distill and the trainer's ``teacher``): the
teacher is the pack's own function (checked through the engine), a step's loss is the stated
mix of the clean and the taught terms, loading the teacher leaves the run's batches alone, and
unusable teachers are refused in one sentence before training starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from packs import perturbed  # noqa: E402

from rtns.engine import Model, Stream  # noqa: E402
from rtns.pack import Provenance  # noqa: E402
from rtns_export.exporter import parity_signal  # noqa: E402
from rtns_export.fastnet import FastNet, FastNetConfig, export_fastnet  # noqa: E402

TEACHER = FastNetConfig(channels=16, bands=4, hidden=16, blocks=1)
STUDENT = FastNetConfig(channels=16, bands=8, hidden=16, blocks=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_pack(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    m = perturbed(FastNet(TEACHER))
    out = tmp_path_factory.mktemp("teacher") / "pack"
    export_fastnet(
        m,
        out,
        name="test-teacher",
        provenance=Provenance(origin="random weights (test)", model=TEACHER.to_dict()),
        parity_input=parity_signal(2.0, seed=3),
    )
    return out


def config(synth_data, tmp_path, teacher: dict | None, **kw):
    from rtns_export.train_config import TrainConfig

    return TrainConfig.model_validate(
        {
            "name": "distil",
            "family": "fastnet",
            "model": STUDENT.to_dict(),
            "data": {**synth_data, "segment_seconds": 1.0, "snr_db": [0, 10]},
            "losses": [{"name": "cc_mse", "weight": 30.0}, {"name": "sisnr", "weight": 0.1}],
            "optim": {"lr": 0.003, "batch": 4, "steps": 3},
            "valid": {
                "items": 2,
                "seconds": 1.5,
                "pesq_items": 0,
                "select": "si_sdr",
                "every_steps": 3,
            },
            "export": {"name": "tiny-student", "enabled": False},
            "out_dir": str(tmp_path / "runs"),
            **({"teacher": teacher} if teacher else {}),
            **kw,
        }
    )


def test_the_teacher_is_the_pack(teacher_pack):
    """The loaded teacher computes what the engine makes of the pack (to the parity
    tolerance), is frozen, and records where it came from."""
    from rtns_export.distill import load_teacher

    t = load_teacher(teacher_pack, [], torch.device("cpu"))
    assert t.family == "fastnet" and t.model_cfg == TEACHER.to_dict()
    assert t.parity <= 1e-4
    assert not any(p.requires_grad for p in t.model.parameters())
    x = parity_signal(2.0, seed=11)
    stream = Stream(Model(teacher_pack))
    stream.atten_lim = "off"
    heard = stream.push(x)
    lat = stream.model.latency
    y = t(torch.from_numpy(np.concatenate([np.zeros(lat, np.float32), x]))[None])[0].numpy()
    n = min(y.shape[0], heard.shape[0])
    assert n > x.shape[0] // 2 and np.max(np.abs(y[:n] - heard[:n])) <= 1e-4
    assert t.record()["graph_sha256"] and t.record()["pack"] == str(teacher_pack)


def test_a_step_mixes_clean_and_taught_losses(synth_data, tmp_path, teacher_pack):
    """loss = (1 - mix) L(y, clean) + mix L(y, teacher(noisy)), on a batch computed by hand;
    and the teacher's calibration batches do not move the mixer: the run draws the batches it
    would draw without a teacher."""
    from rtns_export.losses import CombinedLoss
    from rtns_export.train import Trainer

    mix = 0.3
    tr = Trainer(
        config(synth_data, tmp_path, {"pack": str(teacher_pack), "mix": mix}), progress=False
    )
    tr.load_data()
    before = json.dumps(tr.mixer.rng.bit_generator.state)
    tr._load_teacher()
    assert json.dumps(tr.mixer.rng.bit_generator.state) == before
    clean, noisy = tr.mixer.batch(4)
    x, s = torch.from_numpy(noisy), torch.from_numpy(clean)
    lf = CombinedLoss([("cc_mse", 30.0), ("sisnr", 0.1)])
    with torch.no_grad():
        tr.model.train()
        y = tr.model(x)
        t = tr.teacher(x)[:, : y.shape[1]]
        want_clean = float(lf(y, s[:, : y.shape[1]])[0])
        want_taught = float(lf(y, t)[0])
    loss, parts, _ = tr.train_step(clean, noisy)
    assert parts["teacher"] == pytest.approx(want_taught, rel=1e-5)
    assert loss == pytest.approx((1 - mix) * want_clean + mix * want_taught, rel=1e-5)
    assert abs(want_taught - want_clean) > 1e-3 * abs(want_clean)  # the terms differ
    prov = tr.provenance({})
    assert "distillation" in prov.losses and str(teacher_pack) in prov.losses
    assert prov.teacher["graph_sha256"] == tr.teacher.sha256 and prov.teacher["parity"] <= 1e-4


def test_a_student_that_is_its_teacher_learns_nothing_from_it(synth_data, tmp_path, teacher_pack):
    """With mix 1 and the student started from the teacher pack itself, the taught loss is the
    loss of identical signals (cc_mse 0) at the first step: the teacher's output is the
    student's, through a different code path (graph import vs. the student's own init)."""
    from rtns_export.train import run_training

    cfg = config(
        synth_data,
        tmp_path,
        {"pack": str(teacher_pack), "mix": 1.0},
        model=TEACHER.to_dict(),
        init_from=str(teacher_pack),
        losses=[{"name": "cc_mse", "weight": 1.0}],
        log_every=1,
    )
    run_training(cfg, threads=1, progress=False)
    rows = (cfg.run_dir / "train.csv").read_text().splitlines()
    head = rows[0].split(",")
    first = dict(zip(head, rows[1].split(","), strict=True))
    assert "teacher" in head
    assert float(first["teacher"]) < 1e-9 and float(first["loss"]) < 1e-9


def test_unusable_teachers_are_refused(synth_data, tmp_path, teacher_pack):
    from rtns_export.train import ConfigError, run_training

    cases = {
        "missing": (str(tmp_path / "nowhere"), "teacher: .*not a readable pack"),
        "dtln": ("models/rtns-dtln", "teacher: .*complex-mask families only"),
    }
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in teacher_pack.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    onnx = next(broken.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-100])
    cases["truncated"] = (str(broken), "teacher: .*(hash|sha256|differ)")
    root = Path(__file__).resolve().parents[1]
    for name, (pack, msg) in cases.items():
        pack = pack if Path(pack).is_absolute() else str(root / pack)
        cfg = config(synth_data, tmp_path / name, {"pack": pack})
        with pytest.raises(ConfigError, match=msg):
            run_training(cfg, threads=1, progress=False)
