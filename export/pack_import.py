"""Read a shipped pack's ONNX weights back into the PyTorch model they were exported from, so
that a shipped model can be trained further (``"init_from": "models/rtns-gtcrn"``) when the
checkpoints behind it are gone.

The export is not a plain copy of the parameters: GRU weights are re-ordered and split,
linear weights transposed, and a batch norm that follows a convolution is folded into it.
Rather than re-deriving each rewrite by hand, :func:`import_pack` exports *probe* copies of
the model through the same exporter and reads the mapping off them:

- probe A: every parameter element set to its own integer id (2**22 + k, exact in float32;
  the export may negate it, as a complex weight's -W_i),
  every batch norm set to the identity (eps 0, mean 0, var 1, scale 1, shift 0), so a folded
  convolution keeps its ids; the graph's constants (ERB matrices, one-hot taps) keep their
  values and are compared with the pack's.
- probe B: the batch norms' parameters and statistics as ids, everything else 0: a batch
  norm the export left in the graph shows up with its own ids.

The pack's tensor at the same place in the same graph then gives each id its value. Where
the export sums two parameters into one constant (fastnet's one-frame GRU adds the input and
recurrent biases of the r and z gates), only their sum is in the pack: a model names such
elements in ``redundant_elements()`` ({parameter name: index}); the probe holds them at zero,
so the sum maps to the other term, and the import sets them to zero (the same function). A batch
norm that was folded has no values of its own left: its convolution holds the folded weights,
and the norm must act as the identity in eval mode. :func:`calibrate_folded_norms` makes it
so with the statistics of real inputs (mean m, variance v per channel; scale sqrt(v + eps),
shift m), which keeps training-mode batch statistics close to the identity as well.
:func:`import_pack`'s caller checks the result through the engine (``check_parity``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from rtns.pack import Manifest, PackError, read_manifest, verify_files

ID0 = 2.0**22  # ids 2**22 + k are exact float32 integers for k < 2**22
COMPLEX_MASK_FAMILIES = ("fastnet", "frcrn", "gtcrn", "lowlat")


class PackImportError(ValueError):
    """The pack cannot be read into this model; one sentence."""


@dataclass
class ImportReport:
    """What :func:`import_pack` did: the pack's lineage and the batch norms left to
    :func:`calibrate_folded_norms`."""

    pack: str
    sha256: str
    steps: int
    minutes: float
    validation: dict[str, float] | None
    folded_norms: list[str] = field(default_factory=list)
    tensors: int = 0


def pack_family(man: Manifest) -> str:
    """The training family of a pack's model: its provenance's architecture (a gtcrn pack
    uses the engine's complex-mask layout of family frcrn), else the manifest's family."""
    return getattr(man.provenance, "architecture", None) or man.family


def _graph_tensors(path: Path) -> tuple[list[str], dict[tuple[int, int], np.ndarray]]:
    """(op types of the nodes in order, {(node index, input slot): float tensor}) for every
    input that is an initializer or a Constant node's output."""
    m = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    nodes = []
    for n in m.graph.node:
        # the exporter shares equal initializers through Identity nodes (a probe's identity
        # batch norm has equal scale and variance): seen through, they are not nodes here
        if n.op_type == "Identity" and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
        else:
            nodes.append(n)
    ops, found = [], {}
    for i, n in enumerate(nodes):
        ops.append(n.op_type)
        for k, name in enumerate(n.input):
            a = consts.get(name)
            if a is not None and a.dtype == np.float32:
                found[(i, k)] = a
    return ops, found


def _norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _export_probe(model: nn.Module, file: str, path: Path) -> None:
    from rtns_export.exporter import complex_mask_graph, export_graph

    export_graph(complex_mask_graph(model.eval(), file), path)


def _probe_slots(model: nn.Module, norm_ids: bool) -> list[tuple[str, torch.Tensor]]:
    """Set the probe's values (see the module doc) and return the id slots in order: one
    (name, tensor) per parameter or statistic that received ids."""
    norm_names = {n for n, _ in _norms(model)}
    slots: list[tuple[str, torch.Tensor]] = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if owner in norm_names:
                continue
            if norm_ids:
                p.zero_()
            else:
                slots.append((name, p))
        for name, bn in _norms(model):
            bn.eps = 0.0
            if norm_ids:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(bn, attr)
                    if t is not None:
                        slots.append((f"{name}.{attr}", t))
            else:
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                if bn.weight is not None:
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
        k = 0
        for _, t in slots:
            t.copy_(torch.arange(k, k + t.numel(), dtype=torch.float64).reshape(t.shape) + ID0)
            k += t.numel()
        params = dict(model.named_parameters())
        for name, index in redundant_elements(model).items():
            params[name][index] = 0.0
    if k >= ID0:
        raise PackImportError(f"model too large to probe ({k} values)")
    return slots


def redundant_elements(model: nn.Module) -> dict[str, object]:
    """{parameter name: index} of the elements the export folds into a sum with another
    parameter (see the module doc); empty for most models."""
    fn = getattr(model, "redundant_elements", None)
    return dict(fn()) if fn is not None else {}


def _ids(a: np.ndarray, n: int) -> np.ndarray:
    """Signed index: k + 1 where ``a`` holds the id 2**22 + k (k < n), -(k + 1) where it holds
    its negation (a complex weight's -W_i), else 0."""
    k = np.abs(a.astype(np.float64)) - ID0
    ok = (k >= 0) & (k < n) & (k == np.round(k))
    return np.where(ok, (np.round(k) + 1) * np.sign(a), 0).astype(np.int64)


def _values_by_id(
    pack_dir: Path,
    slots: list[tuple[str, torch.Tensor]],
    tensors: dict[tuple[int, int], np.ndarray],
    shipped: dict[tuple[int, int], np.ndarray],
    folded_ok: bool,
    redundant: dict[str, object],
) -> dict[str, torch.Tensor]:
    """{slot name: its values in the pack} for one probe: each id found in a probe tensor
    takes the shipped value at the same place. Every slot must be found whole, except (with
    ``folded_ok``) batch norms the export folded away, found not at all."""
    sizes = [t.numel() for _, t in slots]
    n = int(sum(sizes))
    flat = np.full(n, np.nan)
    off = 0
    for (name, t), size in zip(slots, sizes, strict=True):
        if name in redundant:  # held at zero in the probe: zero in the model too
            mask = np.zeros(tuple(t.shape), dtype=bool)
            mask[redundant[name]] = True
            flat[off : off + size][mask.reshape(-1)] = 0.0
        off += size
    for key, a in tensors.items():
        idx = _ids(a, n).reshape(-1)
        hit = idx != 0
        k = np.abs(idx[hit]) - 1
        v = shipped[key].reshape(-1)[hit].astype(np.float64) * np.sign(idx[hit])
        seen = ~np.isnan(flat[k])
        if seen.any() and not np.allclose(flat[k][seen], v[seen], rtol=1e-5, atol=1e-6):
            raise PackImportError(f"{pack_dir}: one parameter holds two values in the graph")
        flat[k] = v
    values, off = {}, 0
    for (name, t), size in zip(slots, sizes, strict=True):
        chunk = flat[off : off + size]
        off += size
        if folded_ok:
            if np.isnan(chunk).all():
                continue  # a folded batch norm: calibrated later
            if np.isnan(chunk).any():
                raise PackImportError(f"{pack_dir}: {name} is only partly in the graph")
        elif np.isnan(chunk).any():
            raise PackImportError(f"{pack_dir}: parameter {name} is not in the graph")
        values[name] = torch.from_numpy(chunk.reshape(tuple(t.shape)))
    return values


def import_pack(
    pack_dir: str | Path, model: nn.Module, family: str, model_cfg: dict
) -> ImportReport:
    """Load the weights of the pack in ``pack_dir`` into ``model`` (a freshly built model of
    ``family`` with the options ``model_cfg``). Raises :class:`PackImportError` when the pack
    is of another family or configuration, was exported by a different graph layout, or
    leaves a parameter without a value."""
    import tempfile

    pack_dir = Path(pack_dir)
    try:
        man = read_manifest(pack_dir)
        verify_files(pack_dir, man)  # a truncated or altered graph fails here, by its hash
    except PackError as e:
        raise PackImportError(f"{pack_dir}: not a readable pack ({e})") from None
    prov = man.provenance
    if family not in COMPLEX_MASK_FAMILIES:
        raise PackImportError(
            f"importing a {family} pack is not supported (complex-mask families only: "
            f"{', '.join(COMPLEX_MASK_FAMILIES)}); DTLN weights come from their checkpoints"
        )
    arch = pack_family(man)
    if arch != family:
        raise PackImportError(f"{pack_dir} holds a {arch} model, this run builds {family}")
    shipped_cfg = getattr(prov, "model", None)
    shipped_cfg, model_cfg = (json.loads(json.dumps(c)) for c in (shipped_cfg, model_cfg))
    if isinstance(shipped_cfg, dict) and shipped_cfg != model_cfg:
        diff = sorted(
            k for k in set(shipped_cfg) | set(model_cfg) if shipped_cfg.get(k) != model_cfg.get(k)
        )
        raise PackImportError(f"{pack_dir}: model options differ from this run's: {diff}")
    if len(man.graphs) != 1:
        raise PackImportError(f"{pack_dir}: expected one graph, found {len(man.graphs)}")
    graph = man.graphs[0]
    ops, shipped = _graph_tensors(pack_dir / graph.file)

    probes = []
    with tempfile.TemporaryDirectory() as tmp:
        for norm_ids in (False, True):
            probe = copy.deepcopy(model).cpu().float()
            slots = _probe_slots(probe, norm_ids)
            path = Path(tmp) / f"probe{int(norm_ids)}.onnx"
            _export_probe(probe, graph.file, path)
            p_ops, tensors = _graph_tensors(path)
            if p_ops != ops or tensors.keys() != shipped.keys():
                raise PackImportError(
                    f"{pack_dir}: its graph differs from the one this code exports for these "
                    f"{family} model options (another configuration, or another version of "
                    "the code), so its tensors cannot be matched to parameters"
                )
            probes.append((slots, tensors))

    values: dict[str, torch.Tensor] = {}
    counts = [int(sum(t.numel() for _, t in slots)) for slots, _ in probes]
    for key, s in shipped.items():
        a, b = probes[0][1][key], probes[1][1][key]
        if a.shape != s.shape:
            raise PackImportError(f"{pack_dir}: tensor {key} has shape {s.shape}, not {a.shape}")
        const = (_ids(a, counts[0]) == 0) & (_ids(b, counts[1]) == 0)
        # constants of the graph (ERB matrices, one-hot taps) must be the pack's
        if not np.allclose(a[const], s[const], rtol=1e-5, atol=1e-6):
            raise PackImportError(
                f"{pack_dir}: a constant of node {key[0]} ({ops[key[0]]}) differs from this "
                "configuration's"
            )
    for norm_ids, (slots, tensors) in enumerate(probes):
        values |= _values_by_id(
            pack_dir, slots, tensors, shipped, bool(norm_ids), redundant_elements(model)
        )

    folded = []
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for name, v in values.items():
            dst = params.get(name, buffers.get(name))
            dst.copy_(v.to(dst.dtype))
        for name, bn in _norms(model):
            if f"{name}.running_mean" not in values:
                folded.append(name)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
                if bn.weight is not None:
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
    # the whole lineage's minutes where the pack records it (staged runs), else its own
    minutes = getattr(prov, "total_train_minutes", None) or getattr(prov, "train_minutes", 0.0)
    return ImportReport(
        pack=str(pack_dir),
        sha256=graph.sha256,
        steps=int(prov.steps or 0),
        minutes=float(minutes),
        validation=getattr(prov, "validation", None),
        folded_norms=folded,
        tensors=len(shipped),
    )


def calibrate_folded_norms(
    model: nn.Module, names: Iterable[str], inputs: Iterable[torch.Tensor]
) -> None:
    """Make each named (folded) batch norm the identity in eval mode, with statistics of real
    inputs: over ``inputs`` (noisy waveforms [B, N]) its per-channel input mean m and variance
    v; then running stats (m, v), scale sqrt(v + eps), shift m."""
    names = list(names)
    mods = dict(model.named_modules())
    sums: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name):
        def f(_m, args):
            x = args[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1]
            sums[name].append(torch.stack([x.mean(dims), (x * x).mean(dims)]))

        return f

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if names and not batches:
        raise PackImportError("no calibration input for the folded batch norms")
    with torch.no_grad():
        for n in names:
            s = torch.stack(sums[n]).mean(0)
            m, v = s[0], (s[1] - s[0] ** 2).clamp_min(0)
            bn = mods[n]
            bn.running_mean.copy_(m)
            bn.running_var.copy_(v)
            bn.weight.copy_(torch.sqrt(v + bn.eps))
            bn.bias.copy_(m)


def finish_import(
    model: nn.Module, rep: ImportReport, inputs: Iterable[torch.Tensor], tol: float = 1e-4
) -> float:
    """The last part of an import: calibrate the folded batch norms on ``inputs`` (noisy
    waveforms [B, N]), then check ``model`` (on the CPU) against the pack through the engine.
    Returns the largest difference; raises :class:`PackImportError` above ``tol``."""
    from rtns_export.exporter import check_parity, parity_signal

    calibrate_folded_norms(model, rep.folded_norms, inputs)
    par = check_parity(model, Path(rep.pack), parity_signal())
    if not par.max_abs_err <= tol:
        raise PackImportError(
            f"the weights read from {rep.pack} differ from the pack by "
            f"{par.max_abs_err:.3g} through the engine"
        )
    return float(par.max_abs_err)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin CLI
    """Import a pack and check the result through the engine (parity against the pack)."""
    import argparse

    from rtns_export.exporter import check_parity, parity_signal
    from rtns_export.families import build_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pack")
    a = ap.parse_args(argv)
    man = read_manifest(Path(a.pack))
    fam = pack_family(man)
    cfg = dict(man.provenance.model or {})
    model = build_model(fam, cfg)
    rep = import_pack(a.pack, model, fam, cfg)
    x = torch.from_numpy(parity_signal(seconds=4.0, seed=1))[None]
    calibrate_folded_norms(model, rep.folded_norms, [x])
    par = check_parity(model, Path(a.pack), parity_signal())
    print(json.dumps({**rep.__dict__, "parity_max_abs_err": par.max_abs_err}, indent=1))
    return 0 if par.max_abs_err <= 1e-4 else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
