"""Limits and hostile input (issue 5, point 4). Every test runs a well-behaved client in a
thread beside the hostile traffic and checks that its output is still exactly
``enhance_array``'s: the daemon answers or drops-and-counts the bad input, keeps serving,
and loses or alters nobody else's audio."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from polling import wait_until  # noqa: E402
from test_server import noise, running_server  # noqa: E402

from rtns.daemon import protocol as P  # noqa: E402
from rtns.daemon.client import Client, NoReply, ServerError  # noqa: E402
from rtns.daemon.server import Server, ServerConfig  # noqa: E402
from rtns.engine import Model, enhance_array  # noqa: E402
from rtns.errors import RtnsError  # noqa: E402


@contextmanager
def bystander(endpoint: str, pack, seconds: float = 1.0, **kw) -> Iterator[None]:
    """A real-time client streaming noise for ``seconds`` while the body runs; the body
    starts once the daemon counts its session open, and on exit its output must equal
    enhance_array's bit for bit. Used on a daemon with no other session open."""
    x = noise(int(16000 * seconds), seed=42)
    result: dict = {}

    def run() -> None:
        try:
            with Client(endpoint, timeout=10) as c:
                result["y"] = c.enhance(x, chunk=320, realtime=True, **kw)
        except BaseException as e:  # reported in the main thread
            result["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    wait_until(
        lambda: "error" in result or stats(endpoint)["sessions"] >= 1,
        30,
        "the bystander's session to open",
        step=0.01,
    )
    yield
    th.join(30)
    assert not th.is_alive(), "the bystander did not finish"
    if "error" in result:
        raise result["error"]
    np.testing.assert_array_equal(result["y"], enhance_array(Model(pack), x))


def raw_socket(endpoint: str, ctx=None):
    ctx = ctx or zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(endpoint)
    return s


def reply(sock, timeout: float = 5.0) -> tuple[dict, list[bytes]]:
    assert sock.poll(int(timeout * 1000)), "no reply"
    frames = sock.recv_multipart()
    return json.loads(frames[0]), frames[1:]


def stats(endpoint: str) -> dict:
    with Client(endpoint) as c:
        return c.stats()


def hello(**kw) -> bytes:
    return json.dumps(
        {"type": "hello", "version": 1, "sample_rate": 16000, "format": "f32le"} | kw
    ).encode()


def audio(seq: int, x: np.ndarray | bytes) -> list[bytes]:
    pcm = x if isinstance(x, bytes) else np.asarray(x, "<f4").tobytes()
    return [json.dumps({"type": "audio", "seq": seq}).encode(), pcm]


def test_protocol_violations_get_error_replies(passthrough_pack):
    with running_server([passthrough_pack]) as srv, bystander(srv.endpoint, passthrough_pack):
        s = raw_socket(srv.endpoint)
        cases = [
            ([b"{nope"], "bad_json"),
            ([b'{"type": "teleport"}'], "unknown_type"),
            (audio(0, np.zeros(128)), "no_session"),  # audio before hello
            ([b'{"type": "close"}'], "no_session"),
            ([hello(sample_rate=0)], "bad_rate"),
            ([hello(sample_rate=-16000)], "bad_rate"),
            ([hello(sample_rate=10**12)], "bad_rate"),
            ([hello(sample_rate="fast")], "bad_rate"),
            ([hello(channels=1000)], "bad_channels"),
            ([hello(format="u8")], "bad_format"),
            ([hello(version=99)], "bad_version"),
            ([hello(model="../../etc/passwd")], "unknown_model"),
            ([hello(atten_lim_db=float("nan"))], "bad_atten"),
        ]
        for frames, code in cases:
            s.send_multipart(frames)
            msg, _ = reply(s)
            assert (msg["type"], msg["code"]) == ("error", code), (frames, msg)
            assert msg["message"] and not msg["fatal"]
        # Now a session, and violations inside it; none of them ends it.
        s.send_multipart([hello()])
        assert reply(s)[0]["type"] == "ready"
        s.send_multipart([hello()])
        assert reply(s)[0]["code"] == "already_open"
        x = noise(1000)
        s.send_multipart(audio(0, x[:500]))
        assert reply(s)[0] == {"type": "audio", "seq": 0, "samples": 384, "queued": 0}
        bad = [
            (audio(0, x[:10]), "duplicate_seq", 0),
            (audio(5, x[:10]), "seq_gap", 5),
            (audio(1, b"\0" * 7), "bad_length", 1),
            (audio(1, np.array([0.0, np.nan], "<f4").tobytes()), "bad_samples", 1),
            (audio(1, np.array([np.inf], "<f4").tobytes()), "bad_samples", 1),
            ([json.dumps({"type": "audio", "seq": 1}).encode()], "bad_frames", 1),
            (audio(1, x[:3]) + [b"extra"], "bad_frames", 1),
        ]
        for frames, code, seq in bad:
            s.send_multipart(frames)
            msg, _ = reply(s)
            assert (msg["code"], msg["seq"], msg["fatal"]) == (code, seq, False), msg
        # The session is intact: seq 1 continues the stream exactly.
        s.send_multipart(audio(1, x[500:]))
        msg, pcm = reply(s)
        assert (msg["seq"], msg["samples"]) == (1, 512)
        s.send_multipart([b'{"type": "close"}'])
        closed, tail = reply(s)
        assert closed["type"] == "closed" and closed["samples_in"] == 1000
        assert closed["samples_out"] == 1000 + 384 == 384 + 512 + len(tail[0]) // 4
        s.close()
        st = stats(srv.endpoint)
        assert sum(st["dropped"].values()) == len(cases) + 1 + len(bad)


def test_ten_thousand_random_messages(passthrough_pack):
    rng = np.random.default_rng(0)
    n = 10_000
    with (
        running_server([passthrough_pack]) as srv,
        bystander(srv.endpoint, passthrough_pack, seconds=1.5),
    ):
        s = raw_socket(srv.endpoint)
        errors = 0
        deadline = time.monotonic() + 60
        # In bursts of 50: the server caps what it queues for a client that does not read
        # (max_output_bytes), so a reader that keeps up gets every answer.
        for _ in range(n // 50):
            for _ in range(50):
                frames = [
                    rng.integers(0, 256, rng.integers(0, 64), dtype=np.uint8).tobytes()
                    for _ in range(rng.integers(1, 4))
                ]
                s.send_multipart(frames)
            for _ in range(50):
                assert time.monotonic() < deadline
                msg, _ = reply(s, 10)
                assert msg["type"] == "error"
                errors += 1
        assert errors == n
        s.close()
        st = stats(srv.endpoint)
        assert sum(st["dropped"].values()) == n
        assert st["sessions"] <= 1  # only the bystander


def test_max_sessions(passthrough_pack):
    with running_server([passthrough_pack], max_sessions=2, max_sessions_per_peer=2) as srv:
        # The bystander's session is open when the body starts and lasts 2 s, far longer
        # than the body needs: it holds one slot, `a` the other.
        with bystander(srv.endpoint, passthrough_pack, 2.0), Client(srv.endpoint) as a:
            a.hello()
            assert stats(srv.endpoint)["sessions"] == 2
            with Client(srv.endpoint) as b, pytest.raises(ServerError) as e:
                b.hello()
            assert e.value.code == "server_full"
        # Slots free again once sessions end.
        with Client(srv.endpoint) as c:
            c.hello()


def test_oversized_message_drops_only_that_connection(passthrough_pack):
    limit = 4096
    with running_server([passthrough_pack], max_message_bytes=limit) as srv:
        with bystander(srv.endpoint, passthrough_pack):
            s = raw_socket(srv.endpoint)
            s.send_multipart([hello()])
            ready = reply(s)[0]
            assert ready["max_message_bytes"] == limit
            s.send_multipart(audio(0, noise(limit)))  # 16 KiB > 4 KiB: ZMQ drops the peer
            assert not s.poll(500), "an oversized frame must get no answer"
            s.close()


def test_too_large_on_inproc(passthrough_pack):
    """inproc:// bypasses ZMQ_MAXMSGSIZE; the server checks the PCM size itself."""
    ctx = zmq.Context()
    srv = Server(
        ServerConfig(bind="inproc://big", models=[str(passthrough_pack)], max_message_bytes=4096),
        context=ctx,
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    assert srv.bound.wait(10)
    try:
        with Client("inproc://big", context=ctx) as c:
            c.hello()
            # The client refuses to send it: "too large for this server", not a time-out.
            with pytest.raises(RtnsError, match="8000 bytes is too large for this server"):
                c.send_audio(noise(2000))
            c.send_frames(audio(0, noise(2000)))  # a client that sends it anyway
            msg, _ = c.recv(5)
            assert isinstance(msg, P.Error) and msg.code == "too_large" and msg.seq == 0
            c.send_audio(noise(200), seq=0)  # the refused seq is not consumed
            msg, pcm = c.recv(5)
            assert isinstance(msg, P.AudioOut) and msg.seq == 0 and pcm.shape == (128, 1)
    finally:
        srv.stop()
        th.join(10)
        ctx.term()


def test_idle_session_times_out(passthrough_pack):
    # 1 s: a real-time client on a busy machine can stall for a few hundred ms between
    # messages; that must not count as idle.
    with running_server([passthrough_pack], idle_timeout=1.0) as srv:
        with Client(srv.endpoint) as c:
            c.hello()
            msg, tail = c.recv(10)
            assert isinstance(msg, P.Closed) and msg.reason == "timeout" and tail.size == 0
            with pytest.raises(ServerError) as e:  # the session is gone
                c.send_audio(noise(10))
                m, _ = c.recv(3)
                raise ServerError(m)
            assert e.value.code == "no_session"
        # Traffic keeps a session alive (any message counts), well past the idle timeout.
        with bystander(srv.endpoint, passthrough_pack, seconds=2.5):
            pass
        with Client(srv.endpoint) as c:
            assert c.stats()["counters"]["closed_timeout"] == 1


def test_backpressure_is_reported_and_recoverable(passthrough_pack):
    with running_server([passthrough_pack], queue_limit=1024, hops_per_tick=1) as srv:
        with bystander(srv.endpoint, passthrough_pack):
            with Client(srv.endpoint) as c:
                c.hello()
                for _ in range(10):
                    c.send_audio(noise(1000))
                codes = []
                for _ in range(10):
                    msg, _ = c.recv(5)
                    codes.append(msg.code if isinstance(msg, P.Error) else "audio")
                assert "audio" in codes  # seq 0 fits (errors are sent before audio answers)
                assert "queue_full" in codes  # the limit bit, and the client was told
                assert set(codes) <= {"audio", "queue_full", "seq_gap"}
                assert c.stats()["overruns"] >= 1
            # The client's retry path recovers the exact stream despite back-pressure.
            x = noise(8000, seed=8)
            with Client(srv.endpoint) as c:
                y = c.enhance(x, chunk=1000, window=8)
            np.testing.assert_array_equal(y, enhance_array(Model(passthrough_pack), x))


def test_client_vanishing_mid_stream(passthrough_pack):
    with running_server([passthrough_pack], idle_timeout=1.0) as srv:
        with bystander(srv.endpoint, passthrough_pack, seconds=1.5):
            for _ in range(5):
                s = raw_socket(srv.endpoint, zmq.Context())
                s.send_multipart([hello()])
                assert reply(s)[0]["type"] == "ready"
                for seq in range(20):  # answers pile up unread, then the client is gone
                    s.send_multipart(audio(seq, noise(320)))
                assert s.poll(10_000), "the daemon did not start answering"
                s.close(linger=0)
                s.context.term()
        wait_until(lambda: stats(srv.endpoint)["sessions"] == 0, 30, "vanished sessions to close")
        st = stats(srv.endpoint)
        assert st["sessions"] == 0
        gone = st["counters"].get("closed_vanished", 0) + st["counters"].get("closed_timeout", 0)
        assert gone == 5


def test_no_reply_from_nowhere():
    with Client("tcp://127.0.0.1:9", timeout=0.3) as c, pytest.raises(NoReply, match="rtns serve"):
        c.hello()


def test_a_failing_session_does_not_take_the_daemon_down(passthrough_pack, monkeypatch):
    """An exception while answering one session (a server bug) ends only that session."""
    from rtns.streams import ChannelStream

    real = ChannelStream.take

    def flaky(self):
        if self.channels == 2:  # only the stereo session trips the "bug"
            raise RuntimeError("boom")
        return real(self)

    monkeypatch.setattr(ChannelStream, "take", flaky)
    with running_server([passthrough_pack]) as srv, bystander(srv.endpoint, passthrough_pack):
        with Client(srv.endpoint) as c:
            c.hello(channels=2)
            c.send_audio(noise(1000, channels=2))
            msg, _ = c.recv(5)
            assert isinstance(msg, P.Error) and msg.code == "internal" and msg.fatal
        assert stats(srv.endpoint)["dropped"]["internal"] == 1


def test_client_that_never_reads_cannot_block_the_server(passthrough_pack):
    """Answers to a client whose pipe is full are dropped and counted (never a blocking send);
    other sessions go on exactly."""
    ctx = zmq.Context()
    srv = Server(
        ServerConfig(bind="inproc://slow", models=[str(passthrough_pack)], hwm=10), context=ctx
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    assert srv.bound.wait(10)
    slow = ctx.socket(zmq.DEALER)
    try:
        slow.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 1)
        slow.connect("inproc://slow")
        slow.send(hello())
        assert slow.poll(5000)
        slow.recv_multipart()
        for seq in range(200):  # 200 answers owed; the pipe holds a few
            slow.send_multipart(audio(seq, noise(128)))
        x = noise(5000, seed=1)
        with Client("inproc://slow", context=ctx) as c:
            y = c.enhance(x, chunk=500)
            np.testing.assert_array_equal(y, enhance_array(Model(passthrough_pack), x))
            # Every answer owed to the slow client was either delivered or counted.
            delivered, dropped = 0, 0
            deadline = time.monotonic() + 10
            while delivered + dropped < 200 and time.monotonic() < deadline:
                while slow.poll(50):
                    slow.recv_multipart()
                    delivered += 1
                dropped = c.stats()["dropped"].get("send_hwm", 0)
        assert dropped > 0 and delivered + dropped == 200
    finally:
        slow.close(linger=0)
        srv.stop()
        th.join(10)
        ctx.term()


def test_local_clients_do_not_share_one_quota(passthrough_pack):
    """Issue 31 (5): the per-peer limit was keyed by IP, so every local process was one
    peer: one process holding half the sessions locked every other local client out
    ("127.0.0.1 already holds 2 sessions"). Without CURVE a client is its connection: one
    process's connections take sessions up to --max-sessions, and the refusal names it."""
    with running_server([passthrough_pack], max_sessions=4) as srv:  # 2 per client
        clients = [Client(srv.endpoint) for _ in range(4)]
        try:
            for c in clients:
                c.hello()  # before: the third was server_full (one peer, 2 sessions)
            with Client(srv.endpoint) as extra, pytest.raises(ServerError) as e:
                extra.hello()
            assert e.value.code == "server_full" and "limit of 4 sessions" in str(e.value)
        finally:
            for c in clients:
                c.close()


def _curve(tmp_path):
    from rtns.cli.serve import write_keypair
    from rtns.daemon.server import CurveConfig

    write_keypair(tmp_path / "server", "server")
    for name in ("alice", "bob"):
        write_keypair(tmp_path / "allowed", name)
    curve = CurveConfig(
        server_secret=tmp_path / "server/server.key_secret", allowed_clients=tmp_path / "allowed"
    )

    def client(endpoint: str, name: str) -> Client:
        return Client(
            endpoint,
            server_key=tmp_path / "server/server.key",
            client_key=tmp_path / f"allowed/{name}.key_secret",
        )

    return curve, client


def test_the_per_client_limit_is_per_curve_key(passthrough_pack, tmp_path):
    """Issue 31 (5): with CURVE the limit counts a client's key, whatever its connections;
    another key still gets in; the message names the key and the limit."""
    curve, client = _curve(tmp_path)
    with running_server([passthrough_pack], max_sessions=8, max_sessions_per_peer=2,
                        curve=curve) as srv:  # fmt: skip
        held = [client(srv.endpoint, "alice") for _ in range(2)]
        try:
            for c in held:
                c.hello()
            with client(srv.endpoint, "alice") as a3, pytest.raises(ServerError) as e:
                a3.hello()
            assert e.value.code == "server_full"
            assert "client key" in str(e.value) and "already holds 2" in str(e.value)
            assert "--max-sessions-per-peer 2" in str(e.value)
            with client(srv.endpoint, "bob") as b:
                b.hello()
            held[0].close_session()
            with client(srv.endpoint, "alice") as a4:
                a4.hello()  # alice's count went down with her closed session
            with client(srv.endpoint, "bob") as b:
                assert b.stats()["counters"]["refused_peer"] == 1
        finally:
            for c in held:
                c.close()


CLIENT_THEN_WAIT = """
import sys, time
from rtns.daemon.client import Client
c = Client(sys.argv[1], timeout=20)
c.hello()
print("ready", flush=True)
time.sleep(600)
"""


def killed_client_sessions_end(endpoint: str, sessions) -> None:
    """Start a client process that opens a session, SIGKILL it, and wait until
    ``sessions()`` is back to what it was: the socket monitor saw the connection go (the
    idle timeout, 30 s, is far beyond the wait)."""
    import subprocess
    import sys

    before = sessions()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_THEN_WAIT, endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert sessions() == before + 1
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: sessions() == before, 30, "the killed client's session ending")


def test_a_killed_clients_session_ends_at_once(passthrough_pack):
    """Issue 31 (5): the sessions of a killed client kept counting until the 30 s idle
    timeout. ZeroMQ's socket monitor reports the disconnect and the session ends."""
    with running_server([passthrough_pack], idle_timeout=30.0) as srv:
        killed_client_sessions_end(srv.endpoint, lambda: stats(srv.endpoint)["sessions"])
        assert stats(srv.endpoint)["counters"]["closed_vanished"] == 1


def test_stats_reset_is_the_operators(passthrough_pack):
    with running_server([passthrough_pack], allow_stats_reset=False) as srv:
        with Client(srv.endpoint) as c:
            c.enhance(noise(1000))
            with pytest.raises(ServerError) as e:
                c.stats(reset=True)
            assert e.value.code == "not_allowed"
            assert c.stats()["blocks_processed"] > 0  # nothing was reset


def test_ipv6_loopback(passthrough_pack):
    x = noise(3000)
    with running_server([passthrough_pack], bind="tcp://[::1]:*") as srv:
        assert srv.endpoint.startswith("tcp://[::1]:")
        with Client(srv.endpoint) as c:
            np.testing.assert_array_equal(c.enhance(x), enhance_array(Model(passthrough_pack), x))


def test_client_ends_on_shutdown_not_on_its_timeout(passthrough_pack):
    """Before: a client streaming while the server shut down waited for its time-out."""
    x = noise(16000 * 4)
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint, timeout=30) as c:
        threading.Timer(0.5, srv.stop).start()
        t0 = time.monotonic()
        with pytest.raises(RtnsError, match=r"ended the session \(shutdown\)"):
            c.enhance(x, chunk=320, realtime=True)
        assert time.monotonic() - t0 < 10


def test_client_data_makes_no_numpy_warnings(passthrough_pack, recwarn):
    huge = np.full(4000, 3e38, np.float32)
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint) as c:
        y = c.enhance(huge)
    assert np.isfinite(y).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
