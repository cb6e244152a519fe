"""Model packs: a folder with ONNX graph(s) and a ``manifest.json`` that describes them.

The manifest is the contract between the exporter and the engine: which DSP front end the
model expects, which graph plays which role, every graph input and output with its shape
and dtype, every recurrent state tensor with its shape and initial value, the sha256 of
every file, and where the weights came from and what they scored. Loading checks all of
it against the files and the real ONNX graphs, and fails with one sentence that names the
file and the problem. A pack the engine cannot honour is refused when its manifest is read:
a framing other than 16 kHz blocks of whole hops, a latency other than the one the framing
implies, a state initial value that is not finite and small, a graph file outside the pack
folder, or a family this build does not know.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rtns.atten import MAX_DB
from rtns.errors import RtnsError, first_validation_error
from rtns.framing import FrameSpec

MANIFEST = "manifest.json"
PACK_FORMAT = "rtns-pack/1"
#: Name of the dynamic leading axis of every graph tensor (one row per stream).
BATCH = "batch"
#: Environment variable with extra folders (os.pathsep-separated) to search for packs.
PACK_PATH_ENV = "RTNS_MODEL_PATH"
#: The pack a single stream runs without ``--model`` (``rtns enhance``, ``rtns run``, the
#: virtual microphone): the flagship, best on both test sets (README, "Quality").
DEFAULT_PACK = "rtns-gtcrn"
#: The pack ``rtns serve`` hosts without ``--model``: a hop of it costs 0.4-0.5x the
#: flagship's, so one core keeps 100 real-time clients with it against 15 (README, "Daemon").
DEFAULT_SERVE_PACK = "rtns-dtln"
#: Largest magnitude of a state's initial value. Recurrent states start at zero or near it
#: (an LSTM cell, a running mean); 1e39 is already infinite in float32.
MAX_STATE_INIT = 1e3

#: Model families a manifest may name. The family labels the graphs' architecture for people
#: and tools; the engine runs any family through the same front end. Tests and new exporters
#: add theirs with :func:`register_family`.
KNOWN_FAMILIES: set[str] = {"dtln", "fastnet", "frcrn", "gtcrn", "lowlat"}
#: Environment variable with extra family names (comma-separated) accepted as known: how a
#: family registered in one process reaches the rtns processes it starts (CLI, daemon).
FAMILIES_ENV = "RTNS_EXTRA_FAMILIES"
_FAMILY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def register_family(name: str) -> None:
    """Accept ``name`` as the family of a pack from now on (in this process)."""
    if not _FAMILY_NAME.match(name):
        raise ValueError(f"family name {name!r} must be lower-case letters, digits, '_' or '-'")
    KNOWN_FAMILIES.add(name)


def known_families() -> list[str]:
    """The registered families and those named in $RTNS_EXTRA_FAMILIES, sorted."""
    extra = {n.strip() for n in os.environ.get(FAMILIES_ENV, "").split(",")}
    return sorted(KNOWN_FAMILIES | {n for n in extra if _FAMILY_NAME.match(n)})


class PackError(RtnsError):
    """A pack that cannot be used; the message is one sentence naming file and problem."""


class TensorSpec(BaseModel):
    """One graph input or output; ``shape[0]`` is always the dynamic batch axis."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    shape: list[int | str]
    dtype: Literal["float32"] = "float32"

    @model_validator(mode="after")
    def _batch_first(self) -> TensorSpec:
        if not self.shape or self.shape[0] != BATCH:
            raise ValueError(f"tensor {self.name!r} must have {BATCH!r} as its first axis")
        if any(not isinstance(d, int) or d <= 0 for d in self.shape[1:]):
            raise ValueError(f"tensor {self.name!r} has a non-positive or symbolic inner axis")
        return self

    @property
    def inner_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape[1:])


class StateSpec(BaseModel):
    """A recurrent state tensor fed back from ``output`` to ``input`` after every block."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str
    output: str
    shape: list[int | str]
    dtype: Literal["float32"] = "float32"
    #: Value of every element of a new stream's state.
    init: float = 0.0
    description: str = ""

    @field_validator("init")
    @classmethod
    def _small_init(cls, v: float, info: ValidationInfo) -> float:
        if not math.isfinite(v) or abs(v) > MAX_STATE_INIT:
            raise ValueError(
                f"state {info.data.get('input', '?')!r} has init {v!r}; an initial value must "
                f"be finite and at most {MAX_STATE_INIT:g} in magnitude"
            )
        return v

    @model_validator(mode="after")
    def _batch_first(self) -> StateSpec:
        TensorSpec(name=self.input, shape=self.shape)
        return self

    @property
    def inner_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape[1:])


class GraphSpec(BaseModel):
    """One ONNX file. ``mask`` graphs map a spectral feature to a mask; ``frame`` graphs map a
    time-domain block to a block (DTLN's second stage)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["mask", "frame"]
    #: Path of the ONNX file relative to the pack folder; it must stay inside the folder.
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signal_in: TensorSpec
    signal_out: TensorSpec
    states: list[StateSpec] = []

    @field_validator("file")
    @classmethod
    def _plain_relative(cls, v: str) -> str:
        posix, windows = PurePosixPath(v), PureWindowsPath(v)
        if (
            not posix.parts
            or posix.is_absolute()
            or windows.is_absolute()
            or windows.drive
            or ".." in posix.parts
            or ".." in windows.parts
        ):
            raise ValueError(
                f"graph file {v!r} must be a relative path inside the pack folder "
                "(no absolute path, no '..')"
            )
        return v


class FrontEnd(BaseModel):
    """The numpy DSP around the graphs.

    ``window``: analysis window before the rfft and its perfect-reconstruction synthesis
    partner after the irfft (``none`` = raw block, as DTLN). ``mask``: ``magnitude`` feeds
    |X| as [batch, 1, bins] and multiplies X by the real mask [batch, 1, bins] (phase kept);
    ``complex`` feeds (Re X, Im X) as [batch, 2, bins] and multiplies X by the complex mask
    [batch, 2, bins].
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: Literal["none", "sqrt_hann"]
    mask: Literal["magnitude", "complex"]


class Provenance(BaseModel):
    """Where the weights came from; free text where a field does not apply."""

    model_config = ConfigDict(extra="allow")

    origin: str
    training_data: str = ""
    steps: int | None = None
    losses: str = ""
    notes: str = ""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["rtns-pack/1"] = PACK_FORMAT
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    #: One of :func:`known_families`.
    family: str
    description: str = ""
    frames: FrameSpec = FrameSpec()
    #: Output sample n is the estimate of input sample n - latency_samples; must be what the
    #: framing implies (``frames.latency_samples``), written out so readers need not derive it.
    latency_samples: int = Field(ge=0)
    frontend: FrontEnd
    graphs: list[GraphSpec]
    provenance: Provenance
    #: The attenuation limit (dB) a stream of this pack starts with; None: unlimited. Users
    #: override it (``--atten-lim DB`` or ``off``). Chosen on validation data at export.
    atten_lim_db: float | None = Field(None, ge=0.0, le=MAX_DB, allow_inf_nan=False)
    #: scores[test set][metric] = value, as measured by benchmarks/quality.py.
    scores: dict[str, dict[str, float]] = {}

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        known = known_families()
        if v not in known:
            raise ValueError(f"unknown family {v!r}; known families: {', '.join(known)}")
        return v

    @field_validator("latency_samples")
    @classmethod
    def _latency_of_framing(cls, v: int, info: ValidationInfo) -> int:
        frames = info.data.get("frames")
        if frames is not None and v != frames.latency_samples:  # None: frames is invalid
            raise ValueError(
                f"latency_samples is {v} but the framing implies {frames.latency_samples} "
                f"(block_len {frames.block_len} - block_shift {frames.block_shift})"
            )
        return v

    @model_validator(mode="after")
    def _graphs(self) -> Manifest:
        roles = [g.role for g in self.graphs]
        if roles not in (["mask"], ["mask", "frame"]):
            raise ValueError(f"graphs must be [mask] or [mask, frame] in that order, got {roles}")
        bins = self.frames.n_bins
        want_feat = (1 if self.frontend.mask == "magnitude" else 2, bins)
        mask = self.graphs[0]
        for t in (mask.signal_in, mask.signal_out):
            if t.inner_shape != want_feat:
                raise ValueError(
                    f"mask graph tensor {t.name!r} has shape {t.shape}, "
                    f"expected [batch, {want_feat[0]}, {want_feat[1]}]"
                )
        if len(self.graphs) == 2:
            for t in (self.graphs[1].signal_in, self.graphs[1].signal_out):
                if t.inner_shape != (1, self.frames.block_len):
                    raise ValueError(
                        f"frame graph tensor {t.name!r} has shape {t.shape}, "
                        f"expected [batch, 1, {self.frames.block_len}]"
                    )
        names = [s.input for g in self.graphs for s in g.states]
        if len(set(names)) != len(names):
            raise ValueError("state input names must be unique across graphs")
        return self


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(pack_dir: Path) -> Manifest:
    """Parse and validate ``pack_dir/manifest.json`` (no file hashing, no ONNX loading)."""
    path = Path(pack_dir) / MANIFEST
    if not Path(pack_dir).is_dir():
        raise PackError(f"{pack_dir}: no such model pack folder")
    if not path.is_file():
        raise PackError(f"{path}: missing; a model pack folder needs a {MANIFEST}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackError(f"{path}: not readable JSON ({e})") from None
    except RecursionError:
        raise PackError(f"{path}: not a manifest (JSON nested too deeply to read)") from None
    try:
        manifest = Manifest.model_validate(data)
    except RecursionError:
        raise PackError(f"{path}: not a manifest (JSON nested too deeply to check)") from None
    except ValidationError as e:
        where, msg = first_validation_error(e)
        msg = msg.removeprefix("Value error, ")
        raise PackError(f"{path}: invalid manifest at {where}: {msg}") from None
    check_files_inside(pack_dir, manifest)
    return manifest


def check_files_inside(pack_dir: Path, manifest: Manifest) -> None:
    """Refuse a graph file that resolves (through symlinks too) outside ``pack_dir``."""
    where = Path(pack_dir) / MANIFEST
    try:
        root = Path(pack_dir).resolve()
        for g in manifest.graphs:
            target = (root / g.file).resolve()
            if not target.is_relative_to(root):
                raise PackError(
                    f"{where}: graph file {g.file!r} resolves to {target}, outside the pack "
                    f"folder {root}"
                )
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise PackError(f"{where}: a graph file path cannot be resolved ({e})") from None


def write_manifest(pack_dir: Path, manifest: Manifest) -> Path:
    path = Path(pack_dir) / MANIFEST
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def verify_files(pack_dir: Path, manifest: Manifest) -> None:
    """Check that every graph file lies in the pack folder, exists and has the sha256 the
    manifest records."""
    check_files_inside(pack_dir, manifest)
    for g in manifest.graphs:
        path = Path(pack_dir) / g.file
        if not path.is_file():
            what = "missing"
            if path.is_dir():
                what = "a folder, not a graph file"
            elif path.exists():
                what = "not a regular file (a FIFO, socket or device)"
            raise PackError(f"{path}: {what}; the manifest lists it for the {g.role} graph")
        digest = sha256_file(path)
        if digest != g.sha256:
            raise PackError(
                f"{path}: sha256 is {digest[:12]}… but the manifest records {g.sha256[:12]}…; "
                "the file is corrupt or was changed after export"
            )


def check_session_io(path: Path, graph: GraphSpec, session: object) -> None:
    """Compare a graph's declared inputs/outputs with those of the loaded ORT session."""
    declared_in = {graph.signal_in.name: graph.signal_in.shape} | {
        s.input: s.shape for s in graph.states
    }
    declared_out = {graph.signal_out.name: graph.signal_out.shape} | {
        s.output: s.shape for s in graph.states
    }
    for kind, declared, actual in (
        ("input", declared_in, session.get_inputs()),  # type: ignore[attr-defined]
        ("output", declared_out, session.get_outputs()),  # type: ignore[attr-defined]
    ):
        actual_map = {a.name: a for a in actual}
        if set(actual_map) != set(declared):
            raise PackError(
                f"{path}: graph {kind}s are {sorted(actual_map)} but the manifest declares "
                f"{sorted(declared)}"
            )
        for name, shape in declared.items():
            a = actual_map[name]
            if a.type != "tensor(float)":
                raise PackError(f"{path}: {kind} {name!r} is {a.type}, the manifest says float32")
            real = list(a.shape)
            if len(real) != len(shape) or any(
                isinstance(r, int) and r != d for r, d in zip(real[1:], shape[1:], strict=False)
            ):
                raise PackError(
                    f"{path}: {kind} {name!r} has shape {real} but the manifest says {shape}"
                )
            if isinstance(real[0], int) and real[0] != 1:
                raise PackError(f"{path}: {kind} {name!r} has a fixed batch axis of {real[0]}")


def search_path() -> list[Path]:
    """Folders searched for packs by name, in order."""
    dirs: list[Path] = []
    env = os.environ.get(PACK_PATH_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(Path.home() / ".local" / "share" / "rtns" / "models")
    try:
        from rtns_models import PACKS_DIR

        dirs.append(PACKS_DIR)
    except ImportError:  # running from a tree without the shipped packs installed
        pass
    return dirs


def iter_packs() -> Iterator[tuple[Path, Manifest | PackError]]:
    """Every pack folder on the search path, with its manifest or the error reading it."""
    seen: set[Path] = set()
    for d in search_path():
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if not (sub / MANIFEST).is_file() or sub.resolve() in seen:
                continue
            seen.add(sub.resolve())
            try:
                yield sub, read_manifest(sub)
            except PackError as e:
                yield sub, e


PackList = Sequence[tuple[Path, "Manifest | PackError"]]


def _find_by_name(name: str, packs: PackList | None = None) -> Path | None:
    """The pack ``name`` means on the search path, or None.

    A folder of that name wins (the first on the search path, as before manifest names were
    accepted); otherwise the one pack whose manifest has that name. ``packs``: the result of
    :func:`iter_packs`, when the caller already has it.
    """
    for d in search_path():
        if (d / name / MANIFEST).is_file():
            return d / name
    listed = iter_packs() if packs is None else packs
    named = [sub for sub, man in listed if isinstance(man, Manifest) and man.name == name]
    if len(named) > 1:
        raise PackError(
            f"{name}: ambiguous pack name; the packs in {named[0]} and {named[1]} both have it "
            "in their manifest (pass the folder instead)"
        )
    return named[0] if named else None


def resolve_pack(spec: str | os.PathLike[str] | None) -> Path:
    """A pack folder from a path, or a pack's folder or manifest name found on the search
    path (None: the default pack)."""
    name = DEFAULT_PACK if spec is None else str(spec)
    if not name.strip():
        raise PackError("--model is empty; give a pack name (see `rtns models`) or a pack folder")
    p = Path(name).expanduser()
    if p.is_dir() or os.sep in name or name.startswith("."):
        if not p.is_dir():
            raise PackError(f"{p}: no such model pack folder")
        return p
    found = _find_by_name(name)
    if found is not None:
        return found
    packs = list(iter_packs())
    known = sorted(
        {sub.name for sub, _ in packs} | {m.name for _, m in packs if isinstance(m, Manifest)}
    )
    hint = f"; known packs: {', '.join(known)}" if known else "; no packs are installed"
    raise PackError(f"{name}: no model pack of that name{hint} (see `rtns models`)")


def model_arg(pack_dir: Path, manifest: Manifest | None, packs: PackList | None = None) -> str:
    """What ``--model`` takes to reach the pack in ``pack_dir`` (a folder on the search path):
    its manifest name, else its folder name, else (both mean another pack) the folder path.
    ``packs``: the result of :func:`iter_packs`, when the caller already has it."""
    names = ([manifest.name] if manifest is not None else []) + [pack_dir.name]
    for name in names:
        try:
            found = _find_by_name(name, packs)
        except PackError:  # ambiguous: this name reaches no pack
            continue
        if found is not None and found.resolve() == pack_dir.resolve():
            return name
    return str(pack_dir)


def initial_states(manifest: Manifest, batch: int = 1) -> dict[str, np.ndarray]:
    """Fresh state tensors for ``batch`` streams, keyed by graph input name."""
    return {
        s.input: np.full((batch, *s.inner_shape), s.init, dtype=np.float32)
        for g in manifest.graphs
        for s in g.states
    }
