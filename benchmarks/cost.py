#!/usr/bin/env python3
"""What a model costs to serve, against rtns-dtln, in one interleaved run.

For every ``--pack`` (a pack name or folder) and every ``--candidate`` (a model family and
its options, exported here with random weights, parity-checked, to a temporary pack):

- ``kernels``: nodes left in its graphs after onnxruntime's optimisation (one thread);
- ``state``: recurrent state floats per stream (from the manifest's state tensors);
- ``MMAC``: multiply-accumulates per hop (the manifest's provenance, when it says);
- ``hop``: one :class:`rtns.engine.Stream` hop (128 samples in, DSP included) at one
  thread, p50 / p99 over ``--hops`` hops, and its ratio to the reference's p50;
- ``row@N``: one :meth:`rtns.bank.StreamBank.step` over N streams (rFFT, one onnxruntime
  call, irFFT, overlap-add for all), divided by N, for N in ``--streams``; the ratio to the
  reference's at the same N.

Subjects and the reference alternate in rounds of ``--round`` hops (or bank steps), so both
see the same machine load; the ratios are medians of the per-round ratios. Absolute times
drift with load, ratios much less. Prints a markdown table (and ``--json``)::

    python benchmarks/cost.py --pack models/rtns-gtcrn \\
        --candidate 'fast32=fastnet:{"channels": 32, "bands": 16}'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOP = 128
DEFAULT_STREAMS = (1, 8, 32, 64, 128)


def optimized_kernels(model) -> int:  # rtns.engine.Model -> int
    """Nodes of every graph of the pack after onnxruntime's optimisation at one thread."""
    import onnx
    import onnxruntime as ort

    from rtns.engine import session_options

    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(model.manifest.graphs):
            opts = session_options(1)
            opts.optimized_model_filepath = str(Path(tmp) / f"g{i}.onnx")
            data = (model.pack_dir / spec.file).read_bytes()
            ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            total += len(onnx.load(opts.optimized_model_filepath).graph.node)
    return total


def state_floats(model) -> int:
    return sum(int(np.prod(s.shape[1:])) for g in model.manifest.graphs for s in g.states)


def export_candidate(label: str, family: str, options: dict, out: Path) -> Path:
    """Build ``family`` with ``options`` (random weights, seed 0), export and check a pack."""
    import torch

    from rtns.pack import Provenance
    from rtns_export.families import get_family

    torch.manual_seed(0)
    fam = get_family(family)
    model = fam.build(dict(options)).eval()
    pack = out / label
    prov = Provenance(origin="random weights (seed 0) for a cost measurement")
    fam.export(model, pack, name=label, provenance=prov)
    return pack


class Subject:
    """One pack under test: its one-hop stream and its banks at each stream count."""

    def __init__(self, label: str, pack: Path | str, streams: tuple[int, ...]) -> None:
        from rtns.bank import StreamBank
        from rtns.config import EngineConfig
        from rtns.engine import Model

        self.label = label
        self.model = Model(pack, EngineConfig(threads=1))
        self.stream = self.model.stream()
        self.banks = {}
        for n in streams:
            bank = StreamBank(self.model, n, max_batch=max(streams))
            slots = np.array([bank.open() for _ in range(n)], dtype=np.int64)
            self.banks[n] = (bank, slots)
        prov = self.model.manifest.provenance
        extra = prov.model_extra or {}
        self.info = {
            "label": label,
            "pack": str(pack),
            "family": self.model.manifest.family,
            "kernels": optimized_kernels(self.model),
            "state_floats": state_floats(self.model),
            "mmac_per_hop": (extra.get("macs_per_hop") or 0) / 1e6 or None,
            "parameters": extra.get("parameters"),
        }

    def hop_round(self, x: np.ndarray) -> np.ndarray:
        """Time ``Stream.push`` of each hop of x [k, 128]; ns [k]."""
        clock, push = time.perf_counter_ns, self.stream.push
        ns = np.empty(x.shape[0], np.int64)
        for i in range(x.shape[0]):
            t0 = clock()
            push(x[i])
            ns[i] = clock() - t0
        return ns

    def bank_round(self, n: int, x: np.ndarray, steps: int) -> np.ndarray:
        """Time ``steps`` bank steps over n streams (the feeding is not timed); ns per row."""
        bank, slots = self.banks[n]
        clock = time.perf_counter_ns
        ns = np.empty(steps, np.int64)
        for i in range(steps):
            for j, s in enumerate(slots):
                bank.feed(int(s), x[(i + j) % x.shape[0]])
            t0 = clock()
            bank.step(slots)
            ns[i] = clock() - t0
        return ns / n


def interleave(
    subjects: list[Subject], run: Callable[[Subject], np.ndarray], rounds: int
) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {s.label: [] for s in subjects}
    run(subjects[0]), run(subjects[-1])  # warm-up
    for _ in range(rounds):
        for s in subjects:
            out[s.label].append(run(s))
    return out


def summarise(times: dict[str, list[np.ndarray]], ref: str) -> dict[str, dict]:
    res = {}
    for label, rounds in times.items():
        allv = np.concatenate(rounds) / 1e3  # us
        per_round = [
            float(np.median(a) / np.median(b)) for a, b in zip(rounds, times[ref], strict=True)
        ]
        res[label] = {
            "p50_us": float(np.median(allv)),
            "p99_us": float(np.percentile(allv, 99)),
            "ratio": float(np.median(per_round)),
        }
    return res


def measure(subjects: list[Subject], streams, hops: int, round_hops: int) -> dict:
    rng = np.random.default_rng(7)
    x = (0.05 * rng.standard_normal((round_hops, HOP))).astype(np.float32)
    rounds = max(2, hops // round_hops)
    ref = subjects[0].label
    out = {"hop": summarise(interleave(subjects, lambda s: s.hop_round(x), rounds), ref)}
    for n in streams:
        steps = max(4, round_hops // max(1, n // 8))
        t = interleave(subjects, lambda s, n=n, k=steps: s.bank_round(n, x, k), rounds)
        out[f"row@{n}"] = summarise(t, ref)
    return out


def table(subjects: list[Subject], res: dict, streams) -> str:
    head = ["subject", "kernels", "state floats", "MMAC/hop", "hop p50 / p99 us (x ref)"]
    head += [f"row@{n} us (x ref)" for n in streams]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in subjects:
        i, h = s.info, res["hop"][s.label]
        mmac = f"{i['mmac_per_hop']:.2f}" if i["mmac_per_hop"] else "-"
        cells = [s.label, str(i["kernels"]), f"{i['state_floats']:,}", mmac]
        cells.append(f"{h['p50_us']:.0f} / {h['p99_us']:.0f} ({h['ratio']:.2f}x)")
        for n in streams:
            r = res[f"row@{n}"][s.label]
            cells.append(f"{r['p50_us']:.1f} ({r['ratio']:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_candidate(text: str) -> tuple[str, str, dict]:
    try:
        label, rest = text.split("=", 1)
        family, opts = rest.split(":", 1)
        options = json.loads(opts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--candidate {text!r}: expected LABEL=FAMILY:JSON ({e})"
        ) from None
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise argparse.ArgumentTypeError(
            f"--candidate {text!r}: LABEL may hold letters, digits, '_', '.' and '-' only"
        )
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"--candidate {text!r}: options must be a JSON object")
    return label, family, options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--reference", default="rtns-dtln", help="the reference pack (rtns-dtln)")
    ap.add_argument("--pack", action="append", default=[], help="a pack to measure (repeat)")
    ap.add_argument(
        "--candidate",
        action="append",
        default=[],
        type=parse_candidate,
        metavar="LABEL=FAMILY:JSON",
        help="a model to export with random weights (repeat)",
    )
    ap.add_argument("--streams", default=",".join(map(str, DEFAULT_STREAMS)))
    ap.add_argument("--hops", type=int, default=3000, help="hops timed per subject (3000)")
    ap.add_argument("--round", type=int, default=250, help="hops per interleaved round (250)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    try:
        streams = tuple(int(v) for v in args.streams.split(","))
    except ValueError:
        ap.error(f"--streams must be comma-separated integers, got {args.streams!r}")
    if not streams or min(streams) < 1 or max(streams) > 1024:
        ap.error("--streams values must be in 1..1024")
    if not 10 <= args.round <= args.hops:
        ap.error("--round must be at least 10 and at most --hops")
    if not (args.pack or args.candidate):
        ap.error("give at least one --pack or --candidate")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        packs = [(Path(p).name, p) for p in args.pack]
        for label, family, options in args.candidate:
            packs.append((label, export_candidate(label, family, options, Path(tmp))))
        subjects = [Subject(f"{Path(args.reference).name} (ref)", args.reference, streams)]
        subjects += [Subject(label, p, streams) for label, p in packs]
        res = measure(subjects, streams, args.hops, args.round)
    print(
        f"onnxruntime at one thread; load average {load:.2f} at start"
        + (" (busy: absolute times drift, ratios hold better)" if load > 0.5 else "")
    )
    print(table(subjects, res, streams))
    if args.json:
        args.json.write_text(
            json.dumps({"subjects": [s.info for s in subjects], "results": res}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
