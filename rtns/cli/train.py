"""``rtns train`` (train / resume / export a model from a JSON config) and ``rtns make-testset``
(a fixed paired benchmark set from clean and noise folders).

Both need the ``train`` extra (torch, ...); rtns_export is imported only inside the run
functions so that ``import rtns.cli`` stays light.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rtns.cli import options
from rtns.errors import RtnsError, UserInputError

TRAIN_EXTRA = "rtns train needs PyTorch and the training extras: pip install 'rtns[train]'"


def add_parsers(sub: Any) -> None:
    _add_train(sub)
    _add_make_testset(sub)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a JSON config (resumes from runs/<name>/last.pt)",
        description="Train a model on online noisy mixtures, validate, keep the best "
        "checkpoint and export it to a pack. Re-running the same command resumes.",
    )
    p.add_argument("--config", required=True, help="training config (JSON, see configs/)")
    options.add_threads(p, "torch CPU", default=None)
    p.add_argument("--no-resume", action="store_true", help="start over even if last.pt exists")
    p.add_argument("--no-export", action="store_true", help="do not export a pack at the end")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="only export the run's best checkpoint (to --out or the config's export folder)",
    )
    p.add_argument("--out", default=None, help="pack folder for --export-only")
    p.add_argument(
        "--checkpoint",
        choices=("best", "last", "average"),
        default="best",
        help="which weights --export-only exports (best: by the config's validation rule; "
        "average: what --average saved)",
    )
    p.add_argument(
        "--average",
        type=options.average_count,
        default=None,
        metavar="K",
        help="only average the model weights of the run's K latest snapshots, validate the "
        "mean and save it as <run>/average.pt (export it with --export-only --checkpoint "
        "average)",
    )
    p.add_argument(
        "--snapshots",
        default=None,
        metavar="DIR",
        help="folder of checkpoints for --average (default <run>/snapshots, kept when the "
        'config sets "snapshots": true)',
    )
    p.add_argument(
        "--provenance",
        default=None,
        metavar="JSON_FILE",
        help="extra fields (a JSON object) to record in the exported manifest's provenance",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a config value, e.g. --set optim.steps=50 (repeatable)",
    )
    options.add_quiet(p, "no progress bar")
    p.set_defaults(func=run_train)


def _add_make_testset(sub: Any) -> None:
    m = sub.add_parser(
        "make-testset",
        help="build a fixed paired test set (clean/ and noisy/) from clean and noise folders",
        description="Mix clean utterances with noise at SNRs from a range (seeded) and write "
        "OUT/clean/NAME.wav and OUT/noisy/NAME.wav (16 kHz) plus OUT/mixes.csv (which "
        "speech, noise, SNR and level each pair got).",
    )
    m.add_argument(
        "--clean",
        required=True,
        action="append",
        help="folder of clean speech (wav/flac, any rate); repeat to pool several folders",
    )
    m.add_argument(
        "--noise",
        required=True,
        action="append",
        help="folder of noise (wav/flac, any rate); repeat for several folders, each then "
        "equally likely per pair",
    )
    m.add_argument("--out", required=True, help="output folder (created; must be empty)")
    m.add_argument(
        "--count", type=options.pair_count, default=50, help="number of pairs (default 50)"
    )
    m.add_argument(
        "--snr",
        type=options.snr_db,
        nargs=2,
        default=(-5.0, 20.0),
        metavar=("LOW", "HIGH"),
        help="SNR range in dB (default -5 20)",
    )
    m.add_argument(
        "--level",
        type=options.level_dbfs,
        nargs=2,
        default=(-35.0, -15.0),
        metavar=("LOW", "HIGH"),
        help="RMS level of the noisy file in dBFS",
    )
    m.add_argument(
        "--max-seconds",
        type=options.crop_seconds,
        default=10.0,
        help="crop longer utterances (default 10)",
    )
    m.add_argument("--seed", type=options.seed, default=0, help="random seed (default 0)")
    m.set_defaults(func=run_make_testset)


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RtnsError(TRAIN_EXTRA) from None


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_train(args: argparse.Namespace) -> int:
    _need_torch()
    from rtns_export.data import DataError
    from rtns_export.families import FamilyError
    from rtns_export.train import SelectionError, Trainer, run_training
    from rtns_export.train_config import ConfigError, load_config

    try:
        cfg = load_config(args.config, _overrides(args.set))
        if args.average is not None:
            if args.export_only:
                raise UserInputError("--average and --export-only are two steps; run one")
            tr = Trainer(cfg, threads=args.threads, progress=False)
            res = tr.average(args.average, args.snapshots)
            steps = res.pop("steps")
            print(
                f"average of {len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}) saved "
                f"to {tr.run_dir / 'average.pt'}; validation "
                + ", ".join(f"{k} {v:.3f}" for k, v in res.items())
            )
            return 0
        if args.export_only:
            tr = Trainer(cfg, threads=args.threads, progress=False)
            if args.checkpoint != "average" and not (tr.run_dir / "last.pt").exists():
                raise UserInputError(f"no checkpoint in {tr.run_dir}; train first")
            extra = None
            if args.provenance:
                try:
                    with open(args.provenance) as f:
                        extra = json.load(f)
                except (OSError, json.JSONDecodeError) as e:
                    raise UserInputError(f"--provenance {args.provenance}: {e}") from None
                if not isinstance(extra, dict):
                    raise UserInputError(f"--provenance {args.provenance}: not a JSON object")
            manifest, parity = tr.export(args.out, which=args.checkpoint, extra_provenance=extra)
            print(
                f"exported {manifest.name} ({manifest.provenance.steps} steps) to "
                f"{args.out or cfg.export.out_dir or tr.run_dir / 'pack'}; parity max error "
                f"{parity.max_abs_err:.2e}"
            )
            return 0
        tr, result = run_training(
            cfg,
            threads=args.threads,
            resume=not args.no_resume,
            export=False if args.no_export else None,
            progress=not args.quiet,
        )
    except (ConfigError, DataError, FamilyError, SelectionError) as e:
        raise UserInputError(str(e)) from None
    s = tr.state
    print(
        f"{cfg.name}: {s.step} steps, {s.elapsed_s / 60:.1f} min; best validation "
        f"{cfg.valid.select} {s.best_score:.3f} at step {s.best_step}"
        + (f"; pack {result[0].name} written" if result else "")
    )
    return 130 if tr._stop else 0


def run_make_testset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rtns_export.data import DataError, make_testset

    try:
        n = make_testset(
            [Path(d) for d in args.clean],
            [Path(d) for d in args.noise],
            Path(args.out),
            count=args.count,
            snr_db=tuple(args.snr),
            level_dbfs=tuple(args.level),
            max_seconds=args.max_seconds,
            seed=args.seed,
        )
    except DataError as e:
        raise UserInputError(str(e)) from None
    print(f"wrote {n} pairs to {args.out}/clean and {args.out}/noisy (list in mixes.csv)")
    return 0
