"""Admission control (rtns.daemon.capacity) against a real daemon process: the capacity
estimate is loud (logged, in stats and metrics); at 1.5 times it, the sessions admitted
stay real time (at least 99 % of answers within 60 ms, server side and client side) and the
rest get `busy`; `rtns stream` and rtns.daemon.client.connect fall through a list of endpoints on
busy, draining (the same path) or silence. The daemon runs with a small headroom (0.1) so that 1.5 times
its capacity is a light load for a test; benchmarks/load.py --admission measures the
default (docs/operations.md has the figures)."""

from __future__ import annotations

import math
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import load_benchmark

pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")

from cli_helpers import free_port, start_serve  # noqa: E402

from rtns.daemon.client import Client, NoServer, ServerError, connect  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    return load_benchmark("load")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_one_and_a_half_capacity_admitted_stay_real_time(tmp_path: Path):
    mport = free_port()
    proc, endpoint, log = start_serve(
        tmp_path, "--metrics-port", str(mport), "--capacity-headroom", "0.1"
    )
    try:
        with Client(endpoint, timeout=20) as c:
            cap = c.stats()["capacity"]
        assert cap["mode"] == "auto" and cap["streams"] == cap["estimate"] >= 1, cap
        assert "event=capacity" in log.read_text() and "start-up probe" in cap["source"]
        assert scrape(mport)["rtns_capacity_streams"] == cap["streams"]
        n = math.ceil(1.5 * cap["streams"])
        r = _load_bench().run_clients(
            endpoint, n, seconds=3.0, warmup=1.0, chunk=320, deadline_ms=60.0
        )
        m = scrape(mport)
        print(f"\ncapacity {cap}; {n} clients: {r}")
        assert r["admitted"] >= 1 and r["admitted"] + r["refused"].get("busy", 0) == n, r
        assert r["admitted"] <= cap["streams"] or r["admitted"] <= m["rtns_capacity_streams"]
        # Real time at the 99th percentile: without admission every client is late all the
        # time; a stray late answer is the host. (With four busy processes beside the suite
        # on two cores, 2 of 5 runs had late answers: 1 and 2 of 150, capacity probed as 1;
        # this bound covers the first, not the second. With two busy processes: none.)
        assert r["dropped"] == 0 and r["errors"] == 0 and r["late"] <= r["answered"] // 100, r
        assert m["rtns_late_answers_total"] <= r["answered"] // 100
        assert m['rtns_errors_total{code="busy"}'] == r["refused"]["busy"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_connect_falls_through_busy_and_silence(passthrough_pack, tmp_path: Path):
    silent = f"tcp://127.0.0.1:{free_port()}"  # nobody listens
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full, ep_full, _ = start_serve(tmp_path / "a", "-m", str(passthrough_pack), "--capacity", "1")
    ok, ep_ok, _ = start_serve(tmp_path / "b", "-m", str(passthrough_pack))
    try:
        with Client(ep_full) as holder:
            holder.hello()  # the one stream it admits
            with pytest.raises(ServerError) as e:
                Client(ep_full).hello()
            assert e.value.code == "busy"
            with connect([silent, ep_full, ep_ok], timeout=1.0) as c:
                assert c.endpoint == ep_ok
                y = c.stream(np.zeros(3200, np.float32), chunk=320)
                assert y.shape == (3200,)
            with pytest.raises(NoServer) as e:
                connect([silent, ep_full], timeout=1.0)
            assert "no answer" in str(e.value) and "busy" in str(e.value)
    finally:
        for p in (full, ok):
            p.send_signal(signal.SIGINT)
            p.wait(30)
