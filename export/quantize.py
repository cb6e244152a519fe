"""Int8 copies of a pack with onnxruntime's quantization tools, for measuring (issue "One
flagship", item 4): does int8 make a small mask network cheaper per hop or per bank row, and
what does it cost in quality?

- ``dynamic``: int8 weights of every MatMul/Gemm, activations quantized per call with a scale
  computed from the whole tensor. The scale then depends on every row of a batched call, so
  such a graph is **not batch-invariant** (a stream's output changes with its neighbours in
  a bank step): usable for one stream, never for the daemon's bank.
- ``static``: int8 weights and activations with fixed scales calibrated on real inputs (QDQ
  format): the scales do not depend on the batch.

Calibration feeds are the graph's real inputs (spectrum and states) captured while the
engine enhances noisy validation speech (never test data)::

    python -m rtns_export.quantize models/rtns-fastnet /tmp/fastnet-int8 --mode static \\
        --calibrate ../shared/data/valid/speech --noise ../shared/data/valid/noise
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from rtns.engine import Model
from rtns.pack import read_manifest, sha256_file, write_manifest

MODES = ("dynamic", "static")


def capture_feeds(pack: Path, signals: list[np.ndarray], every: int = 4) -> list[dict]:
    """The inputs of a one-graph complex-mask pack's graph (spectrum and states) for every
    ``every``-th hop of each signal, with the states the engine's ``infer`` carries:
    [{input name: float32 [1, ...]}]."""
    from rtns import dsp

    model = Model(pack)
    man = model.manifest
    if len(man.graphs) != 1 or man.frontend.mask != "complex":
        raise ValueError(f"{pack}: quantization here handles one-graph complex-mask packs")
    spec = man.graphs[0]
    win = dsp.analysis_window(man.frontend.window, model.block_len)
    feeds: list[dict] = []
    for x in signals:
        state = model.initial_state(1)
        blocks = dsp.frame_signal(x.astype(np.float32), model.block_len, model.block_shift)
        for i, block in enumerate(blocks):
            if i % every == 0:
                z = dsp.spectrum(block[None], win)
                f = {spec.signal_in.name: np.stack((z.real, z.imag), 1).astype(np.float32)}
                f.update({s.input: state[s.input].copy() for s in spec.states})
                feeds.append(f)
            _, state = model.infer(block[None], state)
    return feeds


def calibration_signals(speech: Path, noise: Path, seconds: float, seed: int = 0) -> list:
    """Noisy mixtures (0..15 dB SNR) of validation speech and noise, ``seconds`` in all."""
    from rtns_export.data import load_folder

    rng = np.random.default_rng(seed)
    clean, _ = load_folder(speech, cache_dir=None)
    noises, _ = load_folder(noise, cache_dir=None)
    out, total = [], 0.0
    while total < seconds:
        s = clean[int(rng.integers(len(clean)))]
        n = noises[int(rng.integers(len(noises)))]
        n = np.resize(n, s.shape[0])
        snr = rng.uniform(0, 15)
        g = np.sqrt(np.mean(s**2) / (np.mean(n**2) + 1e-12) / 10 ** (snr / 10))
        out.append((s + g * n).astype(np.float32))
        total += s.shape[0] / 16000
    return out


def quantize_pack(src: Path, out: Path, mode: str, feeds: list[dict] | None = None) -> Path:
    """Write an int8 copy of the one-graph pack ``src`` to ``out`` (manifest renamed with
    an ``-int8`` suffix, its hash and provenance updated)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    man = read_manifest(src)
    graph = man.graphs[0]
    out.mkdir(parents=True, exist_ok=False)
    dst = out / graph.file
    with tempfile.TemporaryDirectory() as tmp:
        # the quantizer wants shapes: run onnxruntime's pre-processing first
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src / graph.file), str(pre), skip_optimization=False)
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
        else:
            if not feeds:
                raise ValueError("static quantization needs calibration feeds")

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter(feeds)

                def get_next(self):
                    return next(self.it, None)

            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
    new_graph = graph.model_copy(update={"sha256": sha256_file(dst)})
    prov = man.provenance.model_copy(
        update={"quantized": f"onnxruntime {mode} int8 of {man.name} (graph {graph.sha256[:12]})"}
    )
    write_manifest(
        out,
        man.model_copy(
            update={
                "name": f"{man.name}-int8-{mode}",
                "graphs": [new_graph],
                "provenance": prov,
                "scores": {},
            }
        ),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pack", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", choices=MODES, default="static")
    ap.add_argument("--calibrate", type=Path, help="clean speech folder (validation split)")
    ap.add_argument("--noise", type=Path, help="noise folder (validation split)")
    ap.add_argument("--seconds", type=float, default=60.0, help="calibration audio (60 s)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    a = ap.parse_args(argv)
    if a.out.resolve() == a.pack.resolve() or a.pack.resolve() in a.out.resolve().parents:
        ap.error(f"{a.out} is the pack itself or inside it; choose another folder")
    if a.out.exists() or a.out.is_symlink():
        if not a.force:
            ap.error(f"{a.out} exists (use --force to replace it)")
        if a.out.is_symlink() or not a.out.is_dir():
            ap.error(f"{a.out} is not a folder this tool wrote; remove it yourself")
        shutil.rmtree(a.out)
    feeds = None
    if a.mode == "static":
        if not (a.calibrate and a.noise):
            ap.error("--mode static needs --calibrate SPEECH_DIR and --noise NOISE_DIR")
        if not 1.0 <= a.seconds <= 3600.0:
            ap.error("--seconds must be in 1..3600")
        feeds = capture_feeds(a.pack, calibration_signals(a.calibrate, a.noise, a.seconds))
    quantize_pack(a.pack, a.out, a.mode, feeds)
    print(f"wrote {a.out} ({a.mode} int8, {len(feeds or [])} calibration hops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
