"""``rtns web``: its WebSocket protocol (docs/protocol.md), file enhancement and the CLI, against
the real command in a subprocess (aiohttp's client speaks to it).

* A session's output is exactly ``ChannelStream``'s for the same input (the in-process
  path), controls change it as documented, and ``closed`` accounts for every sample.
* Hostile peers (garbage, binary before the hello, a wrong rate, nothing at all, an
  oversized frame, a partial sample frame, NaN, an error flood, silence after the hello)
  are each answered with one ``error`` and/or dropped, while a good session streaming at
  the same time gets exactly the output it would get alone.
* ``--endpoint``: the same page protocol in front of a running ``rtns serve``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

aiohttp = pytest.importorskip("aiohttp")

from cli_helpers import free_port, run_rtns, start_serve  # noqa: E402
from web_harness import WebProc  # noqa: E402

from rtns.web import protocol as W  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATE = 48_000
CHUNK = 960  # 20 ms, what the page sends at 48 kHz
HELLO_TIMEOUT, IDLE_TIMEOUT = 1.0, 3.0
MAX_SESSIONS = 6


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    srv = WebProc(
        tmp_path_factory.mktemp("web"),
        "--hello-timeout", str(HELLO_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT),
        "--max-sessions", str(MAX_SESSIONS), "--max-upload-mb", "1",
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.output
    assert "Traceback" not in srv.output, srv.output


@pytest.fixture(scope="module")
def model():
    from rtns.cli.files import load_model

    return load_model(None)


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    """Noisy 'speech': an amplitude-modulated harmonic tone plus white noise, float32 [n]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((180, 360, 540, 900), 1))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.1 * env * voice + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


def _chunks(x: np.ndarray) -> list[np.ndarray]:
    return [x[i : i + CHUNK] for i in range(0, len(x), CHUNK)]


async def _hello(s, url: str, **fields):
    ws = await s.ws_connect(f"{url}/ws")
    await ws.send_str(json.dumps({"type": "hello", "version": 1, "sample_rate": RATE, **fields}))
    return ws, json.loads((await ws.receive()).data)


async def _stream(ws, chunks, pause: float = 0.0) -> np.ndarray:
    """Send each chunk and read its answer; returns the outputs concatenated."""
    outs = []
    for c in chunks:
        await ws.send_bytes(c.astype("<f4").tobytes())
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        outs.append(np.frombuffer(msg.data, "<f4"))
        if pause:
            await asyncio.sleep(pause)
    return np.concatenate(outs)


async def _close(ws) -> tuple[np.ndarray, dict]:
    await ws.send_str('{"type": "close"}')
    tail = await ws.receive()
    closed = json.loads((await ws.receive()).data)
    return np.frombuffer(tail.data, "<f4"), closed


def _reference(model, chunks, **controls) -> np.ndarray:
    from rtns.streams import ChannelStream

    cs = ChannelStream(model, 1, RATE)
    for k, v in controls.items():
        setattr(cs, k, v)
    parts = [cs.push(c)[:, 0] for c in chunks] + [cs.flush()[:, 0]]
    return np.concatenate(parts)


def test_session_output_is_channelstreams(web, model):
    chunks = _chunks(_signal(1.0))

    async def go():
        async with aiohttp.ClientSession() as s:
            ws, ready = await _hello(s, web.url)
            y = await _stream(ws, chunks)
            tail, closed = await _close(ws)
            return ready, np.concatenate([y, tail]), closed

    ready, y, closed = asyncio.run(go())
    W.Ready.model_validate(ready)
    assert ready["model"] == model.name and ready["backend"] == "in-process"
    assert ready["atten_lim_db"] == model.manifest.atten_lim_db and ready["bypass"] is False
    ref = _reference(model, chunks)
    np.testing.assert_array_equal(y, ref)
    n = sum(len(c) for c in chunks)
    assert closed == {
        "type": "closed", "reason": "close", "samples_in": n, "samples_out": n + ready["latency"]
    }  # fmt: skip


def test_controls(web, model):
    """Bypass: the input delayed by the latency, exactly; a limit change answers with the
    state in force and changes the output as ChannelStream's does."""
    x = _signal(0.6, seed=1)
    chunks = _chunks(x)

    async def go():
        async with aiohttp.ClientSession() as s:
            ws, ready = await _hello(s, web.url, bypass=True)
            y = await _stream(ws, chunks)
            await ws.send_str(json.dumps({"type": "control", "bypass": False, "atten_lim_db": 6}))
            state = json.loads((await ws.receive()).data)
            await ws.send_str(json.dumps({"type": "control", "atten_lim_db": 1e9}))
            err = json.loads((await ws.receive()).data)
            await ws.close()
            return ready, y, state, err

    ready, y, state, err = asyncio.run(go())
    assert ready["bypass"] is True
    lat = ready["latency"]
    np.testing.assert_allclose(y[lat:], x[: len(y) - lat], atol=1e-6)
    assert state == {"type": "control", "bypass": False, "atten_lim_db": 6.0}
    assert err["code"] == "bad_atten" and err["fatal"] is False


# -- hostile peers ----------------------------------------------------------------------------
async def _garbage_text(s, url):
    ws = await s.ws_connect(f"{url}/ws")
    await ws.send_str("\x00not json{")
    return json.loads((await ws.receive()).data), (await ws.receive()).type, ws.close_code


async def _binary_first(s, url):
    ws = await s.ws_connect(f"{url}/ws")
    await ws.send_bytes(b"\x01" * 400)
    return json.loads((await ws.receive()).data), (await ws.receive()).type, ws.close_code


async def _wrong_rate(s, url):
    ws, err = await _hello(s, url, sample_rate=1000)
    return err, (await ws.receive()).type, ws.close_code


async def _nothing_at_all(s, url):
    ws = await s.ws_connect(f"{url}/ws")
    return json.loads((await ws.receive()).data), (await ws.receive()).type, ws.close_code


async def _oversized(s, url):
    ws, _ = await _hello(s, url)
    await ws.send_bytes(b"\0" * (W.MAX_FRAME_BYTES + 4))
    return None, (await ws.receive()).type, ws.close_code


async def _idle_after_hello(s, url):
    ws, _ = await _hello(s, url)
    return json.loads((await ws.receive()).data), (await ws.receive()).type, ws.close_code


async def _bad_frames_in_a_session(s, url):
    """A partial sample frame and NaN are answered (not fatal); the session goes on."""
    ws, _ = await _hello(s, url)
    await ws.send_bytes(b"\0" * 7)
    e1 = json.loads((await ws.receive()).data)
    await ws.send_bytes(np.full(CHUNK, np.nan, "<f4").tobytes())
    e2 = json.loads((await ws.receive()).data)
    await ws.send_str('{"type": "hello", "version": 1, "sample_rate": 48000}')
    e3 = json.loads((await ws.receive()).data)
    y = await _stream(ws, _chunks(_signal(0.1)))
    await ws.close()
    return (e1["code"], e2["code"], e3["code"], len(y) > 0), None, None


async def _error_flood(s, url):
    ws, _ = await _hello(s, url)
    for _ in range(W.MAX_ERRORS):
        await ws.send_str("[]")
    codes = []
    while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
        codes.append(json.loads(msg.data)["code"])
    return codes[-1], msg.type, ws.close_code


HOSTILE = {
    "garbage text": (_garbage_text, ("bad_json", True), W.CLOSE_POLICY),
    "binary before the hello": (_binary_first, ("no_session", True), W.CLOSE_POLICY),
    "wrong rate": (_wrong_rate, ("bad_rate", True), W.CLOSE_POLICY),
    "nothing at all": (_nothing_at_all, ("timeout", True), W.CLOSE_POLICY),
    "oversized frame": (_oversized, None, W.CLOSE_TOO_BIG),
    "silence after the hello": (_idle_after_hello, ("timeout", True), W.CLOSE_POLICY),
}


def test_hostile_peers_leave_a_good_session_alone(web, model):
    x = _signal(8.0, seed=2)
    chunks = _chunks(x)

    async def good(s, done: asyncio.Event):
        ws, _ = await _hello(s, web.url)
        sent, outs = 0, []
        while not done.is_set() or sent < 25:  # streams for as long as the peers misbehave
            outs.append(await _stream(ws, chunks[sent : sent + 1], pause=0.01))
            sent += 1
        tail, closed = await _close(ws)
        return chunks[:sent], np.concatenate([*outs, tail]), closed

    async def go():
        async with aiohttp.ClientSession() as s:
            done = asyncio.Event()
            task = asyncio.create_task(good(s, done))
            peers = [f(s, web.url) for f, _, _ in HOSTILE.values()]
            peers += [_bad_frames_in_a_session(s, web.url), _error_flood(s, web.url)]
            results = await asyncio.gather(*peers)
            done.set()
            return results, await task

    results, (sent, y, closed) = asyncio.run(go())
    for (name, (_, want_err, want_code)), (err, kind, code) in zip(
        HOSTILE.items(), results, strict=False
    ):
        if want_err is not None:
            assert (err["code"], err["fatal"]) == want_err, (name, err)
            assert "\n" not in err["message"] and err["message"], (name, err)
        assert kind == aiohttp.WSMsgType.CLOSE and code == want_code, (name, kind, code)
    assert results[-2][0] == ("bad_length", "bad_samples", "already_open", True)
    assert results[-1][0] == "too_many_errors" and results[-1][2] == W.CLOSE_POLICY
    # The good session got exactly what it would have got alone.
    np.testing.assert_array_equal(y, _reference(model, sent))
    assert closed["reason"] == "close"
    assert "Traceback" not in web.output


def test_server_full_and_stats(web):
    async def go():
        async with aiohttp.ClientSession() as s:
            await _wait_idle(s, web.url)
            held = [await _hello(s, web.url) for _ in range(MAX_SESSIONS)]
            ws, err = await _hello(s, web.url)
            kind = (await ws.receive()).type
            async with s.get(f"{web.url}/api/stats") as r:
                stats = await r.json()
            for h, _ in held:
                await h.close()
            return err, kind, ws.close_code, stats

    err, kind, code, stats = asyncio.run(go())
    assert err["code"] == "server_full" and err["fatal"], err
    assert kind == aiohttp.WSMsgType.CLOSE and code == W.CLOSE_TRY_AGAIN
    assert stats["sessions_open"] == MAX_SESSIONS
    assert stats["errors"].get("server_full", 0) >= 1


async def _wait_idle(s, url, timeout: float = 30.0) -> None:
    """Until the server has released every earlier session (it does so after the peer
    goes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with s.get(f"{url}/api/stats") as r:
            if (await r.json())["sessions_open"] == 0:
                return
        assert loop.time() < deadline, "sessions still open"
        await asyncio.sleep(0.05)


# -- files ------------------------------------------------------------------------------------
def test_dropped_file_comes_back_enhanced_with_its_picture(web, model, shared_dir):
    from rtns.audio_io import read_audio
    from rtns.cli.files import enhance_channels

    path = shared_dir / "data/test/vbdemand36/noisy/p232_001.flac"

    async def post(body: bytes, name: str):
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{web.url}/api/enhance", params={"name": name}, data=body) as r:
                return r.status, await r.json()

    status, out = asyncio.run(post(path.read_bytes(), path.name))
    assert status == 200, out
    y, rate = sf.read(io.BytesIO(base64.b64decode(out["wav"])), dtype="float32")
    audio = read_audio(path)
    ref = enhance_channels(model, audio.samples, audio.sample_rate)[:, 0]
    assert rate == audio.sample_rate and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1.5 / 32768)  # 16-bit WAV of the same samples
    assert base64.b64decode(out["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out["model"], out["name"], out["channels"]) == (model.name, path.name, 1)

    status, out = asyncio.run(post(b"RIFF garbage", "bad.wav"))
    assert status == 400 and out["error"].startswith("bad.wav: not a readable audio file"), out
    assert "\n" not in out["error"] and "/tmp" not in out["error"]
    status, out = asyncio.run(post(b"\0" * (1 << 20) + b"\0", "big.wav"))
    assert status == 413 and "larger than 1 MiB" in out["error"], out


# -- in front of rtns serve ---------------------------------------------------------------------
def test_endpoint_mode_fronts_a_daemon(tmp_path):
    from rtns.daemon.client import Client

    proc, endpoint, _ = start_serve(tmp_path)
    web = None
    try:
        web = WebProc(tmp_path, "--endpoint", endpoint)
        x = _signal(1.0, seed=3)
        chunks = _chunks(x)

        async def go():
            async with aiohttp.ClientSession() as s:
                ws, ready = await _hello(s, web.url)
                y1 = await _stream(ws, chunks[:20])
                await ws.send_str(json.dumps({"type": "control", "bypass": True}))
                state = json.loads((await ws.receive()).data)
                y2 = await _stream(ws, chunks[20:30])
                ctl = {"type": "control", "bypass": False, "atten_lim_db": 0}
                await ws.send_str(json.dumps(ctl))
                state2 = json.loads((await ws.receive()).data)
                y3 = await _stream(ws, chunks[30:])
                tail, closed = await _close(ws)
                return ready, (y1, y2, y3, tail), state, state2, closed

        ready, (y1, y2, y3, tail), state, state2, closed = asyncio.run(go())
        with Client(endpoint) as c:
            ref = c.enhance(x[:19200], RATE, chunk=CHUNK)  # the daemon's own output
    finally:
        if web is not None:
            assert web.stop() == 0, web.output
        proc.terminate()
        proc.wait(timeout=30)
    assert ready["backend"] == endpoint and ready["model"] == "rtns-dtln"
    lat = ready["latency"]
    assert state["bypass"] is True and state2 == {
        "type": "control", "bypass": False, "atten_lim_db": 0.0
    }  # fmt: skip
    y = np.concatenate([y1, y2, y3, tail])
    n = len(x)
    assert closed["samples_in"] == n and len(y) == closed["samples_out"] == n + lat
    # Before bypass: the daemon's output; during it: the input delayed; at 0 dB: the input.
    np.testing.assert_allclose(y[lat : len(y1)], ref[: len(y1) - lat], atol=1e-5)
    a, b = len(y1), len(y1) + len(y2)
    np.testing.assert_allclose(y[a:b], x[a - lat : b - lat], atol=1e-6)
    np.testing.assert_allclose(y[b + 2 * lat : n], x[b + lat : n - lat], atol=1e-4)
    assert "Traceback" not in web.output


# -- the command --------------------------------------------------------------------------------
def test_command_errors_are_one_line(tmp_path):
    r = run_rtns("web", "--endpoint", "tcp://127.0.0.1:1", "--model", "x", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--model picks the in-process model" in r.stderr
    import socket

    with socket.socket() as taken:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = run_rtns("web", "--port", str(port), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(f"rtns: error: cannot listen on 127.0.0.1:{port}")
    )


def test_cli_import_stays_light():
    code = (
        "import sys, rtns.cli; rtns.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'playwright', 'pipecat', 'torch', 'rtns') and m.startswith(("
        "'aiohttp', 'playwright', 'pipecat', 'torch', 'rtns.web'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
