"""The daemon end to end: exact output, batch independence, resampling, channels, stats,
CURVE, SIGTERM flush, and `rtns stream` == `rtns enhance`. Servers run in a thread on
tcp://127.0.0.1 (random port) or in a subprocess; every wait has a timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zmq")

from rtns.daemon import protocol as P  # noqa: E402
from rtns.daemon.client import Client, NoReply, ServerError  # noqa: E402
from rtns.daemon.server import CurveConfig, Server, ServerConfig, batch_invariant, is_loopback  # noqa: E402
from rtns.engine import Model, enhance_array  # noqa: E402
from rtns.errors import UserInputError  # noqa: E402
from rtns.streams import ChannelStream


@contextmanager
def running_server(packs: list[Path], **kw) -> Iterator[Server]:
    """A Server in a daemon thread on a free loopback port; stopped and joined on exit."""
    kw.setdefault("bind", "tcp://127.0.0.1:*")
    kw.setdefault("allow_stats_reset", True)
    srv = Server(ServerConfig(models=[str(p) for p in packs], **kw))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    assert srv.bound.wait(10), "server did not bind"
    try:
        yield srv
    finally:
        srv.stop()
        th.join(10)
        assert not th.is_alive(), "server loop did not stop"


def noise(n: int, seed: int = 0, channels: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n,) if channels is None else (n, channels)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 100, 128, 1000, 7000])
def test_stream_equals_enhance_array(passthrough_pack, random_dtln_pack, chunk):
    x = noise(6000 if chunk == 1 else 20_000, seed=chunk)
    ref = enhance_array(Model(random_dtln_pack), x)
    with running_server([random_dtln_pack, passthrough_pack]) as srv, Client(srv.endpoint) as c:
        y = c.enhance(x, chunk=chunk)
        assert c.closed is not None
        assert c.closed.samples_in == x.size
        assert c.closed.samples_out == x.size + 384  # the tail carries the latency
    np.testing.assert_array_equal(y, ref)


def test_every_audio_message_answered_in_order(passthrough_pack):
    x = noise(8000)
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint) as c:
        ready = c.hello()
        assert (ready.latency, ready.block_shift, ready.model) == (384, 128, "passthrough")
        sizes = [0, 50, 200, 128, 1, 3000, 77]
        pos = 0
        got = []
        for n in sizes:  # lockstep: each answer holds exactly the hops completed so far
            c.send_audio(x[pos : pos + n])
            pos += n
            msg, pcm = c.recv(5)
            assert isinstance(msg, P.AudioOut)
            got.append((msg.seq, pcm.shape[0]))
        for n in sizes:  # pipelined: answers stay in order, counts add up
            c.send_audio(x[pos : pos + n])
            pos += n
        for i in range(len(sizes)):
            msg, pcm = c.recv(5)
            assert isinstance(msg, P.AudioOut) and msg.seq == len(sizes) + i
            got.append((msg.seq, pcm.shape[0]))
        _, tail = c.close_session()
    assert [s for s, _ in got] == list(range(2 * len(sizes)))
    lockstep = [n for _, n in got[: len(sizes)]]
    np.testing.assert_array_equal(np.cumsum(lockstep), np.cumsum(sizes) // 128 * 128)
    assert sum(n for _, n in got) + tail.shape[0] == pos + 384


def test_batch_invariance_probe(random_dtln_pack, passthrough_stft_pack):
    """The measurement behind batching: rows at batch 2..64 are bit-identical to batch 1."""
    assert batch_invariant(Model(random_dtln_pack))
    assert batch_invariant(Model(passthrough_stft_pack), 20)


def test_probe_detects_batch_dependent_rows(passthrough_pack):
    """A model whose rows depend on the batch (here: on the batch mean) fails the probe."""
    model = Model(passthrough_pack)
    infer = model.infer

    def leaky(blocks, state):
        y, st = infer(blocks, state)
        return y + 1e-7 * blocks.mean(), st

    model.infer = leaky  # type: ignore[method-assign]
    assert not batch_invariant(model, 8)


def _crowd(srv: Server, x: np.ndarray, others: int, chunk: int = 256) -> np.ndarray:
    """Stream ``x`` on one session while ``others`` sessions stream noise in lockstep."""
    clients = [Client(srv.endpoint) for _ in range(others + 1)]
    try:
        for c in clients:
            c.hello()
        signals = [x] + [noise(x.size, seed=100 + i) for i in range(others)]
        outs: list[list[np.ndarray]] = [[] for _ in clients]
        for pos in range(0, x.size, chunk):
            for c, s in zip(clients, signals, strict=True):
                c.send_audio(s[pos : pos + chunk])
            for i, c in enumerate(clients):
                msg, pcm = c.recv(10)
                assert isinstance(msg, P.AudioOut), msg
                outs[i].append(pcm[:, 0])
        for i, c in enumerate(clients):
            _, tail = c.close_session()
            outs[i].append(tail[:, 0])
        return np.concatenate(outs[0])
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("max_batch", [64, 16])
def test_output_independent_of_other_sessions(random_dtln_pack, max_batch):
    x = noise(16_000, seed=7)
    # probe=False: batch whatever the probe would say, so this test checks batching itself.
    # max_batch=16 splits the 51 rows into calls of 16, 16, 16 and 3.
    with running_server([random_dtln_pack], probe=False, max_batch=max_batch) as srv:
        alone = _crowd(srv, x, 0)
        with Client(srv.endpoint) as c:
            c.stats(reset=True)
        crowd = _crowd(srv, x, 50)
        with Client(srv.endpoint) as c:
            st = c.stats()
    assert st["rows_per_tick"]["max"] >= 40, st["rows_per_tick"]
    np.testing.assert_array_equal(crowd, alone)
    ref = enhance_array(Model(random_dtln_pack), x)
    np.testing.assert_array_equal(alone[384 : 384 + x.size], ref)


@pytest.mark.parametrize("how", ["probe fails", "--no-batch"])
def test_unbatched_paths_are_exact(random_dtln_pack, monkeypatch, how):
    """If the probe finds batch-dependent rows (or --no-batch), one row per call."""
    import rtns.daemon.server

    monkeypatch.setattr(rtns.daemon.server, "batch_invariant", lambda model, max_batch: False)
    x = noise(8000, seed=3)
    with running_server([random_dtln_pack], batch=how != "--no-batch") as srv:
        assert not srv.models["random-dtln"].batched
        with Client(srv.endpoint) as c:
            y = c.enhance(x, chunk=300)
    np.testing.assert_array_equal(y, enhance_array(Model(random_dtln_pack), x))


def test_channels_are_independent_streams(random_dtln_pack):
    x = noise(9000, seed=4, channels=3)
    m = Model(random_dtln_pack)
    with running_server([random_dtln_pack]) as srv, Client(srv.endpoint) as c:
        y = c.enhance(x, chunk=333)
    for ch in range(3):
        np.testing.assert_array_equal(y[:, ch], enhance_array(m, x[:, ch]))


def test_s16le_passthrough_is_lossless(passthrough_pack):
    x = (np.random.default_rng(5).integers(-30000, 30000, 7000) / 32768).astype(np.float32)
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint) as c:
        y = c.enhance(x, chunk=512, format="s16le")
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_other_rates_are_resampled_both_ways(passthrough_pack, rate):
    t = np.arange(rate * 2) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * np.minimum(1, t)).astype(np.float32)
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint) as c:
        y = c.enhance(x, rate, chunk=rate // 100)
        ready, closed = c.ready, c.closed
    # The session's latency is the ChannelStream's: whole samples at the client's rate.
    assert ready.latency == ChannelStream(Model(passthrough_pack), 1, rate).latency
    assert closed.samples_out == x.size + ready.latency  # exact count at the client's rate
    # Time-aligned to the sample (a pass-through model returns the input).
    err = np.abs(y - x)[rate // 10 : -rate // 10]
    assert err.max() < 1e-5, err.max()


def test_models_by_name_and_attenuation(passthrough_pack, random_dtln_pack):
    x = noise(4000, seed=9)
    m = Model(random_dtln_pack)
    with running_server([random_dtln_pack, passthrough_pack]) as srv:
        with Client(srv.endpoint) as c:
            np.testing.assert_allclose(c.enhance(x, model="passthrough"), x, atol=1e-6)
        with Client(srv.endpoint) as c:
            y = c.enhance(x, atten_lim_db=6.0)
        with Client(srv.endpoint) as c, pytest.raises(ServerError) as e:
            c.hello(model="nope")
        assert e.value.code == "unknown_model"
    st = m.stream()
    st.atten_lim = 6.0
    np.testing.assert_array_equal(y, enhance_array(m, x, st))


def test_pack_default_limit_and_off(random_dtln_pack, tmp_path):
    """A hello without a limit gets the pack's default; "off" (math.inf in the client) lifts it."""
    import math

    from test_engine import limited_copy

    limited = limited_copy(random_dtln_pack, tmp_path / "limited", 12.0)
    x = noise(4000, seed=3)
    m = Model(limited)
    with running_server([limited]) as srv:
        with Client(srv.endpoint) as c:
            assert c.hello().atten_lim_db == pytest.approx(12.0)
        with Client(srv.endpoint) as c:
            y_default = c.enhance(x)
        with Client(srv.endpoint) as c:
            assert c.hello(atten_lim_db=math.inf).atten_lim_db is None
        with Client(srv.endpoint) as c:
            y_off = c.enhance(x, atten_lim_db=math.inf)
    np.testing.assert_array_equal(y_default, enhance_array(m, x))
    st = m.stream()
    st.atten_lim = "off"
    np.testing.assert_array_equal(y_off, enhance_array(m, x, st))
    assert np.max(np.abs(y_default - y_off)) > 1e-4


def test_stats_and_ping(passthrough_pack):
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint) as c:
        c.hello()
        c.send_audio(noise(1000))
        c.recv(5)
        s = c.stats()
        for key in ("sessions", "blocks_processed", "queue_depths", "overruns", "tick_infer_ms"):
            assert key in s
        assert s["sessions"] == 1 and s["blocks_processed"] == 1000 // 128
        assert (
            s["tick_infer_ms"]["p50"] > 0 and s["tick_infer_ms"]["p99"] >= s["tick_infer_ms"]["p50"]
        )
        assert list(s["queue_depths"].values()) == [0]
        c.send_frames([P.encode(P.Ping())])
        msg, _ = c.recv(5)
        assert isinstance(msg, P.Pong)
        assert c.stats(reset=True)["blocks_processed"] == 7
        assert c.stats()["blocks_processed"] == 0


@pytest.mark.parametrize(
    ("endpoint", "loop"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:*", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/x.sock", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://10.0.0.5:5555", False),
        ("tcp://127.0.0.1.evil.com:5555", False),
        ("udp://127.0.0.1:5555", False),
    ],
)
def test_is_loopback(endpoint, loop):
    assert is_loopback(endpoint) is loop


def test_non_loopback_bind_needs_curve(passthrough_pack):
    with pytest.raises(UserInputError, match="requires CurveZMQ"):
        Server(ServerConfig(bind="tcp://0.0.0.0:5555", models=[str(passthrough_pack)]))
    with pytest.raises(UserInputError, match="requires CurveZMQ"):
        Server(ServerConfig(bind="tcp://*:5555", models=[str(passthrough_pack)]))


def test_serve_cli_refuses_plaintext_off_loopback(passthrough_pack, capsys):
    from rtns.cli import main

    assert main(["serve", "--bind", "tcp://0.0.0.0:5555", "-m", str(passthrough_pack)]) == 1
    assert "requires CurveZMQ" in capsys.readouterr().err
    assert main(["serve", "--require-curve", "-m", str(passthrough_pack)]) == 1
    assert "--curve-secret" in capsys.readouterr().err


def test_curve_allows_listed_clients_only(passthrough_pack, tmp_path):
    from rtns.cli.serve import write_keypair

    write_keypair(tmp_path / "server", "server")
    write_keypair(tmp_path / "allowed", "alice")
    write_keypair(tmp_path / "other", "mallory")
    curve = CurveConfig(
        server_secret=tmp_path / "server/server.key_secret",
        allowed_clients=tmp_path / "allowed",
    )
    x = noise(3000)
    server_pub = tmp_path / "server/server.key"
    with running_server([passthrough_pack], curve=curve) as srv:
        with Client(
            srv.endpoint, server_key=server_pub, client_key=tmp_path / "allowed/alice.key_secret"
        ) as c:
            np.testing.assert_array_equal(c.enhance(x), enhance_array(Model(passthrough_pack), x))
        with (
            Client(
                srv.endpoint,
                timeout=1.0,
                server_key=server_pub,
                client_key=tmp_path / "other/mallory.key_secret",
            ) as c,
            pytest.raises(NoReply),
        ):
            c.hello()
        with Client(srv.endpoint, timeout=0.5) as c, pytest.raises(NoReply):
            c.hello()  # plaintext client
        with Client(
            srv.endpoint, server_key=server_pub, client_key=tmp_path / "allowed/alice.key_secret"
        ) as c:
            assert c.stats()["counters"]["sessions_opened"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LogTail:
    """Reads a subprocess's stderr lines in a thread so a test can wait for a given line
    (with a deadline) instead of sleeping and hoping it was written."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, pred, timeout: float = 30.0) -> str:
        """The first line for which ``pred`` holds; fails after ``timeout`` s or at EOF."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                assert not self._done, f"stderr ended without the line: {self.lines[-5:]}"
                assert left > 0, f"no such line within {timeout} s: {self.lines[-5:]}"
                self._cond.wait(left)

    def all(self, timeout: float = 10.0) -> list[str]:
        """Every line, once the process has closed its stderr."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stderr still open"
        return self.lines


def _event(line: str) -> str | None:
    try:
        return json.loads(line).get("event")
    except ValueError:
        return None


def test_sigterm_flushes_open_sessions(passthrough_pack):
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtns", "serve", "--bind", endpoint, "-m", str(passthrough_pack)]
        + ["--stats-every", "0.2", "--drain-seconds", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    log = LogTail(proc)
    try:
        log.wait_for(lambda line: _event(line) == "listening")
        x = noise(5000)
        with Client(endpoint, timeout=20) as a, Client(endpoint, timeout=20) as b:
            a.hello()
            b.hello()
            a.send_audio(x)
            b.send_audio(x[:1000])
            assert isinstance(a.recv()[0], P.AudioOut) and isinstance(b.recv()[0], P.AudioOut)
            log.wait_for(lambda line: _event(line) == "stats")  # a periodic stats line
            proc.send_signal(signal.SIGTERM)
            for c, n in ((a, 5000), (b, 1000)):
                msg, tail = c.recv(10)
                assert isinstance(msg, P.Closed) and msg.reason == "shutdown"
                assert msg.samples_in == n and msg.samples_out == n + 384
        assert proc.wait(15) == 0
        events = [json.loads(line)["event"] for line in log.all()]
        assert {"curve", "listening", "open", "stats", "shutdown", "close", "stopped"} <= set(
            events
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_rtns_stream_equals_rtns_enhance(random_dtln_pack, tmp_path):
    import soundfile as sf

    from rtns.cli import main

    rng = np.random.default_rng(11)
    files = {
        "a16.wav": ((0.1 * rng.standard_normal(12_000)).astype(np.float32), 16000, "FLOAT"),
        "b44.flac": (0.1 * rng.standard_normal((30_000, 2)), 44100, "PCM_16"),
        # full band: the session splits bands exactly as enhance does
        "c48.wav": ((0.1 * rng.standard_normal(30_000)).astype(np.float32), 48000, "FLOAT"),
    }
    with running_server([random_dtln_pack]) as srv:
        for name, (x, rate, subtype) in files.items():
            src = tmp_path / name
            sf.write(src, x, rate, subtype=subtype)
            out_s, out_e = tmp_path / f"s_{name}", tmp_path / f"e_{name}"
            args = ["stream", str(src), str(out_s), "-e", srv.endpoint, "-q"]
            assert main(args + ["--fast", "--chunk", "500"]) == 0
            assert main(["enhance", str(src), str(out_e), "-m", str(random_dtln_pack), "-q"]) == 0
            ys, rs = sf.read(out_s, dtype="float32")
            ye, re_ = sf.read(out_e, dtype="float32")
            assert rs == re_ == rate and sf.info(out_s).subtype == subtype
            np.testing.assert_array_equal(ys, ye)
        # Real-time pacing gives the same samples (0.75 s of audio).
        out_rt = tmp_path / "rt.wav"
        assert (
            main(["stream", str(tmp_path / "a16.wav"), str(out_rt), "-e", srv.endpoint, "-q"]) == 0
        )
        np.testing.assert_array_equal(sf.read(out_rt)[0], sf.read(tmp_path / "e_a16.wav")[0])


def test_stream_cli_reports_a_missing_server(tmp_path):
    import soundfile as sf

    from rtns.cli import main

    sf.write(tmp_path / "a.wav", noise(1600), 16000)
    port = _free_port()
    rc = main(
        [
            "stream",
            str(tmp_path / "a.wav"),
            str(tmp_path / "o.wav"),
            "-e",
            f"tcp://127.0.0.1:{port}",
            "--timeout",
            "0.5",
        ]
    )
    assert rc == 1
    assert not (tmp_path / "o.wav").exists()


def test_import_cli_stays_light():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import rtns.cli"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mods = out.stderr
    assert "| rtns.cli" in mods  # the import ran (importtime lists it)
    assert "zmq" not in mods and "torch" not in mods and "soxr" not in mods


def test_address_in_use_is_one_clear_error(passthrough_pack):
    with running_server([passthrough_pack]) as srv:
        other = Server(ServerConfig(bind=srv.endpoint, models=[str(passthrough_pack)]))
        with pytest.raises(UserInputError, match="cannot bind .*in use"):
            other.run()


def test_ipc_endpoint(passthrough_pack, tmp_path):
    x = noise(3000)
    with running_server([passthrough_pack], bind=f"ipc://{tmp_path}/rtns.sock") as srv:
        assert srv.endpoint.startswith("ipc://")
        with Client(srv.endpoint) as c:
            y = c.enhance(x, chunk=256)
    np.testing.assert_array_equal(y, enhance_array(Model(passthrough_pack), x))


def test_keys_cli(tmp_path, capsys):
    import zmq.auth

    from rtns.cli import main

    assert main(["keys", str(tmp_path / "k"), "--name", "srv"]) == 0
    pub, none = zmq.auth.load_certificate(str(tmp_path / "k/srv.key"))
    pub2, secret = zmq.auth.load_certificate(str(tmp_path / "k/srv.key_secret"))
    assert none is None and pub == pub2 and len(secret) == 40
    assert (tmp_path / "k/srv.key_secret").stat().st_mode & 0o777 == 0o600
    assert main(["keys", str(tmp_path / "k"), "--name", "srv"]) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_serve_and_stream_cli_with_curve(passthrough_pack, tmp_path):
    """The command-line wiring of CURVE: `rtns serve --curve ...` and `rtns stream` with keys."""
    import soundfile as sf

    from rtns.cli import main

    assert main(["keys", str(tmp_path / "srv"), "--name", "server"]) == 0
    assert main(["keys", str(tmp_path / "ok"), "--name", "alice"]) == 0
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "rtns", "serve", "--bind", endpoint, "-m", str(passthrough_pack)]
    cmd += ["--curve", "--curve-secret", str(tmp_path / "srv/server.key_secret")]
    cmd += ["--allowed-clients", str(tmp_path / "ok"), "--log-format", "kv"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    log = LogTail(proc)
    try:
        # A busy machine may take longer than a client's timeout to start the daemon.
        log.wait_for(lambda line: "event=listening" in line)
        x = noise(4000)
        sf.write(tmp_path / "in.wav", x, 16000, subtype="FLOAT")
        common = ["stream", str(tmp_path / "in.wav"), "-e", endpoint, "--fast", "-q"]
        keys = ["--server-key", str(tmp_path / "srv/server.key")]
        keys += ["--client-key", str(tmp_path / "ok/alice.key_secret")]
        assert main([*common[:2], str(tmp_path / "out.wav"), *common[2:], *keys]) == 0
        y, _ = sf.read(tmp_path / "out.wav", dtype="float32")
        np.testing.assert_array_equal(y, enhance_array(Model(passthrough_pack), x))
        # Without keys the same server gives a plaintext client nothing.
        args = [*common[:2], str(tmp_path / "no.wav"), *common[2:], "--timeout", "0.5"]
        assert main(args) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        text = "\n".join(log.all())
        assert "event=curve" in text and "CurveZMQ on" in text and "keys=1" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_shipped_default_among_a_hundred_sessions_equals_enhance():
    """Batching is on by construction for the server's default pack (the probe passes), and
    one client among 100 others gets exactly `rtns enhance`'s samples."""
    default = Model("rtns-dtln")
    x = noise(8_000, seed=9)
    with running_server([default.pack_dir], max_sessions=128, max_sessions_per_peer=128) as srv:
        crowd = _crowd(srv, x, 100)
        with Client(srv.endpoint) as c:
            st = c.stats()
    model = st["models"]["rtns-dtln"]
    assert model["batched"], model["why"]
    assert st["rows_per_tick"]["max"] >= 64  # the batches really were large
    np.testing.assert_array_equal(crowd[384 : 384 + x.size], enhance_array(default, x))


def test_probe_failure_at_the_largest_batch_caps_the_batches(random_dtln_pack, monkeypatch):
    """Rows that differ only at large batches cost the cap, not batching: the server batches
    at the largest power of two that passes the probe, says so, and stays exact."""
    import rtns.daemon.server

    asked = []

    def probe(model, max_batch):
        asked.append(max_batch)
        return max_batch <= 16

    monkeypatch.setattr(rtns.daemon.server, "batch_invariant", probe)
    x = noise(8000, seed=5)
    with running_server([random_dtln_pack], max_batch=100) as srv:
        served = srv.models["random-dtln"]
        assert served.batched and served.bank.max_batch == 16, served.why
        assert "capped at 16 rows" in served.why and "at 100 rows" in served.why
        with Client(srv.endpoint) as c:
            y = c.enhance(x, chunk=300)
            st = c.stats()
    assert asked == [100, 64, 32, 16]
    assert st["models"]["random-dtln"]["batched"] and "capped" in st["models"]["random-dtln"]["why"]
    np.testing.assert_array_equal(y, enhance_array(Model(random_dtln_pack), x))


def test_gc_frozen_only_in_the_daemons_own_process(passthrough_pack, monkeypatch):
    """`rtns serve` (its own process) freezes the collector once loaded; a Server embedded
    in another program (the default) leaves the process's collector alone."""
    import gc

    from rtns.cli import build_parser
    from rtns.cli.serve import server_config

    args = build_parser().parse_args(["serve", "-m", str(passthrough_pack)])
    assert server_config(args).freeze_gc is True
    froze = []
    monkeypatch.setattr(gc, "freeze", lambda: froze.append(True))
    for freeze in (False, True):
        with running_server([passthrough_pack], freeze_gc=freeze) as srv, Client(srv.endpoint) as c:
            c.stats()  # the loop runs
        assert froze == ([True] if freeze else []), (freeze, froze)
