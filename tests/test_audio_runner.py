"""rtns.audio without PortAudio: resampler, buffering plan, the callback driven with arrays,
device resolution and the CLI's messages when PortAudio or devices are missing."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from alloc_probe import callback_peak_bytes
from polling import wait_until

from rtns.atten import OFF, AttenLimit
from rtns.audio import (
    DEAD_AFTER_BLOCKS,
    DEAD_AFTER_S,
    PORTAUDIO_MISSING,
    LiveRunner,
    format_devices,
    plan_buffering,
    resolve_device,
)
from rtns.engine import Model
from rtns.errors import UserInputError
from rtns.streams import ChannelStream

REPO = Path(__file__).resolve().parents[1]
RATE_PAIRS = [(48000, 16000), (16000, 48000), (44100, 16000), (16000, 44100), (16000, 32000)]


# -- buffering plan ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rate", "block", "align", "worker"),
    [(16000, 128, 0, 128), (16000, 256, 0, 256), (16000, 64, 64, 128), (48000, 128, 256, 384)],
)
def test_plan_buffering(
    passthrough_pack: Path, rate: int, block: int, align: int, worker: int
) -> None:
    cs = ChannelStream(Model(passthrough_pack), 1, rate)
    plan = plan_buffering(block, rate, 16000, 128, cs.count_out)
    assert (plan.alignment_frames, plan.worker_frames) == (align, worker)
    assert plan.prefill_frames == align + worker
    with pytest.raises(ValueError, match="positive"):
        plan_buffering(0, rate, 16000, 128)


# -- the runner driven by hand -----------------------------------------------------------
@dataclass
class Flags:
    input_overflow: bool = False
    input_underflow: bool = False
    output_underflow: bool = False
    output_overflow: bool = False

    def __bool__(self) -> bool:
        return any(vars(self).values())


def drive(runner: LiveRunner, x: np.ndarray, block: int, step_every: int = 1) -> np.ndarray:
    """Feed x [n] through the callback in blocks; run the worker after every
    ``step_every`` callbacks (0: never). Returns the output [n]."""
    y = np.zeros_like(x)
    inbuf = np.zeros((block, 1), dtype=np.float32)
    outbuf = np.zeros((block, 1), dtype=np.float32)
    for j, i in enumerate(range(0, x.shape[0] - block + 1, block)):
        inbuf[:, 0] = x[i : i + block]
        runner.callback(inbuf, outbuf, block, None, None)
        y[i : i + block] = outbuf[:, 0]
        if step_every and (j + 1) % step_every == 0:
            while runner.step():
                pass
    return y


def clicks(n: int, every: int, first: int) -> np.ndarray:
    x = np.zeros(n, dtype=np.float32)
    x[first::every] = 0.5
    return x


@pytest.fixture(scope="module")
def passthrough_model(passthrough_pack: Path) -> Model:
    return Model(passthrough_pack)


@pytest.mark.parametrize("block", [128, 64, 256, 200])
def test_passthrough_delay_is_the_reported_latency_at_16k(
    passthrough_model: Model, block: int
) -> None:
    with LiveRunner(passthrough_model, 16000) as runner:
        n = block * (16000 // block)
        x = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1
        y = drive(runner, x, block)
        lat = runner.latency()
        d = round(lat.in_process_s * 16000)
        assert runner.plan is not None and runner.plan.block_frames == block
        # The first callback only primes; the timeline starts at the second.
        np.testing.assert_allclose(y[block + d :], x[block : x.shape[0] - d], atol=1e-5)
        assert runner.underruns == 0
        assert d == 384 + runner.plan.prefill_frames
        if block == 128:
            assert d == 512  # 24 ms algorithmic + one 8 ms hop for the worker


@pytest.mark.parametrize(("rate", "block"), [(48000, 128), (44100, 256), (32000, 100)])
def test_resampled_delay_is_the_reported_latency(
    passthrough_model: Model, rate: int, block: int
) -> None:
    with LiveRunner(passthrough_model, rate) as runner:
        x = clicks(block * (rate // block), every=rate // 5 + 3, first=rate // 10)
        y = drive(runner, x, block)
        lat = runner.latency()
        expected = lat.in_process_s * rate
        assert lat.resampling_s > 0
        # Input x[block + n] is the timeline's sample n (the first callback only primes),
        # and so is output y[block + n]: a click at x[c] is expected at y[c + expected].
        for c in np.flatnonzero(x)[1:]:
            seg = y[c : c + int(0.1 * rate)]
            k = int(np.argmax(seg))
            # Sub-sample peak by a parabola through the three samples around it.
            a, b, cc = seg[k - 1], seg[k], seg[k + 1]
            frac = 0.5 * (a - cc) / (a - 2 * b + cc)
            # The delay is a whole number of samples and the full band comes back.
            assert abs(k + frac - expected) < 0.01, (c, k, frac, expected)
            assert b == pytest.approx(0.5, abs=1e-4)
        assert runner.underruns == 0


@pytest.mark.parametrize(
    ("rate", "block"), [(16000, 128), (16000, 64), (48000, 128), (44100, 256), (48000, 1024)]
)
def test_worker_budget_is_exactly_the_worker_term(
    passthrough_model: Model, rate: int, block: int
) -> None:
    """A worker that finishes each block's input within worker_frames / block callbacks
    never under-runs; one callback later it does: the prefill is the minimum."""
    x = np.random.default_rng(0).standard_normal(block * (rate // block)).astype(np.float32)
    results = []
    for extra in (0, 1):
        with LiveRunner(passthrough_model, rate) as runner:
            runner.callback(
                np.zeros((block, 1), np.float32),
                np.zeros((block, 1), np.float32),
                block,
                None,
                None,
            )
            runner.step()
            assert runner.plan is not None
            budget = runner.plan.worker_frames // block
            drive(runner, x, block, step_every=budget + extra)
            results.append(runner.underruns)
    assert results[0] == 0 and results[1] > 0, results


def test_late_worker_gives_silence_counts_underruns_and_keeps_the_delay(
    passthrough_model: Model,
) -> None:
    with LiveRunner(passthrough_model, 16000) as runner:
        block = 128
        x = clicks(64 * block, every=10 * block + 5, first=3)
        inbuf = np.zeros((block, 1), dtype=np.float32)
        outbuf = np.full((block, 1), 7.0, dtype=np.float32)
        runner.callback(inbuf, outbuf, block, None, None)  # primes
        runner.step()
        y = np.zeros_like(x)
        for j in range(x.shape[0] // block):
            inbuf[:, 0] = x[j * block : (j + 1) * block]
            outbuf.fill(7.0)
            runner.callback(inbuf, outbuf, block, None, None)
            y[j * block : (j + 1) * block] = outbuf[:, 0]
            if not 10 <= j < 30:  # the worker stalls for 20 callbacks (160 ms)
                while runner.step():
                    pass
        # Callbacks 11..30 found nothing (10 got the last hop done; at 30 the worker
        # had not caught up yet).
        assert runner.underruns == 20
        assert runner.underrun_frames == 20 * block
        assert not (y == 7.0).any(), "every output sample must be written"
        d = 512
        assert np.all(y[11 * block : 31 * block] == 0.0)
        # After the stall the clicks come out with the same delay as before it.
        for c in np.flatnonzero(x):
            if c + d < y.shape[0] and not 11 * block <= c + d < 31 * block:
                assert y[c + d] == pytest.approx(0.5, abs=1e-5)


def test_callback_counts_portaudio_flags(passthrough_model: Model) -> None:
    with LiveRunner(passthrough_model, 16000) as runner:
        buf = np.zeros((128, 1), dtype=np.float32)
        runner.callback(buf, buf.copy(), 128, None, Flags(input_overflow=True))
        runner.callback(
            buf, buf.copy(), 128, None, Flags(output_underflow=True, input_overflow=True)
        )
        runner.callback(
            buf, buf.copy(), 128, None, Flags(input_underflow=True, output_overflow=True)
        )
        s = runner.stats()
        assert (s.pa_input_overflow, s.pa_output_underflow) == (2, 1)
        assert (s.pa_input_underflow, s.pa_output_overflow) == (1, 1)
        assert s.callbacks == 3


def test_callback_allocates_no_arrays(passthrough_model: Model) -> None:
    """With 4096-frame blocks any array made in the callback would cost >= 16 KiB."""
    block = 4096
    with LiveRunner(passthrough_model, 16000) as runner:
        inbuf = np.ones((block, 1), dtype=np.float32)
        outbuf = np.zeros((block, 1), dtype=np.float32)
        runner.callback(inbuf, outbuf, block, None, None)
        runner.step()
        runner.callback(inbuf, outbuf, block, None, None)  # warm every branch
        flags = Flags(input_overflow=True)
        grown = callback_peak_bytes(lambda: runner.callback(inbuf, outbuf, block, None, flags))
        assert grown < 4096, f"callback allocated {grown} bytes"
        assert runner.underruns > 0  # the worker did not run: the short branch was taken


def test_controls_reach_the_engine_stream(passthrough_model: Model) -> None:
    with LiveRunner(passthrough_model, 16000) as runner:
        runner.set_bypass(True)
        runner.set_atten_lim(12.0)
        runner.step()
        assert runner.cs.bypass and runner.bypass
        assert runner.cs.atten_lim.optional() == pytest.approx(12.0)
        runner.set_bypass(None)
        runner.set_atten_lim(None)
        runner.step()
        assert not runner.cs.bypass
        assert runner.cs.atten_lim.optional() is None
        assert runner.stats().atten_lim_db is None
        with pytest.raises(UserInputError, match=r"0\.\.200 dB or 'off'"):
            runner.set_atten_lim(-3.0)


def test_live_stream_starts_at_the_pack_default_limit(passthrough_pack: Path, tmp_path) -> None:
    from test_engine import limited_copy

    model = Model(limited_copy(passthrough_pack, tmp_path / "limited", 18.0))
    with LiveRunner(model, 16000) as runner:
        assert runner.cs.atten_lim.optional() == pytest.approx(18.0)
        assert runner.stats().atten_lim_db == pytest.approx(18.0)


def test_worker_thread_keeps_up(passthrough_model: Model) -> None:
    """The threaded worker wakes on each callback and produces what the next callback
    needs: each callback is made once the output it will read is in the ring (a deadline,
    not a fixed pace, so a loaded host slows the test but cannot fail it), and the output
    is the input delayed by the reported latency."""
    rate, block = 48000, 128
    x = clicks(block * 375, every=rate // 5 + 3, first=rate // 10)  # 1 s
    y = np.zeros_like(x)
    with LiveRunner(passthrough_model, rate) as runner:
        runner.start()
        inbuf = np.zeros((block, 1), dtype=np.float32)
        outbuf = np.zeros((block, 1), dtype=np.float32)
        runner.callback(inbuf, outbuf, block, None, None)
        assert runner.primed.wait(10)
        for j in range(x.shape[0] // block):
            wait_until(lambda: runner.out_ring.readable() >= block, 30, f"output {j}", step=0.001)
            inbuf[:, 0] = x[j * block : (j + 1) * block]
            runner.callback(inbuf, outbuf, block, None, None)
            y[j * block : (j + 1) * block] = outbuf[:, 0]
        runner.stop()
        assert runner.underruns == 0
        assert runner.stats().hops >= 120
        assert runner.passes > 0
        d = runner.latency().in_process_s * rate
    for c in np.flatnonzero(x):
        if c + d + 2 < y.shape[0]:
            assert abs(int(np.argmax(y[c : c + int(d) + 50])) - d) < 1.5, (c, d)


def test_controls_before_start_are_in_force_at_once(passthrough_pack: Path, tmp_path) -> None:
    """`rtns run --atten-lim off` on a pack with an 18 dB limit: the banner, printed before
    the worker starts, read the pack's limit while the control sat in the queue."""
    from test_engine import limited_copy

    model = Model(limited_copy(passthrough_pack, tmp_path / "limited", 18.0))
    with LiveRunner(model, 16000) as runner:
        runner.set_atten_lim(math.inf)
        runner.set_bypass(True)
        assert runner.stats().atten_lim_db is None and runner.cs.atten_lim.optional() is None
        assert runner.stats().bypass and runner.cs.bypass
        runner.set_atten_lim(6.0)
        assert runner.stats().atten_lim_db == pytest.approx(6.0)
        runner.start()  # from here on controls go through the worker
        runner.set_atten_lim(3.0)
        wait_until(lambda: runner.stats().atten_lim_db == pytest.approx(3.0), 30, "the worker")
        runner.stop()


def test_dead_stream_is_detected(passthrough_model: Model) -> None:
    """No callback for DEAD_AFTER_S (or DEAD_AFTER_BLOCKS blocks, if longer), or PortAudio
    saying the stream is inactive, is a dead stream; callbacks keep it alive."""
    buf = np.zeros((128, 1), dtype=np.float32)
    with LiveRunner(passthrough_model, 16000) as runner:
        runner.callback(buf, buf.copy(), 128, None, None)
        assert runner.dead(now=100.0) is None
        assert runner.dead(now=100.0 + DEAD_AFTER_S - 0.01) is None
        runner.callback(buf, buf.copy(), 128, None, None)
        assert runner.dead(now=100.4) is None  # it moved: the clock restarts
        assert runner.dead(now=100.4 + DEAD_AFTER_S - 0.01) is None
        why = runner.dead(now=100.4 + DEAD_AFTER_S)
        assert why is not None and "no audio callback for 0.5 s" in why
        assert "sound server gone" in (runner.dead(active=False, now=100.5) or "")
    big = 4096  # 256 ms blocks: four of them
    with LiveRunner(passthrough_model, 16000) as runner:
        runner.callback(np.zeros((big, 1), np.float32), np.zeros((big, 1), np.float32), big, 0, 0)
        runner.step()
        assert runner.dead_after_s == pytest.approx(DEAD_AFTER_BLOCKS * big / 16000)
        assert runner.dead(now=0.0) is None
        assert runner.dead(now=1.0) is None
        assert runner.dead(now=1.1) is not None


def test_latency_needs_the_first_callback(passthrough_model: Model) -> None:
    with LiveRunner(passthrough_model, 16000) as runner:
        with pytest.raises(RuntimeError, match="first callback"):
            runner.latency()


# -- devices ---------------------------------------------------------------------------------
def dev(name: str, ins: int, outs: int, rate: float = 48000.0, hostapi: int = 0) -> dict:
    return {
        "name": name,
        "hostapi": hostapi,
        "max_input_channels": ins,
        "max_output_channels": outs,
        "default_samplerate": rate,
    }


DEVICES = [
    dev("HDA Intel PCH: ALC3246 Analog (hw:0,0)", 2, 2),
    dev("USB Headset: Audio (hw:1,0)", 1, 0),
    dev("USB Headset: Audio out", 0, 2),
    dev("pulse", 32, 32, 44100.0),
    dev("default", 32, 32, 44100.0),
]


def test_resolve_device() -> None:
    assert resolve_device("3", DEVICES, "input") == 3
    assert resolve_device("usb", DEVICES, "input") == 1
    assert resolve_device("USB", DEVICES, "output") == 2
    assert resolve_device("Default", DEVICES, "output") == 4  # exact name wins
    with pytest.raises(UserInputError, match=r"no audio device with index 9; run `rtns devices`"):
        resolve_device("9", DEVICES, "input")
    with pytest.raises(UserInputError, match=r"device 2 \(USB Headset: Audio out\) has no input"):
        resolve_device("2", DEVICES, "input")
    with pytest.raises(UserInputError, match=r"'audio out' has no input channels"):
        resolve_device("audio out", DEVICES, "input")
    with pytest.raises(UserInputError, match=r"no output device matches 'webcam'"):
        resolve_device("webcam", DEVICES, "output")
    with pytest.raises(
        UserInputError, match=r"several input devices: \[0\] HDA.*\[1\] USB.*\[3\] pulse"
    ):
        resolve_device("e", DEVICES[:4], "input")


def test_format_devices() -> None:
    text = format_devices(DEVICES, [{"name": "ALSA"}], [3, 4])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["idx", "name"]
    assert len(lines) == 1 + len(DEVICES)
    assert lines[4].rstrip().endswith("input") and "pulse" in lines[4] and "44100" in lines[4]
    assert lines[5].rstrip().endswith("output")
    assert "no audio devices found" in format_devices([], [], [-1, -1])


def run_cli_with_stub(tmp_path: Path, stub: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sounddevice.py").write_text(textwrap.dedent(stub))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "rtns", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("args", [["--list-devices"], ["devices"], ["run", "-i", "0", "-o", "0"]])
def test_cli_without_portaudio(tmp_path: Path, args: list[str]) -> None:
    r = run_cli_with_stub(tmp_path, "raise OSError('PortAudio library not found')\n", *args)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"rtns: error: {PORTAUDIO_MISSING}"]
    assert "libportaudio2" in r.stderr


NO_DEVICES = """
class _Default:
    device = [-1, -1]
default = _Default()
def query_devices():
    return []
def query_hostapis():
    return ()
"""


def test_cli_without_devices(tmp_path: Path) -> None:
    # Issue 31 (9): `rtns devices` exited 0 when it found no devices.
    for args in (["devices"], ["--list-devices"]):
        r = run_cli_with_stub(tmp_path, NO_DEVICES, *args)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("rtns: error: no audio devices found")
    r = run_cli_with_stub(tmp_path, NO_DEVICES, "run", "-i", "0", "-o", "0")
    assert r.returncode == 1
    assert r.stderr.startswith("rtns: error: no audio devices found")


def test_importing_the_cli_loads_no_audio_library() -> None:
    code = "import sys, rtns.cli; rtns.cli.build_parser(); print('sounddevice' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


class FakeSd:
    """The parts of sounddevice that device and rate selection use."""

    class default:  # noqa: N801 - mirrors sounddevice.default
        device = [3, -1]

    def __init__(self, rates: dict[int, set[int]]) -> None:
        self.rates = rates  # device index -> rates it accepts

    def check_input_settings(self, device: int, channels: int, dtype: str, samplerate: int) -> None:
        if samplerate not in self.rates[device]:
            raise ValueError("Invalid sample rate [PaErrorCode -9997]")

    check_output_settings = check_input_settings


def test_rate_and_default_device_selection() -> None:
    from rtns.cli.live import _pick_device, _pick_rate

    sd = FakeSd({0: {44100, 48000}, 3: {16000, 44100}, 4: {16000, 44100, 48000}})
    assert _pick_device(sd, None, DEVICES, "input") == 3
    with pytest.raises(UserInputError, match="no default output device"):
        _pick_device(sd, None, DEVICES, "output")
    assert _pick_rate(sd, 3, 4, DEVICES, None, 16000) == 16000
    assert _pick_rate(sd, 0, 4, DEVICES, None, 16000) == 48000  # the input's default rate
    assert _pick_rate(sd, 3, 4, DEVICES, 44100, 16000) == 44100
    with pytest.raises(UserInputError, match="do not run at 48000 Hz"):
        _pick_rate(sd, 3, 4, DEVICES, 48000, 16000)
    sd.rates[4] = {32000}
    with pytest.raises(UserInputError, match="no common sample rate.*--samplerate"):
        _pick_rate(sd, 0, 4, DEVICES, None, 16000)


def test_stdin_controls(capsys: pytest.CaptureFixture) -> None:
    import io
    import threading

    from rtns.cli.live import _stdin_controls

    calls: list[tuple[str, object]] = []

    class Runner:
        def set_bypass(self, on: bool | None) -> None:
            calls.append(("bypass", on))

        def set_atten_lim(self, limit: str) -> None:
            try:
                calls.append(("atten", AttenLimit.parse(limit)))
            except ValueError as e:
                raise UserInputError(str(e)) from None

    stop = threading.Event()
    _stdin_controls(Runner(), stop, io.StringIO("a 6\nb\nhelp\na -1\na\nq\nb\n"))
    assert calls == [("atten", AttenLimit(6)), ("bypass", None), ("atten", OFF)]
    assert stop.is_set()  # "q" quits; the "b" after it is not read
    err = capsys.readouterr().err
    assert "controls: b (bypass)" in err and "0..200 dB or 'off', got -1" in err


# -- stdin only in the foreground ----------------------------------------------------------
def test_stdin_controls_only_from_a_foreground_terminal() -> None:
    import pty

    from rtns.cli.live import stdin_controls_allowed

    def no_tty(fd: int) -> int:
        raise OSError(25, "Inappropriate ioctl for device")

    tty = {"isatty": lambda fd: True, "getpgrp": lambda: 42}
    assert stdin_controls_allowed(0, tcgetpgrp=lambda fd: 42, **tty)  # foreground
    assert not stdin_controls_allowed(0, tcgetpgrp=lambda fd: 7, **tty)  # `rtns run ... &`
    assert not stdin_controls_allowed(0, tcgetpgrp=no_tty, **tty)  # not our terminal
    assert not stdin_controls_allowed(0, isatty=lambda fd: False)  # a pipe, /dev/null
    r, w = os.pipe()
    master, slave = pty.openpty()
    try:
        assert not stdin_controls_allowed(r)
        # A terminal, but not this process's controlling terminal.
        assert not stdin_controls_allowed(slave)
    finally:
        for fd in (r, w, master, slave):
            os.close(fd)


ALLOWED = "from rtns.cli.live import stdin_controls_allowed as a; print('allowed', a(0))"


@pytest.mark.skipif(sys.platform != "linux", reason="needs setsid(1) --ctty")
@pytest.mark.parametrize(("job", "want"), [("", True), ("&", False)])
def test_background_job_of_an_interactive_shell_leaves_the_terminal_alone(
    job: str, want: bool
) -> None:
    """A shell with job control (sh -m, as an interactive one) on a terminal: a foreground
    command may read it; a background job (`rtns run ... &`) must not, or SIGTTIN stops it."""
    import pty
    import shlex

    master, slave = pty.openpty()
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(ALLOWED)} {job} wait"
    try:
        r = subprocess.run(
            ["setsid", "--ctty", "sh", "-mc", cmd],
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        os.close(slave)
        os.close(master)
    assert f"allowed {want}" in r.stdout, (r.stdout, r.stderr)


# -- rtns run's exits, with a scripted sounddevice ------------------------------------------
STUB_SD = """
import atexit, os, sys, threading, time

import numpy as np

MODE = os.environ["STUB_MODE"]  # ok | hang-stop | die


class _Default:
    device = [0, 0]


default = _Default()


def query_devices():
    return [{"name": "stub", "hostapi": 0, "max_input_channels": 1,
             "max_output_channels": 1, "default_samplerate": 16000.0}]


def query_hostapis():
    return ({"name": "Stub"},)


def check_input_settings(**kw):
    pass


check_output_settings = check_input_settings


def say(text):
    sys.stderr.write(f"stub: {text} at {time.monotonic():.6f}\\n")
    sys.stderr.flush()


class Stream:
    def __init__(self, callback, **kw):
        self.cb, self.latency, self.active, self.go = callback, (0.0, 0.0), False, True

    def start(self):
        self.active = True
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        buf = np.zeros((128, 1), np.float32)
        t0, n = time.monotonic(), 0
        while self.go:
            self.cb(buf, buf.copy(), 128, None, None)
            n += 1
            if MODE == "die" and n == 125:  # like JACK gone: no more callbacks
                say("callbacks stopped")
                return
            time.sleep(max(0.0, t0 + n * 0.008 - time.monotonic()))

    def stop(self):
        if MODE != "ok":
            say("stop called")
            time.sleep(3600)  # like Pa_StopStream with the JACK server gone
            say("stop returned")
        self.go, self.active = False, False

    abort = stop

    def close(self):
        if MODE != "ok":
            time.sleep(3600)
            say("close returned")


if MODE == "die":  # like PortAudio's exit handler with JACK gone (pa_jack.c assertion)
    atexit.register(os.abort)
"""


class StubRun:
    """``rtns run`` with a scripted sounddevice module, as a subprocess."""

    def __init__(self, tmp_path: Path, pack: Path, mode: str) -> None:
        import threading

        (tmp_path / "sounddevice.py").write_text(STUB_SD)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
            "STUB_MODE": mode,
            "PYTHONFAULTHANDLER": "1",  # SIGABRT dumps every thread's stack (see exit_status)
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtns", "run", "-m", str(pack), "-i", "0", "-o", "0", "-q"],
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: any(x.startswith(prefix) for x in self.lines) or self.proc.poll(),
                timeout,
            )
        hits = [x for x in self.lines if x.startswith(prefix)]
        assert ok and hits, f"no {prefix!r} line:\n" + "\n".join(self.lines)
        return hits[0]

    def exit_status(self, timeout: float = 120.0) -> int:
        """The exit status, once every line is in. ``timeout`` only catches a hang: the stub's
        stop and close block for an hour, so an rtns that waits on them never exits."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # where each thread is, on stderr
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._reader.join(10)
            raise AssertionError("rtns run did not exit:\n" + "\n".join(self.lines)) from None
        self._reader.join(timeout)  # every line is in
        return self.proc.returncode

    def never_returned(self) -> None:
        """rtns left while the stub's stop/close were still blocked (it did not wait)."""
        assert not [x for x in self.lines if "returned" in x], self.lines


@pytest.fixture
def stub_run(tmp_path: Path, passthrough_pack: Path):
    runs: list[StubRun] = []

    def start(mode: str) -> StubRun:
        runs.append(StubRun(tmp_path, passthrough_pack, mode))
        return runs[-1]

    yield start
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def test_run_exits_when_callbacks_stop(stub_run) -> None:
    """Callbacks stop (stream.active stays True) and stop/close would block for an hour and
    exit would abort: rtns leaves by itself, without waiting on them, status 1, one error
    line naming the silence."""
    run = stub_run("die")
    run.wait_for("stub: callbacks stopped")
    assert run.exit_status() == 1, run.lines
    run.never_returned()
    run.wait_for("rtns: stopped after")
    errors = [x for x in run.lines if "error" in x or "Traceback" in x or "Assert" in x]
    assert len(errors) == 1 and errors[0].startswith("rtns: error: no audio callback for 0.5 s")


def test_run_exits_when_stop_hangs(stub_run) -> None:
    """Ctrl-C with a stream that never stops: the summary, one line saying it gave up after
    the stop timeout, status 1, while the stub's stop is still blocked."""
    run = stub_run("hang-stop")
    run.wait_for("rtns: latency")
    run.proc.send_signal(signal.SIGINT)
    run.wait_for("stub: stop called")
    assert run.exit_status() == 1, run.lines
    run.never_returned()
    run.wait_for("rtns: stopped after")
    line = run.wait_for("rtns: error:")
    assert "did not stop within 1 s" in line


def test_sigterm_while_stuck_stopping_exits_at_once(stub_run) -> None:
    """SIGTERM while stop is stuck leaves through the signal handler (status 128 + SIGTERM,
    its own line), not through the stop timeout (status 1, "did not stop")."""
    for _ in range(3):  # the SIGTERM must land within the 1 s stop timeout: on a busy box
        run = stub_run("hang-stop")  # it may land later, and the run is repeated
        run.wait_for("rtns: latency")
        run.proc.send_signal(signal.SIGINT)
        run.wait_for("stub: stop called")
        run.proc.send_signal(signal.SIGTERM)
        status = run.exit_status()
        if not (status == 1 and any("did not stop" in x for x in run.lines)):
            break
    assert status == 128 + signal.SIGTERM, run.lines
    run.never_returned()
    assert "SIGTERM while stopping" in run.wait_for("rtns: error:")
    assert not [x for x in run.lines if "did not stop" in x], run.lines


def test_run_stops_cleanly(stub_run) -> None:
    run = stub_run("ok")
    run.wait_for("rtns: latency")
    run.proc.send_signal(signal.SIGTERM)
    assert run.exit_status() == 0, run.lines
    run.wait_for("rtns: stopped after")
    assert not [x for x in run.lines if "error" in x]
