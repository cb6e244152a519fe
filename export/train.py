"""The trainer behind ``rtns train --config FILE``: model-agnostic, resumable, deterministic.

Per run folder ``<out_dir>/<name>/``:

- ``config.json``: the validated config; ``last.pt``: model + optimizer + schedule + RNG
  states (torch, numpy mixer) + step + elapsed time, written atomically every
  ``checkpoint_every`` steps, at every validation and on SIGINT/SIGTERM; ``best.pt``: the
  weights with the best validation score (``valid.select``); ``train.csv`` and ``valid.csv``;
  with ``snapshots`` on, ``snapshots/step_NNNNNNN.pt``: the weights at every checkpoint, and
  after ``rtns train --average K``, ``average.pt``: the validated mean of the last K.
- ``pack/`` (or ``export.out_dir``): the exported pack of the best weights, parity-checked,
  with data, steps, losses and validation scores in its manifest provenance.

A run resumes from ``last.pt`` when it exists; a resumed run draws the same batches and
reaches the same weights as an uninterrupted one (same threads, same device). The model is
anything from :mod:`rtns_export.families`: noisy [B, N] -> enhanced [B, N'], aligned, and
the loss compares it with clean[:, :N'].
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rtns.atten import AttenLimit
from rtns.pack import Provenance, write_manifest
from rtns_export import metrics
from rtns_export.data import (
    BatchFeeder,
    DataError,
    Mixer,
    fingerprint,
    load_folder,
    split_holdout,
    validation_set,
)
from rtns_export.distill import Teacher, TeacherError, load_teacher
from rtns_export.families import build_model, get_family
from rtns_export.losses import CombinedLoss
from rtns_export.metric_disc import MetricStage
from rtns_export.train_config import ConfigError, ScheduleConfig, TrainConfig

if TYPE_CHECKING:  # onnx is imported only when a run starts from a pack
    from rtns_export.pack_import import ImportReport


# -- learning-rate schedule ---------------------------------------------------------------
class LRSchedule:
    """Learning-rate factor per step (constant / cosine with warmup) times a plateau factor
    that shrinks after ``patience`` validations without a new best. Has a state dict."""

    def __init__(
        self,
        cfg: ScheduleConfig,
        base_lr: float,
        total_steps: int,
        total_seconds: float | None = None,
    ) -> None:
        self.cfg, self.base_lr, self.total = cfg, base_lr, max(total_steps, 1)
        self.total_seconds = total_seconds
        self.plateau_factor = 1.0
        self.bad = 0

    def lr(self, step: int, elapsed_s: float = 0.0) -> float:
        c = self.cfg
        f = 1.0
        if c.warmup and step < c.warmup:
            f = (step + 1) / c.warmup
        elif c.kind in ("cosine", "cosine_time"):
            if c.kind == "cosine":
                t = min(max(step - c.warmup, 0) / max(self.total - c.warmup, 1), 1.0)
            else:
                assert self.total_seconds, "cosine_time needs a time budget"
                t = min(elapsed_s / self.total_seconds, 1.0)
            f = c.min_factor + (1 - c.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return self.base_lr * f * self.plateau_factor

    def on_validation(self, improved: bool) -> None:
        if self.cfg.kind != "plateau":
            return
        self.bad = 0 if improved else self.bad + 1
        if self.bad >= self.cfg.patience:
            self.plateau_factor *= self.cfg.factor
            self.bad = 0

    def state_dict(self) -> dict[str, float]:
        return {"plateau_factor": self.plateau_factor, "bad": self.bad}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.plateau_factor, self.bad = float(d["plateau_factor"]), int(d["bad"])


# -- helpers ------------------------------------------------------------------------------
def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def enhance_batch(
    model: torch.nn.Module, noisy: np.ndarray, device: torch.device, chunk: int = 8
) -> np.ndarray:
    """Run the full-sequence model on noisy [B, N]; returns [B, N'] float32 (eval, no grad)."""
    outs = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, noisy.shape[0], chunk):
            x = torch.from_numpy(noisy[i : i + chunk]).to(device)
            outs.append(model(x).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outs)


def score_pairs(clean: np.ndarray, est: np.ndarray, pesq_items: int) -> dict[str, float]:
    """Mean SI-SDR over all rows, and mean PESQ-WB and STOI over the first ``pesq_items``
    rows of clean/est [B, N] (N equal); rows where PESQ finds no utterance are skipped."""
    sdr = [metrics.si_sdr(c, e) for c, e in zip(clean, est, strict=False)]
    out = {"si_sdr": float(np.mean(sdr))}
    if pesq_items:
        vals = []
        for c, e in zip(clean[:pesq_items], est[:pesq_items], strict=False):
            try:
                vals.append(metrics.pesq_wb(c, e))
            except Exception:  # pesq's NoUtterancesError and friends
                continue
        out["pesq"] = float(np.mean(vals)) if vals else float("nan")
        pairs = zip(clean[:pesq_items], est[:pesq_items], strict=False)
        out["stoi"] = float(np.mean([metrics.stoi(c, e) for c, e in pairs]))
    return out


def with_atten_lim(est: np.ndarray, noisy: np.ndarray, db: float) -> np.ndarray:
    """What the engine outputs with an attenuation limit of ``db`` (inf: ``est`` itself):
    ``g * noisy + (1 - g) * est`` with ``g = 10^(-db/20)``; arrays time-aligned, [B, N]."""
    g = AttenLimit.parse(db).dry_gain  # the engine's own rule (rtns.atten)
    if g == 0.0:
        return est
    return ((1.0 - g) * est + g * noisy).astype(np.float32)


def tune_atten_lim(
    clean: np.ndarray,
    noisy: np.ndarray,
    est: np.ndarray,
    grid: Sequence[float],
    pesq_items: int,
    select: str,
    stoi_floor: float,
) -> dict[str, float]:
    """Score ``est`` unlimited and at every limit of ``grid``; return the scores of the limit
    with the best ``select`` among those whose STOI >= ``stoi_floor`` (all when the floor is
    NaN or none reaches it), with ``atten_lim_db`` (inf: unlimited) and ``unlimited_<m>``."""
    rows = {
        db: score_pairs(clean, with_atten_lim(est, noisy, db), pesq_items)
        for db in (math.inf, *sorted(set(grid), reverse=True))
    }
    ok = [db for db, r in rows.items() if r.get("stoi", math.nan) >= stoi_floor]
    pick = max(ok or list(rows), key=lambda db: rows[db].get(select, -math.inf))
    unlimited = {f"unlimited_{k}": x for k, x in rows[math.inf].items()}
    return {**rows[pick], "atten_lim_db": pick, **unlimited}


@dataclass
class RunState:
    step: int = 0
    elapsed_s: float = 0.0
    best_score: float = -math.inf
    best_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    #: Where the weights started when the run is a fine-tuning stage (``init_from``).
    init: dict[str, Any] | None = None


#: A step that takes this many times the typical step (and at least STALL_MIN_S) was not
#: training: the process was stopped (SIGSTOP, a paused job) or the machine suspended.
STALL_FACTOR = 20.0
STALL_MIN_S = 30.0


class StepClock:
    """The training time a step adds to ``elapsed_s`` (the time budget and the cosine-time
    schedule run on it): its wall time, except that a stalled step counts as a typical one
    (an exponential mean of the steps before), so a job paused for minutes does not spend
    its budget or its schedule while it sleeps. Each stall is returned for the log."""

    def __init__(self) -> None:
        self.typical: float | None = None

    def count(self, wall_s: float) -> tuple[float, float | None]:
        """(seconds to count, or the stalled wall time when the step stalled else None)."""
        t = self.typical
        if t is not None and wall_s > max(STALL_FACTOR * t, STALL_MIN_S):
            return t, wall_s
        self.typical = wall_s if t is None else 0.9 * t + 0.1 * wall_s
        return wall_s, None


class _CsvLog:
    """Append-only CSV. A log that already exists keeps its own header (a run resumed by a
    newer trainer that logs more columns writes only the columns the file has)."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as f:
                self.fields = next(csv.reader(f))
        else:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(fields)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.fields])


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _truncate_csv(path: Path, max_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= max_step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(keep)


class SelectionError(RuntimeError):
    """No validated checkpoint met the config's selection rule, so there is nothing to export."""


# -- the trainer --------------------------------------------------------------------------
class Trainer:
    def __init__(
        self, cfg: TrainConfig, *, threads: int | None = None, progress: bool = True
    ) -> None:
        self.cfg = cfg
        if threads:
            torch.set_num_threads(threads)
        self.progress = progress
        self.device = pick_device()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.model = build_model(cfg.family, cfg.model).to(self.device)
        self.loss_fn = CombinedLoss([(t.name, t.weight) for t in cfg.losses])
        self.metric: MetricStage | None = None
        self.teacher: Teacher | None = None
        if cfg.metric_disc is not None:
            m = cfg.metric_disc
            self.metric = MetricStage(m.weight, m.lr, m.channels, m.noisy, self.device)
        o = cfg.optim
        self.opt = torch.optim.Adam(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.sched = LRSchedule(
            o.schedule, o.lr, o.steps, o.max_minutes * 60 if o.max_minutes else None
        )
        self.state = RunState()
        self._stop = False
        self.mixer: Mixer | None = None
        self._pack_import: ImportReport | None = None  # until its norms are calibrated

    # data is loaded lazily so that --export-only does not need it
    def load_data(self) -> None:
        d = self.cfg.data
        t0 = time.time()
        speech, sn = load_folder(d.train_speech, d.cache_dir)
        noise, nn_ = load_folder(d.train_noise, d.cache_dir)
        vs, vsn = load_folder(d.valid_speech, d.cache_dir)
        vn, vnn = load_folder(d.valid_noise, d.cache_dir)
        self.data_info = {
            "train_speech": f"{d.train_speech} ({len(speech)} files, "
            f"{sum(map(len, speech)) / 16000 / 60:.1f} min, id {fingerprint(sn, speech)})",
            "train_noise": f"{d.train_noise} ({len(noise)} files, "
            f"{sum(map(len, noise)) / 16000 / 60:.1f} min, id {fingerprint(nn_, noise)})",
            "valid": f"{d.valid_speech} + {d.valid_noise} (id {fingerprint(vsn + vnn, vs + vn)})",
        }
        v = self.cfg.valid
        urban = None
        if v.kinds and "urban" in v.kinds:
            noise, urban = split_holdout(noise, nn_, d.holdout_subdir, d.holdout_fraction)
            self.data_info["valid"] += (
                f"; urban validation noise: the last {d.holdout_fraction:g} of each of the "
                f"{len(urban)} files under {d.train_noise}/{d.holdout_subdir} "
                f"({sum(map(len, urban)) / 16000 / 60:.1f} min, cut from training)"
            )
        if v.kinds:
            self.data_info["valid"] += f"; validation noise kinds {list(v.kinds)} in turn"
        self.mixer = Mixer(speech, noise, d, np.random.default_rng(self.cfg.seed))
        self.valid_clean, self.valid_noisy = validation_set(
            vs, vn, d, v.items, v.seconds, v.seed, v.kinds, urban
        )
        n = self.valid_noisy.shape[1]
        self.valid_input = score_pairs(self.valid_clean, self.valid_noisy[:, :n], v.pesq_items)
        self._log(f"data loaded in {time.time() - t0:.1f} s; {json.dumps(self.data_info)}")
        self._log(f"validation input (unprocessed): {self.valid_input}")

    def _log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.cfg.name}: {msg}", file=sys.stderr, flush=True)

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        assert self.mixer is not None
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedule": self.sched.state_dict(),
            "run": self.state.__dict__,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy_mixer": self.mixer.rng.bit_generator.state,
                "python": random.getstate(),
            },
            "config": self.cfg.model_dump(mode="json"),
            **({"metric": self.metric.state_dict()} if self.metric is not None else {}),
        }

    def save(self) -> None:
        _atomic_save(self.checkpoint(), self.run_dir / "last.pt")
        if self.cfg.snapshots:
            snap = {"model": self.model.state_dict(), "run": dict(self.state.__dict__)}
            snap["run"].pop("history", None)
            (self.run_dir / "snapshots").mkdir(exist_ok=True)
            _atomic_save(snap, self.run_dir / "snapshots" / f"step_{self.state.step:07d}.pt")

    def _selected(
        self,
        step: int,
        elapsed_s: float,
        valid: dict[str, float],
        init: dict[str, Any] | None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The record of selected weights (``best.pt``, ``average.pt``): what
        :meth:`export` and :func:`_lineage` read back."""
        return {
            "model": self.model.state_dict(),
            "step": step,
            "elapsed_s": elapsed_s,
            "valid": valid,
            "config": self.cfg.model_dump(mode="json"),
            "init": init,
            "valid_input": self.valid_input,
            **extra,
        }

    def average(self, count: int, folder: str | Path | None = None) -> dict[str, Any]:
        """Validate the mean of the model weights of the ``count`` latest checkpoints in
        ``folder`` (default ``<run>/snapshots``; snapshots and ``last.pt`` files, or
        selected records such as ``best.pt`` and ``average.pt``, also from other runs of
        the same model) and save it as ``<run>/average.pt``, exportable with
        ``which="average"``. Buffers that are not floating point (counters) are the latest
        file's. The record's run (step, time, ``init``) is the file with the most training
        behind it (:func:`_lineage`): for one run's snapshots, the latest. Returns the
        validation result plus the averaged steps."""
        src = Path(folder) if folder else self.run_dir / "snapshots"
        found = []
        for p in sorted(src.glob("*.pt")):
            ck = torch.load(p, map_location="cpu", weights_only=False)
            rec = _record(ck)
            if "model" not in ck or "step" not in rec:
                raise SelectionError(f"{p}: not a checkpoint (no model weights or step)")
            found.append((int(rec["step"]), p, ck))
        if count < 1 or len(found) < count:
            raise SelectionError(
                f"--average {count}: {src} holds {len(found)} checkpoints"
                + ("" if found else ' (set "snapshots": true in the config to keep them)')
            )
        found.sort(key=lambda f: f[0])
        chosen = found[-count:]
        states = [ck["model"] for _, _, ck in chosen]
        mean = {}
        for k, v in states[-1].items():
            if v.is_floating_point():
                mean[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
            else:
                mean[k] = v
        self.model.load_state_dict(mean)
        if self.mixer is None:
            self.load_data()
        res = self.validate()
        ref = max(chosen, key=lambda c: _lineage(c[2]))[2]
        last = _record(ref)
        steps = [st for st, _, _ in chosen]
        inits = {str(_record(c).get("init") or {}) for _, _, c in chosen}
        averaged: dict[str, Any] = {"count": count, "steps": steps, "folder": str(src)}
        if len(inits) > 1:  # not one run's checkpoints: name each file
            averaged["files"] = [f"{p} (step {st})" for st, p, _ in chosen]
        _atomic_save(
            self._selected(
                int(last["step"]),
                float(last["elapsed_s"]),
                res,
                last.get("init"),
                averaged=averaged,
            ),
            self.run_dir / "average.pt",
        )
        self._log(
            f"average of {count} checkpoints (steps {steps[0]}..{steps[-1]}): valid "
            + ", ".join(f"{k} {v:.3f}" for k, v in res.items())
        )
        return {**res, "steps": steps}

    def resume(self) -> bool:
        path = self.run_dir / "last.pt"
        if not path.exists():
            return False
        # on the CPU: RNG states must be CPU byte tensors (the model and the optimizer copy
        # their tensors to their own device)
        ck = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["schedule"])
        if self.metric is not None:
            if "metric" in ck:
                self.metric.load_state_dict(ck["metric"])
            else:
                self._log("resumed a run without a discriminator: it starts untrained")
        self.state = RunState(**ck["run"])
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        assert self.mixer is not None
        self.mixer.rng.bit_generator.state = ck["rng"]["numpy_mixer"]
        random.setstate(ck["rng"]["python"])
        for name in ("train.csv", "valid.csv"):
            _truncate_csv(self.run_dir / name, self.state.step)
        self._log(f"resumed from step {self.state.step} ({self.state.elapsed_s / 60:.1f} min)")
        self._check_best_metric()
        return True

    def _check_best_metric(self) -> None:
        """A run resumed with another ``valid.select`` (a GPU run that had no PESQ, resumed
        here with it) must not compare PESQ against a best SI-SDR: where the best step's
        validation row does not hold the best score under the current metric, the best is
        forgotten (loudly) and the next validation writes best.pt afresh."""
        st, select = self.state, self.cfg.valid.select
        if st.best_step < 0:
            return
        row = next((h for h in st.history if int(h.get("step", -1)) == st.best_step), None)
        if row is not None and math.isclose(row.get(select, math.nan), st.best_score):
            return
        self._log(
            f"the best so far (step {st.best_step}, score {st.best_score:.3f}) was not "
            f"selected by valid.select={select!r}: best forgotten, the next validation "
            "writes best.pt"
        )
        st.best_score, st.best_step = -math.inf, -1

    def init_weights(self, path: str | Path) -> None:
        """Load model weights (only) from another run's checkpoint, for fine-tuning."""
        p = Path(path)
        if p.is_dir():
            self._init_from_pack(p)
            return
        if not p.is_file():
            raise ConfigError(f"init_from: no checkpoint or pack at {p}")
        try:
            ck = torch.load(p, map_location=self.device, weights_only=False)
            src = ck.get("config", {})
        except Exception as e:  # a truncated or foreign file
            raise ConfigError(f"init_from: {p} is not a readable rtns checkpoint ({e})") from None
        if src.get("family") != self.cfg.family or src.get("model") != self.cfg.model:
            raise ConfigError(
                f"init_from: {p} holds a {src.get('family')} model {src.get('model')}, "
                f"but this run builds {self.cfg.family} {self.cfg.model}"
            )
        self.model.load_state_dict(ck["model"])
        step = _record(ck).get("step")
        self.state.init = {
            "init_from": str(p),
            "init_step": step,
            "init_valid": ck.get("valid"),
        }
        self.state.init["init_minutes"], self.state.init["init_steps"] = _lineage(ck)
        self._log(f"initialised from {p} (step {step}); optimizer and schedule start fresh")

    def _init_from_pack(self, p: Path) -> None:
        """``init_from`` names a pack: its weights read back from the ONNX graph; the batch
        norms the export folded are calibrated on training batches once the data is loaded
        (:meth:`_finish_pack_import`)."""
        from rtns_export.pack_import import PackImportError, import_pack

        try:
            rep = import_pack(p, self.model, self.cfg.family, dict(self.cfg.model))
        except PackImportError as e:
            raise ConfigError(f"init_from: {e}") from None
        self._pack_import = rep
        self.state.init = {
            "init_from": str(p),
            "init_step": rep.steps,
            "init_valid": rep.validation,
            "init_minutes": rep.minutes,
            "init_steps": rep.steps,
            "init_pack_sha256": rep.sha256,
        }
        self._log(
            f"weights read from pack {p} ({rep.tensors} tensors; {rep.steps} steps, "
            f"{rep.minutes:.1f} min of training behind it); {len(rep.folded_norms)} folded "
            "batch norms to calibrate"
        )

    def _finish_pack_import(self, batches: int = 8) -> None:
        """Calibrate the folded batch norms of an imported pack on ``batches`` training
        batches, then check the model against the pack through the engine (<= 1e-4)."""
        from rtns_export.pack_import import PackImportError, finish_import

        rep = self._pack_import
        assert rep is not None
        try:
            err = finish_import(self.model.cpu(), rep, self._noisy_batches(batches))
        except PackImportError as e:
            raise ConfigError(f"init_from: {e}") from None
        finally:
            self.model.to(self.device)
        assert self.state.init is not None
        self.state.init["init_parity"] = err
        self._log(f"pack import checked through the engine: max |error| {err:.2g}")
        self._pack_import = None

    def _noisy_batches(self, count: int, keep_rng: bool = False) -> list[torch.Tensor]:
        """``count`` noisy training batches (CPU tensors [batch, N]) for calibration; with
        ``keep_rng`` the mixer's random state is put back afterwards, so the run still draws
        the batches it would have drawn."""
        assert self.mixer is not None
        saved = self.mixer.rng.bit_generator.state
        try:
            size = self.cfg.optim.batch
            return [torch.from_numpy(self.mixer.batch(size)[1]) for _ in range(count)]
        finally:
            if keep_rng:
                self.mixer.rng.bit_generator.state = saved

    def _load_teacher(self) -> None:
        """Read the teacher pack and check it through the engine. Its calibration batches
        come from the mixer with its random state put back afterwards, and the teacher's
        (discarded) initial weights from a forked torch RNG: the run draws the same batches
        and weights as it would without a teacher."""
        t = self.cfg.teacher
        assert t is not None
        xs = self._noisy_batches(t.calibration_batches, keep_rng=True)
        with torch.random.fork_rng(devices=[]):
            try:
                self.teacher = load_teacher(t.pack, xs, self.device)
            except TeacherError as e:
                raise ConfigError(str(e)) from None
        self._log(
            f"teacher {t.pack} ({self.teacher.family}, checked through the engine: max "
            f"|error| {self.teacher.parity:.2g}); loss = {1 - t.mix:g} x L(y, clean) + "
            f"{t.mix:g} x L(y, teacher)"
        )

    # -- one step / validation --------------------------------------------------------------
    def train_step(
        self, clean: np.ndarray, noisy: np.ndarray
    ) -> tuple[float, dict[str, float], float]:
        self.model.train()
        x = torch.from_numpy(noisy).to(self.device)
        s = torch.from_numpy(clean).to(self.device)
        y = self.model(x)
        ref = s[:, : y.shape[1]]
        loss, parts = self.loss_fn(y, ref)
        if self.teacher is not None:
            mix = self.cfg.teacher.mix  # type: ignore[union-attr]
            taught, _ = self.loss_fn(y, self.teacher(x)[:, : y.shape[1]])
            parts["teacher"] = float(taught.detach())
            loss = (1.0 - mix) * loss + mix * taught
        if self.metric is not None:
            adv = self.metric.generator_term(y, ref)
            parts["metric_adv"] = float(adv.detach())
            loss = loss + adv
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.clipnorm
        gnorm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip else float("inf")
        )
        self.opt.step()
        if self.metric is not None:  # then the discriminator, on this step's output
            parts.update(self.metric.step(y, ref, x))
        return float(loss.detach()), parts, float(gnorm)

    def validate(self) -> dict[str, float]:
        """Loss and scores on the validation set, of what the pack would output: with the
        export's attenuation limit (``atten_lim_db`` in the result; inf: unlimited)."""
        v, e = self.cfg.valid, self.cfg.export
        est = enhance_batch(self.model, self.valid_noisy, self.device)
        n = est.shape[1]
        clean, noisy = self.valid_clean[:, :n], self.valid_noisy[:, :n]
        with torch.no_grad():
            loss, _ = self.loss_fn(torch.from_numpy(est), torch.from_numpy(clean))
        out = {"loss": float(loss)}
        if e.atten_lim == "auto":
            floor = self.valid_input.get("stoi", math.nan) + (v.min_stoi_gain or 0.0)
            return {
                **out,
                **tune_atten_lim(
                    clean, noisy, est, e.atten_lim_grid, v.pesq_items, v.select, floor
                ),
            }
        lim = math.inf if e.atten_lim is None else float(e.atten_lim)
        scores = score_pairs(clean, with_atten_lim(est, noisy, lim), v.pesq_items)
        return {**out, **scores, "atten_lim_db": lim}

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop = True

    # -- main loop ------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> RunState:
        from tqdm import tqdm

        cfg, o, v = self.cfg, self.cfg.optim, self.cfg.valid
        fresh = not (resume and (self.run_dir / "last.pt").exists())
        if fresh and cfg.init_from:
            self.init_weights(cfg.init_from)  # before the data, so a bad path fails fast
        if self.mixer is None:
            self.load_data()
        (self.run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        if not fresh:
            self.resume()
        elif cfg.init_from:
            imported = self._pack_import is not None
            if imported:
                self._finish_pack_import()
            res = self.validate()
            assert self.state.init is not None
            self.state.init["init_valid_now"] = res
            self._log("starting point: valid " + ", ".join(f"{k} {x:.3f}" for k, x in res.items()))
            if imported:  # the pack's weights as a record (step 0), e.g. to average with
                _atomic_save(
                    self._selected(0, 0.0, res, self.state.init), self.run_dir / "imported.pt"
                )
        assert self.mixer is not None
        if cfg.teacher is not None and self.teacher is None:
            self._load_teacher()
        part_names = [t.name for t in cfg.losses]
        if cfg.teacher is not None:
            part_names.append("teacher")
        if self.metric is not None:
            part_names += ["metric_adv", "disc_loss", "batch_pesq"]
        tlog = _CsvLog(
            self.run_dir / "train.csv",
            ["step", "elapsed_s", "lr", "loss", *part_names, "grad_norm", "audio_s_per_s"],
        )
        vlog = _CsvLog(
            self.run_dir / "valid.csv",
            ["step", "elapsed_s", "loss", "si_sdr", "pesq", "stoi", "atten_lim_db", "best"],
        )
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        seg_s = self.mixer.seg_len / 16000
        bar = tqdm(
            total=o.steps,
            initial=self.state.step,
            desc=cfg.name,
            disable=not self.progress,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            dynamic_ncols=True,
        )
        t_last = time.time()
        audio_since = 0.0
        clock = StepClock()
        feeder = None
        if cfg.data.workers:
            feeder = BatchFeeder(
                self.mixer.speech,
                self.mixer.noise,
                cfg.data,
                seed=cfg.seed,
                start_step=self.state.step,
                size=o.batch,
                workers=cfg.data.workers,
            )
            self._log(
                f"data: {cfg.data.workers} mixing processes (a resumed run draws other "
                "batches than an uninterrupted one)"
            )
        try:
            while self.state.step < o.steps and not self._stop:
                if o.max_minutes and self.state.elapsed_s >= o.max_minutes * 60:
                    self._log(f"time budget of {o.max_minutes} min reached")
                    break
                t0 = time.time()
                lr = self.sched.lr(self.state.step, self.state.elapsed_s)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                clean, noisy = feeder.batch() if feeder else self.mixer.batch(o.batch)
                loss, parts, gnorm = self.train_step(clean, noisy)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.state.step}")
                self.state.step += 1
                counted, stalled = clock.count(time.time() - t0)
                self.state.elapsed_s += counted
                if stalled is not None:
                    self._log(
                        f"step {self.state.step} took {stalled:.0f} s (the process was "
                        f"stopped or the machine suspended?): counted as {counted:.2f} s"
                    )
                audio_since += o.batch * seg_s
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}", refresh=False)
                step = self.state.step
                if step % cfg.log_every == 0:
                    now = time.time()
                    tlog.write(
                        {
                            "step": step,
                            "elapsed_s": self.state.elapsed_s,
                            "lr": lr,
                            "loss": loss,
                            **parts,
                            "grad_norm": gnorm,
                            "audio_s_per_s": audio_since / max(now - t_last, 1e-9),
                        }
                    )
                    t_last, audio_since = now, 0.0
                if step % v.every_steps == 0 or step == o.steps:
                    self._validation(vlog)
                elif step % cfg.checkpoint_every == 0:
                    self.save()
            if feeder is not None:
                feeder.close()
            # still under our handlers: a SIGTERM now only repeats the stop request. The last
            # weights are validated whatever ended the loop (steps, time budget, a signal).
            if self.state.step and (
                not self.state.history or self.state.history[-1]["step"] != self.state.step
            ):
                self._validation(vlog)
            self.save()
        finally:
            if feeder is not None:
                feeder.close()
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        return self.state

    def _validation(self, vlog: _CsvLog) -> None:
        t0 = time.time()
        res = self.validate()
        v = self.cfg.valid
        score = res.get(v.select, float("nan"))
        improved = math.isfinite(score) and score > self.state.best_score
        if improved and v.min_stoi_gain is not None:
            floor = self.valid_input.get("stoi", float("nan")) + v.min_stoi_gain
            improved = res.get("stoi", float("nan")) >= floor
        if improved:
            self.state.best_score, self.state.best_step = score, self.state.step
            _atomic_save(
                self._selected(self.state.step, self.state.elapsed_s, res, self.state.init),
                self.run_dir / "best.pt",
            )
        self.sched.on_validation(improved)
        row = {
            "step": self.state.step,
            "elapsed_s": self.state.elapsed_s,
            **res,
            "best": int(improved),
        }
        self.state.history.append({k: float(v) for k, v in row.items()})
        vlog.write(row)
        self._log(
            f"step {self.state.step} ({self.state.elapsed_s / 60:.1f} min): valid "
            + ", ".join(f"{k} {v:.3f}" for k, v in res.items())
            + (" *best*" if improved else "")
            + f" [{time.time() - t0:.1f} s]"
        )
        self.save()

    # -- export ---------------------------------------------------------------------------
    def provenance(self, best: dict[str, Any], extra: dict[str, Any] | None = None) -> Provenance:
        cfg = self.cfg
        info = getattr(
            self,
            "data_info",
            {"train_speech": cfg.data.train_speech, "train_noise": cfg.data.train_noise},
        )
        d = cfg.data
        init = best.get("init") or self.state.init
        if init is None and cfg.init_from:
            init = {"init_from": cfg.init_from}
        if init and Path(init["init_from"]).is_file():
            # counted again from the files: a record may predate a stage's lineage
            ck = torch.load(init["init_from"], map_location="cpu", weights_only=False)
            minutes, steps = _lineage(ck)
            init = {**init, "init_minutes": minutes, "init_steps": steps}
        stage_minutes = float(best.get("elapsed_s", self.state.elapsed_s)) / 60
        origin = f"trained from scratch with `rtns train` (run {cfg.name!r}, seed {cfg.seed})"
        if init:
            src = f"checkpoint {init['init_from']}"
            if init.get("init_pack_sha256"):
                src = (
                    f"pack {init['init_from']} as it was then (graph sha256 "
                    f"{init['init_pack_sha256'][:12]}; its weights read back from the ONNX graph)"
                )
            origin = (
                f"trained from scratch with `rtns train` in stages: run {cfg.name!r} (seed "
                f"{cfg.seed}) fine-tuned this project's own {src}, itself trained from scratch"
            )
        sel = cfg.valid.select
        if cfg.valid.min_stoi_gain is not None:
            sel += f" among checkpoints with STOI >= input + {cfg.valid.min_stoi_gain:g}"
        chosen = f"best checkpoint by validation {sel}"
        if best.get("averaged"):
            a = best["averaged"]
            chosen = (
                f"weights: the mean of the {a['count']} checkpoints of steps "
                f"{a['steps'][0]}..{a['steps'][-1]} (validated as such)"
            )
            if a.get("files"):
                chosen = (
                    f"weights: the mean of {a['count']} checkpoints of different runs, "
                    + ", ".join(a["files"])
                    + " (validated as such; steps and time counted along the longest lineage)"
                )
        return Provenance(
            origin=origin,
            training_data=(
                f"speech {info['train_speech']}; noise {info['train_noise']}; online mixing, "
                f"{d.segment_seconds:g} s segments, SNR {d.snr_db[0]:g}..{d.snr_db[1]:g} dB, "
                f"level {d.level_dbfs[0]:g}..{d.level_dbfs[1]:g} dBFS, augmentation "
                + json.dumps(d.augment.model_dump())
            ),
            steps=int(best.get("step", self.state.step))
            + int((init or {}).get("init_steps") or (init or {}).get("init_step") or 0),
            losses=self._losses_text(),
            notes=(
                f"Adam lr {cfg.optim.lr:g}, clipnorm {cfg.optim.clipnorm}, batch {cfg.optim.batch}, "
                f"schedule {cfg.optim.schedule.kind}; {chosen} "
                f"({cfg.valid.items} fixed pairs of {cfg.valid.seconds:g} s, "
                f"PESQ and STOI on {cfg.valid.pesq_items})"
            ),
            model=cfg.model,
            validation={k: float(v) for k, v in best.get("valid", {}).items() if math.isfinite(v)},
            validation_input=best.get("valid_input") or getattr(self, "valid_input", None),
            train_minutes=round(stage_minutes, 1),
            # this stage plus every earlier stage the weights went through
            total_train_minutes=round(
                stage_minutes + float((init or {}).get("init_minutes") or 0), 1
            ),
            **({"init": init} if init else {}),
            **({"teacher": self.teacher.record()} if self.teacher is not None else {}),
            **(extra or {}),
        )

    def _losses_text(self) -> str:
        t = self.cfg.teacher
        if t is None:
            return self.loss_fn.describe()
        return (
            f"{1 - t.mix:g} x ({self.loss_fn.describe()}) against the clean speech + {t.mix:g} "
            f"x the same against the output of the pack {t.pack} (distillation)"
        )

    def export(
        self,
        out_dir: str | Path | None = None,
        *,
        name: str | None = None,
        which: str = "best",
        extra_provenance: dict[str, Any] | None = None,
        scores: dict[str, dict[str, float]] | None = None,
    ):
        """Export the best (or last) weights to a pack; returns (manifest, parity report)."""
        path = self.run_dir / f"{which}.pt"
        if which == "best" and not path.exists() and (self.run_dir / "last.pt").exists():
            raise SelectionError(
                f"{self.run_dir}: no checkpoint met the selection rule (valid.select="
                f"{self.cfg.valid.select!r}, min_stoi_gain={self.cfg.valid.min_stoi_gain}); "
                "see valid.csv, or export the last weights (--export-only --checkpoint last)"
            )
        if which == "average" and not path.exists():
            raise SelectionError(f"{path} does not exist: average first (rtns train --average K)")
        best: dict[str, Any] = {}
        if path.exists():
            ck = torch.load(path, map_location="cpu", weights_only=False)
            self.model.load_state_dict(ck["model"])
            best = (
                ck
                if which in ("best", "average")
                else {"step": ck["run"]["step"], "elapsed_s": ck["run"]["elapsed_s"]}
            )
        if best and "valid_input" not in best and not hasattr(self, "valid_input"):
            try:  # an older checkpoint: score the validation input for the provenance
                self.load_data()
            except DataError as e:
                self._log(f"validation input not scored for the provenance: {e}")
        model = self.model.to("cpu").eval()
        out = Path(out_dir or self.cfg.export.out_dir or self.run_dir / "pack")
        fam = get_family(self.cfg.family)
        manifest, parity = fam.export(
            model,
            out,
            name=name or self.cfg.export.name,
            provenance=self.provenance(best, extra_provenance),
            scores=scores,
        )
        # The parity check ran unlimited; the default limit is a property of the pack.
        lim = self.export_atten_lim(best)
        if lim is not None:
            manifest = manifest.model_copy(update={"atten_lim_db": lim})
            write_manifest(out, manifest)
        return manifest, parity

    def export_atten_lim(self, best: dict[str, Any]) -> float | None:
        """The default limit to write into the pack (None: unlimited)."""
        e = self.cfg.export
        if e.atten_lim == "auto":
            db = best.get("valid", {}).get("atten_lim_db", math.inf)
            return None if math.isinf(db) else float(db)
        return None if e.atten_lim is None else float(e.atten_lim)


def run_training(
    cfg: TrainConfig,
    *,
    threads: int | None = None,
    resume: bool = True,
    export: bool | None = None,
    progress: bool = True,
) -> tuple[Trainer, Any]:
    """Train (or resume) then, unless disabled or interrupted, export the best weights.
    Returns (trainer, (manifest, parity) or None)."""
    tr = Trainer(cfg, threads=threads, progress=progress)
    tr.fit(resume=resume)
    do_export = cfg.export.enabled if export is None else export
    if tr._stop:
        tr._log("interrupted: checkpoint saved; run the same command again to resume")
        return tr, None
    result = None
    if do_export:
        manifest, parity = tr.export()
        tr._log(
            f"exported {manifest.name} to {cfg.export.out_dir or tr.run_dir / 'pack'} "
            f"(parity max error {parity.max_abs_err:.2e})"
        )
        result = (manifest, parity)
    return tr, result


def read_valid_log(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of a run's valid.csv as floats (step, elapsed_s, loss, si_sdr, pesq, best)."""
    with (Path(run_dir) / "valid.csv").open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def best_within(rows: list[dict[str, float]], seconds: float, key: str) -> dict[str, float]:
    """The validation row with the highest ``key`` among rows at <= ``seconds`` of training."""
    cand = [
        r for r in rows if r["elapsed_s"] <= seconds + 1e-6 and math.isfinite(r.get(key, math.nan))
    ]
    if not cand:
        raise ValueError(f"no validation row within {seconds:.0f} s")
    return max(cand, key=lambda r: r[key])


def compare_runs(run_dirs: list[str | Path], key: str = "pesq") -> dict[str, Any]:
    """Compare runs at equal training time (the shortest run's last validation): for each,
    the best validation row (by ``key``) reached within that time, and the last row."""
    logs = {Path(d).name: read_valid_log(d) for d in run_dirs}
    budget = min(rows[-1]["elapsed_s"] for rows in logs.values())
    out: dict[str, Any] = {"equal_training_seconds": round(budget, 1), "select": key, "runs": {}}
    for name, rows in logs.items():
        best = best_within(rows, budget, key)
        out["runs"][name] = {
            "best_at_equal_time": {k: round(v, 4) for k, v in best.items() if k != "best"},
            "last": {k: round(v, 4) for k, v in rows[-1].items() if k != "best"},
        }
    out["winner"] = max(out["runs"], key=lambda n: out["runs"][n]["best_at_equal_time"][key])
    return out


def _record(ck: dict[str, Any]) -> dict[str, Any]:
    """Where a checkpoint keeps its step, time and init: a snapshot's or last.pt's "run",
    a selected record's (best.pt, average.pt) top level."""
    return ck["run"] if isinstance(ck.get("run"), dict) else ck


def _lineage(ck: dict[str, Any], _depth: int = 0) -> tuple[float, int]:
    """(minutes, steps) of training behind a checkpoint's weights, counted from scratch: its
    own run's time and steps up to it plus the lineage of the checkpoint its run started
    from (``init_from``), read again from that file, recursively, wherever it still exists
    (a record made when the file was read last is used only when it is gone: an older
    trainer recorded one stage back only)."""
    run = ck.get("run") or {}
    own_s = ck.get("elapsed_s", run.get("elapsed_s")) or 0.0
    own_steps = ck.get("step", run.get("step")) or 0
    init = ck.get("init") or run.get("init") or {}
    minutes, steps = init.get("init_minutes"), init.get("init_steps")
    src = Path(init["init_from"]) if init.get("init_from") else None
    if src is not None and src.is_file() and _depth < 32:
        minutes, steps = _lineage(
            torch.load(src, map_location="cpu", weights_only=False), _depth + 1
        )
    if steps is None:
        steps = init.get("init_step") or 0  # the stage before: its own steps at least
    return round(float(own_s) / 60 + float(minutes or 0.0), 2), int(own_steps) + int(steps)
