"""rtns.audio without PortAudio: resampler, buffering plan, the callback driven with arrays,
device resolution and the CLI's messages when PortAudio or devices are missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rtns.audio import (
    PORTAUDIO_MISSING,
    RESAMPLER_CUTOFF,
    LiveRunner,
    PolyphaseResampler,
    format_devices,
    plan_buffering,
    resolve_device,
)
from rtns.engine import Model
from rtns.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
RATE_PAIRS = [(48000, 16000), (16000, 48000), (44100, 16000), (16000, 44100), (16000, 32000)]


# -- resampler ---------------------------------------------------------------------------
@pytest.mark.parametrize(("fin", "fout"), RATE_PAIRS)
def test_resampler_reproduces_a_sine_with_its_stated_delay(fin: int, fout: int) -> None:
    rs = PolyphaseResampler(fin, fout)
    t = np.arange(fin // 2) / fin
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    rng = np.random.default_rng(0)
    chunks, i = [], 0
    while i < x.shape[0]:
        c = int(rng.integers(0, 700))
        chunks.append(rs.process(x[i : i + c]))
        i += c
    y = np.concatenate(chunks)
    assert y.shape[0] == rs.count_out(x.shape[0])
    ref = 0.5 * np.sin(2 * np.pi * 1000 * (np.arange(y.shape[0]) / fout - rs.delay_s))
    skip = int(0.01 * fout)  # the filter's start-up
    np.testing.assert_allclose(y[skip:], ref[skip:], atol=5e-4)
    assert 0.001 < rs.delay_s < 0.002


@pytest.mark.parametrize(("fin", "fout"), RATE_PAIRS)
def test_resampler_output_does_not_depend_on_chunking(fin: int, fout: int) -> None:
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    whole = PolyphaseResampler(fin, fout).process(x)
    rs = PolyphaseResampler(fin, fout)
    parts = np.concatenate([rs.process(x[i : i + 37]) for i in range(0, 5000, 37)])
    np.testing.assert_allclose(parts, whole, atol=1e-6)
    rs.reset()
    np.testing.assert_allclose(rs.process(x), whole, atol=1e-6)


def test_resampler_rejects_bad_rates() -> None:
    with pytest.raises(ValueError, match="positive"):
        PolyphaseResampler(0, 16000)


# -- buffering plan ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rate", "block", "align", "worker"),
    [(16000, 128, 0, 128), (16000, 256, 0, 256), (16000, 64, 64, 128), (48000, 128, 256, 384)],
)
def test_plan_buffering(rate: int, block: int, align: int, worker: int) -> None:
    ins = PolyphaseResampler(rate, 16000) if rate != 16000 else None
    outs = PolyphaseResampler(16000, rate) if rate != 16000 else None
    plan = plan_buffering(block, rate, 16000, 128, ins, outs)
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
            assert abs(k + frac - expected) < 0.6, (c, k, frac, expected)
            assert b == pytest.approx(0.5 * RESAMPLER_CUTOFF * 16000 / rate, rel=0.05)
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
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(20):
                runner.callback(inbuf, outbuf, block, None, Flags(input_overflow=True))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - base < 4096, f"callback allocated {peak - base} bytes"
        assert runner.underruns > 0  # the worker did not run: the short branch was taken


def test_controls_reach_the_engine_stream(passthrough_model: Model) -> None:
    with LiveRunner(passthrough_model, 16000) as runner:
        runner.set_bypass(True)
        runner.set_atten_lim_db(12.0)
        runner.step()
        assert runner.stream.bypass and runner.bypass
        assert runner.stream.atten_lim_db == pytest.approx(12.0)
        runner.set_bypass(None)
        runner.set_atten_lim_db(None)
        runner.step()
        assert not runner.stream.bypass
        assert runner.stream.atten_lim_db is None
        assert runner.stats().atten_lim_db is None
        with pytest.raises(UserInputError, match="non-negative"):
            runner.set_atten_lim_db(-3.0)


def test_live_stream_starts_at_the_pack_default_limit(passthrough_pack: Path, tmp_path) -> None:
    from test_engine import limited_copy

    model = Model(limited_copy(passthrough_pack, tmp_path / "limited", 18.0))
    with LiveRunner(model, 16000) as runner:
        assert runner.stream.atten_lim_db == pytest.approx(18.0)
        assert runner.stats().atten_lim_db == pytest.approx(18.0)


def test_worker_thread_keeps_up(passthrough_model: Model) -> None:
    """The threaded worker, fed in real time at 48 kHz, leaves no gaps once primed."""
    import time

    with LiveRunner(passthrough_model, 48000) as runner:
        runner.start()
        block = 128
        inbuf = np.zeros((block, 1), dtype=np.float32)
        outbuf = np.zeros((block, 1), dtype=np.float32)
        runner.callback(inbuf, outbuf, block, None, None)
        assert runner.primed.wait(5)
        t0 = time.monotonic()
        for j in range(375):  # 1 s
            runner.callback(inbuf, outbuf, block, None, None)
            time.sleep(max(0.0, t0 + (j + 1) * block / 48000 - time.monotonic()))
        runner.stop()
        assert runner.underruns == 0
        assert runner.stats().hops >= 120


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
    r = run_cli_with_stub(tmp_path, NO_DEVICES, "devices")
    assert r.returncode == 0
    assert "no audio devices found" in r.stdout
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


def test_stdin_controls(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import io
    import threading

    from rtns.cli.live import _stdin_controls

    calls: list[tuple[str, object]] = []

    class Runner:
        def set_bypass(self, on: bool | None) -> None:
            calls.append(("bypass", on))

        def set_atten_lim_db(self, db: float | None) -> None:
            if db is not None and db < 0:
                raise UserInputError("attenuation limit must be a non-negative number of dB")
            calls.append(("atten", db))

    monkeypatch.setattr("sys.stdin", io.StringIO("a 6\nb\nhelp\na -1\na\nq\nb\n"))
    stop = threading.Event()
    _stdin_controls(Runner(), stop)
    assert calls == [("atten", 6.0), ("bypass", None), ("atten", None)]
    assert stop.is_set()  # "q" quits; the "b" after it is not read
    err = capsys.readouterr().err
    assert "controls: b (bypass)" in err and "non-negative" in err
