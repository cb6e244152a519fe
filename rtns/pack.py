"""Model packs: a folder with ONNX graph(s) and a ``manifest.json`` that describes them.

The manifest is the contract between the exporter and the engine: which DSP front end the
model expects, which graph plays which role, every graph input and output with its shape
and dtype, every recurrent state tensor with its shape and initial value, the sha256 of
every file, and where the weights came from and what they scored. Loading checks all of
it against the files and the real ONNX graphs, and fails with one sentence that names the
file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rtns.config import FrameSpec
from rtns.errors import RtnsError, first_validation_error

MANIFEST = "manifest.json"
PACK_FORMAT = "rtns-pack/1"
#: Name of the dynamic leading axis of every graph tensor (one row per stream).
BATCH = "batch"
#: Environment variable with extra folders (os.pathsep-separated) to search for packs.
PACK_PATH_ENV = "RTNS_MODEL_PATH"
DEFAULT_PACK = "rtns-dtln"


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
    init: float = 0.0
    description: str = ""

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
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signal_in: TensorSpec
    signal_out: TensorSpec
    states: list[StateSpec] = []


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
    family: Literal["dtln", "frcrn", "passthrough"]
    description: str = ""
    frames: FrameSpec = FrameSpec()
    #: Output sample n is the estimate of input sample n - latency_samples.
    latency_samples: int = Field(ge=0)
    frontend: FrontEnd
    graphs: list[GraphSpec]
    provenance: Provenance
    #: The attenuation limit (dB) a stream of this pack starts with; None: unlimited. Users
    #: override it (``--atten-lim DB`` or ``off``). Chosen on validation data at export.
    atten_lim_db: float | None = Field(None, ge=0.0, le=200.0, allow_inf_nan=False)
    #: scores[test set][metric] = value, as measured by benchmarks/quality.py.
    scores: dict[str, dict[str, float]] = {}

    @model_validator(mode="after")
    def _graphs(self) -> Manifest:
        roles = [g.role for g in self.graphs]
        if roles not in (["mask"], ["mask", "frame"]):
            raise ValueError(f"graphs must be [mask] or [mask, frame] in that order, got {roles}")
        bins = self.frames.block_len // 2 + 1
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
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        where, msg = first_validation_error(e)
        raise PackError(f"{path}: invalid manifest at {where}: {msg}") from None


def write_manifest(pack_dir: Path, manifest: Manifest) -> Path:
    path = Path(pack_dir) / MANIFEST
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def verify_files(pack_dir: Path, manifest: Manifest) -> None:
    """Check that every graph file exists and has the sha256 the manifest records."""
    for g in manifest.graphs:
        path = Path(pack_dir) / g.file
        if not path.is_file():
            raise PackError(f"{path}: missing; the manifest lists it for the {g.role} graph")
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


def resolve_pack(spec: str | os.PathLike[str] | None) -> Path:
    """A pack folder from a path, or a pack name found on the search path (None: default)."""
    name = DEFAULT_PACK if spec is None else str(spec)
    p = Path(name).expanduser()
    if p.is_dir() or os.sep in name or name.startswith("."):
        if not p.is_dir():
            raise PackError(f"{p}: no such model pack folder")
        return p
    for d in search_path():
        if (d / name / MANIFEST).is_file():
            return d / name
    known = sorted({sub.name for sub, _ in iter_packs()})
    hint = f"; known packs: {', '.join(known)}" if known else "; no packs are installed"
    raise PackError(f"{name}: no model pack of that name{hint} (see `rtns models`)")


def initial_states(manifest: Manifest, batch: int = 1) -> dict[str, np.ndarray]:
    """Fresh state tensors for ``batch`` streams, keyed by graph input name."""
    return {
        s.input: np.full((batch, *s.inner_shape), s.init, dtype=np.float32)
        for g in manifest.graphs
        for s in g.states
    }
