"""benchmarks/loss_study.py (issue 30's DCCRN loss study): the eight configs and their
weights from the terms' sizes, configs the trainer accepts, the per-SNR sets (seen and
unseen noise at the exact SNR asked), and the table of a scored study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from bench_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def study():
    return load_benchmark("loss_study")


SIZES = {"mse": 0.0012, "sisnr": 6.4, "lms": 2.2, "pmsqe": 2.75}


def test_eight_configs_weighted_by_size(study):
    assert sorted(study.CONFIGS) == sorted(
        ["mse", "sisnr", "lms", "pmsqe", "mse_lms", "mse_pmsqe", "sisnr_lms", "sisnr_pmsqe"]
    )
    for name, (base, perc) in study.CONFIGS.items():
        terms = dict(study.weights(name, SIZES, ratio=4.0))
        if base and perc:
            # base : perceptual is 4 : 1 in size (weight x size)
            assert terms[base] * SIZES[base] == pytest.approx(4 * terms[perc] * SIZES[perc])
        else:
            ((term, w),) = terms.items()
            assert w * SIZES[term] == pytest.approx(1.0)


def test_configs_load_in_the_trainer(study, tmp_path):
    from rtns_export.train_config import load_config

    template = json.loads(study.TEMPLATE.read_text())
    for name in study.CONFIGS:
        cfg = study.make_config(name, template, SIZES, 4.0, 30.0, str(tmp_path / "runs"))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        loaded = load_config(path)
        assert loaded.name == f"ls_{name}" and loaded.optim.max_minutes == 30.0
        assert [t.name for t in loaded.losses] == [t for t in study.CONFIGS[name] if t]
        # everything but the loss (and the names) is the template's: one model, one recipe
        assert loaded.model == load_config(study.TEMPLATE).model
        assert cfg["data"] == template["data"] and cfg["valid"] == template["valid"]


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data (the project's data)")
def test_sets_hold_each_snr_class_and_noise_kind(study, tmp_path):
    made = study.make_sets(tmp_path, count=2, seed=5)
    assert len(made) == len(study.SNR_CLASSES) * 2
    for d in made:
        kind, snr = d.name.split("_")
        rows = list(csv.DictReader((d / "mixes.csv").open()))
        assert len(rows) == 2
        assert all(float(r["snr_db"]) == float(snr) for r in rows)
        noise = {Path(r["noise_dir"]).name for r in rows}
        assert noise == ({"noise"} if kind == "seen" else {"demand_noise"}), noise


def test_table_means_over_classes(study):
    per = {
        str(s): {"pesq_wb": 1.0 + s / 10, "stoi": 0.8, "si_sdr": 5.0, "dnsmos_ovrl": 2.5}
        for s in study.SNR_CLASSES
    }
    md = study.table({"unprocessed": {"seen": per, "unseen": per}})
    row = md.splitlines()[2].split(" | ")
    # mean PESQ over -5..20 dB: 1 + 65/60
    assert row[1] == f"{1.0 + sum(study.SNR_CLASSES) / 60:.3f}"
    assert len(md.splitlines()) == 3
