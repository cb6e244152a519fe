"""End-to-end trainer smoke test on generated data: a tiny DTLN trains for a few dozen steps
on synthetic voiced tones + noise written to tmp folders, its loss falls, the exported pack
passes the exporter's parity check and loads in the engine; resume is exact."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from packs import voiced  # noqa: E402

from rtns_export.train import _record, run_training  # noqa: E402
from rtns_export.train_config import TrainConfig  # noqa: E402

SR = 16_000


def tiny_config(data: dict[str, str], out: Path, steps: int = 40, **kw) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": "tiny",
            "family": "dtln",
            "model": {"hidden": 16, "layers": 1, "encoder": 32, "dropout": 0.0, "norm": True},
            "data": {**data, "segment_seconds": 1.0, "snr_db": [0, 10]},
            "losses": [{"name": "sisnr", "weight": 1.0}, {"name": "lms", "weight": 0.5}],
            "optim": {"lr": 0.005, "batch": 8, "steps": steps},
            "valid": {"items": 4, "seconds": 1.5, "pesq_items": 2, "every_steps": 20},
            "export": {"name": "tiny-test"},
            "out_dir": str(out),
            "log_every": 1,
            "checkpoint_every": 10,
            **kw,
        }
    )


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "train.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_tiny_training_learns_and_exports(synth_data, tmp_path):
    from rtns.engine import Model, enhance_array
    from rtns.pack import read_manifest

    cfg = tiny_config(synth_data, tmp_path)
    # One thread: on a busy 2-core machine two intra-op threads wait on each other at every
    # op (25-35 s here against 6 s at one thread, 127 s in the issue).
    tr, result = run_training(cfg, threads=1, progress=False)
    assert torch.get_num_threads() == 1
    assert tr.state.step == 40
    loss = _losses(cfg.run_dir)
    assert len(loss) == 40
    assert np.mean(loss[-10:]) < np.mean(loss[:10]) - 1.0, loss
    assert result is not None
    manifest, parity = result
    assert parity.max_abs_err <= 1e-4
    pack = cfg.run_dir / "pack"
    m = read_manifest(pack)
    assert m.name == "tiny-test" and m.family == "dtln"
    prov = m.provenance.model_dump()
    assert prov["losses"] == "1*sisnr + 0.5*lms"
    assert prov["steps"] == tr.state.best_step
    assert "speech" in prov["training_data"] and "validation" in prov
    # the pack runs in the engine and changes the signal
    x = np.random.default_rng(1).standard_normal(SR).astype(np.float32) * 0.05
    y = enhance_array(Model(pack), x)
    assert y.shape == x.shape and np.isfinite(y).all() and not np.allclose(x, y)
    for name in ("last.pt", "best.pt", "valid.csv", "config.json"):
        assert (cfg.run_dir / name).exists()
    assert json.loads((cfg.run_dir / "config.json").read_text())["name"] == "tiny"


def test_resume_is_exact(synth_data, tmp_path):
    a = tiny_config(synth_data, tmp_path / "a", steps=20)
    run_training(a, threads=1, progress=False, export=False)
    b = tiny_config(synth_data, tmp_path / "b", steps=10)
    run_training(b, threads=1, progress=False, export=False)
    b2 = tiny_config(synth_data, tmp_path / "b", steps=20)
    tr, _ = run_training(b2, threads=1, progress=False, export=False)
    assert tr.state.step == 20
    wa = torch.load(a.run_dir / "last.pt", weights_only=False)["model"]
    wb = torch.load(b.run_dir / "last.pt", weights_only=False)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _losses(a.run_dir) == _losses(b.run_dir)


def test_resume_with_another_select_metric_forgets_the_best(synth_data, tmp_path, capsys):
    def cfg(steps: int, select: str, pesq_items: int) -> TrainConfig:
        valid = {"items": 4, "seconds": 1.5, "pesq_items": pesq_items, "every_steps": 10}
        return tiny_config(synth_data, tmp_path, steps=steps, valid={**valid, "select": select})

    tr, _ = run_training(cfg(20, "si_sdr", 0), threads=1, progress=False, export=False)
    row = next(h for h in tr.state.history if h["step"] == tr.state.best_step)
    assert tr.state.best_score == pytest.approx(row["si_sdr"])
    # the same run, resumed with PESQ as the metric: an SI-SDR best must not stand for one
    b = cfg(30, "pesq", 2)
    tr2, _ = run_training(b, threads=1, progress=False, export=False)
    assert "was not selected by valid.select='pesq'" in capsys.readouterr().err
    assert tr2.state.best_step == 30
    last = tr2.state.history[-1]
    assert tr2.state.best_score == pytest.approx(last["pesq"]) and last["best"] == 1
    assert _record(torch.load(b.run_dir / "best.pt", weights_only=False))["step"] == 30


def test_mixing_workers_feed_the_training_loop(synth_data, tmp_path, capsys):
    cfg = tiny_config({**synth_data, "workers": 2}, tmp_path, steps=12)
    tr, _ = run_training(cfg, threads=1, progress=False, export=False)
    assert tr.state.step == 12 and len(_losses(cfg.run_dir)) == 12
    assert "2 mixing processes" in capsys.readouterr().err
    import multiprocessing as mp

    assert not [p for p in mp.active_children() if p.name.startswith("rtns-feeder")]


def test_export_only_cli_and_errors(synth_data, tmp_path):
    from rtns.cli import main

    cfg = tiny_config(synth_data, tmp_path, steps=20)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    assert main(["train", "--config", str(path), "--threads", "1", "--quiet", "--no-export"]) == 0
    out = tmp_path / "exported"
    assert main(["train", "--config", str(path), "--export-only", "--out", str(out)]) == 0
    assert (out / "manifest.json").exists()
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "family": "nope"}')
    assert main(["train", "--config", str(bad), "--set", "optim.steps=1"]) == 1


def test_train_without_torch_says_what_to_install(monkeypatch, capsys, tmp_path):
    import sys

    from rtns.cli import main

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'rtns[train]'" in err[0]


def test_fine_tune_from_own_checkpoint(synth_data, tmp_path):
    from rtns.pack import read_manifest

    base = tiny_config(synth_data, tmp_path / "base", steps=20)
    run_training(base, threads=1, progress=False, export=False)
    start = torch.load(base.run_dir / "last.pt", weights_only=False)["model"]

    ft = tiny_config(
        synth_data,
        tmp_path / "ft",
        steps=20,
        init_from=str(base.run_dir / "last.pt"),
        optim={"lr": 0.001, "batch": 8, "steps": 20, "schedule": {"kind": "cosine"}},
    )
    # Step 0 of the fine-tune validates the loaded weights: they are the base run's last ones.
    tr, result = run_training(ft, threads=1, progress=False)
    assert tr.state.init["init_step"] == 20
    assert tr.state.init["init_valid_now"]["si_sdr"] == pytest.approx(
        base_last_si_sdr(base), abs=1e-6
    )
    assert result is not None
    prov = read_manifest(ft.run_dir / "pack").provenance.model_dump()
    assert "fine-tuned this project" in prov["origin"] and "from scratch" in prov["origin"]
    assert prov["steps"] == 20 + tr.state.best_step  # counted from scratch
    assert prov["init"]["init_from"].endswith("last.pt")
    # training time counted from scratch too: the base run's time to its last.pt + this stage's
    base_s = torch.load(base.run_dir / "last.pt", weights_only=False)["run"]["elapsed_s"]
    assert base_s > 0 and prov["init"]["init_minutes"] == pytest.approx(base_s / 60, abs=0.006)
    assert prov["total_train_minutes"] == pytest.approx(
        prov["train_minutes"] + base_s / 60, abs=0.11
    )
    now = torch.load(ft.run_dir / "last.pt", weights_only=False)["model"]
    assert any(not torch.equal(start[k], now[k]) for k in start)  # it trained on

    # A resumed fine-tune does not reload init_from (it continues from its own last.pt).
    more = ft.model_copy(update={"optim": ft.optim.model_copy(update={"steps": 25})})
    tr2, _ = run_training(more, threads=1, progress=False, export=False)
    assert tr2.state.step == 25 and tr2.state.init["init_step"] == 20


def base_last_si_sdr(cfg: TrainConfig) -> float:
    """SI-SDR of the run's last weights on its validation set, measured afresh."""
    from rtns_export.train import Trainer

    tr = Trainer(cfg, threads=1, progress=False)
    tr.load_data()
    tr.model.load_state_dict(torch.load(cfg.run_dir / "last.pt", weights_only=False)["model"])
    return tr.validate()["si_sdr"]


def test_fine_tune_refuses_a_checkpoint_of_another_shape(synth_data, tmp_path, capsys):
    from rtns.cli import main

    base = tiny_config(synth_data, tmp_path / "base", steps=10)
    run_training(base, threads=1, progress=False, export=False)
    other = tiny_config(synth_data, tmp_path / "other", steps=10)
    other = other.model_copy(
        update={"model": {**other.model, "hidden": 8}, "init_from": str(base.run_dir / "last.pt")}
    )
    path = tmp_path / "other.json"
    path.write_text(other.model_dump_json())
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init_from" in err[0] and "'hidden': 8" in err[0]
    missing = other.model_copy(update={"init_from": str(tmp_path / "nope.pt")})
    path.write_text(missing.model_dump_json())
    assert main(["train", "--config", str(path), "--quiet"]) == 1
    assert "no checkpoint or pack at" in capsys.readouterr().err


def test_stoi_floor_can_refuse_every_checkpoint(synth_data, tmp_path, capsys):
    """With an unreachable STOI floor no checkpoint becomes best, and export says so."""
    from rtns.cli import main

    cfg = tiny_config(synth_data, tmp_path, steps=20)
    cfg = cfg.model_copy(
        update={"valid": cfg.valid.model_copy(update={"min_stoi_gain": 1.0})}  # STOI <= 1
    )
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    assert main(["train", "--config", str(path), "--threads", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint met the selection rule" in err and "min_stoi_gain=1.0" in err
    assert not (cfg.run_dir / "best.pt").exists()
    with (cfg.run_dir / "valid.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0 < float(r["stoi"]) <= 1 and r["best"] == "0" for r in rows)
    # The last weights can still be exported on purpose.
    out = tmp_path / "last-pack"
    argv = ["train", "--config", str(path), "--export-only", "--checkpoint", "last"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file()


def test_resume_keeps_an_older_log_header(synth_data, tmp_path):
    """A valid.csv written before the STOI column existed keeps its columns on resume."""
    cfg = tiny_config(synth_data, tmp_path, steps=10)
    run_training(cfg, threads=1, progress=False, export=False)
    log = cfg.run_dir / "valid.csv"
    with log.open() as f:
        rows = list(csv.reader(f))
    i = rows[0].index("stoi")
    log.write_text("\n".join(",".join(r[:i] + r[i + 1 :]) for r in rows) + "\n")
    more = tiny_config(synth_data, tmp_path, steps=20)
    run_training(more, threads=1, progress=False, export=False)
    with log.open() as f:
        rows = list(csv.reader(f))
    assert "stoi" not in rows[0] and all(len(r) == len(rows[0]) for r in rows)
    assert [int(r[0]) for r in rows[1:]] == [10, 20]


def test_tune_atten_lim_picks_by_rule():
    """Unit test on arrays: a model that removes the noise but also half of the speech."""
    from rtns_export.train import tune_atten_lim, with_atten_lim

    rng = np.random.default_rng(0)
    clean = np.stack([voiced(2.0, f0, rng) for f0 in (120.0, 180.0)])
    noisy = clean + 0.01 * rng.standard_normal(clean.shape).astype(np.float32)
    est = 0.5 * clean
    est[:, ::2] = 0.0  # heavy distortion
    np.testing.assert_array_equal(with_atten_lim(est, noisy, math.inf), est)
    g = 10 ** (-6 / 20)
    np.testing.assert_allclose(with_atten_lim(est, noisy, 6.0), g * noisy + (1 - g) * est)
    res = tune_atten_lim(clean, noisy, est, [20, 6], 2, "si_sdr", stoi_floor=math.nan)
    assert res["atten_lim_db"] == 6.0  # the most dry signal restores the most
    assert res["si_sdr"] > res["unlimited_si_sdr"]
    # No limit reaches an impossible floor: the best by the metric is still reported.
    res = tune_atten_lim(clean, noisy, est, [20, 6], 2, "si_sdr", stoi_floor=2.0)
    assert res["atten_lim_db"] == 6.0


def test_auto_limit_is_validated_and_exported(synth_data, tmp_path):
    from rtns.pack import read_manifest

    cfg = tiny_config(synth_data, tmp_path, steps=20)
    cfg = cfg.model_copy(
        update={
            "export": cfg.export.model_copy(update={"atten_lim": "auto", "atten_lim_grid": [18, 9]})
        }
    )
    tr, result = run_training(cfg, threads=1, progress=False)
    assert result is not None
    with (cfg.run_dir / "valid.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["atten_lim_db"]) in (math.inf, 18.0, 9.0) for r in rows)
    best = torch.load(cfg.run_dir / "best.pt", weights_only=False)["valid"]
    m = read_manifest(cfg.run_dir / "pack")
    want = None if math.isinf(best["atten_lim_db"]) else best["atten_lim_db"]
    assert m.atten_lim_db == want
    assert "unlimited_pesq" in m.provenance.model_dump()["validation"]


def test_cosine_time_follows_the_training_time_budget():
    from rtns_export.train import LRSchedule
    from rtns_export.train_config import OptimConfig, ScheduleConfig

    s = LRSchedule(ScheduleConfig(kind="cosine_time", min_factor=0.1), 1e-3, 10, 600.0)
    assert s.lr(step=5, elapsed_s=0.0) == pytest.approx(1e-3)
    assert s.lr(step=5, elapsed_s=300.0) == pytest.approx(0.55e-3)
    assert s.lr(step=5, elapsed_s=600.0) == pytest.approx(1e-4)
    assert s.lr(step=10**6, elapsed_s=900.0) == pytest.approx(1e-4)  # stays at the floor
    with pytest.raises(ValueError, match="cosine_time needs optim.max_minutes"):
        OptimConfig(schedule=ScheduleConfig(kind="cosine_time"))


def test_lineage_counts_every_stage_from_the_files(tmp_path):
    """Minutes and steps behind a checkpoint go back through every init_from still on disk,
    also where a stage's record stops one stage back (as an older trainer wrote it)."""
    from rtns_export.train import _lineage

    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save({"step": 8400, "elapsed_s": 600.0}, a)  # from scratch: 10 min
    # b's record lacks its parent's minutes (an older trainer)
    torch.save(
        {"step": 6300, "elapsed_s": 1200.0, "init": {"init_from": str(a), "init_step": 8400}}, b
    )
    # c recorded b's time only (one stage back): the file says more
    c_ck = {
        "run": {"step": 9900, "elapsed_s": 1800.0},
        "init": {"init_from": str(b), "init_step": 6300, "init_minutes": 20.0},
    }
    torch.save(c_ck, c)
    assert _lineage(torch.load(a, weights_only=False)) == (10.0, 8400)
    assert _lineage(torch.load(b, weights_only=False)) == (30.0, 14_700)
    assert _lineage(c_ck) == (60.0, 24_600)
    # with the earlier files gone, the records are all there is
    a.unlink()
    assert _lineage(torch.load(b, weights_only=False)) == (20.0, 14_700)
    b.unlink()
    assert _lineage(c_ck) == (50.0, 16_200)


def test_average_of_snapshots_is_validated_and_exported(synth_data, tmp_path, capsys):
    """With "snapshots" on, every checkpoint's weights are kept; --average K saves the mean
    of the K latest (exactly the mean, counters from the latest), validated, and
    --checkpoint average exports it with the averaged steps in the provenance."""
    from rtns.cli import main
    from rtns.pack import read_manifest

    cfg = tiny_config(synth_data, tmp_path, steps=30, snapshots=True)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    run = cfg.run_dir
    out = tmp_path / "avg_pack"
    export_avg = ["train", "--config", str(path), "--export-only", "--checkpoint", "average"]
    export_avg += ["--out", str(out)]
    # nothing to export before averaging: an error, not the untrained weights
    assert main(["train", "--config", str(path), "--threads", "1", "--quiet", "--no-export"]) == 0
    assert main(export_avg) == 1
    assert "average first" in capsys.readouterr().err
    snaps = sorted((run / "snapshots").glob("step_*.pt"))
    assert [p.name for p in snaps] == ["step_0000010.pt", "step_0000020.pt", "step_0000030.pt"]
    assert main(["train", "--config", str(path), "--average", "2", "--threads", "1"]) == 0
    assert "steps 20..30" in capsys.readouterr().out
    avg = torch.load(run / "average.pt", weights_only=False)
    a, b = (
        torch.load(run / "snapshots" / f"step_00000{n}.pt", weights_only=False)["model"]
        for n in (20, 30)
    )
    for k, v in avg["model"].items():
        if v.is_floating_point():
            assert torch.allclose(v, (a[k].double() + b[k].double()).div(2).float(), atol=1e-7)
    assert avg["step"] == 30 and avg["averaged"]["steps"] == [20, 30]
    assert math.isfinite(avg["valid"]["si_sdr"])
    assert main(export_avg) == 0
    man = read_manifest(out)
    assert "mean of the 2 checkpoints of steps 20..30" in man.provenance.notes
    assert man.provenance.steps == 30
    # more than there are, or a folder of something else: clear errors
    assert main(["train", "--config", str(path), "--average", "9"]) == 1
    assert "holds 3 checkpoints" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    torch.save({"weights": 1}, junk / "x.pt")
    assert main(["train", "--config", str(path), "--average", "1", "--snapshots", str(junk)]) == 1
    assert "not a checkpoint" in capsys.readouterr().err


def test_average_of_two_runs_keeps_the_longer_lineage(synth_data, tmp_path, capsys):
    """--average over selected records of different runs (a stage and the weights it
    started from): exactly their mean, every file named, steps and minutes counted along
    the longer lineage, exportable from a run folder that never trained."""
    import shutil

    from rtns.cli import main
    from rtns.pack import read_manifest

    first = tiny_config(synth_data, tmp_path, steps=20)
    run_training(first, threads=1, progress=False)
    second = tiny_config(
        synth_data, tmp_path, steps=20, name="tiny_b", init_from=str(first.run_dir / "best.pt")
    )
    run_training(second, threads=1, progress=False)
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(first.run_dir / "best.pt", both / "a.pt")
    shutil.copy(second.run_dir / "best.pt", both / "b.pt")
    mean_cfg = tiny_config(synth_data, tmp_path, name="tiny_mean")
    path = tmp_path / "mean.json"
    path.write_text(mean_cfg.model_dump_json())
    assert main(["train", "--config", str(path), "--average", "2", "--snapshots", str(both)]) == 0
    avg = torch.load(mean_cfg.run_dir / "average.pt", weights_only=False)
    a, b = (torch.load(both / n, weights_only=False) for n in ("a.pt", "b.pt"))
    for k, v in avg["model"].items():
        if v.is_floating_point():
            want = (a["model"][k].double() + b["model"][k].double()).div(2).float()
            assert torch.allclose(v, want, atol=1e-7)
    assert avg["init"]["init_from"] == str(first.run_dir / "best.pt")  # b's record
    assert avg["step"] == b["step"] and avg["elapsed_s"] == b["elapsed_s"]
    assert [f.split(" ")[0] for f in avg["averaged"]["files"]] == [
        str(both / "a.pt"),
        str(both / "b.pt"),
    ]
    assert not (mean_cfg.run_dir / "last.pt").exists()
    out = tmp_path / "mean_pack"
    args = ["train", "--config", str(path), "--export-only", "--checkpoint", "average"]
    assert main([*args, "--out", str(out)]) == 0
    prov = read_manifest(out).provenance
    assert "mean of 2 checkpoints of different runs" in prov.notes
    assert prov.steps == a["step"] + b["step"]
    assert prov.total_train_minutes == pytest.approx(
        (a["elapsed_s"] + b["elapsed_s"]) / 60, abs=0.1
    )


def test_a_stalled_step_counts_as_a_typical_one():
    """A step during which the job was paused (SIGSTOP) must not spend the time budget."""
    from rtns_export.train import STALL_MIN_S, StepClock

    clock = StepClock()
    assert clock.count(1.0) == (1.0, None)
    for _ in range(20):
        clock.count(1.0)
    assert clock.count(3.0) == (3.0, None)  # slower, not stalled
    typical = clock.typical
    counted, stalled = clock.count(300.0)  # paused for five minutes
    assert stalled == 300.0 and counted == typical and 1.0 <= typical < 1.3
    assert clock.count(STALL_MIN_S - 1) == (STALL_MIN_S - 1, None)  # under the floor: real
