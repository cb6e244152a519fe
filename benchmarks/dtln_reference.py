"""Per-block time: the rtns engine on the imported official DTLN (model.h5) vs the official
split-ONNX loop (model_1.onnx + model_2.onnx), same machine, same input, 1 thread.

Both process the same real noisy speech (VoiceBank+DEMAND test subset, looped) one 128-sample
hop at a time; every hop is timed with perf_counter_ns. The two loops alternate in rounds
of --round hops so that background load hits both alike. Prints a table of median / p90 /
p99 / max per block and the real-time factor (mean time / 8 ms), plus the machine load.

    python benchmarks/dtln_reference.py                     # imports model.h5 into a tmp dir
    python benchmarks/dtln_reference.py --pack /tmp/dtln-official --blocks 10000

Needs ../shared (official weights and data); without --pack it also needs torch + h5py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HOP = 128


def load_speech(data_dir: Path, n: int) -> np.ndarray:
    """Noisy test utterances end to end, looped to ``n`` samples, float32 [n]."""
    from rtns.audio_io import read_audio

    files = sorted(data_dir.glob("*.flac"))
    if not files:
        sys.exit(f"no .flac files in {data_dir}")
    x = np.concatenate([read_audio(f).samples[:, 0] for f in files])
    return np.resize(x, n).astype(np.float32)


def time_hops(
    hop_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, out: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Run hop_fn on consecutive hops of x, writing outputs to out. Returns wall-clock ns
    and this thread's CPU ns per hop (with 1 onnxruntime thread the graphs run on the
    calling thread, so CPU time is the compute cost even when other processes steal the
    core; wall time is what a real-time caller sees)."""
    n = x.shape[0] // HOP
    wall = np.empty(n, dtype=np.int64)
    cpu = np.empty(n, dtype=np.int64)
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for i in range(n):
        s = slice(i * HOP, (i + 1) * HOP)
        t0, c0 = clock(), cpu_clock()
        out[s] = hop_fn(x[s])
        cpu[i] = cpu_clock() - c0
        wall[i] = clock() - t0
    return wall, cpu


def stats_row(name: str, ns: np.ndarray) -> list[str]:
    us = ns / 1e3
    return [
        name,
        f"{us.min():.1f}",
        f"{np.median(us):.1f}",
        f"{np.percentile(us, 90):.1f}",
        f"{np.percentile(us, 99):.1f}",
        f"{us.max():.1f}",
        f"{us.mean():.1f}",
        f"{us.mean() / 8000:.3f}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=Path, help="imported model.h5 pack (default: import now)")
    ap.add_argument("--official", type=Path, default=SHARED / "weights" / "dtln")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "test" / "vbdemand36" / "noisy")
    ap.add_argument("--blocks", type=int, default=6000, help="timed hops per loop (6000)")
    ap.add_argument("--warmup", type=int, default=300, help="untimed hops first (300)")
    ap.add_argument("--round", type=int, default=500, help="hops per alternation round (500)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from rtns.config import EngineConfig
    from rtns.engine import Model
    from rtns_export.official_dtln import OfficialDTLN

    tmp = None
    pack = args.pack
    if pack is None:
        from rtns_export.dtln_import import import_dtln

        tmp = tempfile.TemporaryDirectory(prefix="rtns-bench-")
        pack = Path(tmp.name) / "dtln-official"
        import_dtln(args.official / "model.h5", pack)

    model = Model(pack, EngineConfig(threads=args.threads))
    stream = model.stream()
    official = OfficialDTLN(args.official, threads=args.threads)
    total = args.warmup + args.blocks
    x = load_speech(args.data, total * HOP)
    y_eng = np.empty_like(x)
    y_off = np.empty_like(x)

    w = args.warmup * HOP
    time_hops(stream.push, x[:w], y_eng)
    time_hops(official.hop, x[:w], y_off)
    load0 = os.getloadavg()
    eng, off = [], []
    for start in range(w, x.shape[0], args.round * HOP):
        stop = min(start + args.round * HOP, x.shape[0])
        eng.append(time_hops(stream.push, x[start:stop], y_eng[start:stop]))
        off.append(time_hops(official.hop, x[start:stop], y_off[start:stop]))
    load1 = os.getloadavg()
    e, o = np.concatenate([t for t, _ in eng]), np.concatenate([t for t, _ in off])
    ec, oc = np.concatenate([c for _, c in eng]), np.concatenate([c for _, c in off])
    diff = float(np.max(np.abs(y_eng - y_off)))

    rows = [
        ["loop", "min us", "median us", "p90 us", "p99 us", "max us", "mean us", "RTF"],
        stats_row(f"engine Stream.push ({model.name}), wall", e),
        stats_row("official split ONNX loop, wall", o),
        stats_row(f"engine Stream.push ({model.name}), thread CPU", ec),
        stats_row("official split ONNX loop, thread CPU", oc),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(
        f"DTLN per-block time, {e.shape[0]} blocks each, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    for r in rows:
        print(
            "  ".join(
                c.rjust(wd) if i else c.ljust(wd)
                for i, (c, wd) in enumerate(zip(r, widths, strict=True))
            )
        )
    print(
        f"engine / official median ratio: wall {np.median(e) / np.median(o):.2f}, "
        f"CPU {np.median(ec) / np.median(oc):.2f}"
    )
    print(f"outputs agree to max abs {diff:.2g} over {x.shape[0]} samples")
    print(
        f"load average before/after: {load0[0]:.2f}/{load1[0]:.2f} on {os.cpu_count()} CPUs"
        + (
            "  (CONTENDED: figures are not quiet-machine numbers)"
            if max(load0[0], load1[0]) > 0.5
            else ""
        )
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
