"""Latency benchmark: per-block inference time, real-time factor and end-to-end delay.

For every model pack (by default each pack ``rtns models`` finds, plus every ``--pack``
folder), and for the official DTLN split-ONNX loop as a reference when
``../shared/weights/dtln`` exists, this measures:

per-block p50 / p99 / max (ms)
    Wall time of ``rtns.engine.Stream.push`` of one 128-sample hop (analysis FFT, the ONNX
    graphs, mask, inverse FFT, overlap-add), onnxruntime at 1 thread, over ``--blocks``
    consecutive hops (default 10,000) after ``--warmup`` hops. For the reference row the
    same for ``OfficialDTLN.hop`` (export/official_dtln.py).
RTF
    Mean per-block time / 8 ms (one hop of audio). Below 1 keeps up with real time; the
    live runner has one hop (8 ms) of budget per hop.
algorithmic (ms)
    The pack's ``latency_samples`` / 16 kHz: output sample n estimates input n - 384 for
    512/128 framing (24 ms). ``rtns models`` shows this plus one hop (32 ms), the time a
    hop takes to arrive, which ``rtns run`` reports as its "worker" term.
JACK measured / reported (ms)
    End to end through a real PortAudio duplex stream: ``rtns run -m PACK`` on a JACK
    dummy server at 16 kHz with 128-frame periods; a player client sends clicks into its
    input and a recorder client takes its output; "measured" is the click delay (peak of
    the cross-correlation). The pack runs on every hop, with bypass on, so that the clicks
    come back unaltered through the same path (a denoiser may remove clicks); the bypass
    output is aligned with the pack's algorithmic latency. "reported" is the latency
    ``rtns run`` prints: algorithmic + worker + hop alignment + resampling + PortAudio's
    ``stream.latency`` (in + out). The in-graph recorder does not see PortAudio's output
    latency (the system playback port's one period), so measured = reported - 8 ms here.
    "n/a" without jackd / libportaudio2 / JACK-Client, and for the reference loop.
daemon p50 / p99 (ms)
    ``rtns serve -m PACK`` on tcp://127.0.0.1 in another process, one client sending one
    128-sample message and waiting for its answer, ``--daemon-messages`` times: transport
    both ways plus one hop of inference. "n/a" when rtns/server.py or rtns/client.py is
    missing, and for the reference loop.

Run it on a quiet machine (check ``uptime``; the load is printed and stored). Prints a
Markdown table; ``--json PATH`` writes every number.

    python benchmarks/latency.py
    python benchmarks/latency.py --pack /tmp/my-pack --json /tmp/latency.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HOP = 128
HOP_S = HOP / 16000


def stats_ms(ns: np.ndarray) -> dict[str, float]:
    ms = ns / 1e6
    return {
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
        "rtf": float(ms.mean() / 1e3 / HOP_S),
    }


def time_blocks(step, blocks: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """Time ``step(hop)`` on ``warmup + blocks`` hops of noise; stats of the last ``blocks``."""
    rng = np.random.default_rng(seed)
    x = (0.05 * rng.standard_normal((warmup + blocks, HOP))).astype(np.float32)
    ns = np.empty(blocks, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(warmup):
        step(x[i])
    for i in range(blocks):
        t0 = clock()
        step(x[warmup + i])
        ns[i] = clock() - t0
    return stats_ms(ns)


def engine_row(pack: Path, blocks: int, warmup: int) -> dict:
    from rtns.config import EngineConfig
    from rtns.engine import Model

    model = Model(pack, EngineConfig(threads=1))
    stream = model.stream()
    row = {
        "name": model.name,
        "family": model.manifest.family,
        "pack": str(pack),
        "algorithmic_ms": 1e3 * model.latency / model.sample_rate,
    }
    row.update(time_blocks(stream.push, blocks, warmup))
    return row


def reference_row(weights: Path, blocks: int, warmup: int) -> dict:
    from rtns_export.official_dtln import LATENCY, OfficialDTLN

    ref = OfficialDTLN(weights, threads=1)
    row = {
        "name": "official DTLN (split ONNX loop)",
        "family": "reference",
        "pack": str(weights),
        "algorithmic_ms": 1e3 * LATENCY / 16000,
    }
    row.update(time_blocks(ref.hop, blocks, warmup))
    return row


def interleaved_ratio(
    pack: Path, weights: Path, blocks: int, warmup: int, round_hops: int = 250
) -> dict:
    """``Stream.push`` of ``pack`` against the official loop, alternating every
    ``round_hops`` hops so both see the same machine load; per-hop wall times of each, and
    the ratio of their medians (also the median of the per-round ratios)."""
    from rtns.config import EngineConfig
    from rtns.engine import Model
    from rtns_export.official_dtln import OfficialDTLN

    steps = {
        "rtns": Model(pack, EngineConfig(threads=1)).stream().push,
        "official": OfficialDTLN(weights, threads=1).hop,
    }
    rng = np.random.default_rng(1)
    x = (0.05 * rng.standard_normal((round_hops, HOP))).astype(np.float32)
    for step in steps.values():
        for i in range(warmup):
            step(x[i % round_hops])
    times: dict[str, list[np.ndarray]] = {k: [] for k in steps}
    clock = time.perf_counter_ns
    for _ in range(max(1, blocks // round_hops)):
        for name, step in steps.items():
            ns = np.empty(round_hops, dtype=np.int64)
            for i in range(round_hops):
                t0 = clock()
                step(x[i])
                ns[i] = clock() - t0
            times[name].append(ns)
    med = {k: float(np.median(np.concatenate(v))) / 1e6 for k, v in times.items()}
    per_round = [
        float(np.median(a) / np.median(b))
        for a, b in zip(times["rtns"], times["official"], strict=True)
    ]
    return {
        "pack": str(pack),
        "hops_each": round_hops * len(per_round),
        "rtns_p50_ms": med["rtns"],
        "official_p50_ms": med["official"],
        "rtns_p99_ms": float(np.percentile(np.concatenate(times["rtns"]), 99)) / 1e6,
        "official_p99_ms": float(np.percentile(np.concatenate(times["official"]), 99)) / 1e6,
        "ratio_p50": med["rtns"] / med["official"],
        "ratio_median_of_rounds": float(np.median(per_round)),
    }


# -- JACK end to end ----------------------------------------------------------------------
def jack_available() -> str | None:
    sys.path.insert(0, str(REPO / "tests"))
    from jack_harness import skip_reason

    return skip_reason()


def jack_row(pack: Path, seconds: float) -> dict:
    from jack_harness import JackServer, run_click_measurement

    with JackServer(16000) as srv:
        res = run_click_measurement(
            srv,
            ["-m", str(pack), "-i", "system", "-o", "system", "--bypass", "--quiet"],
            seconds=seconds,
        )
    if res["rc"] != 0:
        raise RuntimeError(f"rtns run failed:\n{res['output']}")
    lat, summ = res["latency"], res["summary"]
    return {
        "jack_measured_ms": res["measured"] / 16.0,
        "jack_reported_ms": float(lat["total"]),
        "jack_reported_terms_ms": {
            k: float(v) for k, v in lat.items() if k not in ("rate", "block")
        },
        "jack_underruns": int(summ["underruns"]),
        "jack_rtf": float(summ["rtf"]),
    }


# -- daemon loopback ------------------------------------------------------------------------
def daemon_available() -> str | None:
    for mod in ("rtns.daemon.server", "rtns.daemon.client"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} does not exist"
    if importlib.util.find_spec("zmq") is None:
        return "pyzmq is not installed"
    return None


def daemon_row(pack: Path, messages: int) -> dict:
    from rtns.daemon.client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "rtns", "serve", "--bind", endpoint, "-m", str(pack)]
    proc = subprocess.Popen(cmd + ["--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        client = Client(endpoint, timeout=10.0)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.hello()
                    break
                except Exception:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.2)
            x = (0.05 * np.random.default_rng(1).standard_normal(HOP)).astype(np.float32)
            ns = np.empty(messages, dtype=np.int64)
            for i in range(messages + 100):
                t0 = time.perf_counter_ns()
                client.send_audio(x)
                client.recv()
                if i >= 100:
                    ns[i - 100] = time.perf_counter_ns() - t0
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    st = stats_ms(ns)
    return {"daemon_p50_ms": st["p50_ms"], "daemon_p99_ms": st["p99_ms"]}


# -- table ----------------------------------------------------------------------------------
def fmt(v: object, spec: str = ".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def table(rows: list[dict]) -> str:
    head = [
        "model",
        "block p50 ms",
        "block p99 ms",
        "block max ms",
        "RTF",
        "algorithmic ms",
        "JACK measured ms",
        "rtns reported ms",
        "daemon p50 ms",
        "daemon p99 ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["name"],
            fmt(r["p50_ms"]),
            fmt(r["p99_ms"]),
            fmt(r["max_ms"]),
            fmt(r["rtf"]),
            fmt(r["algorithmic_ms"], ".1f"),
            fmt(r.get("jack_measured_ms", "n/a"), ".3f"),
            fmt(r.get("jack_reported_ms", "n/a"), ".3f"),
            fmt(r.get("daemon_p50_ms", "n/a")),
            fmt(r.get("daemon_p99_ms", "n/a")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--pack", action="append", default=[], metavar="PATH", help="also this pack folder (repeat)"
    )
    ap.add_argument(
        "--no-installed", action="store_true", help="skip the packs `rtns models` finds"
    )
    ap.add_argument(
        "--official",
        type=Path,
        default=SHARED / "weights" / "dtln",
        metavar="DIR",
        help="official DTLN model_1/model_2.onnx (default ../shared/weights/dtln)",
    )
    ap.add_argument("--blocks", type=int, default=10_000, help="timed hops per model (10000)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed hops first (200)")
    ap.add_argument("--no-jack", action="store_true", help="skip the JACK end-to-end run")
    ap.add_argument(
        "--jack-seconds", type=float, default=2.0, help="clicks played per JACK run (2)"
    )
    ap.add_argument("--no-daemon", action="store_true", help="skip the daemon round trip")
    ap.add_argument("--daemon-messages", type=int, default=2000, help="round trips per pack (2000)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write all numbers here")
    args = ap.parse_args(argv)

    packs: list[Path] = []
    if not args.no_installed:
        from rtns.pack import PackError, iter_packs

        packs += [p for p, man in iter_packs() if not isinstance(man, PackError)]
    packs += [Path(p) for p in args.pack]
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        file=sys.stderr,
    )
    if load[0] > 0.5:
        print("warning: the machine is busy; timings are not representative", file=sys.stderr)

    jack_why = "disabled (--no-jack)" if args.no_jack else jack_available()
    daemon_why = "disabled (--no-daemon)" if args.no_daemon else daemon_available()
    rows: list[dict] = []
    for pack in packs:
        print(f"timing {pack} ...", file=sys.stderr, flush=True)
        row = engine_row(pack, args.blocks, args.warmup)
        if jack_why is None:
            row.update(jack_row(pack, args.jack_seconds))
        else:
            row["jack_measured_ms"] = row["jack_reported_ms"] = "n/a"
            row["jack_na_reason"] = jack_why
        if daemon_why is None:
            row.update(daemon_row(pack, args.daemon_messages))
        else:
            row["daemon_p50_ms"] = row["daemon_p99_ms"] = "n/a"
            row["daemon_na_reason"] = daemon_why
        rows.append(row)
    if (args.official / "model_1.onnx").is_file() and importlib.util.find_spec(
        "rtns_export.official_dtln"
    ):
        print(f"timing the official DTLN loop ({args.official}) ...", file=sys.stderr, flush=True)
        row = reference_row(args.official, args.blocks, args.warmup)
        row.update(
            {
                "jack_measured_ms": "n/a",
                "jack_reported_ms": "n/a",
                "daemon_p50_ms": "n/a",
                "daemon_p99_ms": "n/a",
            }
        )
        row["jack_na_reason"] = row["daemon_na_reason"] = "not a pack (reference loop only)"
        rows.append(row)
    if not rows:
        print(
            "nothing to time: no packs found and no official DTLN weights (use --pack)",
            file=sys.stderr,
        )
        return 1
    print(table(rows))
    ratio = None
    default = next((p for p in packs if p.name == "rtns-dtln"), None)
    if default is not None and (args.official / "model_1.onnx").is_file():
        print("interleaving rtns-dtln and the official loop ...", file=sys.stderr, flush=True)
        ratio = interleaved_ratio(default, args.official, args.blocks, args.warmup)
        print(
            f"\nStream.push rtns-dtln vs the official DTLN loop, interleaved every 250 hops "
            f"({ratio['hops_each']} hops each): p50 {ratio['rtns_p50_ms']:.3f} vs "
            f"{ratio['official_p50_ms']:.3f} ms, p99 {ratio['rtns_p99_ms']:.3f} vs "
            f"{ratio['official_p99_ms']:.3f} ms; ratio of medians {ratio['ratio_p50']:.2f} "
            f"(median of per-round ratios {ratio['ratio_median_of_rounds']:.2f})"
        )
    for why, what in ((jack_why, "JACK"), (daemon_why, "daemon")):
        if why:
            print(f"\n{what}: n/a ({why})")
    if args.json:
        out = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "load_average_at_start": load,
                "load_average_at_end": os.getloadavg(),
                "python": platform.python_version(),
            },
            "blocks": args.blocks,
            "rows": rows,
            "interleaved": ratio,
        }
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
