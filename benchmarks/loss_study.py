#!/usr/bin/env python3
"""The DCCRN loss study (seed 002, issue 30) on one model at equal training time.

Two base losses (waveform MSE, SI-SNR), two perceptual ones (log-mel spectra ``lms``,
``pmsqe``), and the four base + perceptual pairs: eight training configs that differ only
in their loss, scored per SNR class (-5, 0, 5, 10, 15, 20 dB) on noise seen in training (its
classes: ESC-10 fold 5 of valid/noise) and unseen (the DEMAND noise of vbdemand36), with
the same unseen speakers (valid/speech). Steps, from the repository root::

    # 1. each term's size at initialisation (the seed's "initial size"), 40 batches
    python benchmarks/loss_study.py calibrate --out out/loss_study/calibration.json
    # 2. the eight configs: weight 1/size for a term alone; a pair at base:perceptual
    #    RATIO:1 of their sizes (the seed moved it from 1:1 to 10:1 and kept the base heavier)
    python benchmarks/loss_study.py configs --calibration out/loss_study/calibration.json \\
        --ratio 4 --minutes 30 --out configs/loss_study
    # 3. train each for the same time; score the *last* checkpoint of each (no selection)
    for n in mse sisnr lms pmsqe mse_lms mse_pmsqe sisnr_lms sisnr_pmsqe; do
        rtns train --config configs/loss_study/$n.json --threads 1 --no-export
        rtns train --config configs/loss_study/$n.json --export-only --checkpoint last \\
            --out out/loss_study/packs/$n
    done
    # 4. the per-SNR sets, then the table and the plot
    python benchmarks/loss_study.py sets --out out/loss_study/sets --count 20
    python benchmarks/loss_study.py score --sets out/loss_study/sets --out out/loss_study/result \\
        --pack mse=out/loss_study/packs/mse ... --jobs 2

``score`` writes ``result.json``, ``table.md`` (PESQ-WB, STOI, SI-SDR and DNSMOS OVRL per
SNR class and noise kind, a row per config, the unprocessed input first) and ``snr.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SNR_CLASSES = (-5, 0, 5, 10, 15, 20)
NOISE_KINDS = ("seen", "unseen")
BASE = ("mse", "sisnr")
PERCEPTUAL = ("lms", "pmsqe")
#: The eight configurations: name -> (base or None, perceptual or None).
CONFIGS: dict[str, tuple[str | None, str | None]] = {
    **{b: (b, None) for b in BASE},
    **{p: (None, p) for p in PERCEPTUAL},
    **{f"{b}_{p}": (b, p) for b in BASE for p in PERCEPTUAL},
}
METRICS = ("pesq_wb", "stoi", "si_sdr", "dnsmos_ovrl")
#: The model every config trains (the runtime-first family's candidate A, issue 27).
TEMPLATE = REPO / "configs" / "fastnet" / "cand_a.json"


def term_sizes(calibration: dict) -> dict[str, float]:
    """Each term's size: the mean absolute value over the calibration batches."""
    return {name: float(v["mean_abs"]) for name, v in calibration["terms"].items()}


def weights(name: str, sizes: dict[str, float], ratio: float) -> list[tuple[str, float]]:
    """Loss terms of config ``name``: a term alone weighs 1/size (about 1 at the start);
    a pair weighs its base term ``ratio`` times its perceptual one, in size."""
    base, perc = CONFIGS[name]
    if base and perc:
        return [(base, ratio / sizes[base]), (perc, 1.0 / sizes[perc])]
    term = base or perc
    assert term is not None
    return [(term, 1.0 / sizes[term])]


def make_config(
    name: str, template: dict, sizes: dict[str, float], ratio: float, minutes: float, out_dir: str
) -> dict:
    cfg = json.loads(json.dumps(template))  # a deep copy
    cfg.pop("init_from", None)
    cfg["name"] = f"ls_{name}"
    cfg["losses"] = [
        {"name": t, "weight": float(f"{w:.6g}")} for t, w in weights(name, sizes, ratio)
    ]
    cfg["optim"] = {**cfg["optim"], "steps": 1_000_000, "max_minutes": minutes}
    cfg["export"] = {"name": f"ls-{name.replace('_', '-')}", "enabled": False}
    cfg["out_dir"] = out_dir
    cfg["seed"] = 30
    return cfg


def calibrate(batches: int, config: Path) -> dict:
    """Every term on the untrained model's output against the clean target, ``batches``
    training batches of ``config``'s data."""
    import numpy as np
    import torch

    from rtns_export.losses import LOSSES
    from rtns_export.train import Trainer
    from rtns_export.train_config import load_config

    # Its own name and folder: nothing of the template's run is touched (nothing is saved).
    scratch = tempfile.mkdtemp(prefix="rtns-loss-study-")
    cfg = load_config(config, {"init_from": None, "name": "calibrate", "out_dir": scratch})
    trainer = Trainer(cfg, threads=1, progress=False)
    trainer.load_data()
    assert trainer.mixer is not None
    values: dict[str, list[float]] = {t: [] for t in (*BASE, *PERCEPTUAL)}
    trainer.model.eval()
    with torch.no_grad():
        for _ in range(batches):
            clean, noisy = trainer.mixer.batch(cfg.optim.batch)
            y = trainer.model(torch.from_numpy(noisy))
            s = torch.from_numpy(clean)[:, : y.shape[1]]
            for t in values:
                values[t].append(float(LOSSES[t](y, s)))
    return {
        "config": str(config),
        "batches": batches,
        "terms": {
            t: {
                "mean": float(np.mean(v)),
                "mean_abs": float(np.mean(np.abs(v))),
                "p10": float(np.percentile(v, 10)),
                "p90": float(np.percentile(v, 90)),
            }
            for t, v in values.items()
        },
    }


def make_sets(out: Path, count: int, seed: int) -> list[Path]:
    """One paired set per noise kind and SNR class: ``out/KIND_SNR/{clean,noisy}``."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_unseen_set import write_demand_noise

    from rtns_export.data import make_testset

    demand = out / "demand_noise"
    if not demand.exists():
        write_demand_noise(DATA / "test" / "vbdemand36", demand)
    noise = {"seen": DATA / "valid" / "noise", "unseen": demand}
    made = []
    for k, kind in enumerate(NOISE_KINDS):
        for snr in SNR_CLASSES:
            d = out / f"{kind}_{snr}"
            if not (d / "mixes.csv").exists():
                make_testset(
                    DATA / "valid" / "speech",
                    noise[kind],
                    d,
                    count=count,
                    snr_db=(snr, snr),
                    seed=seed + 100 * k + snr,
                )
            made.append(d)
    return made


def score(sets: Path, packs: list[str], out: Path, jobs: int, dnsmos: bool) -> dict:
    """quality.py on every set; returns {label: {kind: {snr: means}}}."""
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict[str, dict[str, dict]]] = {}
    for kind in NOISE_KINDS:
        for snr in SNR_CLASSES:
            d = sets / f"{kind}_{snr}"
            js = out / f"{kind}_{snr}.json"
            cmd = [
                sys.executable,
                str(REPO / "benchmarks" / "quality.py"),
                "--clean",
                str(d / "clean"),
                "--noisy",
                str(d / "noisy"),
                "--set-name",
                f"{kind}_{snr}",
                "--json",
                str(js),
                "--jobs",
                str(jobs),
                "--no-progress",
            ]
            for p in packs:
                cmd += ["--pack", p]
            if not dnsmos:
                cmd.append("--no-dnsmos")
            print(f"loss_study: scoring {kind} noise at {snr} dB", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            for s in json.loads(js.read_text())["systems"]:
                result.setdefault(s["label"], {}).setdefault(kind, {})[str(snr)] = s["means"]
    return result


def table(result: dict) -> str:
    """Markdown: a row per system; per noise kind, each metric's mean over the SNR classes
    and PESQ-WB and STOI per class."""
    head = ["system"]
    for kind in NOISE_KINDS:
        head += [f"{kind} {m}" for m in ("PESQ", "STOI", "SI-SDR", "OVRL")]
        head += [f"{kind} PESQ @{s}" for s in SNR_CLASSES]
        head += [f"{kind} STOI @{s}" for s in SNR_CLASSES]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def f(v: float | None, d: int) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    for label, kinds in result.items():
        row = [label]
        for kind in NOISE_KINDS:
            per = kinds.get(kind, {})
            for m, d in zip(METRICS, (3, 3, 2, 3), strict=True):
                vals = [per[str(s)].get(m) for s in SNR_CLASSES if str(s) in per]
                vals = [v for v in vals if v is not None]
                row.append(f(sum(vals) / len(vals), d) if vals else "-")
            for m in ("pesq_wb", "stoi"):
                row += [f(per.get(str(s), {}).get(m), 3) for s in SNR_CLASSES]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, kind in enumerate(NOISE_KINDS):
        for row, (m, name) in enumerate((("pesq_wb", "PESQ-WB"), ("stoi", "STOI"))):
            ax = axes[row][col]
            for label, kinds in result.items():
                per = kinds.get(kind, {})
                ys = [per.get(str(s), {}).get(m) for s in SNR_CLASSES]
                style = {"color": "k", "ls": "--"} if label == "unprocessed" else {}
                ax.plot(
                    SNR_CLASSES,
                    [float("nan") if y is None else y for y in ys],
                    marker="o",
                    label=label,
                    **style,
                )
            ax.set_title(f"{name}, {kind} noise")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("input SNR (dB)")
    axes[0][1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="each term's size on the untrained model")
    c.add_argument("--config", type=Path, default=TEMPLATE)
    c.add_argument("--batches", type=int, default=40)
    c.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("configs", help="write the eight training configs")
    g.add_argument("--calibration", type=Path, required=True)
    g.add_argument("--ratio", type=float, default=4.0, help="base:perceptual, in size")
    g.add_argument("--minutes", type=float, default=30.0, help="training time of each")
    g.add_argument("--template", type=Path, default=TEMPLATE)
    g.add_argument("--runs", default="/root/rtns-runs/loss_study", help="their out_dir")
    g.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("sets", help="the per-SNR test sets")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--count", type=int, default=20, help="pairs per set")
    s.add_argument("--seed", type=int, default=2002)
    r = sub.add_parser("score", help="score packs on the sets: table.md, result.json, snr.png")
    r.add_argument("--sets", type=Path, required=True)
    r.add_argument("--pack", action="append", required=True, metavar="LABEL=PACK")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--no-dnsmos", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "calibrate":
        cal = calibrate(args.batches, args.config)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(cal, indent=1) + "\n")
        print(json.dumps(cal["terms"], indent=1))
    elif args.cmd == "configs":
        sizes = term_sizes(json.loads(args.calibration.read_text()))
        template = json.loads(args.template.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        for name in CONFIGS:
            cfg = make_config(name, template, sizes, args.ratio, args.minutes, args.runs)
            (args.out / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")
            print(
                f"{name}: {' + '.join(f'{w:g}*{t}' for t, w in weights(name, sizes, args.ratio))}"
            )
    elif args.cmd == "sets":
        for d in make_sets(args.out, args.count, args.seed):
            print(d)
    else:
        result = score(args.sets, args.pack, args.out, args.jobs, not args.no_dnsmos)
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        md = table(result)
        (args.out / "table.md").write_text(md)
        print(md, end="")
        try:
            plot(result, args.out / "snr.png")
        except ImportError:
            print("loss_study: matplotlib missing: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
