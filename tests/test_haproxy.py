"""Two daemons behind HAProxy (Debian's haproxy; TCP mode, health checks
`option httpchk GET /readyz` against each daemon's metrics port): 20 sessions through
HAProxy equal `rtns enhance` sample for sample; one daemon drained (SIGTERM) in the middle:
its sessions finish intact, HAProxy marks it down, new sessions land on the other, none is
lost. Free ports chosen at run time. Without haproxy the test skips, saying why, except
in CI (CI=true), where it fails."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")

from cli_helpers import free_port, start_serve  # noqa: E402

from rtns.daemon.client import Client  # noqa: E402
from rtns.engine import Model, enhance_array  # noqa: E402

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
if HAPROXY is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError(
            "haproxy is missing in CI (.ci/run installs it: apt-get install haproxy)"
        )
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)

CONFIG = """global
    stats socket {sock} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
frontend rtns
    bind 127.0.0.1:{port}
    default_backend daemons
backend daemons
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 100ms fall 1 rise 1
    server d0 127.0.0.1:{z0} check port {m0}
    server d1 127.0.0.1:{z1} check port {m1}
"""


def haproxy_states(sock: Path) -> dict[str, str]:
    """Each daemon's state in HAProxy's eyes (UP, DOWN, ...), from its stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = {}
    for line in data.decode().splitlines():
        f = line.split(",")
        if len(f) > 17 and f[0] == "daemons" and f[1] in ("d0", "d1"):
            out[f[1]] = f[17].split()[0]
    return out


def wait_states(sock: Path, want: dict[str, str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = haproxy_states(sock)
        except OSError:
            got = {}
        if all(got.get(k) == v for k, v in want.items()):
            return
        assert time.monotonic() < deadline, f"haproxy states {got}, wanted {want}"
        time.sleep(0.05)


def test_twenty_sessions_through_haproxy_with_a_drain(tmp_path: Path):
    daemons = []
    for k in range(2):
        (tmp_path / f"d{k}").mkdir()
        m = free_port()
        proc, ep, log = start_serve(
            tmp_path / f"d{k}", "--metrics-port", str(m), "--drain-seconds", "120"
        )
        daemons.append((proc, int(ep.rsplit(":", 1)[1]), m, log))
    port, sock = free_port(), tmp_path / "haproxy.sock"
    cfg = tmp_path / "haproxy.cfg"
    (z0, m0), (z1, m1) = ((d[1], d[2]) for d in daemons)
    cfg.write_text(CONFIG.format(sock=sock, port=port, z0=z0, m0=m0, z1=z1, m1=m1))
    ha = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stderr=subprocess.PIPE, text=True)
    front = f"tcp://127.0.0.1:{port}"
    model = Model("rtns-dtln")
    # The first ten run 4 s in real time: d0 is still draining them while the rest start.
    xs = [
        (0.1 * np.random.default_rng(i).standard_normal(64_000 if i < 10 else 24_000)).astype(
            np.float32
        )
        for i in range(20)
    ]
    ys: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def stream(i: int, c: Client) -> None:
        try:
            with c:
                ys[i] = c.stream(xs[i], chunk=320, realtime=True)
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        wait_states(sock, {"d0": "UP", "d1": "UP"})
        first = []
        for i in range(10):  # leastconn: five on each daemon
            c = Client(front, timeout=30)
            c.hello()
            first.append(threading.Thread(target=stream, args=(i, c)))
        for t in first:
            t.start()
        daemons[0][0].send_signal(signal.SIGTERM)  # drain d0 mid-run
        wait_states(sock, {"d0": "DOWN", "d1": "UP"})
        assert daemons[0][0].poll() is None, "d0 went down by exiting, not by /readyz"
        second = []
        for i in range(10, 20):
            c = Client(front, timeout=30)
            c.hello()  # a draining daemon would answer `draining`
            second.append(threading.Thread(target=stream, args=(i, c)))
        for t in second:
            t.start()
        for t in first + second:
            t.join(120)
        assert not errors, errors
        assert daemons[0][0].wait(60) == 0  # d0 exits once its sessions ended
        opened = [d[3].read_text().count("event=open") for d in daemons]
        assert opened[0] >= 1 and sum(opened) == 20, opened  # none lost, d0 took only early ones
        after_drain = daemons[0][3].read_text().split("event=drain", 1)[1]
        assert "event=open" not in after_drain  # d0 took none after SIGTERM
    finally:
        ha.terminate()
        ha.wait(10)
        for proc, *_ in daemons:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(30)
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(ys[i], enhance_array(model, x), err_msg=f"session {i}")
