"""Model packs built by tests (never shipped): an exact pass-through and a random DTLN.

Importing this module registers the tests' "passthrough" family, here and (through
$RTNS_EXTRA_FAMILIES) in every rtns process a test starts afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rtns.framing import BLOCK_LEN, BLOCK_SHIFT, LATENCY_SAMPLES, N_BINS
from rtns.pack import (
    BATCH,
    FAMILIES_ENV,
    FrontEnd,
    GraphSpec,
    Manifest,
    Provenance,
    StateSpec,
    TensorSpec,
    register_family,
    sha256_file,
    write_manifest,
)

#: Family of the identity packs below; the runtime does not ship it.
PASSTHROUGH_FAMILY = "passthrough"


def _register_passthrough() -> None:
    register_family(PASSTHROUGH_FAMILY)
    names = [n for n in os.environ.get(FAMILIES_ENV, "").split(",") if n]
    if PASSTHROUGH_FAMILY not in names:
        os.environ[FAMILIES_ENV] = ",".join([*names, PASSTHROUGH_FAMILY])


_register_passthrough()


def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_passthrough_pack(out_dir: Path, window: str = "none", mask: str = "magnitude") -> Path:
    """A pack whose output is its input delayed by 384 samples (mask = 1).

    ``window="none"`` adds the DTLN-style frame graph, which scales each block by
    shift / block_len so the un-windowed overlap-add sums to one; with ``sqrt_hann`` the
    synthesis window already does. Each graph also carries a block counter state
    ([batch, 1], +1 per call) so state plumbing and reset are exercised.
    """
    from onnx import TensorProto, helper, numpy_helper

    out_dir.mkdir(parents=True, exist_ok=True)
    ch = 1 if mask == "magnitude" else 2
    f32 = TensorProto.FLOAT

    def counter(prefix: str):
        return (
            [helper.make_node("Add", [f"{prefix}_count", "one"], [f"{prefix}_count_out"])],
            helper.make_tensor_value_info(f"{prefix}_count", f32, [BATCH, 1]),
            helper.make_tensor_value_info(f"{prefix}_count_out", f32, [BATCH, 1]),
        )

    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    zero = numpy_helper.from_array(np.zeros(1, np.float32), "zero")
    if mask == "magnitude":
        mask_nodes = [
            helper.make_node("Mul", ["feat", "zero"], ["z"]),
            helper.make_node("Add", ["z", "one"], ["mask"]),
        ]
    else:  # complex mask 1 + 0j
        unit = numpy_helper.from_array(
            np.stack([np.ones(N_BINS), np.zeros(N_BINS)])[None].astype(np.float32), "unit"
        )
        mask_nodes = [
            helper.make_node("Mul", ["feat", "zero"], ["z"]),
            helper.make_node("Add", ["z", "unit"], ["mask"]),
        ]
    cnodes, cin, cout = counter("m")
    inits = [one, zero] + ([] if mask == "magnitude" else [unit])
    g1 = helper.make_graph(
        mask_nodes + cnodes,
        "passthrough_mask",
        [helper.make_tensor_value_info("feat", f32, [BATCH, ch, N_BINS]), cin],
        [helper.make_tensor_value_info("mask", f32, [BATCH, ch, N_BINS]), cout],
        inits,
    )
    _save(g1, out_dir / "mask.onnx")
    graphs = [
        GraphSpec(
            role="mask",
            file="mask.onnx",
            sha256=sha256_file(out_dir / "mask.onnx"),
            signal_in=TensorSpec(name="feat", shape=[BATCH, ch, N_BINS]),
            signal_out=TensorSpec(name="mask", shape=[BATCH, ch, N_BINS]),
            states=[StateSpec(input="m_count", output="m_count_out", shape=[BATCH, 1])],
        )
    ]
    if window == "none":
        scale = numpy_helper.from_array(np.array([BLOCK_SHIFT / BLOCK_LEN], np.float32), "scale")
        cnodes, cin, cout = counter("f")
        g2 = helper.make_graph(
            [helper.make_node("Mul", ["frame", "scale"], ["block"])] + cnodes,
            "passthrough_frame",
            [helper.make_tensor_value_info("frame", f32, [BATCH, 1, BLOCK_LEN]), cin],
            [helper.make_tensor_value_info("block", f32, [BATCH, 1, BLOCK_LEN]), cout],
            [scale, one],
        )
        _save(g2, out_dir / "frame.onnx")
        graphs.append(
            GraphSpec(
                role="frame",
                file="frame.onnx",
                sha256=sha256_file(out_dir / "frame.onnx"),
                signal_in=TensorSpec(name="frame", shape=[BATCH, 1, BLOCK_LEN]),
                signal_out=TensorSpec(name="block", shape=[BATCH, 1, BLOCK_LEN]),
                states=[StateSpec(input="f_count", output="f_count_out", shape=[BATCH, 1])],
            )
        )
    write_manifest(
        out_dir,
        Manifest(
            name="passthrough",
            family=PASSTHROUGH_FAMILY,
            description="identity model for tests",
            latency_samples=LATENCY_SAMPLES,
            frontend=FrontEnd(window=window, mask=mask),
            graphs=graphs,
            provenance=Provenance(origin="built by tests/packs.py"),
        ),
    )
    return out_dir


def build_random_dtln_pack(out_dir: Path, seed: int = 0, norm: bool = False) -> Path:
    """A randomly initialised DTLN exported through the real exporter (needs torch)."""
    import torch

    from rtns.pack import Provenance
    from rtns_export.dtln import DTLN, DTLNConfig, export_dtln

    torch.manual_seed(seed)
    model = DTLN(DTLNConfig(norm=norm))
    export_dtln(model, out_dir, name="random-dtln", provenance=Provenance(origin="random init"))
    return out_dir


def perturbed(model):
    """``model`` with every weight moved off its initial value (PReLU slopes and biases too)
    and random batch-norm statistics, at the scale of a trained model, in eval mode."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + 0.2 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.05, 0.05)
                mod.running_var.uniform_(0.8, 1.25)
    return model.eval()


def voiced(seconds: float, f0: float, rng: np.random.Generator, sr: int = 16_000) -> np.ndarray:
    """A synthetic voiced utterance: harmonics of a wobbling f0 under a syllable-rate
    envelope, float32."""
    t = np.arange(int(seconds * sr)) / sr
    f = f0 * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
    ph = 2 * np.pi * np.cumsum(f) / sr
    x = sum(np.sin(k * ph) / k for k in range(1, 20))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.1 * x * env).astype(np.float32)


def parameters_in_graph(model, path: Path) -> int:
    """How many parameter elements of ``model`` (a complex-mask model) its exported graph
    holds, counted in the graph: a copy with every parameter outside batch norms set to an
    id of its own (2**22 + k, exact in float32; the export may negate one, as for a complex
    weight's -W_i) and every batch norm the identity is exported to ``path``, and the
    distinct ids found in the graph's float tensors (initializers and Constant nodes) are
    counted. The batch norms' weight and bias, which the export folds into the convolution
    before them (no tensor of their own), are added from the model."""
    import copy

    import onnx
    import torch
    from onnx import numpy_helper

    from rtns_export.exporter import complex_mask_graph, export_graph

    id0 = 2**22
    probe = copy.deepcopy(model).eval()
    norms = [m for m in probe.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    in_norms = {id(p) for m in norms for p in m.parameters()}
    k = 0
    with torch.no_grad():
        for m in norms:
            m.eps = 0.0
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.weight.fill_(1.0)
            m.bias.zero_()
        for p in probe.parameters():
            if id(p) not in in_norms:
                p.copy_(torch.arange(k, k + p.numel(), dtype=torch.float64).reshape(p.shape) + id0)
                k += p.numel()
    assert k < id0
    export_graph(complex_mask_graph(probe, path.name), path)
    graph = onnx.load(str(path)).graph
    tensors = [numpy_helper.to_array(t) for t in graph.initializer]
    tensors += [
        numpy_helper.to_array(a.t)
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    found: set[int] = set()
    for a in tensors:
        if a.dtype == np.float32:
            v = np.abs(a.astype(np.float64).reshape(-1)) - id0
            found.update(v[(v >= 0) & (v < k) & (v == np.round(v))].astype(np.int64).tolist())
    return len(found) + sum(p.numel() for m in norms for p in m.parameters())
