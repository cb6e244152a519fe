"""Load benchmark of ``rtns serve``: N concurrent real-time clients on loopback.

For each mode (batched, ``--no-batch``) and each N, starts ``rtns serve`` in its own process,
then this process plays N clients (one DEALER socket each, one event loop, every client
sending one chunk per chunk duration with its own phase) for ``--seconds`` after a warm-up,
and reports:

* tick inference time (server ``stats``: wall time of one round, i.e. its infer calls plus
  state gather/scatter and overlap-add; with ``--no-batch`` a round is one call per
  session, one after the other), p50/p99;
* rows per tick (how many hops one round carried);
* answer latency (send -> answer received, per message), p50/p99;
* late blocks: answers that arrived more than ``--deadline-ms`` after their chunk was due
  (default 60 ms), and dropped
  blocks (refused with an error such as ``queue_full``, or not answered by 0.5 s after the
  run: an overloaded server falls further behind every second);
* server CPU use (fraction of one core) and how late this client process itself sent
  (if that is large, the client, not the server, was the bottleneck);
* which batching mode the server runs and why (its ``stats``), mean rows per tick, and the
  server's CPU time per hop (µs, over the measured span);
* the largest N that stays real time (no late answer, nothing dropped, client lag p99 < one
  chunk) per mode. ``--server-cpus 0 --client-cpus 1`` pins the server and the clients to
  different cores.

Not a test: run it on a quiet machine (`uptime`), e.g.

    python benchmarks/load.py --model PACK --ns 1,8,32,64,128 --seconds 10

The timings depend on the CPU; the table is printed as Markdown, raw numbers as JSON with
``--json FILE``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

from rtns.daemon import protocol as P


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(
    model: str,
    batch: bool,
    max_sessions: int,
    cpus: set[int] | None = None,
    workers: int = 1,
    extra: list[str] | None = None,
    server_cmd: str | None = None,
) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    if server_cmd:  # a stand-in server (benchmarks/echo/): the messaging floor
        cmd = shlex.split(server_cmd.format(endpoint=endpoint))
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, preexec_fn=lambda: _pin(cpus))
        return proc, endpoint
    cmd = [sys.executable, "-m", "rtns", "serve", "--bind", endpoint, "-m", model]
    cmd += ["--max-sessions", str(max_sessions), "--log-level", "warning"]
    cmd += ["--max-sessions-per-peer", str(max_sessions), "--allow-stats-reset"]
    cmd += ["--workers", str(workers), *(extra or [])]
    if not any(a.startswith("--capacity") for a in extra or []):
        cmd += ["--capacity", "off"]  # the raw loop: admission control measured on request
    if not batch:
        cmd.append("--no-batch")
    proc = subprocess.Popen(
        cmd, stderr=subprocess.DEVNULL, text=True, preexec_fn=lambda: _pin(cpus)
    )
    return proc, endpoint


def _pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (worker processes)."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for c in children:
        try:
            total += process_tree_cpu(int(c))
        except OSError:
            pass
    return total


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def request_stats(ctx: zmq.Context, endpoint: str, reset: bool = False) -> dict:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send(P.encode(P.StatsRequest(reset=reset)))
        if not s.poll(20_000):
            raise RuntimeError("no stats answer")
        return json.loads(s.recv_multipart()[0])
    finally:
        s.close()


def run_clients(
    endpoint: str, n: int, seconds: float, warmup: float, chunk: int, deadline_ms: float
) -> dict:
    """N paced clients in one loop; returns latency and loss figures of the measured part."""
    ctx = zmq.Context()
    period = chunk / 16_000
    rng = np.random.default_rng(0)
    pcm = (0.05 * rng.standard_normal(chunk)).astype("<f4").tobytes()
    socks = []
    poller = zmq.Poller()
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        s.send(P.encode(P.Hello(version=1, sample_rate=16_000, format="f32le")))
        socks.append(s)
        poller.register(s, zmq.POLLIN)
    refused: dict[str, int] = {}
    admitted = []
    for s in socks:
        if not s.poll(20_000):
            raise RuntimeError("no ready within 20 s")
        msg = json.loads(s.recv_multipart()[0])
        if msg["type"] == "error" and msg["code"] in ("busy", "server_full"):
            refused[msg["code"]] = refused.get(msg["code"], 0) + 1  # admission control
            poller.unregister(s)
            s.close()
        elif msg["type"] != "ready":
            raise RuntimeError(f"hello refused: {msg}")
        else:
            admitted.append(s)
    socks, n = admitted, len(admitted)
    index = {s: i for i, s in enumerate(socks)}
    t0 = time.monotonic() + 0.05
    due_heap = [(t0 + i * period / n, i) for i in range(n)]
    heapq.heapify(due_heap)
    next_seq = [0] * n
    sent_at: list[dict[int, float]] = [{} for _ in range(n)]
    t_measure = t0 + warmup
    t_end = t_measure + seconds
    lat: list[float] = []
    lag: list[float] = []
    errors = 0
    answered_measured = 0
    sent_measured = 0
    reset_done = False
    while True:
        now = time.monotonic()
        if not reset_done and now >= t_measure:
            request_stats(ctx, endpoint, reset=True)
            reset_done = True
            now = time.monotonic()
        if now >= t_end + 0.5:
            break
        # Send every chunk that is due (a heap of (due time, client)).
        while due_heap and due_heap[0][0] <= now:
            due, i = heapq.heappop(due_heap)
            seq = next_seq[i]
            socks[i].send_multipart([P.encode_audio(seq), pcm], copy=False)
            sent = time.monotonic()
            sent_at[i][seq] = due
            if due >= t_measure:
                lag.append(sent - due)
                sent_measured += 1
            next_seq[i] += 1
            if due + period < t_end:
                heapq.heappush(due_heap, (due + period, i))
        soonest = due_heap[0][0] if due_heap else now + 0.01
        wait_ms = 1e3 * (soonest - time.monotonic())
        # Never spin (poll(0) while the next send is a fraction of a ms away kept this loop
        # at 100 % of its core, which pushed other work onto the server's core): wait at
        # least 1 ms; a send up to 1 ms after its due time counts in the answer latency.
        for s, _ in poller.poll(0 if wait_ms <= 0 else max(1, math.ceil(wait_ms))):
            i = index[s]
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got = time.monotonic()
                # Answers without a JSON parser (the clients' loop must stay light: it
                # shares a core with whatever else runs there).
                seq = P.answer_seq(frames[0])
                is_audio = seq is not None
                if seq is None:
                    seq = json.loads(frames[0]).get("seq")
                due = sent_at[i].pop(seq, None) if seq is not None else None
                if due is None or due < t_measure:
                    continue
                if is_audio:
                    lat.append(got - due)
                    answered_measured += 1
                else:
                    errors += 1
    for s in socks:
        s.send(P.encode(P.Close()))
    time.sleep(0.2)
    for s in socks:
        s.close()
    ctx.term()
    lat_ms = np.asarray(lat) * 1e3
    lag_ms = np.asarray(lag) * 1e3 if lag else np.zeros(1)
    late = int((lat_ms > deadline_ms).sum())
    dropped = sent_measured - answered_measured
    return {
        "admitted": n,
        "refused": refused,
        "sent": sent_measured,
        "answered": answered_measured,
        "errors": errors,
        "dropped": dropped,
        "late": late,
        "late_pct": 100.0 * late / max(1, sent_measured),
        "lat_p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms.size else None,
        "lat_p99_ms": float(np.percentile(lat_ms, 99)) if lat_ms.size else None,
        "client_lag_p99_ms": float(np.percentile(lag_ms, 99)),
    }


def largest_realtime(
    passes: Callable[[int], bool], ns: list[int], search: bool, max_n: int
) -> int | None:
    """The largest client count that ``passes`` (runs a load test) says is real time.

    Runs every N of ``ns`` in order; the answer is the largest passing N below the first
    failure. With ``search``: from the largest such N, steps of x1.5 up to ``max_n`` until
    one fails (or, when the first N already failed, steps of /1.5 down until one passes),
    then bisection until the bracket is within an eighth of the lower end (or 2).
    """
    lo: int | None = None
    hi: int | None = None
    for n in ns:
        if passes(n):
            lo = n if hi is None else lo
        elif hi is None:
            hi = n
    if search and lo is None and hi is not None:
        while lo is None and hi > 1:  # all failed: go down by a third each time
            n = max(1, int(hi / 1.5))
            if passes(n):
                lo = n
            else:
                hi = n
    if search and lo is not None:
        while hi is None and lo < max_n:  # all passed: go up by half each time
            n = min(max_n, int(lo * 1.5))
            if passes(n):
                lo = n
            else:
                hi = n
        while hi is not None and hi - lo > max(2, lo // 8):
            n = (lo + hi) // 2
            if passes(n):
                lo = n
            else:
                hi = n
    return lo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default="rtns-dtln", help="pack name or folder")
    ap.add_argument("--ns", default="1,8,32,64,128", help="client counts, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    ap.add_argument("--chunk", type=int, default=320, help="samples per message (320 = 20 ms)")
    ap.add_argument(
        "--deadline-ms",
        type=float,
        default=60.0,
        help="an answer later than this after its chunk was due is late (60)",
    )
    ap.add_argument("--modes", default="batch,nobatch")
    ap.add_argument("--json", metavar="FILE", help="also write raw results here")
    ap.add_argument(
        "--search",
        action="store_true",
        help="after the list, search the largest real-time N (steps of x1.5 up from the largest "
        "passing N, or of /1.5 down when none passed, then bisection)",
    )
    ap.add_argument("--max-n", type=int, default=512, help="upper bound of --search")
    ap.add_argument(
        "--server-cpus",
        default=None,
        help="pin the server to these CPUs, e.g. 0 (default: not pinned)",
    )
    ap.add_argument(
        "--client-cpus", default=None, help="pin this client process to these CPUs, e.g. 1"
    )
    ap.add_argument("--workers", type=int, default=1, help="rtns serve --workers")
    ap.add_argument(
        "--serve-args", default="", help="more rtns serve options, e.g. '--max-batch 128'"
    )
    ap.add_argument(
        "--server-cmd",
        default=None,
        help="run this server instead of rtns serve ({endpoint} is replaced): the echo "
        "servers of benchmarks/echo/ measure the messaging floor",
    )
    args = ap.parse_args()

    def cpu_set(text: str | None) -> set[int] | None:
        return {int(c) for c in text.split(",")} if text else None

    server_cpus, client_cpus = cpu_set(args.server_cpus), cpu_set(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    ns = [int(v) for v in args.ns.split(",")]
    deadline = args.deadline_ms
    load = os.getloadavg()
    print(
        f"# {'rtns serve' if not args.server_cmd else repr(args.server_cmd)} load: "
        f"model {args.model if not args.server_cmd else 'none (echo)'}, chunk {args.chunk} samples "
        f"({1e3 * args.chunk / 16000:.0f} ms), {args.seconds:g} s measured per run, "
        f"deadline {deadline:g} ms, {os.cpu_count()} CPUs, loadavg {load[0]:.2f} at start, "
        f"server CPUs {args.server_cpus or 'any'}, client CPUs {args.client_cpus or 'any'}, "
        f"workers {args.workers}, admission "
        + (
            "as --serve-args says"
            if "--capacity" in (args.serve_args or "")
            else "off (--capacity off: the raw loop)"
        ),
        file=sys.stderr,
    )
    results = []
    ctx = zmq.Context()
    chunk_ms = 1e3 * args.chunk / 16_000

    def run_one(mode: str, n: int) -> dict:
        proc, endpoint = start_server(
            args.model,
            mode == "batch",
            max(256, n),
            server_cpus,
            args.workers,
            args.serve_args.split(),
            args.server_cmd,
        )
        try:
            st0 = request_stats(ctx, endpoint)  # waits until the server is up
            r = run_clients(endpoint, n, args.seconds, args.warmup, args.chunk, deadline)
            # run_clients reset the stats when measuring began; read CPU over the same span
            st = request_stats(ctx, endpoint)
            cpu_s = process_tree_cpu(proc.pid)
        finally:
            stop_server(proc)
        tick = st.get("tick_infer_ms", {"p50": None, "p99": None})  # an echo has no ticks
        blocks = max(1, st["blocks_processed"])
        span = max(1e-9, st["uptime_s"])
        # What the server says about batching, e.g. "batched (rows bit-identical ...)".
        models = st0.get("models", {})
        mode_text = (
            f"echo ({args.server_cmd})"
            if args.server_cmd
            else "; ".join(
                f"{'batched' if m['batched'] else 'one row per call'} ({m['why']})"
                for m in models.values()
            )
        )
        r |= {
            "mode": mode,
            "server_mode": mode_text,
            "n": n,
            "tick_p50_ms": tick["p50"],
            "tick_p99_ms": tick["p99"],
            "rows_per_tick": st.get("rows_per_tick", {}).get("mean"),
            "server_cpu": st.get("cpu_s", 0.0) / span if "cpu_s" in st else None,
            "server_cpu_total_s": cpu_s,
            "server_us_per_hop": 1e6 * st["cpu_s"] / blocks if "cpu_s" in st else None,
            "server_overruns": st["overruns"],
        }
        r["realtime"] = r["late"] == 0 and r["dropped"] == 0 and r["client_lag_p99_ms"] < chunk_ms
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
        return r

    best: dict[str, int | None] = {}
    for mode in args.modes.split(","):
        best[mode] = largest_realtime(
            lambda n, mode=mode: run_one(mode, n)["realtime"], ns, args.search, args.max_n
        )
    ctx.term()
    modes_seen = sorted({r["server_mode"] for r in results})
    for m in modes_seen:
        print(f"server batching: {m}")
    cols = (
        "| mode | N | tick infer p50 / p99 ms | rows/tick | server CPU us/hop | answer p50 / p99 ms "
        "| late | dropped | server CPU | client lag p99 ms | real time |"
    )
    print(cols)
    print("|---" * (cols.count("|") - 1) + "|")
    for r in sorted(results, key=lambda r: (r["mode"] != "batch", r["n"])):

        def f(v: float | None, d: int = 2) -> str:
            return "-" if v is None else f"{v:.{d}f}"

        print(
            f"| {r['mode']} | {r['n']} | {f(r['tick_p50_ms'])} / {f(r['tick_p99_ms'])} "
            f"| {f(r['rows_per_tick'], 1)} | {f(r['server_us_per_hop'], 1)} "
            f"| {f(r['lat_p50_ms'])} / {f(r['lat_p99_ms'])} "
            f"| {r['late']} ({r['late_pct']:.2f} %) | {r['dropped']} "
            f"| {f(None if r['server_cpu'] is None else 100 * r['server_cpu'], 0)} % "
            f"| {f(r['client_lag_p99_ms'])} | {'yes' if r['realtime'] else 'no'} |"
        )
    for r in results:
        if r.get("refused"):
            print(
                f"admission ({r['mode']}, N = {r['n']}): {r['admitted']} admitted, refused {r['refused']}"
            )
    for mode, n in best.items():
        first_fail = min(
            (r["n"] for r in results if r["mode"] == mode and not r["realtime"]), default=None
        )
        print(
            f"\nlargest real-time N ({mode}): {n if n else 'none'}"
            + (f" (first failure at N = {first_fail})" if first_fail else " (no failure seen)")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
