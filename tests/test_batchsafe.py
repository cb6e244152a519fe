"""Batch invariance by construction: every shipped pack's rows are bit-identical to batch 1,
and the exporter's pass makes a graph so without changing its values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtns.daemon.server import ServerConfig, batch_invariant
from rtns.engine import Model

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.parent.name for p in (REPO / "models").glob("*/manifest.json"))


@pytest.mark.parametrize("pack", SHIPPED)
def test_shipped_pack_is_batch_invariant_here(pack):
    # Up to the server's default max_batch: the complex-mask packs used to fail at 128
    # rows (numpy's temporary elision, see rtns.dsp.apply_complex_mask) and be capped.
    assert batch_invariant(Model(REPO / "models" / pack), max_batch=ServerConfig().max_batch)


def test_pass_wraps_transcendentals_and_keeps_values(tmp_path):
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rtns_export.batchsafe import LANES, make_batch_invariant

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 257])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 257])
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"]), helper.make_node("Sigmoid", ["l"], ["y"])],
        "g",
        [x],
        [y],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fixed, wrapped = make_batch_invariant(model)
    assert wrapped == 2 and LANES == 16
    ops = [n.op_type for n in fixed.graph.node]
    assert ops == ["Pad", "Log", "Slice", "Pad", "Sigmoid", "Slice"]
    rng = np.random.default_rng(0)
    feat = rng.uniform(0.01, 10, (64, 1, 257)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    alone = np.concatenate([after.run(None, {"x": feat[b : b + 1]})[0] for b in range(64)])
    for size in (2, 7, 64):
        np.testing.assert_array_equal(after.run(None, {"x": feat[:size]})[0], alone[:size])
    np.testing.assert_allclose(
        after.run(None, {"x": feat})[0], before.run(None, {"x": feat})[0], rtol=1e-6, atol=0
    )
    onnx.checker.check_model(fixed)
