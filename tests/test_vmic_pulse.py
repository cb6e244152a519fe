"""``rtns run -i pulse --virtual-mic NAME`` against a private headless PulseAudio server.

Speech is played into the null sink ``fake_mic``; rtns reads ``fake_mic.monitor`` through
PortAudio's ALSA ``pulse`` device (PULSE_SOURCE) and publishes ``rtns_test``, which
``parecord`` records. Needs pulseaudio, pulseaudio-utils, libasound2-plugins and
libportaudio2; skipped with the reason otherwise. No fixed sleeps: every wait is on a
condition (a line from rtns, a file growing, pactl's answer) with a generous deadline.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from cli_helpers import run_rtns
from pulse_harness import (
    RATE,
    PulseServer,
    Recorder,
    Rtns,
    best_lag,
    piecewise_match,
    skip_reason,
    wait_until,
)

REASON = skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

NAME = "rtns_test"
LATENCY_LINE = r"rtns: latency (?P<total>[\d.]+) ms"


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    with PulseServer(tmp_path_factory.mktemp("pulse")) as srv:
        yield srv


@pytest.fixture(scope="module")
def speech(shared_dir: Path, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Two noisy VoiceBank+DEMAND utterances at 48 kHz mono, with 0.3 s of silence around
    them, as a wav file and its samples."""
    from rtns.resample import resample_signal

    parts = []
    for name in ("p232_001.flac", "p232_005.flac"):
        x, rate = sf.read(shared_dir / "data/test/vbdemand36/noisy" / name, dtype="float32")
        parts.append(resample_signal(x[:, None], rate, RATE)[:, 0].astype(np.float32))
    gap = np.zeros(int(0.3 * RATE), np.float32)
    x = np.concatenate([gap, parts[0], gap, parts[1], gap])
    path = tmp_path_factory.mktemp("speech") / "speech48k.wav"
    sf.write(path, x, RATE, subtype="FLOAT")
    return path, x


def _rtns(pulse: PulseServer, tmp_path: Path, *extra: str) -> Rtns:
    env = {**pulse.env, "PULSE_SOURCE": "fake_mic.monitor"}
    return Rtns(["-i", "pulse", "--virtual-mic", NAME, *extra], env, tmp_path)


def test_virtual_mic_carries_the_enhanced_speech(pulse, speech, tmp_path):
    wav, x = speech
    # rtns's own offline output of the same 48 kHz file: the reference.
    r = run_rtns("enhance", str(wav), str(tmp_path / "ref.wav"), cwd=tmp_path, env=pulse.env)
    assert r.returncode == 0, r.stderr
    ref, _ = sf.read(tmp_path / "ref.wav", dtype="float32")

    proc = _rtns(pulse, tmp_path)
    rec = None
    try:
        proc.wait_for(LATENCY_LINE)
        assert NAME in pulse.sources()
        rec = Recorder(pulse, NAME, tmp_path / "rec.raw")
        # Recording has begun once samples reach the file.
        wait_until(lambda: rec.frames() > RATE // 10, 30, "parecord to record rtns_test")
        before = rec.frames()
        play = pulse.run("paplay", "--device=fake_mic", str(wav), timeout=120)
        assert play.returncode == 0, play.stderr
        # The whole utterance (and rtns's delay) is in once the file holds its length more.
        wait_until(
            lambda: rec.frames() >= before + len(x) + RATE // 2, 60, "the recording to cover it"
        )
        rec.stop()
        assert proc.interrupt() == 0, proc.output
    finally:
        if rec is not None:
            rec.stop()
        proc.kill()
    out = proc.output
    assert "rtns: virtual microphone rtns_test removed" in out, out
    assert NAME not in pulse.sources(), pulse.sources()
    assert "module-pipe-source" not in pulse.modules()

    y = rec.samples()
    assert np.isfinite(y).all() and len(y) > len(x)
    lag, corr = best_lag(y, ref, len(y) - len(ref) // 2)
    lag_noisy, corr_noisy = best_lag(y, x, len(y) - len(x) // 2)
    # Piece by piece (a quarter second each, aligned within 0.1 s of the whole's lag): a few
    # ms the sound server inserts or loses once shifts all that follows, and one lag for the
    # whole recording then correlates poorly (seen in CI: 0.62) though every piece is the
    # enhanced speech.
    pieces, shifts = piecewise_match(y, ref, lag, RATE // 4, RATE // 10)
    pieces_noisy, _ = piecewise_match(y, x, lag_noisy, RATE // 4, RATE // 10)
    seams = int(np.count_nonzero(np.abs(np.diff(shifts)) > 2))
    print(
        f"\nvirtual mic: correlation with rtns enhance {corr:.3f}, with the noisy input "
        f"{corr_noisy:.3f}, at lag {lag} samples into the recording; {len(pieces)} pieces: "
        f"median {np.median(pieces):.3f} (noisy input {np.median(pieces_noisy):.3f}), "
        f"{np.mean(pieces > 0.95):.0%} above 0.95 (noisy input {np.mean(pieces_noisy > 0.95):.0%}), "
        f"{seams} seams (shifts {sorted(set(shifts.tolist()))})\n{out}"
    )
    # The recording is the enhanced speech (the same model, the same 48 kHz plumbing), not
    # the noisy input. Measured on an idle machine: whole 1.000, all 26 pieces above 0.95;
    # against the noisy input the pieces' median is 0.91, 41 % above 0.95. Offline: 5 ms of
    # silence inserted mid-way, whole 0.43, 25 of 26 pieces above 0.95; 8 seams of +-256
    # samples, whole 0.62, 96 %; the noisy input or half of it played instead, 42 % and 65 %.
    # Under PipeWire 0.3.65 some runs had 1 to 8 such seams in 9 s (multiples of 256 samples)
    # while rtns reported every block processed and every sample written into the FIFO:
    # 77-100 % of the pieces whole, more with halves (parecord of fake_mic.monitor alone: none).
    # And a residual (1 - corr**2) under half the noisy input's.
    assert np.mean(pieces > 0.95) >= 0.75, (pieces.round(3), shifts)
    med, med_noisy = np.median(pieces), np.median(pieces_noisy)
    assert 1 - med**2 < 0.5 * (1 - med_noisy**2), (med, med_noisy)
    seg = y[lag : lag + len(ref)]
    np.testing.assert_allclose(np.sqrt(np.mean(seg**2)), np.sqrt(np.mean(ref**2)), rtol=0.2)


def test_sigterm_removes_the_virtual_mic(pulse, tmp_path):
    proc = _rtns(pulse, tmp_path, "--quiet")
    try:
        proc.wait_for(LATENCY_LINE)
        assert NAME in pulse.sources()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=30) == 0, proc.output
    finally:
        proc.kill()
    assert NAME not in pulse.sources()


def test_leftover_of_a_crash_is_removed_at_the_next_start(pulse, tmp_path):
    proc = _rtns(pulse, tmp_path, "--quiet")
    try:
        proc.wait_for(LATENCY_LINE)
    finally:
        proc.proc.kill()  # SIGKILL: no chance to clean up
        proc.kill()
    assert NAME in pulse.sources()  # the leftover

    proc = _rtns(pulse, tmp_path, "--quiet")
    try:
        m = proc.wait_for(r"removed the virtual microphone 'rtns_test' left by rtns pid (\d+)")
        assert int(m.group(1)) != proc.proc.pid
        proc.wait_for(LATENCY_LINE)
        assert pulse.sources().count(NAME) == 1
        # A second rtns may not take over the name of a running one.
        r = run_rtns(
            "run", "-i", "pulse", "--virtual-mic", NAME, cwd=tmp_path, env=pulse.env, timeout=120
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"already published by rtns (pid {proc.proc.pid})" in r.stderr
        assert proc.interrupt() == 0, proc.output
    finally:
        proc.kill()
    assert NAME not in pulse.sources()


def test_a_source_of_another_program_is_left_alone(pulse, tmp_path):
    """A null sink's monitor is not a pipe source of rtns: rtns refuses the name."""
    r = pulse.run("pactl", "load-module", "module-null-sink", "sink_name=other")
    assert r.returncode == 0, r.stderr
    try:
        res = run_rtns(
            "run", "-i", "pulse", "--virtual-mic", "other.monitor", cwd=tmp_path, env=pulse.env
        )
    finally:
        pulse.run("pactl", "unload-module", r.stdout.strip())
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "already has a source called 'other.monitor'" in res.stderr


def test_missing_sound_server_is_one_line(tmp_path):
    """No server (an empty runtime folder): one line, exit status 1, before any device."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = {
        "XDG_RUNTIME_DIR": str(run_dir),
        "HOME": str(tmp_path),
        "PULSE_SERVER": f"unix:{run_dir}/no-such-socket",
    }
    r = run_rtns("run", "-i", "pulse", "--virtual-mic", NAME, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("rtns: error: no PulseAudio or PipeWire"), lines[0]


def test_metrics_of_the_live_path(pulse, tmp_path):
    """``--metrics-port`` on the virtual microphone: the live counters, scraped."""
    from urllib.request import urlopen

    from cli_helpers import free_port

    port = free_port()
    proc = _rtns(pulse, tmp_path, "--metrics-port", str(port), "--quiet")
    try:
        proc.wait_for(LATENCY_LINE)
        url = f"http://127.0.0.1:{port}/metrics"

        def scrape() -> str | None:
            text = urlopen(url, timeout=10).read().decode()
            m = [ln for ln in text.splitlines() if ln.startswith("rtns_live_callbacks_total ")]
            return text if m and float(m[0].split()[1]) > 50 else None

        text = wait_until(scrape, 60, "callbacks in the metrics", step=0.2)
        assert proc.interrupt() == 0, proc.output
    finally:
        proc.kill()
    values = {
        ln.split(" ")[0]: float(ln.split(" ")[1])
        for ln in text.splitlines()
        if ln and not ln.startswith("#")
    }
    for key in (
        "rtns_live_rtf",
        "rtns_live_underruns_total",
        'rtns_live_xruns_total{kind="input_overflow"}',
        "rtns_live_latency_seconds",
        "rtns_live_vmic_overruns_total",
    ):
        assert key in values, (key, text)
    assert 0 < values["rtns_live_rtf"] < 1
    assert 0.03 < values["rtns_live_latency_seconds"] < 0.5
    assert values["rtns_live_processed_seconds_total"] > 0


def test_virtual_mic_refuses_an_output_device(tmp_path):
    r = run_rtns("run", "--virtual-mic", NAME, "-o", "0", cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "leave out -o" in r.stderr, r.stderr


def test_bad_virtual_mic_names_are_refused(tmp_path):
    r = run_rtns("run", "--virtual-mic", "bad name;rm", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--virtual-mic" in r.stderr
