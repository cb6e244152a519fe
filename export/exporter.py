"""Export a streamable PyTorch model to an rtns pack, and refuse packs that disagree with it.

A family describes its graphs with :class:`GraphExport` (a module taking ``(signal, *states)``
and returning ``(signal, *states)``, plus names and shapes). :func:`export_pack` writes the
ONNX files with a dynamic batch axis on every tensor, writes the manifest with file hashes,
loads the pack with the runtime engine, and checks that the engine, block by block, matches
the model's full-sequence forward (fed the signal delayed by the pack's latency) to
``tol``. On a mismatch the pack folder is removed and :class:`ParityError` raised.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtns.engine import Model, Stream
from rtns.framing import N_BINS
from rtns.pack import (
    BATCH,
    FrontEnd,
    GraphSpec,
    Manifest,
    Provenance,
    StateSpec,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from rtns_export.batchsafe import rewrite_file

OPSET = 17


class ParityError(RuntimeError):
    """The exported pack does not reproduce the PyTorch model."""


@dataclass
class StateExport:
    input: str
    output: str
    inner_shape: tuple[int, ...]
    init: float = 0.0
    description: str = ""


@dataclass
class GraphExport:
    role: str  # "mask" | "frame"
    file: str
    module: nn.Module  # forward(signal, *states) -> (signal, *states)
    signal_in: tuple[str, tuple[int, ...]]
    signal_out: tuple[str, tuple[int, ...]]
    states: list[StateExport] = field(default_factory=list)


@dataclass
class ParityReport:
    max_abs_err: float
    n_samples: int
    tol: float


class _StepModule(nn.Module):
    """Adapts a bound step method to the module interface torch.onnx.export needs."""

    def __init__(self, owner: nn.Module, step: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.owner = owner
        self._step = step

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._step(*args)


def step_module(owner: nn.Module, step: Callable[..., tuple[torch.Tensor, ...]]) -> nn.Module:
    return _StepModule(owner, step)


def export_graph(g: GraphExport, path: Path) -> GraphSpec:
    names_in = [g.signal_in[0]] + [s.input for s in g.states]
    names_out = [g.signal_out[0]] + [s.output for s in g.states]
    batch = 2  # traced with 2 rows so no axis is specialised to 1
    args = tuple(
        torch.full((batch, *shape), init, dtype=torch.float32)
        for shape, init in [(g.signal_in[1], 0.1)] + [(s.inner_shape, s.init) for s in g.states]
    )
    dyn = {n: {0: BATCH} for n in names_in + names_out}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            g.module.eval(),
            args,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    # Rows of a batched call must equal batch-1 rows bit for bit (the daemon batches).
    rewrite_file(path)
    return GraphSpec(
        role=g.role,  # type: ignore[arg-type]
        file=path.name,
        sha256=sha256_file(path),
        signal_in=TensorSpec(name=g.signal_in[0], shape=[BATCH, *g.signal_in[1]]),
        signal_out=TensorSpec(name=g.signal_out[0], shape=[BATCH, *g.signal_out[1]]),
        states=[
            StateSpec(
                input=s.input,
                output=s.output,
                shape=[BATCH, *s.inner_shape],
                init=s.init,
                description=s.description,
            )
            for s in g.states
        ],
    )


def parity_signal(seconds: float = 10.0, sample_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like test signal: voiced harmonics with a moving pitch and
    syllable-rate envelope, plus coloured noise and silent gaps. float32 [n]."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    env = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 2 * (np.sin(2 * np.pi * 0.23 * t) > -0.6)
    noise = np.cumsum(rng.standard_normal(n)) * 0.002
    noise -= np.convolve(noise, np.ones(401) / 401, mode="same")
    x = 0.15 * voiced * env + 0.05 * rng.standard_normal(n) + noise
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def offline_reference(model: nn.Module, x: np.ndarray, latency: int) -> np.ndarray:
    """The full-sequence forward on x delayed by ``latency`` samples (float64 out)."""
    xp = np.concatenate([np.zeros(latency, dtype=np.float32), x])
    with torch.no_grad():
        y = model.eval()(torch.from_numpy(xp)[None])[0]
    return y.double().numpy()


def check_parity(
    model: nn.Module, pack_dir: Path, x: np.ndarray, tol: float = 1e-4
) -> ParityReport:
    """Run the pack through the engine block by block and compare with the forward pass. The
    graph is compared: the stream runs without the pack's default attenuation limit (a
    shipped pack has one, and a limited output is not the model's forward)."""
    engine = Model(pack_dir)
    stream = Stream(engine)
    stream.atten_lim = "off"
    streamed = stream.push(x).astype(np.float64)
    ref = offline_reference(model, x, engine.latency)
    n = min(streamed.shape[0], ref.shape[0])
    err = float(np.max(np.abs(streamed[:n] - ref[:n])))
    return ParityReport(max_abs_err=err, n_samples=n, tol=tol)


def export_pack(
    model: nn.Module,
    out_dir: Path,
    *,
    name: str,
    family: str,
    frontend: FrontEnd,
    graphs: Sequence[GraphExport],
    latency: int,
    provenance: Provenance,
    description: str = "",
    scores: dict[str, dict[str, float]] | None = None,
    parity_input: np.ndarray | None = None,
    tol: float = 1e-4,
) -> tuple[Manifest, ParityReport]:
    """Write the pack to ``out_dir`` and check it; raises ParityError (and removes the
    folder) if the engine output differs from the PyTorch forward by more than ``tol``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    specs = [export_graph(g, out_dir / g.file) for g in graphs]
    manifest = Manifest(
        name=name,
        family=family,  # type: ignore[arg-type]
        description=description,
        latency_samples=latency,
        frontend=frontend,
        graphs=specs,
        provenance=provenance,
        scores=scores or {},
    )
    write_manifest(out_dir, manifest)
    x = parity_signal() if parity_input is None else parity_input
    report = check_parity(model, out_dir, x, tol)
    if not report.max_abs_err <= tol:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise ParityError(
            f"exported pack differs from the PyTorch model by {report.max_abs_err:.3g} "
            f"(> {tol:g}) over {report.n_samples} samples; pack removed"
        )
    return manifest, report


# -- complex-mask families (frcrn, gtcrn, lowlat, ...: rtns_export.cmask.MaskModel) ---------
def complex_mask_graph(model: nn.Module, file: str) -> GraphExport:
    """The one graph of a complex-mask pack: ``model.step(spectrum [B, 2, 257], *states) ->
    (mask [B, 2, 257], *new states)`` with the states of ``model.state_defs``
    (:class:`rtns_export.cmask.StateDef`)."""
    return GraphExport(
        "mask",
        file,
        step_module(model, model.step),
        ("spectrum", (2, N_BINS)),
        ("mask", (2, N_BINS)),
        [
            StateExport(s.name, f"{s.name}_out", s.shape, s.init, s.description)
            for s in model.state_defs
        ],
    )


def export_complex_mask_pack(
    model: nn.Module,
    out_dir: Path,
    *,
    family: str,
    name: str,
    provenance: Provenance,
    description: str,
    graph_file: str | None = None,
    **kw,
) -> tuple[Manifest, ParityReport]:
    """Export a complex-mask model (sqrt-Hann 512/128 STFT in, complex ratio mask out, one
    graph ``<family>_mask.onnx``) to a parity-checked pack. The provenance gains the model's
    architecture (= ``family``), parameter count, MACs per hop and state floats."""
    from rtns_export.cmask import count_params

    prov = provenance.model_copy(
        update={
            "architecture": family,
            "parameters": count_params(model),
            "macs_per_hop": model.macs_per_frame(),
            "state_floats": model.state_floats(),
        }
    )
    return export_pack(
        model,
        out_dir,
        name=name,
        family=family,
        frontend=FrontEnd(window="sqrt_hann", mask="complex"),
        graphs=[complex_mask_graph(model, graph_file or f"{family}_mask.onnx")],
        latency=model.latency,
        provenance=prov,
        description=description,
        **kw,
    )
