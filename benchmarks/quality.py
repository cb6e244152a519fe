#!/usr/bin/env python3
"""Objective quality of model packs on a paired clean/noisy test set.

Every system runs through the streaming engine (``rtns.engine.enhance_array``, one
onnxruntime thread), exactly as ``rtns`` runs it live, and is scored against the clean
reference with wide-band PESQ, STOI and SI-SDR, plus the non-intrusive DNSMOS P.835
SIG/BAK/OVRL of its output. The unprocessed noisy input is always scored as the first row.

Examples (from the repository root)::

    # every installed pack + the unprocessed input on the default set (VB+DEMAND subset)
    nice -n 10 python benchmarks/quality.py --json out/quality.json --markdown out/quality.md

    # a shipped pack and an imported official DTLN as a labelled peer
    python -m rtns import-dtln ../shared/weights/dtln/DTLN_norm_500h.h5 /tmp/dtln_norm_500h
    python benchmarks/quality.py --pack rtns-dtln --official-dtln /tmp/dtln_norm_500h

    # store the means in each evaluated pack's manifest.json, scores["vbdemand36"]
    python benchmarks/quality.py --pack models/rtns-dtln --write-manifest

Files of the two folders are paired by name (extension ignored); a name present on one
side only is an error. Pairs of different lengths are trimmed to the shorter, files at
another rate are resampled to 16 kHz with rtns's resampler (time-aligned), and multi-channel files are averaged to
mono (each counted and reported).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from rtns.errors import RtnsError, UserInputError
from rtns.framing import SAMPLE_RATE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SET = REPO.parent / "shared" / "data" / "test" / "vbdemand36"
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
UNPROCESSED = "unprocessed"

#: Metric keys in JSON and manifests, with the markdown header and decimals of each.
METRICS: dict[str, tuple[str, int]] = {
    "pesq_wb": ("PESQ-WB", 3),
    "stoi": ("STOI", 3),
    "si_sdr": ("SI-SDR (dB)", 2),
    "dnsmos_sig": ("DNSMOS SIG", 3),
    "dnsmos_bak": ("DNSMOS BAK", 3),
    "dnsmos_ovrl": ("DNSMOS OVRL", 3),
}
INTRUSIVE = ("pesq_wb", "stoi", "si_sdr")

Scores = dict[str, float | None]


# --------------------------------------------------------------------------------------
# Systems and pairs
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    """One row of the table: the unprocessed input, or a pack run by the engine."""

    label: str
    kind: Literal["unprocessed", "pack", "peer"]
    path: Path | None = None
    #: Imported into a temporary folder by this run (deleted at the end; never written).
    temporary: bool = False
    #: Run with the pack's default attenuation limit lifted (``--pack-off``).
    limit_off: bool = False


@dataclass(frozen=True)
class Pair:
    name: str
    clean: Path
    noisy: Path


@dataclass
class FileResult:
    """Scores of every system on one pair, and what loading had to fix."""

    name: str
    samples: int
    trimmed: int = 0  # samples dropped from the longer side
    resampled: list[str] = field(default_factory=list)  # "clean"/"noisy"
    downmixed: list[str] = field(default_factory=list)
    scores: dict[str, Scores] = field(default_factory=dict)  # label -> metric -> value
    errors: list[str] = field(default_factory=list)


def _audio_files(folder: Path, side: str) -> dict[str, Path]:
    """Audio files of ``folder`` keyed by stem; one-line errors for a bad folder."""
    if not folder.exists():
        raise UserInputError(f"{folder}: no such {side} folder")
    if not folder.is_dir():
        raise UserInputError(f"{folder}: the {side} path is not a folder")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in AUDIO_EXTS:
            if p.stem in files:
                raise UserInputError(
                    f"{folder}: {files[p.stem].name} and {p.name} have the same name; "
                    "files are paired by name, so keep one"
                )
            files[p.stem] = p
    if not files:
        raise UserInputError(
            f"{folder}: no audio files ({', '.join(AUDIO_EXTS)}) in the {side} folder"
        )
    return files


def _names(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def find_pairs(clean_dir: Path, noisy_dir: Path) -> list[Pair]:
    """Pairs of equal names (extension ignored) in the two folders, sorted by name."""
    clean = _audio_files(clean_dir, "clean")
    noisy = _audio_files(noisy_dir, "noisy")
    only_noisy = sorted(set(noisy) - set(clean))
    only_clean = sorted(set(clean) - set(noisy))
    if only_noisy or only_clean:
        parts = []
        if only_noisy:
            parts.append(
                f"{len(only_noisy)} noisy file(s) without a clean file of the same name in "
                f"{clean_dir} ({_names([noisy[n].name for n in only_noisy])})"
            )
        if only_clean:
            parts.append(
                f"{len(only_clean)} clean file(s) without a noisy file of the same name in "
                f"{noisy_dir} ({_names([clean[n].name for n in only_clean])})"
            )
        raise UserInputError("unpaired files: " + "; ".join(parts))
    return [Pair(name=clean[n].name, clean=clean[n], noisy=noisy[n]) for n in sorted(clean)]


def _load(path: Path) -> tuple[np.ndarray, bool, bool]:
    """Mono float32 [N] at 16 kHz; returns (samples, resampled, downmixed)."""
    from rtns.audio_io import read_audio
    from rtns.resample import resample_signal

    audio = read_audio(path)  # the runtime's one reader: one-line errors naming the file
    x = audio.samples
    downmixed = x.shape[1] > 1
    x = x.mean(axis=1, keepdims=True) if downmixed else x
    resampled = audio.sample_rate != SAMPLE_RATE
    if resampled:
        x = resample_signal(x, audio.sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(x[:, 0], dtype=np.float32), resampled, downmixed


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray, FileResult]:
    """(clean [N], noisy [N], a FileResult recording the fixes) with equal lengths N."""
    clean, rs_c, dm_c = _load(pair.clean)
    noisy, rs_n, dm_n = _load(pair.noisy)
    n = min(clean.shape[0], noisy.shape[0])
    res = FileResult(
        name=pair.name,
        samples=n,
        trimmed=max(clean.shape[0], noisy.shape[0]) - n,
        resampled=[s for s, f in (("clean", rs_c), ("noisy", rs_n)) if f],
        downmixed=[s for s, f in (("clean", dm_c), ("noisy", dm_n)) if f],
    )
    if n == 0:
        raise UserInputError(f"{pair.clean} / {pair.noisy}: empty audio")
    return clean[:n], noisy[:n], res


# --------------------------------------------------------------------------------------
# Scoring (runs in worker processes when --jobs > 1)
# --------------------------------------------------------------------------------------
@dataclass
class _Worker:
    """What one process needs to score pairs: the rows and their loaded packs."""

    systems: list[System]
    models: dict[str, object]  # label -> rtns.engine.Model
    dnsmos: bool


_WORKER: _Worker | None = None


def _single_thread_dnsmos() -> None:
    """Make speechmos build its DNSMOS sessions with one thread (it uses every core).

    speechmos keeps one module-level ``DNSMOS`` object and rebuilds it only when the model
    path changes; we pre-build it with single-threaded sessions. Best effort: any change in
    speechmos's internals just leaves its default.
    """
    try:
        import onnxruntime as ort
        from speechmos import dnsmos as sm

        # the very path string speechmos.dnsmos.run compares with
        base = os.path.join(os.path.dirname(os.path.abspath(sm.__file__)), "dnsmos_models")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        obj = sm.DNSMOS.__new__(sm.DNSMOS)
        obj.primary_model_path = os.path.join(base, "sig_bak_ovr.onnx")
        providers = ["CPUExecutionProvider"]
        obj.onnx_sess = ort.InferenceSession(obj.primary_model_path, opts, providers=providers)
        obj.p808_onnx_sess = ort.InferenceSession(
            os.path.join(base, "model_v8.onnx"), opts, providers=providers
        )
        sm.dnsmos = obj
    except Exception:  # an optimisation only
        pass


def _init_worker(systems: list[System], with_dnsmos: bool) -> None:
    """Load every pack once per process (one ORT thread each)."""
    from rtns.config import EngineConfig
    from rtns.engine import Model

    global _WORKER
    cfg = EngineConfig(threads=1)
    models = {s.label: Model(s.path, cfg) for s in systems if s.kind != "unprocessed"}
    _WORKER = _Worker(systems, models, with_dnsmos)  # type: ignore[arg-type]
    if with_dnsmos:
        _single_thread_dnsmos()


def score_signal(
    clean: np.ndarray, estimate: np.ndarray, with_dnsmos: bool
) -> tuple[Scores, list[str]]:
    """Every metric of ``estimate`` [N] against ``clean`` [N]; a metric that fails is None."""
    from rtns_export import metrics

    out: Scores = {}
    errors: list[str] = []
    for key, fn in (
        ("pesq_wb", metrics.pesq_wb),
        ("stoi", metrics.stoi),
        ("si_sdr", metrics.si_sdr),
    ):
        try:
            v = float(fn(clean, estimate))
            out[key] = v if math.isfinite(v) else None
        except RtnsError:
            raise
        except Exception as e:  # pesq raises e.g. NoUtterancesError on silence
            out[key] = None
            errors.append(f"{key}: {type(e).__name__}: {str(e).strip()[:120]}")
    if with_dnsmos:
        try:
            d = metrics.dnsmos(estimate)
            out |= {"dnsmos_sig": d["sig"], "dnsmos_bak": d["bak"], "dnsmos_ovrl": d["ovrl"]}
        except RtnsError:
            raise
        except Exception as e:
            out |= {"dnsmos_sig": None, "dnsmos_bak": None, "dnsmos_ovrl": None}
            errors.append(f"dnsmos: {type(e).__name__}: {str(e).strip()[:120]}")
    return out, errors


def score_pair(pair: Pair) -> FileResult:
    """Run every system on one pair and score it (needs :func:`_init_worker` first)."""
    from rtns.engine import enhance_array

    w = _WORKER
    assert w is not None, "call _init_worker first"
    clean, noisy, res = load_pair(pair)
    for s in w.systems:
        if s.kind == "unprocessed":
            est = noisy
        else:
            model = w.models[s.label]
            stream = model.stream()
            if s.limit_off:
                stream.atten_lim = "off"
            est = enhance_array(model, noisy, stream)
        scores, errors = score_signal(clean, est, w.dnsmos)
        res.scores[s.label] = scores
        res.errors += [f"{s.label}: {e}" for e in errors]
    return res


# --------------------------------------------------------------------------------------
# Aggregation and output
# --------------------------------------------------------------------------------------
def means(
    results: list[FileResult], label: str, keys: Sequence[str]
) -> tuple[Scores, Scores, dict[str, int]]:
    """Mean and sample standard deviation of each metric over the files where it could be
    computed, and that number of files."""
    avg: Scores = {}
    std: Scores = {}
    count: dict[str, int] = {}
    for k in keys:
        vals = [r.scores[label][k] for r in results if r.scores[label].get(k) is not None]
        count[k] = len(vals)
        avg[k] = float(np.mean(vals)) if vals else None
        std[k] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return avg, std, count


def _fmt(v: float | None, decimals: int) -> str:
    return "–" if v is None else f"{v:.{decimals}f}"


def markdown_table(
    rows: list[tuple[str, Scores]], keys: Sequence[str], first: str = "system"
) -> str:
    head = [first] + [METRICS[k][0] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, sc in rows:
        cells = [label] + [_fmt(sc.get(k), METRICS[k][1]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, object]:
    from importlib import metadata

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("numpy", "onnxruntime", "pesq", "pystoi", "speechmos", "soxr"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": versions,
    }


def repo_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def pack_info(system: System) -> dict[str, object]:
    from rtns.pack import read_manifest

    if system.path is None:
        return {}
    m = read_manifest(system.path)
    return {
        "path": str(system.path.resolve()),
        "temporary": system.temporary,
        "name": m.name,
        "family": m.family,
        "origin": m.provenance.origin,
        "graphs": {g.file: g.sha256 for g in m.graphs},
        #: The attenuation limit the rows ran with (None: unlimited).
        "atten_lim_db": None if system.limit_off else m.atten_lim_db,
    }


def write_scores(
    system: System, set_name: str, scores: dict[str, float], graphs: dict[str, str]
) -> Path:
    """Store ``scores`` as ``manifest.scores[set_name]`` of the system's pack, re-validated.

    ``graphs`` (file -> sha256) are those that were evaluated: a pack re-exported during
    the run is refused rather than credited with another model's scores.
    """
    from rtns.pack import Manifest, PackError, read_manifest, write_manifest

    assert system.path is not None
    m = read_manifest(system.path)
    if {g.file: g.sha256 for g in m.graphs} != graphs:
        raise PackError(
            f"{system.path}: the pack's graphs changed while it was evaluated; scores not written"
        )
    data = m.model_dump(mode="json")
    data["scores"] = {**m.scores, set_name: scores}
    return write_manifest(system.path, Manifest.model_validate(data))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/quality.py",
        description="PESQ-WB, STOI, SI-SDR and DNSMOS P.835 of model packs (run by the "
        "streaming engine) and of the unprocessed input on a paired clean/noisy set.",
    )
    p.add_argument(
        "--pack",
        action="append",
        default=[],
        metavar="[LABEL=]PACK",
        help="pack name or folder to evaluate (repeatable); LABEL= names its row "
        "(default: the manifest name). Default: every pack rtns finds.",
    )
    p.add_argument(
        "--pack-off",
        action="append",
        default=[],
        metavar="[LABEL=]PACK",
        help="a pack run with its default attenuation limit lifted (repeatable; its row is "
        "'NAME (limit off)' and is never written to the manifest)",
    )
    p.add_argument(
        "--official-dtln",
        action="append",
        default=[],
        metavar="[LABEL=]H5_OR_PACK",
        help="an official DTLN peer: a pack folder made by `rtns import-dtln`, or a Keras "
        ".h5 that is imported into a temporary folder for this run (repeatable)",
    )
    p.add_argument("--clean", type=Path, default=DEFAULT_SET / "clean", help="clean folder")
    p.add_argument("--noisy", type=Path, default=DEFAULT_SET / "noisy", help="noisy folder")
    p.add_argument(
        "--set-name",
        help="name of the set in the outputs and manifests (default: the noisy folder's "
        "parent name, e.g. vbdemand36)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N pairs (by name)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (1)")
    p.add_argument("--no-dnsmos", action="store_true", help="skip DNSMOS (faster)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write all results as JSON")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the table as markdown")
    p.add_argument("--per-file", action="store_true", help="also print per-file scores")
    p.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="write pictures here: spectrograms of the worst and best file (PESQ) of each "
        "system, and a bar chart of the metrics per system (needs matplotlib)",
    )
    p.add_argument(
        "--write-manifest",
        action="store_true",
        help="store the means in each evaluated pack's manifest.json scores[SET_NAME]",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _split_label(spec: str) -> tuple[str | None, str]:
    """``LABEL=PATH`` -> (LABEL, PATH); a plain name or path -> (None, spec)."""
    label, sep, rest = spec.partition("=")
    if sep and label and os.sep not in label and rest:
        return label, rest
    return None, spec


def _import_dtln(h5: Path, tmp: Path) -> Path:
    """Import official Keras weights with ``rtns import-dtln`` into a temporary folder."""
    if not h5.is_file():
        raise UserInputError(f"{h5}: no such file")
    out = tmp / h5.stem
    proc = subprocess.run(
        [sys.executable, "-m", "rtns", "import-dtln", str(h5), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserInputError(
            f"{h5}: `rtns import-dtln` failed ({why}); import it yourself and pass the pack "
            "folder instead"
        )
    return out


def resolve_systems(args: argparse.Namespace, tmp: Path) -> list[System]:
    """The rows to evaluate, unprocessed first; loads every pack once to fail early."""
    from rtns.engine import Model
    from rtns.pack import PackError, iter_packs, read_manifest, resolve_pack

    systems = [System(UNPROCESSED, "unprocessed")]
    if args.pack:
        for spec in args.pack:
            label, target = _split_label(spec)
            path = resolve_pack(target)
            systems.append(System(label or read_manifest(path).name, "pack", path))
    elif not args.official_dtln and not args.pack_off:
        for path, m in iter_packs():
            if isinstance(m, PackError):
                print(f"quality: skipping broken pack: {m}", file=sys.stderr)
                continue
            systems.append(System(m.name, "pack", path))
        if len(systems) == 1:
            print("quality: no packs found; scoring the unprocessed input only", file=sys.stderr)
    for spec in args.pack_off:
        label, target = _split_label(spec)
        path = resolve_pack(target)
        label = label or f"{read_manifest(path).name} (limit off)"
        systems.append(System(label, "pack", path, limit_off=True))
    for spec in args.official_dtln:
        label, target = _split_label(spec)
        p = Path(target).expanduser()
        temporary = p.suffix.lower() in (".h5", ".hdf5")
        path = _import_dtln(p, tmp) if temporary else resolve_pack(target)
        label = label or f"DTLN official ({p.stem if temporary else read_manifest(path).name})"
        systems.append(System(label, "peer", path, temporary))
    labels = [s.label for s in systems]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UserInputError(f"two rows are labelled {dup[0]!r}; name them with --pack LABEL=PACK")
    for s in systems:  # verify hashes and load the graphs now, not in a worker
        if s.path is not None:
            Model(s.path)
    return systems


def evaluate(
    systems: list[System], pairs: list[Pair], jobs: int, with_dnsmos: bool, progress: bool
) -> list[FileResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(pairs), unit="file", disable=not progress, file=sys.stderr)
    results: list[FileResult] = []
    try:
        if jobs <= 1:
            _init_worker(systems, with_dnsmos)
            for pair in pairs:
                results.append(score_pair(pair))
                bar.update()
        else:
            import multiprocessing as mp

            # fork: workers inherit this module even when it was loaded from a path.
            ctx = mp.get_context("fork")
            with ProcessPoolExecutor(
                max_workers=jobs,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(systems, with_dnsmos),
            ) as pool:
                futures = [pool.submit(score_pair, p) for p in pairs]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
    finally:
        bar.close()
    return sorted(results, key=lambda r: r.name)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    date = datetime.now(UTC).isoformat(timespec="seconds")  # the run's start
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {args.limit}")
    if args.jobs < 1:
        raise UserInputError(f"--jobs must be at least 1, got {args.jobs}")
    set_name = args.set_name or args.noisy.resolve().parent.name
    if args.write_manifest and args.limit is not None and not args.set_name:
        raise UserInputError(
            "--write-manifest with --limit would record a subset's scores under the whole "
            f"set's name ({set_name!r}); give the subset a --set-name"
        )
    pairs = find_pairs(args.clean, args.noisy)
    n_found = len(pairs)
    if args.limit is not None:
        pairs = pairs[: args.limit]
    keys = list(INTRUSIVE) + ([] if args.no_dnsmos else ["dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"])

    with tempfile.TemporaryDirectory(prefix="rtns-quality-") as tmp:
        systems = resolve_systems(args, Path(tmp))
        packs = {s.label: pack_info(s) for s in systems}
        results = evaluate(
            systems, pairs, args.jobs, not args.no_dnsmos, progress=not args.no_progress
        )
        if args.plots:  # while imported packs still exist
            for path in write_plots(args.plots, systems, results, pairs, keys):
                print(f"quality: wrote {path}", file=sys.stderr)

    trimmed = [r for r in results if r.trimmed]
    resampled = [r for r in results if r.resampled]
    downmixed = [r for r in results if r.downmixed]
    if trimmed:
        print(
            f"quality: warning: {len(trimmed)} pair(s) of different lengths trimmed to the "
            f"shorter (up to {max(r.trimmed for r in trimmed)} samples)",
            file=sys.stderr,
        )
    if resampled:
        print(f"quality: note: {len(resampled)} pair(s) resampled to 16 kHz", file=sys.stderr)
    if downmixed:
        print(f"quality: note: {len(downmixed)} pair(s) downmixed to mono", file=sys.stderr)
    errors = [f"{r.name}: {e}" for r in results for e in r.errors]
    for e in errors:
        print(f"quality: warning: {e}", file=sys.stderr)

    rows: list[tuple[str, Scores]] = []
    report_systems = []
    for s in systems:
        avg, std, count = means(results, s.label, keys)
        rows.append((s.label, avg))
        report_systems.append(
            {
                "label": s.label,
                "kind": s.kind,
                "pack": packs[s.label] or None,
                "means": avg,
                "std": std,
                "counts": count,
                "per_file": {r.name: r.scores[s.label] for r in results},
            }
        )

    title = (
        f"Set `{set_name}`: {len(results)} pairs"
        + (f" (first {len(results)} of {n_found})" if len(results) < n_found else "")
        + (", DNSMOS skipped" if args.no_dnsmos else "")
    )
    table = markdown_table(rows, keys)
    print(title + "\n")
    print(table, end="")
    if args.per_file:
        for s in systems:
            print(f"\n{s.label}, per file:\n")
            print(
                markdown_table([(r.name, r.scores[s.label]) for r in results], keys, "file"), end=""
            )

    command = shlex.join(["python", "benchmarks/quality.py", *argv])
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"{title}; {date}; `{command}`\n\n{table}", encoding="utf-8")
    if args.json:
        report = {
            "tool": "benchmarks/quality.py",
            "command": command,
            "argv": list(argv),
            "date": date,
            "finished": finished,
            "machine": machine_info(),
            "repo_commit": repo_commit(),
            "set": {
                "name": set_name,
                "clean": str(args.clean.resolve()),
                "noisy": str(args.noisy.resolve()),
                "pairs_found": n_found,
                "pairs_scored": len(results),
                "limit": args.limit,
                "trimmed": {r.name: r.trimmed for r in trimmed},
                "resampled": {r.name: r.resampled for r in resampled},
                "downmixed": {r.name: r.downmixed for r in downmixed},
                "seconds": sum(r.samples for r in results) / SAMPLE_RATE,
            },
            "engine": {"threads": 1, "path": "rtns.engine.enhance_array"},
            "metrics": keys,
            "systems": report_systems,
            "errors": errors,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.write_manifest:
        for s, (_, avg) in zip(systems, rows, strict=True):
            if s.path is None or s.temporary or s.limit_off:
                continue
            got = {k: v for k, v in avg.items() if v is not None}
            got["files"] = float(len(results))
            path = write_scores(s, set_name, got, packs[s.label]["graphs"])  # type: ignore[arg-type]
            print(f"quality: wrote scores[{set_name!r}] to {path}", file=sys.stderr)
    return 0


def write_plots(
    folder: Path,
    systems: list[System],
    results: list[FileResult],
    pairs: list[Pair],
    keys: list[str],
) -> list[Path]:
    """Spectrogram pictures of each system's worst and best file by PESQ, and one bar chart
    of the mean of every metric per system; returns the files written."""
    from rtns.plot import _pyplot, plot_enhancement

    folder.mkdir(parents=True, exist_ok=True)
    by_name = {p.name: p for p in pairs}
    written: list[Path] = []
    _init_worker(systems, False)
    w = _WORKER
    assert w is not None
    for s in systems:
        if s.kind == "unprocessed":
            continue
        scored = [(r.scores[s.label].get("pesq_wb"), r.name) for r in results]
        scored = [(v, n) for v, n in scored if v is not None]
        if not scored:
            continue
        for tag, (value, name) in (("worst", min(scored)), ("best", max(scored))):
            from rtns.engine import enhance_array

            _, noisy, _ = load_pair(by_name[name])
            model = w.models[s.label]
            stream = model.stream()
            if s.limit_off:
                stream.atten_lim = "off"
            est = enhance_array(model, noisy, stream)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s.label)
            out = folder / f"{safe}-{tag}-{Path(name).stem}.png"
            title = f"{s.label}: {tag} file {name} (PESQ {value:.2f})"
            written.append(plot_enhancement(noisy, est, SAMPLE_RATE, out, title=title))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), dpi=100)
    axes = np.atleast_1d(axes)
    labels = [s.label for s in systems]
    for ax, key in zip(axes, keys, strict=True):
        vals = []
        for s in systems:
            got = [r.scores[s.label].get(key) for r in results]
            got = [v for v in got if v is not None]
            vals.append(float(np.mean(got)) if got else np.nan)
        ax.bar(range(len(labels)), vals, color=plt.cm.tab10(np.arange(len(labels)) % 10))
        ax.set_title(key)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize="small")
        # Fixed, honest baselines (the scales' floors), each bar labelled with its value.
        lo, hi = {"pesq_wb": (1.0, 4.64), "stoi": (0.5, 1.0)}.get(
            key, (1.0, 5.0) if key.startswith("dnsmos") else (None, None)
        )
        if lo is not None:
            ax.set_ylim(lo, hi)
        for i, v in enumerate(vals):
            if np.isfinite(v):
                ax.annotate(
                    f"{v:.3g}",
                    (i, v),
                    ha="center",
                    va="bottom",
                    fontsize="small",
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    fig.tight_layout()
    chart = folder / "metrics.png"
    fig.savefig(chart, format="png")
    plt.close(fig)
    written.append(chart)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except RtnsError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quality: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
