"""Audio files in and out of the 16 kHz engine: reading, checks, resampling, writing.

Everything soundfile (libsndfile) reads is accepted, at any sample rate and channel count.
Samples travel as float32 [frames, channels] at the file's own rate (rate changes happen in
:class:`rtns.streams.ChannelStream`). A file is read whole (:func:`read_audio`) or in blocks
(:func:`open_audio`, :func:`read_blocks`), so that memory does not grow with its length.
Results are written safely: checked against the container before processing
(:func:`plan_output`: never onto the input unless asked, through a symbolic link to its
target), then written to a temporary file beside the target (:class:`AudioWriter`, block by
block) and renamed over it; a target with other hard links is rewritten in place instead, so
every name of it sees the result. Bad input gives one :class:`~rtns.errors.UserInputError`
sentence naming the file. No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
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


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, read from its header (:func:`open_audio`)."""

    path: Path
    frames: int
    sample_rate: int
    channels: int
    subtype: str
    format: str

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.frames / self.sample_rate


def _input_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file")
    if not path.is_file():
        raise UserInputError(f"{path}: not a file")
    return path


def _unreadable(path: Path, e: Exception) -> UserInputError:
    if isinstance(e, OSError):
        return UserInputError(f"{path}: cannot read it ({e.strerror or e})")
    return UserInputError(f"{path}: not a readable audio file ({_first_line(e)})")


_READ_ERRORS = (RuntimeError, TypeError, ValueError, OSError)


def open_audio(path: str | Path) -> AudioInfo:
    """The header of ``path``; raises UserInputError for a missing, unreadable or empty
    file."""
    import soundfile as sf

    path = _input_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            info = AudioInfo(
                path,
                int(f.frames),
                int(f.samplerate),
                int(f.channels),
                str(f.subtype),
                str(f.format),
            )
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    if info.frames <= 0:
        raise UserInputError(f"{path}: the file holds no samples")
    return info


def read_blocks(info: AudioInfo, block: int) -> Iterator[np.ndarray]:
    """The samples of ``info.path`` as float32 [<= block, channels] arrays, in order (the
    last may be shorter). NaN or infinite samples raise UserInputError when met, naming how
    many the file holds and where the first is; nothing after them is yielded."""
    import soundfile as sf

    done = 0
    try:
        with sf.SoundFile(str(info.path)) as f:
            for x in f.blocks(block, dtype="float32", always_2d=True):
                bad = ~np.isfinite(x)
                if bad.any():
                    first = done + int(np.argmax(bad.any(axis=1)))
                    count = int(bad.sum()) + sum(
                        int(np.count_nonzero(~np.isfinite(r)))
                        for r in f.blocks(block, dtype="float32", always_2d=True)
                    )
                    raise UserInputError(
                        f"{info.path}: {count} samples are NaN or infinite (first at "
                        f"{first / info.sample_rate:.3f} s); refusing to process"
                    )
                done += x.shape[0]
                yield x
    except _READ_ERRORS as e:
        raise _unreadable(info.path, e) from None


def read_audio(path: str | Path) -> Audio:
    """Decode ``path`` whole; raises UserInputError for a missing, unreadable or empty file,
    or one with NaN/Inf samples."""
    info = open_audio(path)
    parts = list(read_blocks(info, 1 << 20))
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if data.shape[0] == 0:
        raise UserInputError(f"{info.path}: the file holds no samples")
    return Audio(
        samples=data, sample_rate=info.sample_rate, subtype=info.subtype, format=info.format
    )


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

    if Path(path).is_dir():
        raise UserInputError(f"{path}: is a folder; give an output file name")
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
    """Where and how a result will be written, checked before any processing. ``path`` is
    what the user named; ``target`` the file written (``path`` itself, or the file a
    symbolic link at ``path`` leads to)."""

    path: Path
    format: str
    subtype: str
    channels: int
    sample_rate: int
    target: Path | None = None

    @property
    def file(self) -> Path:
        return self.target or self.path


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name one file: the same path after symbolic links, or
    (both existing) the same inode, as hard links are."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_target(path: str | Path, inputs: Sequence[str | Path] = (), force: bool = False) -> Path:
    """The file a result for ``path`` is written to: through a symbolic link to its target
    (a dangling link gets its target created). Refuses (UserInputError) an output that is
    one of ``inputs`` unless ``force``: that would replace the recording with the result."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    for i in inputs:
        if same_file(i, target) and not force:
            how = "" if same_file(i, path) and str(i) == str(path) else f" ({target})"
            raise UserInputError(
                f"{path}: is the input file{how}; writing it would replace the recording with "
                "the result (give another OUT, or pass --force to replace the input)"
            )
    return target


def _encode(fmt: str, sub: str, samples: np.ndarray, rate: int) -> bytes:
    """``samples`` encoded in memory (the plan's probe of a format)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, subtype=sub, format=fmt)
    return buf.getvalue()


def plan_output(
    path: str | Path,
    channels: int,
    sample_rate: int,
    in_subtype: str | None = None,
    inputs: Sequence[str | Path] = (),
    force: bool = False,
) -> OutputPlan:
    """Check that ``path`` can receive ``channels`` channels at ``sample_rate`` before any
    work is done: extension, container limits, the subtype (the input's where possible),
    that the folder is writable, and that it is none of ``inputs`` (unless ``force``; see
    :func:`output_target`). Raises UserInputError with the reason."""
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder; give an output file name")
    target = output_target(path, inputs, force)
    if target.exists() and not target.is_file():
        raise UserInputError(f"{path}: exists and is not a regular file; give an output file")
    if not target.parent.is_dir():
        raise UserInputError(f"{target.parent}: output folder does not exist")
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
        _check_writable(target)
        return OutputPlan(
            path=path,
            format=fmt,
            subtype=sub,
            channels=channels,
            sample_rate=sample_rate,
            target=target if target != path else None,
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


class AudioWriter:
    """Write a result block by block (:meth:`write`), safely: into a temporary file beside
    the target, which :meth:`commit` fsyncs and renames over it (or, when the target has
    other hard links, copies into it, so that every name of it sees the result); until
    then, and on any failure (:meth:`abort`, or leaving a ``with`` block by an exception),
    an existing file is untouched and the temporary file is removed.

    Integer and lossy subtypes cannot hold |x| > 1: such samples are clipped to full scale
    and counted in the report (the caller warns); float subtypes are written as they are.
    """

    def __init__(self, plan: OutputPlan) -> None:
        import tempfile

        import soundfile as sf

        self.plan = plan
        self.frames = 0
        self.clipped = 0
        self.peak = 0.0
        target = plan.file
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        except OSError as e:
            raise UserInputError(
                f"{plan.path}: cannot write it ({e.strerror or e}); {self._unchanged()}"
            ) from None
        self.tmp: Path | None = Path(tmp)
        self._fd = fd
        try:
            self._sf = sf.SoundFile(
                fd,
                "w",
                plan.sample_rate,
                plan.channels,
                plan.subtype,
                format=plan.format,
                closefd=False,
            )
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
            self.abort()
            raise UserInputError(f"{plan.path}: cannot encode it ({_first_line(e)})") from None

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()

    def _unchanged(self) -> str:
        return (
            "the existing file is unchanged" if self.plan.file.exists() else "nothing was written"
        )

    def write(self, samples: np.ndarray) -> None:
        """Append float32 [frames, channels]."""
        import soundfile as sf

        if not samples.size:
            return
        peak = float(np.max(np.abs(samples)))
        self.peak = max(self.peak, peak)
        if self.plan.subtype not in FLOAT_SUBTYPES and peak > 1.0:
            self.clipped += int(np.count_nonzero(np.abs(samples) > 1.0))
            samples = np.clip(samples, -1.0, 1.0)
        try:
            self._sf.write(samples)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
            self.abort()
            raise UserInputError(
                f"{self.plan.path}: cannot write it ({_first_line(e)}); {self._unchanged()}"
            ) from None
        self.frames += samples.shape[0]

    def commit(self) -> WriteReport:
        """Finish the file and put it in place; returns what had to be done to the samples."""
        import soundfile as sf

        target = self.plan.file
        try:
            self._sf.close()
            os.fsync(self._fd)
            try:
                st = os.stat(target)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_nlink > 1:
                _copy_into(self._fd, target)
            else:
                if st is not None:
                    mode = st.st_mode & 0o7777
                else:
                    umask = os.umask(0)
                    os.umask(umask)
                    mode = 0o666 & ~umask
                os.fchmod(self._fd, mode)
                os.replace(self.tmp, target)
                self.tmp = None
        except (sf.LibsndfileError, RuntimeError) as e:
            self.abort()
            raise UserInputError(f"{self.plan.path}: cannot encode it ({_first_line(e)})") from None
        except OSError as e:
            unchanged = self._unchanged()
            self.abort()
            raise UserInputError(
                f"{self.plan.path}: cannot write it ({e.strerror or e}); {unchanged}"
            ) from None
        self.abort()  # closes the descriptor (the temporary file is gone or in place)
        return WriteReport(subtype=self.plan.subtype, clipped=self.clipped, peak=self.peak)

    def abort(self) -> None:
        """Drop the temporary file (safe to call more than once)."""
        try:
            self._sf.close()
        except Exception:  # noqa: BLE001 - already failing; the descriptor is closed below
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


def _copy_into(fd: int, target: Path) -> None:
    """Copy the whole of ``fd`` into the existing file ``target`` (kept: its inode, and with
    it every hard link). Space is reserved first, so a full disk fails before any change."""
    size = os.fstat(fd).st_size
    out = os.open(target, os.O_WRONLY)
    try:
        if size:
            os.posix_fallocate(out, 0, size)
        done = 0
        while done < size:
            done += os.copy_file_range(fd, out, size - done, done, done)
        os.ftruncate(out, size)
        os.fsync(out)
    finally:
        os.close(out)


def write_audio(
    path: str | Path | OutputPlan,
    samples: np.ndarray,
    sample_rate: int | None = None,
    subtype: str | None = None,
) -> WriteReport:
    """Write float32 [frames, channels] at once with :class:`AudioWriter`. A failure (disk
    full, read-only, no permission) names the OS error and leaves an existing file
    untouched, even when it is the input."""
    if isinstance(path, OutputPlan):
        plan = path
    else:
        if sample_rate is None:
            raise ValueError("write_audio needs the sample rate (or an OutputPlan)")
        plan = plan_output(path, samples.shape[1], int(sample_rate), subtype, force=True)
    with AudioWriter(plan) as w:
        w.write(samples)
        return w.commit()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
