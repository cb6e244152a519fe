#!/usr/bin/env python3
"""Where a pack's one-hop graph time goes, and the least it could be in onnxruntime.

For every graph of every ``--pack``, at one thread, after onnxruntime's own optimisation:

- ``run``: ``session.run`` median and p99 over ``--runs`` calls (the graph alone, no DSP);
- ``kernels``: the nodes left in the optimised graph;
- every recurrent node (GRU / LSTM / RNN) timed alone, in a graph of its own with its
  weights as constants and its inputs as captured from one real call, less the cost of an
  empty call (a one-node graph);
- ``node``: this machine's cost of a trivial kernel (a chain of Add / Mul on a [1, 16, 33]
  tensor, the per-node dispatch a kernel pays whatever it computes).

and a **floor**: recurrent kernels + (other kernels x trivial-kernel cost) + one empty call.
No rewrite of the same nodes runs faster than that; a graph whose floor exceeds another
pack's measured ``run`` cannot match it without fewer recurrent steps or fewer kernels.
Interleaved in one process, so the ratios hold under load; absolute figures drift::

    python benchmarks/graph_cost.py --pack models/rtns-dtln --pack models/rtns-gtcrn
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECURRENT = ("GRU", "LSTM", "RNN")
#: Inputs 1..3 of an ONNX recurrent node: W, R, B (constants of a trained model).
WEIGHT_SLOTS = (1, 2, 3)


def _onnx():
    try:
        import onnx
    except ImportError:
        sys.exit("benchmarks/graph_cost.py needs onnx: pip install -e '.[test]'")
    return onnx


def _session(model_bytes: bytes, optimized_to: Path | None = None):
    import onnxruntime as ort

    from rtns.engine import session_options

    opts = session_options(1)
    if optimized_to is not None:
        opts.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def time_calls(call: Callable[[], object], runs: int) -> dict[str, float]:
    """Median and p99 of ``call()`` in microseconds, after a warm-up of runs // 10 calls."""
    for _ in range(max(1, runs // 10)):
        call()
    t = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        call()
        t[i] = time.perf_counter() - t0
    t *= 1e6
    return {"p50_us": float(np.median(t)), "p99_us": float(np.percentile(t, 99))}


def _chain(n: int) -> bytes:
    """A graph of ``n`` elementwise kernels on a [1, 16, 33] float tensor."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Add" if i % 2 == 0 else "Mul", [prev, "c"], [f"y{i}"]))
        prev = f"y{i}"
    shape = [1, 16, 33]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)],
        [helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0001])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def node_cost(runs: int, length: int = 201) -> dict[str, float]:
    """The empty-call cost (one trivial node) and the cost of each further trivial node."""
    x = {"x": np.ones((1, 16, 33), np.float32)}
    one, many = _session(_chain(1)), _session(_chain(length))
    t1 = time_calls(lambda: one.run(None, x), runs)["p50_us"]
    tn = time_calls(lambda: many.run(None, x), runs)["p50_us"]
    return {"call_us": t1, "node_us": (tn - t1) / (length - 1)}


def _feeds(session, spec, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (1, *spec.signal_in.inner_shape)
    feeds = {spec.signal_in.name: (0.1 * rng.standard_normal(shape)).astype(np.float32)}
    for st in spec.states:
        feeds[st.input] = state[st.input]
    return feeds


def recurrent_nodes(path: Path, feeds: dict[str, np.ndarray], runs: int) -> list[dict]:
    """Each recurrent node of the graph at ``path`` timed alone (the call's cost included)."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    rnns = [n for n in model.graph.node if n.op_type in RECURRENT]
    if not rnns:
        return []
    # One real call with every recurrent input exposed gives inputs of the true shapes.
    probe = onnx.load(str(path))
    wanted = sorted({x for n in rnns for x in n.input if x and x not in inits})
    for name in wanted:
        probe.graph.output.append(helper.make_tensor_value_info(name, 1, None))
    session = _session(probe.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds), strict=True))
    out = []
    for node in rnns:
        ins, consts, node_feeds = [], [], {}
        for slot, name in enumerate(node.input):
            if not name:
                continue
            if name in inits:
                consts.append(inits[name])
            elif slot in WEIGHT_SLOTS:  # weights computed in the graph: constant-folded there
                consts.append(numpy_helper.from_array(values[name], name))
            else:
                a = values[name]
                ins.append(helper.make_tensor_value_info(name, 1, list(a.shape)))
                node_feeds[name] = a
        outs = [helper.make_tensor_value_info(o, 1, None) for o in node.output if o]
        graph = helper.make_graph([node], "one", ins, outs, consts)
        alone = helper.make_model(graph, opset_imports=model.opset_import)
        alone.ir_version = model.ir_version
        s = _session(alone.SerializeToString())
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        direction = attrs.get("direction", b"forward")
        x = node_feeds.get(node.input[0])
        out.append(
            {
                "name": node.name,
                "op": node.op_type,
                "direction": direction.decode() if isinstance(direction, bytes) else direction,
                "hidden": int(attrs.get("hidden_size", 0)),
                "steps": int(x.shape[0]) if x is not None else None,
                **time_calls(lambda s=s, f=node_feeds: s.run(None, f), runs),
            }
        )
    return out


def graph_cost(pack: str, runs: int, call_us: float, node_us: float) -> list[dict]:
    """Every graph of ``pack``: measured run time, kernels, recurrent nodes and the floor."""
    onnx = _onnx()
    from rtns.engine import Model

    model = Model(pack)
    state = model.initial_state(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(model.manifest.graphs):
            path = model.pack_dir / spec.file
            optimized = Path(tmp) / f"graph{i}.onnx"
            session = _session(path.read_bytes(), optimized)
            feeds = _feeds(session, spec, state)
            run = time_calls(lambda s=session, f=feeds: s.run(None, f), runs)
            kernels = len(onnx.load(str(optimized)).graph.node)
            rnns = recurrent_nodes(path, feeds, runs)
            rnn_us = sum(max(r["p50_us"] - call_us, 0.0) for r in rnns)
            floor = call_us + rnn_us + (kernels - len(rnns)) * node_us
            rows.append(
                {
                    "pack": model.name,
                    "graph": spec.file,
                    "kernels": kernels,
                    "recurrent": rnns,
                    "recurrent_us": rnn_us,
                    "floor_us": floor,
                    **run,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--pack", action="append", required=True, help="pack (repeat)")
    ap.add_argument("--runs", type=int, default=3000, help="calls timed per graph (3000)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.runs < 10:
        ap.error("--runs must be at least 10")

    base = node_cost(args.runs)
    print(
        f"onnxruntime, one thread: an empty call {base['call_us']:.1f} us, "
        f"each further trivial kernel {base['node_us']:.2f} us"
    )
    rows = [r for p in args.pack for r in graph_cost(p, args.runs, **base)]
    print(
        "| pack | graph | kernels | run p50 / p99 (us) | recurrent nodes (us, alone) | floor (us) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        rec = ", ".join(
            f"{n['op']} {n['direction'][:2]} x{n['steps']} {n['p50_us'] - base['call_us']:.1f}"
            for n in r["recurrent"]
        )
        print(
            f"| {r['pack']} | {r['graph']} | {r['kernels']} | {r['p50_us']:.1f} / "
            f"{r['p99_us']:.1f} | {rec or '-'} (sum {r['recurrent_us']:.1f}) | "
            f"{r['floor_us']:.1f} |"
        )
    per_pack: dict[str, dict[str, float]] = {}
    for r in rows:
        p = per_pack.setdefault(r["pack"], {"run_us": 0.0, "floor_us": 0.0})
        p["run_us"] += r["p50_us"]
        p["floor_us"] += r["floor_us"]
    for name, p in per_pack.items():
        print(f"{name}: graphs {p['run_us']:.1f} us per hop (p50), floor {p['floor_us']:.1f} us")
    if args.json:
        args.json.write_text(json.dumps({"node": base, "graphs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
