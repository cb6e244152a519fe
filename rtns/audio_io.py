"""Audio files in and out of the 16 kHz engine: reading, checks, resampling, writing.

Everything soundfile (libsndfile) reads is accepted, at any sample rate and channel count.
Samples travel as float32 [frames, channels]. Resampling uses soxr (linear-phase, delay
compensated), so a resampled signal stays time-aligned with the original. Bad input gives
one :class:`~rtns.errors.UserInputError` sentence naming the file. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtns.errors import UserInputError

#: Subtypes that store floating-point samples (no clipping at full scale).
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})


@dataclass(frozen=True)
class Audio:
    """A decoded file: ``samples`` float32 [frames, channels], plus what is needed to write
    a result in the same shape (rate, subtype, container format)."""

    samples: np.ndarray
    sample_rate: int
    subtype: str
    format: str

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.frames / self.sample_rate


def read_audio(path: str | Path) -> Audio:
    """Decode ``path``; raises UserInputError for a missing, unreadable or empty file, or one
    with NaN/Inf samples."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file")
    if not path.is_file():
        raise UserInputError(f"{path}: not a file")
    try:
        with sf.SoundFile(str(path)) as f:
            rate, subtype, fmt = int(f.samplerate), str(f.subtype), str(f.format)
            data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise UserInputError(f"{path}: not a readable audio file ({_first_line(e)})") from None
    except OSError as e:
        raise UserInputError(f"{path}: cannot read it ({e.strerror or e})") from None
    if data.shape[0] == 0:
        raise UserInputError(f"{path}: the file holds no samples")
    bad = ~np.isfinite(data)
    if bad.any():
        first = int(np.argmax(bad.any(axis=1)))
        raise UserInputError(
            f"{path}: {int(bad.sum())} samples are NaN or infinite "
            f"(first at {first / rate:.3f} s); refusing to process"
        )
    return Audio(samples=data, sample_rate=rate, subtype=subtype, format=fmt)


def resample(
    x: np.ndarray, rate_in: int, rate_out: int, frames_out: int | None = None
) -> np.ndarray:
    """Resample float32 [frames, channels] from ``rate_in`` to ``rate_out`` (soxr HQ).

    The result has ``round(frames * rate_out / rate_in)`` frames, or exactly ``frames_out``
    when given (trimmed or zero-padded at the end). Equal rates return the input unchanged.
    """
    import soxr

    if x.ndim != 2:
        raise ValueError(f"resample expects [frames, channels], got shape {x.shape}")
    channels = x.shape[1]
    if rate_in != rate_out:
        x = np.asarray(soxr.resample(x, rate_in, rate_out, quality="HQ"), dtype=np.float32)
        x = x.reshape(-1, channels)
    if frames_out is not None and x.shape[0] != frames_out:
        if x.shape[0] > frames_out:
            x = x[:frames_out]
        else:
            x = np.concatenate([x, np.zeros((frames_out - x.shape[0], channels), x.dtype)])
    return np.ascontiguousarray(x, dtype=np.float32)


def output_format(path: str | Path) -> str:
    """The libsndfile container for ``path``'s extension, or UserInputError."""
    import soundfile as sf

    ext = Path(path).suffix.lstrip(".").upper()
    aliases = {"AIF": "AIFF", "OGA": "OGG", "OPUS": "OGG"}
    fmt = aliases.get(ext, ext)
    if fmt not in sf.available_formats():
        known = ".wav, .flac, .ogg, .aiff, ..."
        raise UserInputError(
            f"{path}: unknown output file type {Path(path).suffix or '(no extension)'!r} "
            f"(use one of {known})"
        )
    return fmt


def output_subtype(in_subtype: str, out_format: str) -> str:
    """Keep the input's sample format where the output container supports it; otherwise keep
    its kind (float input -> FLOAT, 24/32-bit -> PCM_24, else the container default)."""
    import soundfile as sf

    def ok(sub: str) -> bool:
        return bool(sf.check_format(out_format, sub))

    if ok(in_subtype):
        return in_subtype
    prefer = {
        "DOUBLE": ("FLOAT", "PCM_24"),
        "FLOAT": ("FLOAT", "PCM_24"),
        "PCM_32": ("PCM_24",),
        "PCM_24": ("PCM_24",),
    }.get(in_subtype, ())
    for sub in prefer:
        if ok(sub):
            return sub
    return str(sf.default_subtype(out_format))


def check_output_path(path: str | Path) -> Path:
    """Refuse an output path whose folder does not exist or which is a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder; give an output file name")
    if not path.parent.is_dir():
        raise UserInputError(f"{path.parent}: output folder does not exist")
    output_format(path)
    return path


@dataclass(frozen=True)
class WriteReport:
    """What :func:`write_audio` had to do: clipped sample count and the peak before it."""

    subtype: str
    clipped: int
    peak: float


def write_audio(
    path: str | Path, samples: np.ndarray, sample_rate: int, subtype: str | None = None
) -> WriteReport:
    """Write float32 [frames, channels] to ``path`` (format from the extension).

    Integer and lossy subtypes cannot hold |x| > 1: such samples are clipped to full scale
    and counted in the report (the caller warns); float subtypes are written as they are.
    """
    import soundfile as sf

    path = check_output_path(path)
    fmt = output_format(path)
    sub = subtype if subtype and sf.check_format(fmt, subtype) else str(sf.default_subtype(fmt))
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    clipped = 0
    if sub not in FLOAT_SUBTYPES and peak > 1.0:
        clipped = int(np.count_nonzero(np.abs(samples) > 1.0))
        samples = np.clip(samples, -1.0, 1.0)
    try:
        sf.write(str(path), samples, sample_rate, subtype=sub, format=fmt)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as e:
        raise UserInputError(f"{path}: cannot write it ({_first_line(e)})") from None
    return WriteReport(subtype=sub, clipped=clipped, peak=peak)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
