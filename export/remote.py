"""Training on a lent GPU machine that sees only a copy of the repository (64 MiB at most).

``pack`` (here): re-encode the training and validation audio of ``../shared/data`` as Ogg/Opus
into a git-ignored folder of the repository, at bit rates that fit the transfer, plus the
reverberation bank in float16 and a ``PACK.json`` that says what was packed and how lossy it
is (PESQ-WB of the re-encoded clean speech against the original, on a few files).

``prepare`` (there): restore the reverberation bank into the run's cache, decode every file
once into the audio cache (a process pool), and write each given config with its data paths,
cache and run folder pointing at the packed copy, plus any ``--set key=value`` overrides.

    python -m rtns_export.remote pack --out .gpu/data
    python -m rtns_export.remote prepare --data .gpu/data --runs /tmp/runs configs/gtcrn_s10_b.json

Opus changes the waveform (about 15-20 dB signal-to-error at these rates) but not the speech
(PESQ-WB 4.45-4.56 against the original): the clean target and the noisy input are mixed from
the same decoded speech, so the model learns to keep what the codec kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from rtns.framing import SAMPLE_RATE
from rtns_export import augment
from rtns_export.data import list_audio, load_folder, read_audio
from rtns_export.train_config import TrainConfig, load_config

FOLDERS = ("train/speech", "train/noise", "valid/speech", "valid/noise")
RIRS = "rirs.npz"


def opus_level(kbps: float) -> float:
    """libsndfile's Opus ``compression_level`` for about ``kbps`` at 16 kHz mono (measured:
    level 0 gives 259 kb/s, 0.5 gives 133, 0.85 gives 44, 0.9 gives 31)."""
    return float(np.clip((259.0 - kbps) / 251.0, 0.0, 1.0))


def _encode(job: tuple[str, str, float]) -> int:
    import soundfile as sf

    src, dst, level = job
    x = read_audio(Path(src))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    sf.write(dst, x, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=level)
    return Path(dst).stat().st_size


def _fidelity(pairs: list[tuple[Path, Path]]) -> dict[str, float]:
    import soundfile as sf
    from pesq import pesq

    scores, snrs = [], []
    for src, dst in pairs:
        x = read_audio(src)
        y, _ = sf.read(str(dst), dtype="float32")
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        scores.append(pesq(SAMPLE_RATE, x, y, "wb"))
        snrs.append(10 * np.log10(np.sum(x**2) / max(np.sum((x - y) ** 2), 1e-20)))
    return {
        "files": len(pairs),
        "pesq_wb_min": round(float(np.min(scores)), 3),
        "pesq_wb_mean": round(float(np.mean(scores)), 3),
        "snr_db_mean": round(float(np.mean(snrs)), 1),
    }


def pack(args: argparse.Namespace) -> int:
    src_root, out = Path(args.data), Path(args.out)
    kbps = {
        "train/speech": args.speech_kbps,
        "valid/speech": args.speech_kbps,
        "train/noise": args.noise_kbps,
        "valid/noise": args.noise_kbps,
    }
    jobs, speech_pairs = [], []
    for folder in FOLDERS:
        root = src_root / folder
        for p in list_audio(root):
            dst = out / folder / p.relative_to(root).with_suffix(".ogg")
            jobs.append((str(p), str(dst), opus_level(kbps[folder])))
            if folder == "train/speech" and len(speech_pairs) < args.check_files:
                speech_pairs.append((p, dst))
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as ex:
        sizes = list(ex.map(_encode, jobs, chunksize=8))
    cfg = load_config(args.config)
    a = cfg.data.augment
    if a.reverb:
        rirs = augment.rir_bank(a.rir_count, a.rir_seed, a.rt60, cfg.data.cache_dir)
        np.savez_compressed(
            out / RIRS, **{f"r{i}": r.astype(np.float16) for i, r in enumerate(rirs)}
        )
    info: dict[str, Any] = {
        "source": str(src_root.resolve()),
        "folders": {
            f: {"kbps": kbps[f], "files": sum(1 for j in jobs if f"/{f}/" in j[1])} for f in FOLDERS
        },
        "bytes": int(sum(sizes)) + ((out / RIRS).stat().st_size if a.reverb else 0),
        "rirs": {"count": a.rir_count, "seed": a.rir_seed, "rt60": list(a.rt60)}
        if a.reverb
        else None,
        "speech_fidelity": _fidelity(speech_pairs),
    }
    (out / "PACK.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    print(f"packed {len(jobs)} files, {info['bytes'] / 2**20:.1f} MiB, in {time.time() - t0:.0f} s")
    return 0


def _decode_folder(job: tuple[str, str]) -> int:
    arrays, _ = load_folder(job[0], job[1])
    return len(arrays)


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for k in path:
        d = d.setdefault(k, {})
    d[last] = value


def prepare(args: argparse.Namespace) -> int:
    data, runs = Path(args.data).resolve(), Path(args.runs).resolve()
    cache = runs / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.configs_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    restored = set()
    for path in args.configs:
        raw = json.loads(Path(path).read_text())
        raw.setdefault("data", {}).update(
            {
                "train_speech": str(data / "train/speech"),
                "train_noise": str(data / "train/noise"),
                "valid_speech": str(data / "valid/speech"),
                "valid_noise": str(data / "valid/noise"),
                "cache_dir": str(cache),
            }
        )
        raw["out_dir"] = str(runs)
        for item in args.set:
            key, _, value = item.partition("=")
            _set(raw, key, json.loads(value))
        cfg = TrainConfig.model_validate(raw)
        a = cfg.data.augment
        key = (a.rir_count, a.rir_seed, tuple(a.rt60))
        if a.reverb and key not in restored:
            with np.load(data / RIRS) as z:
                bank = [z[f"r{i}"].astype(np.float32) for i in range(len(z.files))]
            if len(bank) != a.rir_count:
                raise SystemExit(f"{path}: the packed bank has {len(bank)} RIRs, not {a.rir_count}")
            name = augment.rir_cache_name(a.rir_count, a.rir_seed, a.rt60)
            np.savez(cache / name, **{f"r{i}": r for i, r in enumerate(bank)})
            restored.add(key)
        (out_dir / Path(path).name).write_text(json.dumps(raw, indent=2))
    if not args.decode:
        print(f"prepared {len(args.configs)} configs")
        return 0
    subfolders = [p for f in FOLDERS for p in sorted((data / f).iterdir()) if p.is_dir()]
    jobs = [(str(data / f), str(cache)) for f in FOLDERS]
    # decode the big folders' subfolders in parallel first, then each folder's loose files
    with ProcessPoolExecutor(args.jobs) as ex:
        list(ex.map(_decode_folder, [(str(p), str(cache)) for p in subfolders]))
        n = list(ex.map(_decode_folder, jobs))
    print(
        f"prepared {len(args.configs)} configs, {sum(n)} files decoded in {time.time() - t0:.0f} s"
    )
    return 0


def train(args: argparse.Namespace) -> int:
    """``rtns train`` without the CLI (whose imports are the runtime's), no export."""
    import torch

    from rtns_export.train import run_training

    cfg = load_config(args.config)
    tr, _ = run_training(cfg, threads=args.threads, export=False, progress=False)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"{cfg.name}: {tr.state.step} steps, {tr.state.elapsed_s / 60:.1f} min on {gpu}; best "
        f"{cfg.valid.select} {tr.state.best_score:.3f} at step {tr.state.best_step}"
    )
    return 0


def score(args: argparse.Namespace) -> int:
    """Validate returned run folders here, on the local validation set of ``--data-config``
    (the runs may have trained on a packed copy, and selected without PESQ): every run's
    best.pt (and last.pt where present) scored as its own trainer would, one table."""
    import torch

    from rtns_export.train import Trainer, _record

    base = load_config(args.data_config)
    rows, shared = [], None
    for run in map(Path, args.runs):
        raw = json.loads((run / "config.json").read_text())
        raw["data"] = {**raw["data"], **base.data.model_dump(mode="json"), "workers": 0}
        raw["valid"] = base.valid.model_dump(mode="json")
        raw["out_dir"], raw["init_from"] = str(Path(args.tmp)), None
        cfg = TrainConfig.model_validate(raw)
        tr = Trainer(cfg, threads=args.threads, progress=False)
        if shared is None:
            tr.load_data()
            shared = (tr.valid_clean, tr.valid_noisy, tr.valid_input)
        tr.valid_clean, tr.valid_noisy, tr.valid_input = shared
        for which in ("best", "last"):
            path = run / f"{which}.pt"
            if not path.exists():
                continue
            ck = torch.load(path, map_location="cpu", weights_only=False)
            tr.model.load_state_dict(ck["model"])
            rec = _record(ck)
            step, elapsed = rec.get("step"), rec.get("elapsed_s")
            res = tr.validate()
            rows.append(
                {"run": run.name, "which": which, "step": step, "elapsed_s": elapsed, **res}
            )
            print(json.dumps(rows[-1]), flush=True)
    rows.insert(0, {"run": "unprocessed", "which": "", **shared[2]})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    keys = ("pesq", "stoi", "si_sdr")
    print("| run | checkpoint | step | train min | " + " | ".join(keys) + " |")
    print("|---|---|---|---|" + "---|" * len(keys))
    for r in rows:
        mins = f"{r['elapsed_s'] / 60:.1f}" if r.get("elapsed_s") else ""
        vals = " | ".join(f"{r[k]:.3f}" for k in keys)
        print(f"| {r['run']} | {r['which']} | {r.get('step', '')} | {mins} | {vals} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rtns_export.remote", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="re-encode ../shared/data for a remote machine")
    a.add_argument("--data", default="../shared/data")
    a.add_argument("--out", default=".gpu/data")
    a.add_argument("--config", default="configs/gtcrn_s10_b.json", help="whose reverb bank to pack")
    a.add_argument("--speech-kbps", type=float, default=34.0)
    a.add_argument("--noise-kbps", type=float, default=26.0)
    a.add_argument("--check-files", type=int, default=8)
    a.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a.set_defaults(func=pack)
    b = sub.add_parser("prepare", help="point configs at a packed copy and fill the cache")
    b.add_argument("configs", nargs="+")
    b.add_argument("--data", default=".gpu/data")
    b.add_argument("--runs", required=True)
    b.add_argument("--configs-out", required=True)
    b.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b.add_argument("--no-decode", dest="decode", action="store_false", help="configs only")
    b.set_defaults(func=prepare)
    c = sub.add_parser("train", help="train one config (no export)")
    c.add_argument("config")
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(func=train)
    d = sub.add_parser("score", help="validate returned run folders here")
    d.add_argument("runs", nargs="+")
    d.add_argument("--data-config", default="configs/gtcrn_s10_b.json")
    d.add_argument("--tmp", default="/tmp/rtns-score")
    d.add_argument("--json")
    d.add_argument("--threads", type=int, default=1)
    d.set_defaults(func=score)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
