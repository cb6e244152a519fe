#!/usr/bin/env python3
"""Build the "unseen" paired test set: speech and noise no rtns model was trained on.

One command (from the repository root; writes only git-ignored folders under ``out/``)::

    python benchmarks/make_unseen_set.py

- **Speech**, pooled: ``valid/speech`` (LibriSpeech test-other, 5 speakers x 10
  utterances) and ``test/vbdemand36/clean`` (VoiceBank, speakers p232 and p257).
- **Noise**, two folders, each drawn for half the pairs on average: ``valid/noise``
  (ESC-10 fold 5: other clips of the ten ESC-10 classes whose folds 1-4 are in train/),
  and real DEMAND noise recovered as noisy - clean of the 36 vbdemand36 pairs (the
  VoiceBank+DEMAND test noises; no DEMAND recording is in train/).
- valid/ is never trained on, but every shipped model's checkpoint (and rtns-dtln's
  18 dB attenuation limit) was selected on mixtures of it: these are unseen by training,
  not by model selection.

The DEMAND noise is written to ``OUT_demand_noise/`` (float wav, one file per vbdemand36
pair, same name), then ``rtns make-testset`` mixes the set into ``OUT/clean``,
``OUT/noisy`` and ``OUT/mixes.csv`` (which speech folder and file, noise folder and file,
SNR and level each pair got). Same arguments, same files.

Then score it, and break the scores down by speech and noise source::

    python benchmarks/quality.py --clean out/unseen120/clean --noisy out/unseen120/noisy \
        --pack models/rtns-dtln --json out/quality_unseen120.json
    python benchmarks/make_unseen_set.py --breakdown out/quality_unseen120.json
"""

from __future__ import annotations

import argparse
import collections
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def write_demand_noise(vbd: Path, out: Path) -> int:
    """noisy - clean of every vbdemand36 pair -> ``out/NAME.wav`` (32-bit float);
    returns the number of files."""
    import numpy as np
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for clean_path in sorted((vbd / "clean").glob("*.flac")):
        clean, sr = sf.read(clean_path, dtype="float64")
        noisy, sr2 = sf.read(vbd / "noisy" / clean_path.name, dtype="float64")
        if sr != sr2 or clean.shape != noisy.shape:
            raise SystemExit(f"{clean_path.name}: clean and noisy differ in rate or length")
        sf.write(out / f"{clean_path.stem}.wav", (noisy - clean).astype(np.float32), sr, "FLOAT")
        n += 1
    if n == 0:
        raise SystemExit(f"no pairs in {vbd}")
    return n


def breakdown(report: Path, mixes: Path, against: str = "unprocessed") -> str:
    """Markdown: each system's mean PESQ-WB / STOI / SI-SDR / DNSMOS OVRL on every group
    of pairs (all, by speech folder, by noise folder) of a quality.py JSON report, and
    its mean paired difference from the row labelled ``against`` (default: the
    unprocessed input) with a 95 % interval (+-1.96 standard errors of the per-pair
    differences)."""
    import json

    import numpy as np

    rep = json.loads(report.read_text())
    rows = {r["name"]: r for r in csv.DictReader(mixes.open())}
    systems = rep["systems"]
    unp = next((s for s in systems if s["label"] == against), None)
    if unp is None:
        raise SystemExit(f"{report} has no row labelled {against!r}")
    names = sorted(unp["per_file"])
    if set(names) != set(rows):
        raise SystemExit(f"{report} and {mixes} name different pairs")
    groups = {"all": names}
    for col, tag in (("clean_dir", "speech"), ("noise_dir", "noise")):
        for d in sorted({rows[n][col] for n in names}):
            groups[f"{tag} {'/'.join(Path(d).parts[-2:])}"] = [
                n for n in names if rows[n][col] == d
            ]
    keys = [k for k in ("pesq_wb", "stoi", "si_sdr", "dnsmos_ovrl") if k in rep["metrics"]]
    out = ["| system | pairs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for gname, members in groups.items():
        for s in systems:
            cells = []
            for k in keys:
                v = np.array([s["per_file"][n][k] for n in members], dtype=float)
                if s is unp:
                    cells.append(f"{np.nanmean(v):.3f}")
                    continue
                d = v - np.array([unp["per_file"][n][k] for n in members], dtype=float)
                d = d[np.isfinite(d)]
                half = 1.96 * d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
                cells.append(f"{np.nanmean(v):.3f} ({d.mean():+.3f} +- {half:.3f})")
            out.append(f"| {s['label']} | {gname} ({len(members)}) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--breakdown",
        type=Path,
        metavar="JSON",
        help="build nothing: print the scores of a `quality.py --json` report on this set "
        "by speech and noise folder, each with its paired difference from the input",
    )
    p.add_argument(
        "--against",
        default="unprocessed",
        metavar="LABEL",
        help="with --breakdown: the row the differences are taken from (default unprocessed)",
    )
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    p.add_argument("--out", type=Path, default=REPO / "out" / "unseen120")
    p.add_argument("--count", type=int, default=120)
    p.add_argument("--snr", type=float, nargs=2, default=(-5.0, 20.0), metavar=("LOW", "HIGH"))
    p.add_argument("--seed", type=int, default=12)
    args = p.parse_args(argv)
    if args.breakdown:
        print(breakdown(args.breakdown, args.out / "mixes.csv", args.against), end="")
        return 0

    vbd = args.data / "test" / "vbdemand36"
    demand = args.out.with_name(args.out.name + "_demand_noise")
    print(f"DEMAND noise: {write_demand_noise(vbd, demand)} files in {demand}")
    cmd = [sys.executable, "-m", "rtns", "make-testset"]
    cmd += ["--clean", str(args.data / "valid" / "speech"), "--clean", str(vbd / "clean")]
    cmd += ["--noise", str(args.data / "valid" / "noise"), "--noise", str(demand)]
    cmd += ["--out", str(args.out), "--count", str(args.count), "--seed", str(args.seed)]
    cmd += ["--snr", *(f"{v:g}" for v in args.snr)]
    print("$ " + " ".join(cmd[2:]).replace("-m rtns", "rtns"))
    if subprocess.run(cmd).returncode != 0:
        return 1

    rows = list(csv.DictReader((args.out / "mixes.csv").open()))
    speech = collections.Counter(Path(r["clean_dir"]).name for r in rows)
    noise = collections.Counter(
        (Path(r["noise_dir"]).name, Path(r["noise_file"]).parent.name or "-") for r in rows
    )
    snr = sorted(float(r["snr_db"]) for r in rows)
    print(f"{len(rows)} pairs; speech folders {dict(speech)}")
    print("noise (folder, class):", dict(sorted(noise.items())))
    print(f"SNR {snr[0]:.2f} .. {snr[-1]:.2f} dB, median {snr[len(snr) // 2]:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
