"""`rtns serve`'s probes and drain against a real daemon process: GET /healthz (alive) and
/readyz (models loaded, taking sessions) on the metrics port; SIGTERM makes it not ready,
refuses new sessions with `draining`, lets open ones finish (intact) for up to
--drain-seconds, flushes the rest and exits 0. Every wait polls with a deadline."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")

from cli_helpers import free_port, start_serve  # noqa: E402
from polling import wait_until  # noqa: E402

from rtns.daemon import protocol as P  # noqa: E402
from rtns.daemon.client import Client, ServerError  # noqa: E402
from rtns.engine import Model, enhance_array  # noqa: E402
from rtns.streams import aligned  # noqa: E402


def probe(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:PORT/PATH."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()


def wait_probe(port: int, path: str, status: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, body = probe(port, path)
        except OSError:  # not listening yet
            got, body = None, ""
        if got == status:
            return body
        assert time.monotonic() < deadline, f"{path}: {got} {body!r}, not {status}"
        time.sleep(0.05)


def _draining_gauge(port: int) -> float:
    """The ``rtns_draining`` line of /metrics (there must be exactly one)."""
    status, body = probe(port, "/metrics")
    assert status == 200
    values = [float(ln.split()[-1]) for ln in body.splitlines() if ln.startswith("rtns_draining")]
    assert len(values) == 1, values
    return values[0]


def noise(n: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(3).standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_open_sessions_intact(passthrough_pack, tmp_path: Path, workers):
    mport = free_port()
    proc, endpoint, log = start_serve(
        tmp_path,
        "-m",
        str(passthrough_pack),
        "--metrics-port",
        str(mport),
        "--drain-seconds",
        "120",
        workers=workers,
    )
    try:
        assert wait_probe(mport, "/healthz", 200) == "alive"
        assert wait_probe(mport, "/readyz", 200) == "ready"
        assert probe(mport, "/nope")[0] == 404
        x = noise(16_000)
        with Client(endpoint, timeout=20) as a, Client(endpoint, timeout=20) as b:
            a.hello()
            outs = []
            for i in range(0, 8000, 800):  # half the signal before SIGTERM
                a.send_audio(x[i : i + 800])
                outs.append(a.recv()[1])
            assert _draining_gauge(mport) == 0
            proc.send_signal(signal.SIGTERM)
            assert wait_probe(mport, "/readyz", 503) == "draining"
            assert probe(mport, "/healthz")[0] == 200
            # The one process sets it at its next half-second check; the supervisor's at once.
            wait_until(lambda: _draining_gauge(mport) == 1, 20, "rtns_draining to become 1")
            with pytest.raises(ServerError) as refused:
                b.hello()
            assert refused.value.code == "draining"
            for i in range(8000, 16_000, 800):  # the open session goes on
                a.send_audio(x[i : i + 800])
                msg, pcm = a.recv()
                assert isinstance(msg, P.AudioOut)
                outs.append(pcm)
            before, tail = a.close_session()
        assert a.closed.reason == "close" and a.closed.samples_out == 16_000 + 384
        y = aligned(np.concatenate([*outs, *(p for _, p in before), tail]), 384, 16_000)
        np.testing.assert_array_equal(y[:, 0], enhance_array(Model(passthrough_pack), x))
        # No session left: the daemon exits now, long before the 120 s drain deadline.
        assert proc.wait(60) == 0
        assert "event=drain" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_drain_deadline_flushes_what_is_left(passthrough_pack, tmp_path: Path):
    mport = free_port()
    proc, endpoint, _ = start_serve(
        tmp_path, "-m", str(passthrough_pack), "--metrics-port", str(mport), "--drain-seconds", "1"
    )
    try:
        with Client(endpoint, timeout=20) as a:
            a.hello()
            a.send_audio(noise(1000))
            assert isinstance(a.recv()[0], P.AudioOut)
            proc.send_signal(signal.SIGTERM)
            msg, tail = a.recv(30)  # the session stays idle: the deadline ends it
            assert isinstance(msg, P.Closed) and msg.reason == "shutdown"
            assert (msg.samples_in, msg.samples_out) == (1000, 1384)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
