"""benchmarks/graph_cost.py: the recurrent nodes it finds and times alone are the graph's,
and its floor adds up from the parts it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("graph_cost")


def test_random_dtln_costs(bench, random_dtln_pack, tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert bench.main(["--pack", str(random_dtln_pack), "--runs", "20", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    node = res["node"]
    assert node["call_us"] > 0
    graphs = res["graphs"]
    assert [g["graph"] for g in graphs] == ["dtln_stage1.onnx", "dtln_stage2.onnx"]
    for g in graphs:
        lstms = [n for n in onnx.load(str(random_dtln_pack / g["graph"])).graph.node]
        lstms = [n.name for n in lstms if n.op_type == "LSTM"]
        # DTLN: two stacked LSTMs per stage, one step per hop, each found and timed alone
        assert [r["name"] for r in g["recurrent"]] == lstms and len(lstms) == 2
        assert all(
            r["op"] == "LSTM" and r["steps"] == 1 and r["p50_us"] > 0 for r in g["recurrent"]
        )
        assert 0 < len(g["recurrent"]) < g["kernels"]
        expect = node["call_us"] + g["recurrent_us"]
        expect += (g["kernels"] - len(g["recurrent"])) * node["node_us"]
        assert g["floor_us"] == pytest.approx(expect)
        assert g["p99_us"] >= g["p50_us"] > 0
    text = capsys.readouterr().out
    assert "each further trivial kernel" in text and "floor" in text


def test_rejects_too_few_runs(bench, random_dtln_pack):
    with pytest.raises(SystemExit):
        bench.main(["--pack", str(random_dtln_pack), "--runs", "3"])
