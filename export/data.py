"""Training data: audio folders loaded once into RAM, and an online noisy-speech mixer.

Folders of clean speech and of noise (wav/flac/ogg, any sample rate, searched recursively)
are decoded, mixed to mono, resampled to 16 kHz once and cached as ``.npy`` files keyed by
path, size and mtime (see :func:`load_folder`). :class:`Mixer` then draws training pairs
the way the DNS-Challenge synthesizer does, but online: a random speech segment of a few
seconds, a noise segment from a different file (or a synthetic noise, see
:mod:`rtns_export.augment`), an SNR drawn from a range (active-speech level against noise
level), an output level drawn from a range (RMS of the mix in dBFS). A mix that would clip
is scaled down (clean and noisy together) and counted in :attr:`Mixer.stats` - never
clipped.

Everything is numpy and deterministic for a given ``numpy.random.Generator`` state.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtns.framing import SAMPLE_RATE
from rtns_export import augment
from rtns_export.train_config import DataConfig

AUDIO_EXT = (".wav", ".flac", ".ogg")
#: Peak limit of a mix; above it the pair is scaled down.
PEAK = 0.99
EPS = 1e-10


class DataError(RuntimeError):
    """Bad data folders (missing, empty, unreadable); one sentence."""


def list_audio(folder: str | Path) -> list[Path]:
    """All audio files under folder (recursive), sorted for determinism."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"audio folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXT and p.is_file())
    if not files:
        raise DataError(f"no audio files (wav/flac/ogg) under {root}")
    return files


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode one file to mono float32 [n] at sample_rate."""
    import soundfile as sf

    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types
        raise DataError(f"cannot read audio file {path}: {e}") from None
    x = x.mean(axis=1)
    if sr != sample_rate:
        import soxr

        x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def _cache_key(path: Path, sample_rate: int) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sample_rate}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def load_folder(
    folder: str | Path,
    cache_dir: str | Path | None = "cache/audio",
    min_seconds: float = 0.5,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[list[np.ndarray], list[str]]:
    """Load every audio file under folder as float32 [n] at 16 kHz (cached as .npy).

    Files shorter than ``min_seconds`` or all-zero are skipped. Returns (arrays, names)
    where names are paths relative to folder.
    """
    root = Path(folder)
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    arrays, names = [], []
    for p in list_audio(root):
        x = None
        if cache:
            c = cache / f"{_cache_key(p, sample_rate)}.npy"
            if c.exists():
                x = np.load(c)
            else:
                x = read_audio(p, sample_rate)
                # one temporary name per process: two runs sharing a cache may decode the
                # same file at once, and the rename makes whichever finishes last win whole
                tmp = c.with_name(f"{c.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, x)
                tmp.replace(c)
        else:
            x = read_audio(p, sample_rate)
        if x.shape[0] < min_seconds * sample_rate or not np.any(x):
            continue
        arrays.append(x)
        names.append(str(p.relative_to(root)))
    if not arrays:
        raise DataError(f"no usable audio (>= {min_seconds} s, not silent) under {root}")
    return arrays, names


def active_rms(x: np.ndarray, frame: int = 320, floor_db: float = -40.0) -> float:
    """RMS over the frames no more than ``-floor_db`` dB below the loudest frame (the
    speech-active part, DNS-synthesizer style); plain RMS for signals shorter than a frame."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0] // frame
    if n < 1:
        return float(np.sqrt(np.mean(x**2) + EPS))
    e = np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1)
    keep = e >= e.max() * 10 ** (floor_db / 10)
    return float(np.sqrt(np.mean(e[keep]) + EPS))


def random_segment(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random n-sample excerpt of x; shorter signals are zero-padded at a random offset."""
    if x.shape[0] >= n:
        start = int(rng.integers(0, x.shape[0] - n + 1))
        return x[start : start + n].astype(np.float32, copy=True)
    out = np.zeros(n, dtype=np.float32)
    start = int(rng.integers(0, n - x.shape[0] + 1))
    out[start : start + x.shape[0]] = x
    return out


def looped_segment(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random n-sample excerpt of x, repeated (from a random phase) when x is shorter:
    noise should cover the whole segment."""
    if x.shape[0] >= n:
        return random_segment(x, n, rng)
    reps = int(np.ceil(n / x.shape[0])) + 1
    tiled = np.tile(x, reps)
    start = int(rng.integers(0, x.shape[0]))
    return tiled[start : start + n].astype(np.float32, copy=True)


@dataclass
class MixStats:
    mixes: int = 0
    rescaled_to_avoid_clipping: int = 0
    sources: dict[str, int] = field(default_factory=dict)


def mix_at(
    clean: np.ndarray,
    noise: np.ndarray,
    snr_db: float,
    level_dbfs: float,
    observed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Scale noise to snr_db below the active level of clean, then scale the pair so that the
    mix has RMS level_dbfs; if its peak would exceed 0.99 scale both down instead of
    clipping. Returns (clean, noisy, rescaled) float32 [n].

    ``observed``: the speech as the microphone hears it when it differs from the target
    ``clean`` (reverberant speech with an early-reverberation target): the noisy mix is
    ``observed + noise`` and the SNR is measured against ``observed``."""
    speech = clean if observed is None else observed
    s_rms = active_rms(speech)
    n_rms = active_rms(noise)
    noise = noise * (s_rms / (n_rms + EPS)) * 10 ** (-snr_db / 20)
    noisy = speech + noise
    rms = float(np.sqrt(np.mean(noisy.astype(np.float64) ** 2)) + EPS)
    g = 10 ** (level_dbfs / 20) / rms
    peak = float(np.max(np.abs(noisy))) * g
    rescaled = peak > PEAK
    if rescaled:
        g *= PEAK / peak
    return (clean * g).astype(np.float32), (noisy * g).astype(np.float32), rescaled


class Mixer:
    """Draws (clean, noisy) training pairs from speech and noise arrays held in RAM.

    Speech and noise always come from different files (the noise pool never holds speech
    files; babble excludes the utterance it is mixed with).
    """

    def __init__(
        self,
        speech: Sequence[np.ndarray],
        noise: Sequence[np.ndarray],
        cfg: DataConfig,
        rng: np.random.Generator,
    ) -> None:
        if len(speech) < 2 or not noise:
            raise DataError("the mixer needs at least 2 speech files and 1 noise file")
        self.speech = list(speech)
        self.noise = list(noise)
        self.cfg = cfg
        self.rng = rng
        self.stats = MixStats()
        a = cfg.augment
        #: Image-method RIRs (generated once, cached with the audio) when reverb is on.
        self.rirs: list[np.ndarray] = (
            augment.rir_bank(a.rir_count, a.rir_seed, a.rt60, cfg.cache_dir) if a.reverb else []
        )
        #: Extra noise pools for forced noise kinds (validation), e.g. {"urban": [...]}.
        self.pools: dict[str, list[np.ndarray]] = {}

    @property
    def seg_len(self) -> int:
        return int(round(self.cfg.segment_seconds * SAMPLE_RATE))

    def _noise(self, n: int, speech_idx: int, kind: str | None = None) -> np.ndarray:
        """The noise [n] of one pair: a source of ``kind`` (drawn when None), layered with a
        second source when that augmentation fires, then hum and clicks."""
        rng, a = self.rng, self.cfg.augment
        noise = self._source(n, speech_idx, kind)
        if a.layer and rng.random() < a.layer_prob:
            second = self._source(n, speech_idx, None)
            noise = augment.layer(noise, second, float(rng.uniform(*a.layer_db)))
            self.stats.sources["layered"] = self.stats.sources.get("layered", 0) + 1
        return augment.add_extras(noise, a, rng)

    def _source(self, n: int, speech_idx: int, kind: str | None) -> np.ndarray:
        rng, a = self.rng, self.cfg.augment
        if kind is None:
            kind = augment.choose_noise_kind(a, rng)
        self.stats.sources[kind] = self.stats.sources.get(kind, 0) + 1
        if kind == "babble":
            pool = rng.choice(len(self.speech), min(12, len(self.speech)), replace=False)
            others = [int(i) for i in pool if i != speech_idx]
            k = int(rng.integers(a.babble_talkers[0], a.babble_talkers[1] + 1))
            talkers = [random_segment(self.speech[i], n, rng) for i in others[:k]]
            noise = augment.babble(talkers, rng)
        elif kind == "colored":
            noise = augment.colored_noise(n, rng)
        elif kind in self.pools:
            pool = self.pools[kind]
            noise = looped_segment(pool[int(rng.integers(len(pool)))], n, rng)
        else:
            noise = looped_segment(self.noise[int(rng.integers(len(self.noise)))], n, rng)
        return noise

    def _speech(self, i: int, n: int) -> np.ndarray:
        """An n-sample excerpt of utterance i, speed-perturbed when that augmentation fires."""
        rng, a = self.rng, self.cfg.augment
        if a.speed and rng.random() < a.speed_prob:
            f = float(rng.uniform(*a.speed_range))
            seg = random_segment(self.speech[i], int(np.ceil(n * f)) + 64, rng)
            out = augment.speed_perturb(seg, f)[:n]
            if out.shape[0] < n:
                out = np.pad(out, (0, n - out.shape[0]))
            return out
        return random_segment(self.speech[i], n, rng)

    def sample(self, noise_kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One pair (clean [n], noisy [n]) float32, n = segment length. ``noise_kind`` forces
        the noise source ("file", "colored", "babble" or a key of :attr:`pools`)."""
        rng, cfg, n = self.rng, self.cfg, self.seg_len
        for _ in range(10):  # avoid (nearly) silent speech excerpts
            i = int(rng.integers(len(self.speech)))
            clean = self._speech(i, n)
            if np.mean(clean.astype(np.float64) ** 2) > 1e-8:
                break
        noise = self._noise(n, i, noise_kind)
        if cfg.augment.eq:
            if rng.random() < cfg.augment.eq_prob:
                clean = augment.random_eq(clean, rng)
            if rng.random() < cfg.augment.eq_prob:
                noise = augment.random_eq(noise, rng)
        if cfg.augment.gain_sweep and rng.random() < cfg.augment.gain_sweep_prob:
            clean = augment.gain_sweep(clean, rng, cfg.augment.gain_sweep_db)
        if cfg.augment.gain_sweep and rng.random() < cfg.augment.gain_sweep_prob:
            noise = augment.gain_sweep(noise, rng, cfg.augment.gain_sweep_db)
        observed = None
        if self.rirs and rng.random() < cfg.augment.reverb_prob:
            h = self.rirs[int(rng.integers(len(self.rirs)))]
            observed, clean = augment.reverberate(clean, h, cfg.augment.early_ms)
            self.stats.sources["reverb"] = self.stats.sources.get("reverb", 0) + 1
        snr = float(rng.uniform(*cfg.snr_db))
        level = float(rng.uniform(*cfg.level_dbfs))
        clean, noisy, rescaled = mix_at(clean, noise, snr, level, observed)
        self.stats.mixes += 1
        self.stats.rescaled_to_avoid_clipping += int(rescaled)
        return clean, noisy

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(clean [B, n], noisy [B, n]) float32."""
        pairs = [self.sample() for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _feed(
    speech: Sequence[np.ndarray],
    noise: Sequence[np.ndarray],
    cfg: DataConfig,
    seed: Sequence[int],
    size: int,
    k: int,
    slots: np.ndarray,
    free,
    ready,
    parent: int,
) -> None:
    """Feeder process k: mix a batch into a free slot of its shared ``slots`` [depth, 2, B, n]
    and announce (k, slot) on ``ready``, until the parent goes."""
    import os
    import queue as queue_mod
    import signal

    # forked from a trainer whose handlers only set a flag: stop on SIGTERM, leave Ctrl-C
    # (sent to the whole foreground group) to the trainer, which then closes the feeder
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mixer = Mixer(speech, noise, cfg, np.random.default_rng(list(seed)))
    while True:
        clean, noisy = mixer.batch(size)
        while True:
            if os.getppid() != parent:
                return
            try:
                slot = free.get(timeout=1.0)
                break
            except queue_mod.Empty:
                continue
        slots[slot, 0] = clean
        slots[slot, 1] = noisy
        ready.put((k, slot))


class BatchFeeder:
    """Training batches mixed ahead by ``workers`` forked processes, each a :class:`Mixer`
    of its own seeded with ``(seed, start_step, k)``: a run restarted at another step draws
    other batches. The batches travel through shared memory, the queues carry only slot
    numbers (writes of a few bytes, whole even when a worker dies in them), so a killed
    worker cannot leave half a message: ``batch()`` raises :class:`DataError` instead."""

    def __init__(
        self,
        speech: Sequence[np.ndarray],
        noise: Sequence[np.ndarray],
        cfg: DataConfig,
        *,
        seed: int,
        start_step: int,
        size: int,
        workers: int,
        depth: int = 3,
    ) -> None:
        import multiprocessing as mp
        import os

        if workers < 1:
            raise ValueError("BatchFeeder needs at least one worker")
        ctx = mp.get_context("fork")  # the arrays are inherited, not pickled
        n = int(round(cfg.segment_seconds * SAMPLE_RATE))
        shape = (depth, 2, size, n)
        self.ready = ctx.Queue()
        self.free, self.slots, self.procs = [], [], []
        for k in range(workers):
            raw = ctx.RawArray("f", int(np.prod(shape)))
            slots = np.frombuffer(raw, dtype=np.float32).reshape(shape)
            free = ctx.Queue()
            for i in range(depth):
                free.put(i)
            self.free.append(free)
            self.slots.append(slots)
            self.procs.append(
                ctx.Process(
                    target=_feed,
                    args=(
                        speech,
                        noise,
                        cfg,
                        (seed, start_step, k),
                        size,
                        k,
                        slots,
                        free,
                        self.ready,
                        os.getpid(),
                    ),
                    daemon=True,
                    name=f"rtns-feeder-{k}",
                )
            )
        for p in self.procs:
            p.start()

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next ready batch (clean [B, n], noisy [B, n]) float32, copied out."""
        import queue as queue_mod

        while True:
            try:
                k, slot = self.ready.get(timeout=1.0)
                break
            except queue_mod.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise DataError(
                        f"data worker {dead[0].name} exited (code {dead[0].exitcode})"
                    ) from None
        clean, noisy = self.slots[k][slot, 0].copy(), self.slots[k][slot, 1].copy()
        self.free[k].put(slot)
        return clean, noisy

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in (self.ready, *self.free):
            q.close()
            q.cancel_join_thread()


def validation_set(
    speech: Sequence[np.ndarray],
    noise: Sequence[np.ndarray],
    cfg: DataConfig,
    items: int,
    seconds: float,
    seed: int,
    kinds: Sequence[str] | None = None,
    urban: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed validation set: ``items`` pairs of ``seconds`` s drawn with a fixed seed from
    the validation folders, same SNR and level ranges as training, no augmentation of the
    speech. Without ``kinds``: real noise of the validation folder only. With ``kinds``,
    item k's noise is ``kinds[k % len(kinds)]``: "file", "colored" (stationary 1/f^a),
    "babble" (other validation utterances) or "urban" (from ``urban``, held-out noise).
    Returns (clean [items, n], noisy [items, n])."""
    vcfg = cfg.model_copy(
        update={"segment_seconds": seconds, "augment": cfg.augment.disabled()}, deep=True
    )
    mixer = Mixer(speech, noise, vcfg, np.random.default_rng(seed))
    if not kinds:
        return mixer.batch(items)
    if "urban" in kinds:
        if not urban:
            raise DataError("validation kind 'urban' needs held-out urban noise")
        mixer.pools["urban"] = list(urban)
    pairs = [mixer.sample(kinds[k % len(kinds)]) for k in range(items)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def split_holdout(
    arrays: Sequence[np.ndarray], names: Sequence[str], subdir: str, fraction: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut the last ``fraction`` of every file under ``subdir/`` (names relative to the
    loaded folder) off for validation: returns (training arrays with those files shortened,
    held-out tails). Other files pass unchanged."""
    train, held = [], []
    prefix = subdir.rstrip("/") + "/"
    for a, name in zip(arrays, names, strict=True):
        if name.startswith(prefix):
            cut = int(round(a.shape[0] * (1 - fraction)))
            train.append(a[:cut])
            held.append(a[cut:])
        else:
            train.append(a)
    if not held:
        raise DataError(f"no training noise under {subdir!r} to hold out for validation")
    return train, held


def fingerprint(names: Sequence[str], arrays: Sequence[np.ndarray]) -> str:
    """A short hash of a loaded folder (names and lengths), for provenance."""
    h = hashlib.sha1(
        json.dumps([[n, int(a.shape[0])] for n, a in zip(names, arrays, strict=False)]).encode()
    )
    return h.hexdigest()[:12]


class TestsetError(DataError):
    """make-testset cannot run with these arguments; one sentence."""


def _load_folders(
    dirs: Path | str | Sequence[Path | str], side: str
) -> list[tuple[Path, list[np.ndarray], list[str]]]:
    """(folder, arrays, names) of each folder of ``dirs`` (one folder or several)."""
    folders = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
    if not folders:
        raise TestsetError(f"make-testset needs at least one {side} folder")
    if len(set(f.resolve() for f in folders)) != len(folders):
        raise TestsetError(f"a {side} folder is given twice")
    return [(f, *load_folder(f, cache_dir=None)) for f in folders]


def make_testset(
    clean_dir: Path | Sequence[Path],
    noise_dir: Path | Sequence[Path],
    out_dir: Path,
    *,
    count: int = 50,
    snr_db: tuple[float, float] = (-5.0, 20.0),
    level_dbfs: tuple[float, float] = (-35.0, -15.0),
    max_seconds: float = 10.0,
    seed: int = 0,
) -> int:
    """Write a fixed paired test set: ``out/clean/NAME.wav`` and ``out/noisy/NAME.wav``
    (16 kHz, 16-bit) with equal names, plus ``out/mixes.csv`` (name, clean folder and file,
    noise folder and file, snr_db, level_dbfs, rescaled; files relative to their folder).
    ``clean_dir`` and ``noise_dir`` are one folder or several. Utterances of all clean
    folders are pooled and taken in a seeded random order (each once while there are
    enough), cropped to ``max_seconds`` from the start; each gets a noise excerpt from a
    random file at an SNR and level drawn uniformly from the ranges. With several noise
    folders, each pair first draws a folder (uniformly, so every folder is equally likely
    whatever its number of files), then a file in it. No audio is cached. Returns the
    number of pairs."""
    import csv

    import soundfile as sf

    if count < 1:
        raise TestsetError("--count must be at least 1")
    if snr_db[0] > snr_db[1] or level_dbfs[0] > level_dbfs[1] or level_dbfs[1] > 0:
        raise TestsetError("--snr and --level take LOW HIGH (level at most 0 dBFS)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TestsetError(f"output folder {out_dir} is not empty")
    speech = [
        (folder, a, n)
        for folder, arrays, names in _load_folders(clean_dir, "clean")
        for a, n in zip(arrays, names, strict=True)
    ]
    noises = _load_folders(noise_dir, "noise")
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(len(speech)) for _ in range(int(np.ceil(count / len(speech))))]
    )[:count]
    (out_dir / "clean").mkdir(parents=True, exist_ok=True)
    (out_dir / "noisy").mkdir(parents=True, exist_ok=True)
    with (out_dir / "mixes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["name", "clean_dir", "clean_file", "noise_dir", "noise_file"]
            + ["snr_db", "level_dbfs", "rescaled"]
        )
        for k, i in enumerate(order):
            cdir, speech_i, sname = speech[i]
            clean = speech_i[: int(max_seconds * SAMPLE_RATE)]
            # one folder: the draws of the single-folder version, so old sets reproduce
            d = int(rng.integers(len(noises))) if len(noises) > 1 else 0
            ndir, noise, nnames = noises[d]
            j = int(rng.integers(len(noise)))
            nz = looped_segment(noise[j], clean.shape[0], rng)
            snr = float(rng.uniform(*snr_db))
            level = float(rng.uniform(*level_dbfs))
            c, y, rescaled = mix_at(clean, nz, snr, level)
            name = f"{k:04d}_{Path(sname).stem}.wav"
            sf.write(str(out_dir / "clean" / name), c, SAMPLE_RATE, subtype="PCM_16")
            sf.write(str(out_dir / "noisy" / name), y, SAMPLE_RATE, subtype="PCM_16")
            w.writerow(
                [name, str(cdir), sname, str(ndir), nnames[j]]
                + [f"{snr:.2f}", f"{level:.2f}", int(rescaled)]
            )
    return count
