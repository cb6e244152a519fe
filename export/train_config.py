"""The training configuration (``rtns train --config FILE``), validated with pydantic.

A JSON file (see ``configs/``) with the sections below; unknown keys are refused so that a
typo does not silently fall back to a default. Relative paths are taken relative to the
current working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rtns.atten import MAX_DB
from rtns.errors import first_validation_error

Range = tuple[float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ordered(r: Range, what: str) -> Range:
    if r[0] > r[1]:
        raise ValueError(f"{what} range must be (low, high), got {r}")
    return r


class AugmentConfig(_Strict):
    """Synthetic additions for what the data lacks; each switchable.

    The noise of a pair is a real noise file, babble or coloured noise (probabilities below,
    the rest real noise); hum and clicks are then added to it with their own probabilities.
    """

    babble: bool = True
    babble_prob: float = Field(0.15, ge=0, le=1)
    babble_talkers: tuple[int, int] = (3, 8)
    colored: bool = True
    colored_prob: float = Field(0.1, ge=0, le=1)
    hum: bool = True
    hum_prob: float = Field(0.1, ge=0, le=1)
    clicks: bool = True
    clicks_prob: float = Field(0.1, ge=0, le=1)
    eq: bool = True
    eq_prob: float = Field(0.3, ge=0, le=1)
    gain_sweep: bool = True
    gain_sweep_prob: float = Field(0.2, ge=0, le=1)
    gain_sweep_db: float = Field(12.0, ge=0)
    #: Speed perturbation of the speech (tempo and pitch, by resampling), factor drawn
    #: uniformly from ``speed_range``.
    speed: bool = False
    speed_prob: float = Field(0.5, ge=0, le=1)
    speed_range: tuple[float, float] = (0.9, 1.1)
    #: Room reverberation: the speech is convolved with one of ``rir_count`` image-method RIRs
    #: (generated once with ``rir_seed``, RT60 drawn from ``rt60``, cached in the data cache);
    #: the training target is the speech convolved with the direct path and the reflections
    #: of the first ``early_ms`` only.
    reverb: bool = False
    reverb_prob: float = Field(0.3, ge=0, le=1)
    rir_count: int = Field(200, ge=1)
    rir_seed: int = 7
    rt60: tuple[float, float] = (0.2, 0.8)
    early_ms: float = Field(50.0, ge=0, le=200)
    #: Layered scenes (a cafe is babble plus clatter, an office a fan plus keys): with
    #: ``layer_prob`` a second, independently drawn noise (file, babble or coloured, by the
    #: probabilities above) is added to the first at ``layer_db`` relative to it.
    layer: bool = False
    layer_prob: float = Field(0.3, ge=0, le=1)
    layer_db: tuple[float, float] = (-10.0, 5.0)

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        lo, hi = self.babble_talkers
        if not 1 <= lo <= hi <= 11:
            raise ValueError("babble_talkers must be (low, high) with 1 <= low <= high <= 11")
        if self.babble * self.babble_prob + self.colored * self.colored_prob > 1:
            raise ValueError("babble_prob + colored_prob must not exceed 1")
        if not 0.5 <= self.speed_range[0] <= self.speed_range[1] <= 2.0:
            raise ValueError("speed_range must be (low, high) within 0.5..2")
        if not 0.05 <= self.rt60[0] <= self.rt60[1] <= 2.0:
            raise ValueError("rt60 must be (low, high) within 0.05..2 s")
        if not -40 <= self.layer_db[0] <= self.layer_db[1] <= 20:
            raise ValueError("layer_db must be (low, high) within -40..20 dB")
        return self

    def disabled(self) -> AugmentConfig:
        return self.model_copy(
            update={
                k: False
                for k in (
                    "babble",
                    "colored",
                    "hum",
                    "clicks",
                    "eq",
                    "gain_sweep",
                    "speed",
                    "reverb",
                    "layer",
                )
            }
        )


class DataConfig(_Strict):
    train_speech: str = "../shared/data/train/speech"
    train_noise: str = "../shared/data/train/noise"
    valid_speech: str = "../shared/data/valid/speech"
    valid_noise: str = "../shared/data/valid/noise"
    cache_dir: str = "cache/audio"
    segment_seconds: float = Field(4.0, gt=0.1, le=60)
    snr_db: Range = (-5.0, 25.0)
    level_dbfs: Range = (-35.0, -15.0)
    augment: AugmentConfig = AugmentConfig()
    #: Validation noise held out of the training noise: the last ``holdout_fraction`` of every
    #: file under ``train_noise``/``holdout_subdir`` is cut from training and serves as the
    #: "urban" validation noise (used only when ``valid.kinds`` names "urban").
    holdout_subdir: str = "street"
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    #: Worker processes that mix batches ahead of the trainer (0: mix in the training loop).
    #: With workers the batches are not the ones a resumed run would draw (each start seeds
    #: the workers afresh), so a resumed run no longer reaches the same weights bit for bit.
    workers: int = Field(0, ge=0, le=64)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        _ordered(self.snr_db, "snr_db")
        _ordered(self.level_dbfs, "level_dbfs")
        if self.level_dbfs[1] > 0:
            raise ValueError("level_dbfs must be <= 0 dBFS")
        return self


class LossTerm(_Strict):
    name: Literal["mse", "spectral_mse", "sisnr", "neg_snr", "lms", "pmsqe", "cc_mse", "cmag_mse"]
    weight: float = 1.0


class ScheduleConfig(_Strict):
    """``constant``; ``cosine`` (to lr*min_factor at ``steps``, after ``warmup`` steps);
    ``cosine_time`` (the same over the training time ``optim.max_minutes``: for runs bounded
    by time, whose step count is not known in advance); ``plateau`` (lr *= factor after
    ``patience`` validations without a new best)."""

    kind: Literal["constant", "cosine", "cosine_time", "plateau"] = "constant"
    warmup: int = Field(0, ge=0)
    min_factor: float = Field(0.05, gt=0, le=1)
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(3, ge=1)


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    clipnorm: float | None = Field(3.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch: int = Field(16, ge=1)
    steps: int = Field(10_000, ge=1)
    #: Also stop (cleanly, with export) after this much training wall time.
    max_minutes: float | None = Field(None, gt=0)
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _time_schedule_needs_a_budget(self) -> OptimConfig:
        if self.schedule.kind == "cosine_time" and not self.max_minutes:
            raise ValueError("schedule cosine_time needs optim.max_minutes")
        return self


class ValidConfig(_Strict):
    items: int = Field(48, ge=1)
    seconds: float = Field(6.0, gt=0.5)
    #: PESQ-WB on the first this-many items (slow metric).
    pesq_items: int = Field(16, ge=0)
    every_steps: int = Field(200, ge=1)
    #: The metric that picks the best checkpoint.
    select: Literal["pesq", "si_sdr", "stoi"] = "pesq"
    #: If set, a checkpoint can only become "best" when its validation STOI is at least the
    #: unprocessed input's STOI plus this margin (an enhancer must not cost intelligibility).
    min_stoi_gain: float | None = None
    seed: int = 1234
    #: Noise of the validation pairs, item k gets ``kinds[k % len(kinds)]``: "file" (the
    #: validation noise folder), "colored" (stationary 1/f^a noise), "babble" (other
    #: validation utterances), "urban" (the held-out street noise, see
    #: ``data.holdout_subdir``). None: all "file" (the original validation set).
    kinds: list[Literal["file", "colored", "babble", "urban"]] | None = None


class ExportConfig(_Strict):
    name: str = Field("rtns-dtln", pattern=r"^[A-Za-z0-9_.-]+$")
    #: Pack folder; default <out_dir>/pack.
    out_dir: str | None = None
    enabled: bool = True
    #: The pack's default attenuation limit in dB (``Manifest.atten_lim_db``): a number, None
    #: (unlimited), or "auto": every validation scores the model unlimited and at each limit
    #: of ``atten_lim_grid``, and keeps the one with the best ``valid.select`` among those
    #: whose STOI is at least the input's (plus ``valid.min_stoi_gain``). Validation scores,
    #: checkpoint selection and the exported pack all use the chosen limit.
    atten_lim: Annotated[float, Field(ge=0, le=MAX_DB)] | Literal["auto"] | None = None
    atten_lim_grid: list[Annotated[float, Field(ge=0, le=MAX_DB)]] = [30, 24, 18, 15, 12]


class MetricDiscConfig(_Strict):
    """A metric discriminator trained beside the generator (:mod:`rtns_export.metric_disc`,
    MetricGAN+ style): it learns the batch's true PESQ-WB; the generator's loss gains
    ``weight * (D(enhanced, clean) - 1)^2``."""

    weight: float = Field(1.0, gt=0)
    lr: float = Field(5e-4, gt=0)
    channels: int = Field(16, ge=4, le=64)
    #: Also train it on (noisy, clean) -> the input's PESQ (MetricGAN+).
    noisy: bool = True


class TeacherConfig(_Strict):
    """Distillation (:mod:`rtns_export.distill`): a shipped pack teaches the model; each
    step's loss is ``(1 - mix) * L(y, clean) + mix * L(y, teacher(noisy))``."""

    #: A pack folder of a complex-mask family (its weights are read back from the graph and
    #: checked through the engine before training starts).
    pack: str
    mix: float = Field(0.5, gt=0, le=1)
    #: Training batches that calibrate the batch norms the pack's export folded.
    calibration_batches: int = Field(8, ge=1, le=64)


class TrainConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    family: str = "dtln"
    #: Passed to the family's builder (e.g. DTLN: hidden, layers, encoder, dropout, norm).
    model: dict[str, Any] = {}
    data: DataConfig = DataConfig()
    losses: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="sisnr")], min_length=1)
    #: A metric-discriminator stage (None: none).
    metric_disc: MetricDiscConfig | None = None
    #: Distillation from a shipped pack (None: none).
    teacher: TeacherConfig | None = None
    optim: OptimConfig = OptimConfig()
    valid: ValidConfig = ValidConfig()
    export: ExportConfig = ExportConfig()
    seed: int = 0
    #: Start from the model weights of this checkpoint (``best.pt`` or ``last.pt`` of an
    #: earlier run) with a fresh optimizer and schedule: a fine-tuning stage. Ignored when the
    #: run resumes from its own ``last.pt``. A pack folder (``models/rtns-gtcrn``) of a
    #: complex-mask family works too: its ONNX weights are read back
    #: (:mod:`rtns_export.pack_import`) and checked against the pack through the engine.
    init_from: str | None = None
    out_dir: str = "runs"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    #: Also keep the model weights of every checkpoint in ``<run>/snapshots/`` (about the
    #: size of the model each), for ``rtns train --average K``: the mean of the last K.
    snapshots: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


class ConfigError(ValueError):
    """A training config that cannot be used; one sentence."""


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a JSON training config; ``overrides`` maps dotted keys to values."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"training config {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"training config {p} is not valid JSON: {e}") from None
    for key, value in (overrides or {}).items():
        d = raw
        *parents, last = key.split(".")
        for k in parents:
            d = d.setdefault(k, {})
        d[last] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        where, msg = first_validation_error(e)
        raise ConfigError(f"training config {p}: {where}: {msg}") from None
