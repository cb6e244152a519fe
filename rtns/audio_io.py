"""Audio files in and out of the 16 kHz engine: reading, checks, resampling, writing.

Everything soundfile (libsndfile) reads is accepted, at any sample rate and channel count.
Samples travel as float32 [frames, channels] at the file's own rate (rate changes happen in
:class:`rtns.streams.ChannelStream`). Results are written safely: checked against the
container before processing (:func:`plan_output`), then written to a temporary file beside
the target and renamed over it. Bad input gives one :class:`~rtns.errors.UserInputError`
sentence naming the file. No torch here.
"""

from __future__ import annotations

import os
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


#: Subtypes that are lossy codecs: they are kept only in their own container.
LOSSY_SUBTYPES = frozenset({"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "VORBIS", "OPUS"})
#: Extensions that name a codec as well as a container.
_EXT_FORMATS = {"AIF": ("AIFF", None), "OGA": ("OGG", None), "OPUS": ("OGG", "OPUS")}
#: What libsndfile cannot write, said plainly (checked before processing).
_LIMITS = {"FLAC": 8, "MP3": 2}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def output_format(path: str | Path) -> str:
    """The libsndfile container for ``path``'s extension, or UserInputError."""
    import soundfile as sf

    ext = Path(path).suffix.lstrip(".").upper()
    fmt = _EXT_FORMATS.get(ext, (ext, None))[0]
    if not ext or fmt not in sf.available_formats():
        raise UserInputError(
            f"{path}: unknown output file type {Path(path).suffix or '(no extension)'!r} "
            "(use .wav, .flac, .ogg, .opus, .mp3, .aiff, ...)"
        )
    return fmt


def output_subtype(in_subtype: str, out_format: str) -> str:
    """Keep the input's sample format where the output container can write it; otherwise
    keep its kind (float input -> FLOAT, 24/32-bit -> PCM_24, else the container default).
    A lossy codec (mp3, Vorbis, Opus) is kept only in a container of its own kind."""
    return _subtype_candidates(in_subtype, out_format)[0]


def _subtype_candidates(in_subtype: str | None, out_format: str) -> list[str]:
    import soundfile as sf

    def ok(sub: str) -> bool:
        return bool(sf.check_format(out_format, sub))

    want: list[str] = []
    if in_subtype and ok(in_subtype):
        lossy_home = {"VORBIS": "OGG", "OPUS": "OGG", "MPEG_LAYER_III": "MP3"}
        if in_subtype not in LOSSY_SUBTYPES or lossy_home.get(in_subtype) == out_format:
            want.append(in_subtype)
    want += {
        "DOUBLE": ["FLOAT", "PCM_24"],
        "FLOAT": ["FLOAT", "PCM_24"],
        "PCM_32": ["PCM_24"],
        "PCM_24": ["PCM_24"],
    }.get(in_subtype or "", [])
    want.append(str(sf.default_subtype(out_format)))
    return [s for s in dict.fromkeys(want) if ok(s)]


@dataclass(frozen=True)
class OutputPlan:
    """Where and how a result will be written, checked before any processing."""

    path: Path
    format: str
    subtype: str
    channels: int
    sample_rate: int


def _encode(fmt: str, sub: str, samples: np.ndarray, rate: int) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, subtype=sub, format=fmt)
    return buf.getvalue()


def plan_output(
    path: str | Path, channels: int, sample_rate: int, in_subtype: str | None = None
) -> OutputPlan:
    """Check that ``path`` can receive ``channels`` channels at ``sample_rate`` before any
    work is done: extension, container limits, the subtype (the input's where possible), and
    that the folder is writable. Raises UserInputError with the reason."""
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder; give an output file name")
    if not path.parent.is_dir():
        raise UserInputError(f"{path.parent}: output folder does not exist")
    fmt = output_format(path)
    forced = _EXT_FORMATS.get(path.suffix.lstrip(".").upper(), (None, None))[1]
    limit = _LIMITS.get(fmt)
    if limit is not None and channels > limit:
        raise UserInputError(
            f"{path}: {fmt} files hold at most {limit} channels and the input has "
            f"{channels}; write .wav (or another container) instead"
        )
    if forced == "OPUS" and sample_rate not in _OPUS_RATES:
        raise UserInputError(
            f"{path}: Opus runs at {', '.join(str(r) for r in _OPUS_RATES)} Hz and the input "
            f"is {sample_rate} Hz; write .ogg (Vorbis), .flac or .wav instead"
        )
    candidates = [forced] if forced else _subtype_candidates(in_subtype, fmt)
    probe = np.zeros((1, channels), np.float32)
    reasons = []
    for sub in candidates:
        try:
            _encode(fmt, sub, probe, sample_rate)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
            reasons.append(f"{sub}: {_first_line(e).split(': ', 1)[-1]}")
            continue
        _check_writable(path)
        return OutputPlan(
            path=path, format=fmt, subtype=sub, channels=channels, sample_rate=sample_rate
        )
    raise UserInputError(
        f"{path}: libsndfile cannot write {channels} channel(s) at {sample_rate} Hz as {fmt} "
        f"({'; '.join(reasons) or 'no subtype fits'})"
    )


def _check_writable(path: Path) -> None:
    """Create and remove a temporary file beside ``path`` (names the OS error if not)."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise UserInputError(f"{path}: cannot write there ({e.strerror})") from None
    os.close(fd)
    os.unlink(tmp)
    if path.exists() and not os.access(path, os.W_OK) and os.geteuid() != 0:
        raise UserInputError(f"{path}: exists and is read-only")


@dataclass(frozen=True)
class WriteReport:
    """What :func:`write_audio` had to do: clipped sample count and the peak before it."""

    subtype: str
    clipped: int
    peak: float


def write_audio(
    path: str | Path | OutputPlan,
    samples: np.ndarray,
    sample_rate: int | None = None,
    subtype: str | None = None,
) -> WriteReport:
    """Write float32 [frames, channels] safely: encode, write a temporary file in the target
    folder, fsync, then rename it over ``path``. A failure (disk full, read-only, no
    permission) names the OS error and leaves an existing file untouched, even when it is
    the input.

    Integer and lossy subtypes cannot hold |x| > 1: such samples are clipped to full scale
    and counted in the report (the caller warns); float subtypes are written as they are.
    """
    import tempfile

    import soundfile as sf

    if isinstance(path, OutputPlan):
        plan = path
    else:
        if sample_rate is None:
            raise ValueError("write_audio needs the sample rate (or an OutputPlan)")
        plan = plan_output(path, samples.shape[1], int(sample_rate), subtype)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    clipped = 0
    if plan.subtype not in FLOAT_SUBTYPES and peak > 1.0:
        clipped = int(np.count_nonzero(np.abs(samples) > 1.0))
        samples = np.clip(samples, -1.0, 1.0)
    try:
        data = _encode(plan.format, plan.subtype, samples, plan.sample_rate)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise UserInputError(f"{plan.path}: cannot encode it ({_first_line(e)})") from None
    target = plan.path
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise UserInputError(
            f"{target}: cannot write it ({e.strerror or e}); "
            + ("the existing file is unchanged" if target.exists() else "nothing was written")
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return WriteReport(subtype=plan.subtype, clipped=clipped, peak=peak)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
