"""Make an exported graph batch-invariant on x86-64 onnxruntime: rows of a batched call equal,
bit for bit, the same rows run alone.

Why rows can differ: onnxruntime's element-wise kernels for transcendental functions (Log,
Exp, Tanh, Sigmoid, ...) run SIMD over the *flattened* tensor and finish with a scalar
tail that is computed differently. With a feature axis of 257 (the rFFT bins of a 512
block), element ``k`` of row ``b`` sits at flat position ``257 b + k``: whether it falls in
the SIMD body or in the scalar tail depends on the batch size and on the row's position,
so the last bit of ``log|X|`` at bin 256 changed with the batch (found on this project's
CPU, see issue "Many streams per core").

The fix, by construction: before every such node whose last axis is not a multiple of
:data:`LANES`, pad that axis (with a value inside the function's domain) to the next
multiple, and slice the result back right after. Every row then starts at a multiple of
the SIMD width, so each element takes the same path whatever the batch. The values of
the real elements do not change at all (the op is element-wise), so the graph computes
exactly what it did at batch 1.

    python -m rtns_export.batchsafe PACK_DIR    # rewrites the pack's graphs and manifest
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

#: Row alignment in float32 elements: 16 = one AVX-512 register (a multiple of 8 for AVX2).
LANES = 16
#: Element-wise ops whose SIMD and scalar code paths may round differently (polynomial
#: approximations; +, -, *, / and sqrt are exact in both), and a padding value inside each
#: one's domain (the padded results are discarded).
TRANSCENDENTAL = {
    "Log": 1.0,
    "Exp": 0.0,
    "Tanh": 0.0,
    "Sigmoid": 0.0,
    "Softplus": 0.0,
    "Erf": 0.0,
    "Sin": 0.0,
    "Cos": 0.0,
}


def _last_dim(value_info: dict, name: str) -> int | None:
    vi = value_info.get(name)
    if vi is None:
        return None
    dims = vi.type.tensor_type.shape.dim
    if not dims or not dims[-1].HasField("dim_value"):
        return None
    return int(dims[-1].dim_value), len(dims)  # type: ignore[return-value]


def make_batch_invariant(model):  # onnx.ModelProto -> (onnx.ModelProto, int)
    """Returns (the rewritten model, how many nodes were wrapped)."""
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    info = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    out_nodes = []
    wrapped = 0
    for node in g.node:
        pad_value = TRANSCENDENTAL.get(node.op_type)
        shape = _last_dim(info, node.input[0]) if pad_value is not None and node.input else None
        if shape is None or shape[0] % LANES == 0:
            out_nodes.append(node)
            continue
        n, rank = shape
        extra = -n % LANES
        tag = f"batchsafe{wrapped}"
        pads = np.zeros(2 * rank, np.int64)
        pads[rank - 1 + rank] = extra  # end of the last axis
        inits = [
            numpy_helper.from_array(pads, f"{tag}_pads"),
            numpy_helper.from_array(np.array(pad_value, np.float32), f"{tag}_value"),
            numpy_helper.from_array(np.array([0], np.int64), f"{tag}_start"),
            numpy_helper.from_array(np.array([n], np.int64), f"{tag}_end"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{tag}_axis"),
        ]
        g.initializer.extend(inits)
        padded = f"{tag}_in"
        out_nodes.append(
            helper.make_node(
                "Pad", [node.input[0], f"{tag}_pads", f"{tag}_value"], [padded], mode="constant"
            )
        )
        inner_out = f"{tag}_out"
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[0] = padded
        original_out = node.output[0]
        new.output[0] = inner_out
        out_nodes.append(new)
        out_nodes.append(
            helper.make_node(
                "Slice",
                [inner_out, f"{tag}_start", f"{tag}_end", f"{tag}_axis"],
                [original_out],
            )
        )
        wrapped += 1
    del g.node[:]
    g.node.extend(out_nodes)
    # Drop inferred value_info: it no longer matches the padded intermediates.
    del g.value_info[:]
    onnx.checker.check_model(inferred)
    return inferred, wrapped


def rewrite_file(path: Path) -> int:
    """Rewrite one ONNX file in place; returns the number of wrapped nodes."""
    import onnx

    model, wrapped = make_batch_invariant(onnx.load(str(path)))
    if wrapped:
        onnx.save(model, str(path))
    return wrapped


def rewrite_pack(pack_dir: Path) -> dict[str, int]:
    """Rewrite every graph of a pack and update the manifest's sha256s."""
    from rtns.pack import read_manifest, sha256_file, write_manifest

    man = read_manifest(pack_dir)
    counts = {}
    graphs = []
    for gspec in man.graphs:
        path = pack_dir / gspec.file
        counts[gspec.file] = rewrite_file(path)
        graphs.append(gspec.model_copy(update={"sha256": sha256_file(path)}))
    write_manifest(pack_dir, man.model_copy(update={"graphs": graphs}))
    return counts


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, rewrite_pack(Path(arg)))
