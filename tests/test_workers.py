"""rtns serve --workers: sessions pinned to worker processes behind one address."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import free_port, start_serve
from polling import wait_until

from rtns.daemon import protocol as P
from rtns.daemon.client import Client
from rtns.engine import Model, enhance_array

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def daemon(tmp_path):
    proc, endpoint, log = start_serve(tmp_path, workers=2)
    yield proc, endpoint, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def worker_pids(log: Path) -> list[int]:
    return [
        int(w.split("pid=")[1].split()[0])
        for w in log.read_text().splitlines()
        if "event=worker " in w
    ]


def test_sessions_spread_exact_and_stats_summed(daemon):
    proc, endpoint, log = daemon
    x = (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    ref = enhance_array(Model("rtns-dtln"), x)
    clients = [Client(endpoint, timeout=20) for _ in range(4)]
    try:
        for c in clients:
            c.hello()
        with Client(endpoint) as s:
            st = s.stats()
        assert st["workers"] == 2 and st["sessions"] == 4
        assert sorted(w["sessions"] for w in st["per_worker"]) == [2, 2]  # least loaded
        for c in clients:
            c.close_session()
        for c in clients:
            np.testing.assert_array_equal(c.enhance(x, chunk=320), ref)
    finally:
        for c in clients:
            c.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_dead_worker_ends_only_its_sessions(daemon):
    proc, endpoint, log = daemon
    a, b = Client(endpoint, timeout=20), Client(endpoint, timeout=20)
    try:
        a.hello()
        b.hello()
        with Client(endpoint) as s:
            per = s.stats()["per_worker"]
        assert [w["sessions"] for w in per] == [1, 1]
        first, _ = worker_pids(log)
        os.kill(first, signal.SIGKILL)
        # one of the two sessions ends with closed/error; the other streams on
        ended, alive = [], []
        for c in (a, b):
            c.send_audio(np.zeros(320, np.float32))
            msg, _ = c.recv(20)
            (ended if isinstance(msg, P.Closed) else alive).append(msg)
        assert len(ended) == 1 and ended[0].reason == "error", (ended, alive)
        assert len(alive) == 1 and isinstance(alive[0], P.AudioOut)
        deadline = time.monotonic() + 60
        while len(worker_pids(log)) < 3:  # a new worker takes the dead one's place
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        x = np.zeros(3200, np.float32)
        with Client(endpoint, timeout=30) as c:
            assert c.enhance(x).shape == x.shape
    finally:
        a.close()
        b.close()


def test_workers_do_not_outlive_a_killed_supervisor(daemon):
    proc, endpoint, log = daemon
    pids = worker_pids(log)
    proc.kill()  # SIGKILL: no chance to stop its workers
    proc.wait(10)
    deadline = time.monotonic() + 20
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[1].split()[0] == "Z":  # exited, not yet reaped
                    break
            assert time.monotonic() < deadline, f"worker {pid} outlived its supervisor"
            time.sleep(0.05)


def test_no_files_left_behind(tmp_path):
    """Issue 31 (6): every `rtns serve --workers 2` (or more) left a /tmp/rtns-workers-*
    folder (IPC sockets, metrics files), even after a clean SIGTERM."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, endpoint, log = start_serve(
        tmp_path, "--metrics-port", str(free_port()), workers=2, env={"TMPDIR": str(tmp)}
    )
    try:
        assert len(list(tmp.glob("rtns-workers-*"))) == 1  # in use
        with Client(endpoint, timeout=20) as c:
            c.hello()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(tmp.glob("rtns-workers-*")) == []


def test_supervisor_keeps_the_daemons_limits(tmp_path):
    """Issue 31 (5): with workers, the refusal showed a worker's share ("limit of 2") and
    the per-peer share, not the daemon's limits; a killed client's session counted until the
    idle timeout. The supervisor checks the daemon's limits and watches disconnects."""
    from test_server_hostile import killed_client_sessions_end

    from rtns.daemon.client import ServerError

    proc, endpoint, log = start_serve(tmp_path, "--max-sessions", "4", workers=2)
    clients = [Client(endpoint, timeout=20) for _ in range(4)]
    try:
        for c in clients:
            c.hello()
        with Client(endpoint, timeout=20) as extra, pytest.raises(ServerError) as e:
            extra.hello()
        assert e.value.code == "server_full" and "limit of 4 sessions" in str(e.value)
        clients.pop().close()  # a connection that goes frees its session

        def sessions() -> int:
            with Client(endpoint, timeout=20) as s:
                return s.stats()["sessions"]

        wait_until(lambda: sessions() == 3, 30, "three sessions open", step=0.05)
        killed_client_sessions_end(endpoint, sessions)
        with Client(endpoint, timeout=20) as s:
            st = s.stats()
        assert st["counters"]["refused_full"] == 1
    finally:
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
