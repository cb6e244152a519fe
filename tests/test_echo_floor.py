"""The messaging-floor instruments of issue 28 (benchmarks/echo/): the Python echo and the
compiled one speak enough of the protocol for benchmarks/load.py's clients: every audio
message comes back with the same PCM, nothing late or lost, and their stats count the hops
load.py divides the CPU by. And benchmarks/daemon_loop.py drives the real server's hot
path in process: every message is answered (three parts each) and its hops are counted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench_helpers import load_benchmark

pytest.importorskip("zmq")

REPO = Path(__file__).resolve().parents[1]
ECHO = REPO / "benchmarks" / "echo"


def _bench(name: str):
    return load_benchmark(name)


def _compiled_echo(tmp_path: Path) -> Path:
    if shutil.which("gcc") is None or not Path("/usr/include/zmq.h").exists():
        pytest.skip("needs gcc and libzmq's headers (Debian: libzmq3-dev, in .ci/run)")
    out = tmp_path / "rtns-echo"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(ECHO / "echo_server.c"), "-lzmq"],
        check=True,
    )
    return out


def _serve_through_load(cmd: str) -> tuple[dict, dict]:
    import zmq

    load = _bench("load")
    proc, endpoint = load.start_server("echo", True, 8, server_cmd=cmd)
    ctx = zmq.Context()
    try:
        load.request_stats(ctx, endpoint)  # waits until it is up
        r = load.run_clients(endpoint, 6, seconds=1.0, warmup=0.3, chunk=320, deadline_ms=60.0)
        st = load.request_stats(ctx, endpoint)
    finally:
        load.stop_server(proc)
        ctx.term()
    assert proc.returncode == 0  # SIGTERM ends it cleanly
    return r, st


@pytest.mark.parametrize("tick_ms", [0, 4])  # each answer at once; a tick's together
@pytest.mark.parametrize("kind", ["python", "compiled"])
def test_echo_servers_answer_every_message(kind: str, tick_ms: int, tmp_path: Path):
    if kind == "python":
        cmd = f"{sys.executable} {ECHO / 'echo_server.py'} {{endpoint}} {tick_ms}"
    else:
        cmd = f"{_compiled_echo(tmp_path)} {{endpoint}} {tick_ms}"
    r, st = _serve_through_load(cmd)
    assert r["admitted"] == 6 and r["sent"] > 0, r
    assert r["answered"] == r["sent"] and r["dropped"] == 0 and r["errors"] == 0, r
    # Since the reset (when measuring began): 320-sample messages are 2 whole hops each.
    assert st["messages"] >= r["answered"] and st["blocks_processed"] == 2 * st["messages"]
    assert st["cpu_s"] > 0 and st["uptime_s"] > 0


def test_daemon_loop_answers_every_message():
    loop = _bench("daemon_loop")
    r = loop.run("rtns-dtln", clients=3, seconds=0.4, chunk=320, metrics=False)
    messages = 3 * 20  # 0.4 s of 20 ms messages per client
    # Each answered message is three parts (identity, header, PCM); hello's ready is one
    # more; the last message of a client may still wait for its second hop.
    assert 3 * (messages - 3) + 3 * 2 <= r["parts_sent"] <= 3 * messages + 3 * 2, r
    assert abs(r["hops"] - messages * 320 // 128) <= 3 * 3, r
    assert r["step_us_per_hop"] > 0 and r["rest_us_per_hop"] > 0
