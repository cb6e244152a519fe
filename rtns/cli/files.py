"""File commands: ``rtns enhance``, ``rtns models``, ``rtns import-dtln``.

Heavy modules (soundfile, onnxruntime, tqdm, torch) are imported inside the run
functions so that ``import rtns.cli`` stays light.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rtns.cli import options
from rtns.errors import RtnsError, UserInputError
from rtns.framing import SAMPLE_RATE

#: Files longer than this many seconds get a progress bar (when stderr is a terminal).
PROGRESS_MIN_SECONDS = 5.0
#: Samples (at the model rate) pushed per stream between progress updates.
CHUNK = SAMPLE_RATE  # one second at the model rate


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "enhance",
        help="denoise an audio file",
        description=(
            "Denoise an audio file (any format soundfile reads, any rate and channel count). "
            "The output has the input's rate, channels, length and sample format, and is "
            "time-aligned with it (the model latency is removed)."
        ),
    )
    p.add_argument("input", metavar="IN", help="input audio file (wav, flac, ogg, ...)")
    p.add_argument(
        "output", metavar="OUT", help="output audio file; its extension picks the format"
    )
    options.add_model(p)
    options.add_threads(p)
    options.add_atten_lim(p)
    options.add_quiet(p)
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw input and output spectrograms and the energy removed per band "
        "(needs matplotlib: pip install 'rtns[plot]'; keeps a mono mix of the input and the "
        "output in memory, 8 bytes per frame)",
    )
    add_force(p)
    options.one_line_errors(p)
    p.set_defaults(func=run_enhance)

    p = sub.add_parser(
        "models",
        help="list installed model packs",
        description="List the model packs on the search path ($RTNS_MODEL_PATH, "
        "~/.local/share/rtns/models, shipped packs): name, family, latency, default "
        "attenuation limit and folder; --scores or a NAME adds the scores of their manifests.",
    )
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="one pack (a name --model takes, or a pack folder), with its scores",
    )
    p.add_argument("--scores", action="store_true", help="each pack's test-set scores under it")
    options.one_line_errors(p)
    p.set_defaults(func=run_models)

    p = sub.add_parser(
        "import-dtln",
        help="convert official DTLN Keras weights (.h5) to a pack (needs the train extra)",
        description=(
            "Convert the official DTLN weights (breizhn/DTLN pretrained_model/*.h5, MIT) into "
            "an rtns pack in OUT_DIR, checked block by block against the PyTorch model. "
            "Needs PyTorch and h5py (pip install 'rtns[train]')."
        ),
    )
    p.add_argument("weights", metavar="WEIGHTS.h5", help="model.h5 or DTLN_norm_*.h5")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) folder for the pack")
    p.add_argument("--name", help="pack name (default from the file name, e.g. dtln-official)")
    options.one_line_errors(p)
    p.set_defaults(func=run_import_dtln)


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="allow OUT to be IN itself (the recording is replaced by the result)",
    )


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


# -- enhance --------------------------------------------------------------------------------
def load_model(spec: str | None, threads: int = 1):  # -> rtns.engine.Model
    """The engine Model of a pack name/path; a clear error when the default is missing."""
    from rtns.config import EngineConfig
    from rtns.engine import Model
    from rtns.pack import DEFAULT_PACK, PackError, resolve_pack

    if spec is None:
        try:
            pack_dir = resolve_pack(None)
        except PackError:
            raise PackError(
                f"no default model pack ({DEFAULT_PACK}) is installed; pass --model with a "
                "pack name or folder (see `rtns models`)"
            ) from None
    else:
        pack_dir = resolve_pack(spec)
    return Model(pack_dir, EngineConfig(threads=threads))


def _progress_bar(total_s: float, enabled: bool):
    """A tqdm bar over ``total_s`` seconds of audio on stderr (disabled: a no-op bar)."""
    from tqdm import tqdm

    return tqdm(
        total=round(total_s, 2),
        unit="s",
        unit_scale=False,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]",
        desc="enhance",
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )


def enhance_channels(
    model,
    x: np.ndarray,
    rate: int | None = None,
    atten_lim=None,
    progress: bool = False,
) -> np.ndarray:
    """Enhance float32 [frames, channels] at ``rate`` (default: the model's) through one
    :class:`rtns.streams.ChannelStream`; returns float32 [frames, channels], time-aligned
    with the input. ``atten_lim``: None keeps the pack's default limit."""
    from rtns.streams import enhance_frames

    rate = rate or model.sample_rate
    with _progress_bar(x.shape[0] / rate, progress) as bar:
        done = [0]

        def advance(frames: int) -> None:
            bar.update(round((frames - done[0]) / rate, 2))
            done[0] = frames

        return enhance_frames(
            model, x, rate, atten_lim=atten_lim, chunk=CHUNK * rate // SAMPLE_RATE, progress=advance
        )


def enhance_blocks(
    model,
    blocks: Iterable[np.ndarray],
    channels: int,
    rate: int,
    write: Callable[[np.ndarray], None],
    atten_lim=None,
) -> int:
    """Enhance a signal that arrives as float32 [n_i, channels] blocks at ``rate`` through
    one :class:`rtns.streams.ChannelStream` and hand the time-aligned output to ``write``
    as it comes: memory stays that of a block, whatever the length. Given the blocks
    :func:`rtns.streams.enhance_frames` pushes (``CHUNK`` frames at 16 kHz, scaled to the
    rate), the output is bit-identical to it. Returns the frames written (= read)."""
    from rtns.streams import ChannelStream

    cs = ChannelStream(model, channels, rate)
    if atten_lim is not None:
        cs.atten_lim = atten_lim
    skip = cs.latency  # output frame k estimates input frame k - latency
    n = written = 0

    def emit(y: np.ndarray) -> None:
        nonlocal skip, written
        cut = min(skip, y.shape[0])
        skip -= cut
        y = y[cut : cut + n - written]
        if y.shape[0]:
            write(y)
            written += y.shape[0]

    for x in blocks:
        n += x.shape[0]
        emit(cs.push(x))
    emit(cs.flush())
    if written != n:  # ChannelStream.flush owes exactly n + latency frames
        raise RtnsError(f"internal error: {written} frames out for {n} in")
    return n


def _check_plot(png: str, args: argparse.Namespace) -> None:
    """Refuse a --plot target that is IN or OUT, a folder, or in a missing or read-only
    folder, and a missing matplotlib, before any work (the picture is drawn last)."""
    from rtns import audio_io
    from rtns.plot import require_matplotlib

    path = Path(png)
    for what, other in (("IN", args.input), ("OUT", args.output)):
        if audio_io.same_file(path, other):
            raise UserInputError(
                f"--plot {png}: is {what} ({other}); the picture would replace it (give the "
                "picture its own name, e.g. plot.png)"
            )
    if path.is_dir():
        raise UserInputError(f"--plot {png}: is a folder; give a file name (e.g. plot.png)")
    if not path.resolve().parent.is_dir():
        raise UserInputError(f"--plot {png}: folder {path.parent} does not exist")
    if not os.access(path.resolve().parent, os.W_OK):
        raise UserInputError(f"--plot {png}: cannot write in {path.parent}")
    require_matplotlib()


def model_label(model) -> str:
    """How a loaded pack is named to people: its manifest name, and its folder too when the
    folder is called something else (the name alone would pass it off as another pack)."""
    folder = Path(model.pack_dir)
    if folder.name == model.name:
        return model.name
    return f"{model.name} (pack folder {folder})"


def run_enhance(args: argparse.Namespace) -> int:
    from rtns import audio_io

    t0 = time.perf_counter()
    audio_io.output_format(args.output)  # an unknown extension is refused before reading
    info = audio_io.open_audio(args.input)
    # Everything about the output is checked before the work starts.
    plan = audio_io.plan_output(
        args.output, info.channels, info.sample_rate, info.subtype, [args.input], args.force
    )
    if args.plot:
        _check_plot(args.plot, args)
    model = load_model(args.model, args.threads)
    interactive = sys.stderr.isatty() and not args.quiet
    mono_in: list[np.ndarray] = []
    mono_out: list[np.ndarray] = []
    rate = info.sample_rate

    def blocks() -> Iterator[np.ndarray]:
        for x in audio_io.read_blocks(info, CHUNK * rate // SAMPLE_RATE):
            if args.plot:
                mono_in.append(x.mean(axis=1))
            yield x
            bar.update(round(x.shape[0] / rate, 2))

    with (
        audio_io.AudioWriter(plan) as writer,
        _progress_bar(info.duration, interactive and info.duration > PROGRESS_MIN_SECONDS) as bar,
    ):

        def write(y: np.ndarray) -> None:
            if args.plot:
                mono_out.append(y.mean(axis=1))
            writer.write(y)

        frames = enhance_blocks(model, blocks(), info.channels, rate, write, args.atten_lim)
        report = writer.commit()
    if args.plot:
        from rtns.plot import plot_enhancement

        plot_enhancement(
            np.concatenate(mono_in),
            np.concatenate(mono_out),
            rate,
            args.plot,
            title=f"{Path(args.input).name}: {model.name}",
        )
    if report.clipped:
        _err(
            f"rtns: warning: {report.clipped} output samples exceeded full scale "
            f"(peak {20 * math.log10(report.peak):+.1f} dBFS) and were clipped for "
            f"{report.subtype}; write a float file (e.g. .wav from float input) to keep them"
        )
    if not args.quiet:
        took = time.perf_counter() - t0
        duration = frames / rate
        limit = model.manifest.atten_lim_db if args.atten_lim is None else args.atten_lim
        band = ""
        if rate > model.sample_rate:
            band = f", above {model.sample_rate // 2000} kHz: crossover gain"
        _err(
            f"rtns: {plan.path}: {duration:.2f} s, {rate} Hz, "
            f"{info.channels} ch, {report.subtype}, model {model_label(model)} (attenuation "
            f"limit {options.limit_text(limit)}{band}), "
            f"{took:.2f} s ({took / duration:.3f} x real time)"
        )
    return 0


# -- models ---------------------------------------------------------------------------------
#: The width ``rtns models`` fits its lines to (a path longer than a line gets its own).
MODELS_WIDTH = 100
#: Short labels for the metrics benchmarks/quality.py writes, with their formats.
_METRICS = {
    "pesq_wb": ("PESQ-WB", "{:.3f}"),
    "stoi": ("STOI", "{:.3f}"),
    "si_sdr": ("SI-SDR", "{:.2f}"),  # dB
    "dnsmos_sig": ("SIG", "{:.3f}"),
    "dnsmos_bak": ("BAK", "{:.3f}"),
    "dnsmos_ovrl": ("OVRL", "{:.3f}"),
}


class PackListing(NamedTuple):
    """One pack as ``rtns models`` lists it. ``name`` is what ``--model`` takes to reach it
    (its manifest name, else its folder name, else its path); ``details``: one line per test
    set's scores, or the error of a broken pack (family 'BROKEN')."""

    name: str
    family: str
    latency: str
    limit: str
    path: str
    details: list[str]

    @property
    def broken(self) -> bool:
        return self.family == "BROKEN"


def score_lines(scores: dict[str, dict[str, float]]) -> list[str]:
    """One line per test set: ``vbdemand36 (36 files): PESQ-WB 1.994  STOI 0.880 ...``
    (SI-SDR in dB; SIG, BAK, OVRL: DNSMOS), its items separated by two spaces."""
    lines = []
    for test_set, metrics in sorted(scores.items()):
        files = metrics.get("files")
        head = test_set if files is None else f"{test_set} ({files:g} files)"
        vals = []
        for k, v in metrics.items():
            if k == "files":
                continue
            label, fmt = _METRICS.get(k, (k, "{:.4g}"))
            vals.append(f"{label} {fmt.format(v)}")
        lines.append(f"{head}: {'  '.join(vals)}")
    return lines


def _wrap(text: str, width: int, indent: str = "    ", more: str = "      ") -> list[str]:
    """``text`` in lines of at most ``width``, broken only between items separated by two
    spaces (a label stays with its value), else between words."""
    import textwrap

    lines: list[str] = []
    line = indent
    for item in text.split("  "):
        sep = "" if line.strip() == "" else "  "
        if line.strip() and len(line) + len(sep) + len(item) > width:
            lines.append(line)
            line, sep = more, ""
        line += sep + item
    lines.append(line)
    out = []
    for ln in lines:  # an item longer than a line (an error message): words
        if len(ln) <= width:
            out.append(ln)
        else:
            lead = ln[: len(ln) - len(ln.lstrip())]
            out += textwrap.wrap(ln.strip(), width, initial_indent=lead, subsequent_indent=more)
    return out


def _listing(path: Path, man, packs) -> PackListing:
    from rtns.pack import DEFAULT_PACK, DEFAULT_SERVE_PACK, PackError, model_arg, verify_files

    if isinstance(man, PackError):
        return PackListing(model_arg(path, None, packs), "BROKEN", "-", "-", str(path), [str(man)])
    try:
        verify_files(path, man)
    except PackError as e:
        return PackListing(model_arg(path, man, packs), "BROKEN", "-", "-", str(path), [str(e)])
    # Algorithmic latency, as everywhere else: output sample n estimates input sample
    # n - latency_samples (24.0 ms for 512/128 at 16 kHz).
    ms = 1000.0 * man.latency_samples / man.frames.sample_rate
    arg = model_arg(path, man, packs)
    default = {DEFAULT_PACK: " (default)", DEFAULT_SERVE_PACK: " (serve default)"}
    return PackListing(
        arg + default.get(arg, ""),
        man.family,
        f"{ms:.1f} ms",
        options.limit_text(man.atten_lim_db),
        str(path),
        score_lines(man.scores),
    )


def models_table() -> list[PackListing]:
    """Every pack on the search path, in search order (broken ones included)."""
    from rtns.pack import iter_packs

    packs = list(iter_packs())
    return [_listing(path, man, packs) for path, man in packs]


def _home_short(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home) :] if home != "/" and path.startswith(home + os.sep) else path


def format_models(
    listings: list[PackListing], scores: bool = False, width: int = MODELS_WIDTH
) -> list[str]:
    """The table: NAME FAMILY LATENCY LIMIT PATH, each pack's scores under it (``scores``)
    and a broken pack's error under it, wrapped to ``width``. A path that would push its row
    past ``width`` goes on the next line, whole (it is for copying)."""
    rows = [("NAME", "FAMILY", "LATENCY", "LIMIT")]
    rows += [(p.name, p.family, p.latency, p.limit) for p in listings]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def cells(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))

    out = [f"{cells(rows[0])}  PATH"]
    for row, pack in zip(rows[1:], listings, strict=True):
        path = _home_short(pack.path)
        line = f"{cells(row)}  {path}"
        if len(line) <= width:
            out.append(line)
        else:
            out += [cells(row).rstrip(), f"    {path}"]
        if scores or pack.broken:
            for detail in pack.details or ["no scores"]:
                out += _wrap(detail, width)
    return out


def run_models(args: argparse.Namespace) -> int:
    from rtns.pack import iter_packs, read_manifest, resolve_pack, search_path

    listings = models_table()
    if args.name is not None:  # one pack, with its scores
        found = resolve_pack(args.name).resolve()
        mine = [p for p in listings if Path(p.path).resolve() == found]
        listings = mine or [_listing(found, read_manifest(found), list(iter_packs()))]
    elif not listings:
        where = ", ".join(str(d) for d in search_path())
        print(f"no model packs found (searched: {where})")
        return 0
    for line in format_models(listings, scores=args.scores or args.name is not None):
        print(line)
    return 0


# -- import-dtln ----------------------------------------------------------------------------
def run_import_dtln(args: argparse.Namespace) -> int:
    try:
        from rtns_export.dtln_import import import_dtln

        manifest, err = import_dtln(args.weights, args.out_dir, name=args.name)
    except ModuleNotFoundError as e:
        if e.name not in ("torch", "h5py", "onnx", "onnxscript"):
            raise
        raise UserInputError(
            f"import-dtln needs PyTorch, onnx and h5py ({e.name} is missing): "
            "pip install 'rtns[train]'"
        ) from None
    except RuntimeError as e:
        if type(e).__name__ != "ParityError":
            raise
        raise RtnsError(f"{args.weights}: conversion failed its parity check: {e}") from None
    print(
        f"wrote pack {manifest.name!r} to {args.out_dir} (parity with the PyTorch model: "
        f"{err:.2g} max abs error); use it with: rtns enhance IN OUT --model {args.out_dir}"
    )
    return 0
