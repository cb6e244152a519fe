"""The daemon's own work per hop, without sockets: ``rtns.daemon.server.Server`` driven in
process by N simulated clients (``--chunk`` samples of 16 kHz f32 each, every client with
its own phase), ticking every ``tick_ms`` of simulated time, its socket replaced by one
that drops what it is given. Prints the server's CPU per hop, split into the bank step
(``StreamBank.step``: FFTs, onnxruntime, overlap-add) and the rest (decoding, queueing,
the ledger, answering: the Python around the model), over ``--rounds`` interleaved rounds
(median and spread), so a change to the hot path can be judged on a busy machine:

    python benchmarks/daemon_loop.py --clients 140 --seconds 4 --rounds 5

The socket work itself (pyzmq, libzmq, the kernel) is measured by ``benchmarks/load.py``
with the echo servers of ``benchmarks/echo/``.

Its ticks fall on a strict grid and every message arrives exactly on time, so its model
calls are smaller than the real loop's (28 rows a call at 140 clients, against 66 in
``load.py``, whose ticks stretch with the work and whose messages bunch): it judges the
Python around the model well and the bank step's batching badly. A change to how ticks
batch must be judged with ``load.py`` (a one-hop-per-tick policy looked 13 % cheaper here
and was not cheaper there: docs/operations.md).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

import numpy as np

from rtns.daemon import protocol as P
from rtns.daemon.server import Server, ServerConfig


class _DropSocket:
    """Takes every part the server sends and counts it."""

    def __init__(self) -> None:
        self.parts = 0

    def send(self, data: object, flags: int = 0) -> None:
        self.parts += 1


class _Frame:
    """The received identity frame (no CurveZMQ key)."""

    bytes = b""

    def get(self, key: str) -> None:
        raise RuntimeError(key)


def run(
    model: str,
    clients: int,
    seconds: float,
    chunk: int,
    metrics: bool,
    **config: object,
) -> dict:
    """One round; ``config``: more ServerConfig fields (``hops_per_tick``, ``tick_ms``)."""
    cfg = ServerConfig(
        **config,  # type: ignore[arg-type]
        models=[model],
        probe=False,
        stats_every=0,
        capacity="off",
        max_sessions=max(256, clients),
        max_sessions_per_peer=max(256, clients),
        metrics=metrics,
    )
    srv = Server(cfg)
    srv.sock, srv._peer_frame = _DropSocket(), _Frame()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16_000 * 4)).astype("<f4")
    hello = json.dumps(
        {"type": "hello", "version": 1, "sample_rate": 16_000, "format": "f32le", "channels": 1}
    ).encode()
    idents = [b"c%05d" % i for i in range(clients)]
    for ident in idents:
        srv._handle(ident, [hello])
    period = chunk / 16_000
    due = rng.uniform(0, period, clients)
    seq = [0] * clients
    bank = srv.models[srv.default_model].bank
    plain_step, in_step = bank.step, [0.0]

    def timed_step(*a: object, **k: object) -> object:
        c = time.thread_time()
        try:
            return plain_step(*a, **k)
        finally:
            in_step[0] += time.thread_time() - c

    bank.step = timed_step  # type: ignore[method-assign]
    tick_s = cfg.tick_ms / 1e3
    t = 0.0
    hops0 = srv.counters["blocks"]
    c0 = time.thread_time()
    while t < seconds:
        t += tick_s
        for j in np.flatnonzero(due <= t).tolist():
            off = (seq[j] * chunk) % (audio.shape[0] - chunk)
            srv._handle(idents[j], [P.encode_audio(seq[j]), audio[off : off + chunk].tobytes()])
            seq[j] += 1
            due[j] += period
        srv._tick()
    cpu = time.thread_time() - c0
    hops = srv.counters["blocks"] - hops0
    return {
        "hops": hops,
        "cpu_us_per_hop": 1e6 * cpu / hops,
        "step_us_per_hop": 1e6 * in_step[0] / hops,
        "rest_us_per_hop": 1e6 * (cpu - in_step[0]) / hops,
        "parts_sent": srv.sock.parts,
        "rows_per_call": float(np.mean(srv.rows_per_tick)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default="rtns-dtln")
    ap.add_argument("--clients", type=int, default=140)
    ap.add_argument("--seconds", type=float, default=4.0, help="simulated seconds per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=320, help="samples per message (320 = 20 ms)")
    ap.add_argument("--metrics", action="store_true", help="with the Prometheus recorder on")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one round")
    ap.add_argument("--tick-ms", type=float, default=4.0, help="rtns serve --tick-ms")
    ap.add_argument("--hops-per-tick", type=int, default=None, help="rtns serve --hops-per-tick")
    args = ap.parse_args()
    extra: dict[str, object] = {"tick_ms": args.tick_ms}
    if args.hops_per_tick is not None:
        extra["hops_per_tick"] = args.hops_per_tick
    print(
        f"# daemon loop in process: {args.model}, {args.clients} clients, {args.chunk}-sample "
        f"messages, {args.rounds} rounds of {args.seconds:g} s, metrics "
        f"{'on' if args.metrics else 'off'}, loadavg {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.model, args.clients, args.seconds, args.chunk, args.metrics, **extra)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return 0
    rounds = [
        run(args.model, args.clients, args.seconds, args.chunk, args.metrics, **extra)
        for _ in range(args.rounds)
    ]
    print("| per hop (us) | median | min | max |")
    print("|---|---|---|---|")
    for key, label in (
        ("cpu_us_per_hop", "server CPU"),
        ("step_us_per_hop", "bank step"),
        ("rest_us_per_hop", "the rest (Python around the model)"),
        ("rows_per_call", "rows per model call"),
    ):
        v = [r[key] for r in rounds]
        print(f"| {label} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
