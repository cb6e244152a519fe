#!/usr/bin/env python3
"""Does a mask post-filter buy DNSMOS OVRL? A probe, measured and not adopted.

The post-filter of DeepFilterNet 2 (facts from its paper; code written here) sharpens a
gain G in [0, 1] towards 0 where it is already small::

    G' = (1 + beta) G / (1 + beta G^2 / (G sin(pi G / 2))^2)

G' = G at G = 1 and at beta = 0, and G' < G below 1. For a complex ratio mask G is the
mask's magnitude and the mask is scaled by G'/G (phase kept); gains above 1 are left alone.
It removes more of the residual noise (DNSMOS BAK) at some cost to speech (SIG, PESQ).

This script runs a pack's graphs one hop at a time through ``Model.infer`` with the
post-filter applied to the mask graph's output, and scores every beta on a paired set
(PESQ-WB, STOI, SI-SDR, DNSMOS). The pack's default attenuation limit is not applied: the
post-filter is compared on the mask alone, against the engine with the limit lifted::

    python benchmarks/mask_postfilter.py --pack models/rtns-gtcrn \\
        --clean VALID/clean --noisy VALID/noisy --betas 0,0.01,0.02,0.04

Choose on a validation set (e.g. ``rtns make-testset --clean ../shared/data/valid/speech
--noise ../shared/data/valid/noise --out /tmp/val60 --count 60 --seed 77``), not a test set.
At beta 0 the output is checked to equal ``rtns.engine.enhance_array`` bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (benchmarks/quality.py: pairs, loading, scoring)


def postfilter_scale(gain: np.ndarray, beta: float) -> np.ndarray:
    """G'/G for gains ``gain`` >= 0 (float32, any shape): 1 where G >= 1 or beta == 0."""
    if beta == 0.0:
        return np.ones_like(gain, dtype=np.float32)
    g = np.clip(gain, 1e-6, 1.0).astype(np.float64)
    s2 = np.maximum(np.sin(0.5 * np.pi * g) ** 2, 1e-12)
    scale = (1.0 + beta) / (1.0 + beta / s2)
    return np.where(gain >= 1.0, 1.0, scale).astype(np.float32)


def filtered_model(pack: str):
    """(model, setter): the pack's Model whose mask graph output goes through the
    post-filter of the beta last given to ``setter``."""
    from rtns.engine import Model

    model = Model(pack)
    graph = model._graphs[0]
    run = graph.run
    beta = [0.0]

    def run_filtered(signal, state, new_state):
        m = run(signal, state, new_state)
        if beta[0] == 0.0:
            return m
        gain = np.sqrt((m * m).sum(axis=1)) if m.shape[1] == 2 else m[:, 0]
        return m * postfilter_scale(gain, beta[0])[:, None]

    graph.run = run_filtered

    def set_beta(b: float) -> None:
        beta[0] = float(b)

    return model, set_beta


def enhance(model, x: np.ndarray) -> np.ndarray:
    """x float32 [N] -> the time-aligned estimate [N], one ``Model.infer`` call per hop."""
    n_block, hop = model.block_len, model.block_shift
    lat = model.latency
    padded = np.concatenate([np.zeros(n_block - hop, np.float32), x, np.zeros(n_block, np.float32)])
    out = np.zeros(padded.shape[0] + n_block, np.float32)
    state = model.initial_state(1)
    for k in range(0, padded.shape[0] - n_block + 1, hop):
        y, state = model.infer(padded[None, k : k + n_block], state)
        out[k : k + n_block] += y[0]
    return out[lat : lat + x.shape[0]]


def engine_unlimited(model, x: np.ndarray) -> np.ndarray:
    """The engine's output [N] for x float32 [N] with the pack's attenuation limit lifted:
    what :func:`enhance` must reproduce at beta 0."""
    from rtns.engine import enhance_array

    controls = model.stream()
    controls.atten_lim = "off"
    return enhance_array(model, x, controls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pack", required=True)
    p.add_argument("--clean", type=Path, required=True)
    p.add_argument("--noisy", type=Path, required=True)
    p.add_argument("--betas", default="0,0.01,0.02,0.04")
    args = p.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    from rtns.engine import Model

    model, set_beta = filtered_model(args.pack)
    plain = Model(args.pack)
    quality._single_thread_dnsmos()
    pairs = quality.find_pairs(args.clean, args.noisy)
    rows: dict[float, list[list[float]]] = {b: [] for b in betas}
    for i, pair in enumerate(pairs):
        clean, noisy, _ = quality.load_pair(pair)
        for b in betas:
            set_beta(b)
            est = enhance(model, noisy)
            if b == 0.0 and i == 0 and not np.array_equal(est, engine_unlimited(plain, noisy)):
                raise SystemExit("beta 0 does not reproduce the engine: the probe is broken")
            s, _ = quality.score_signal(clean, est, with_dnsmos=True)
            rows[b].append([s[k] for k in quality.METRICS])
        print(f"\r{i + 1}/{len(pairs)} pairs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print("| beta | " + " | ".join(label for label, _ in quality.METRICS.values()) + " |")
    print("|---" * (len(quality.METRICS) + 1) + "|")
    for b in betas:
        a = np.array(rows[b], dtype=np.float64)
        means = np.nanmean(a, axis=0)
        cells = [
            f"{m:.{quality.METRICS[k][1]}f}" for k, m in zip(quality.METRICS, means, strict=True)
        ]
        print(f"| {b:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
