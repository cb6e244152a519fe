"""rtns.vmic without a sound server: the FIFO writer, the input callback that feeds it,
the jitter margin of the buffering plan, names, and the live metrics collector."""

from __future__ import annotations

import fcntl
import os
import select
import time
from pathlib import Path

import numpy as np
import pytest
from alloc_probe import callback_peak_bytes
from polling import wait_until

from rtns.audio import LiveRunner, plan_buffering
from rtns.engine import Model
from rtns.errors import UserInputError
from rtns.vmic import PipeWriter, VirtualMic, check_name

RATE = 48000


@pytest.fixture(scope="module")
def passthrough_model(passthrough_pack: Path) -> Model:
    return Model(passthrough_pack)


def _drain(fd: int, want: int, timeout: float = 30.0) -> np.ndarray:
    """Read ``want`` float32 samples from ``fd``."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < want * 4:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(got) // 4} of {want} samples"
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, want * 4 - len(got))
    return np.frombuffer(got, dtype="<f4")


def test_writer_moves_every_sample_in_order():
    r, w = os.pipe()
    writer = PipeWriter(w, RATE)
    writer.start()
    try:
        x = np.arange(20 * 480, dtype=np.float32)
        for i in range(0, len(x), 480):
            writer.push(x[i : i + 480])
            np.testing.assert_array_equal(_drain(r, 480), x[i : i + 480])
        wait_until(lambda: writer.stats().written_frames == len(x), 30, "the writer")
        s = writer.stats()
        assert (s.overruns, s.overrun_frames, s.full_frames, s.error) == (0, 0, 0, None)
    finally:
        writer.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("late_s", [0.0, 0.004], ids=["prompt", "late-writer"])
def test_unread_fifo_drops_the_oldest_beyond_the_backlog_as_unread(late_s: float):
    """Nobody reads (no application records): the writer keeps at most the allowed backlog
    (plus what the kernel's pipe holds) and drops the oldest; what it keeps is the newest
    audio. Issue 31 (9): that was reported as "1 over-runs (136320 frames dropped)", an
    over-run nobody should fix; it is counted as unread frames, not over-runs.

    ``late-writer`` stalls the writer thread after each round, as a loaded machine does:
    the pushes then run ahead of it."""
    r, w = os.pipe()
    writer = PipeWriter(w, RATE, max_backlog_s=0.05)
    if late_s:
        step = writer.step

        def late_step() -> bool:
            caught_up = step()
            time.sleep(late_s)
            return caught_up

        writer.step = late_step  # type: ignore[method-assign]
    writer.start()
    try:
        block = np.zeros(480, np.float32)
        pushed = 0

        def backlog() -> int:
            """What waits for the FIFO: the ring, and what the writer took from it but
            could not write. (The writer moves samples from the ring to ``_pending`` before
            it writes, so the ring alone says nothing: CI once saw the last block, pushed
            after the writer's last trim, still queued when the test stopped the writer.)"""
            return writer.ring.readable() + len(writer._pending) // 4

        for i in range(300):  # 3 s of 10 ms blocks, numbered by value
            block[:] = i
            writer.push(block)
            pushed += 480
            # The writer keeps up with the pushes: never more than a block beyond the cap.
            wait_until(lambda: backlog() <= writer.max_backlog + 480, 30, "a trim")
        # A step in progress when the test stops the writer is finished before its thread
        # ends (stop joins it), so a backlog within the cap now stays within it.
        wait_until(lambda: backlog() <= writer.max_backlog, 30, "the last trim")
        writer.stop()  # the counters hold still from here
        s = writer.stats()
        assert s.overruns == 0 and s.overrun_frames == 0 and s.unread_frames > 0, s
        # Everything pushed is in the pipe, queued or dropped.
        queued = backlog()
        assert s.written_frames + queued + s.unread_frames == pushed
        assert queued <= writer.max_backlog
        rest = np.zeros(writer.ring.readable(), np.float32)
        writer.ring.read_into(rest)
        newest = np.concatenate([np.frombuffer(writer._pending, dtype=np.float32), rest])
        assert len(newest) == queued and newest[-1] == 299
        # The pipe holds the first blocks that fitted, in order.
        in_pipe = _drain(r, s.written_frames)
        assert np.all(np.diff(in_pipe) >= 0) and in_pipe[-1] <= newest[0]
    finally:
        writer.close()
        os.close(r)
        os.close(w)


def test_a_short_write_into_a_full_fifo_is_not_a_read():
    """Nobody reads, the FIFO is full but for part of its last page: after a trim, the
    short write that lands in that page is no sign of a reader, so what is dropped next is
    unread, not an over-run. (CI on a loaded machine reported "1 over-run" here: the writer
    thread, late, met the FIFO in this state. Reproduced step by step, no thread.)"""
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        pytest.skip("the FIFO layout below assumes 4 KiB pages")
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 16 * 4096)  # 16 page slots
        os.write(w, bytes(15 * 4096 + 100))  # every slot taken, the last one at 100 bytes
        writer = PipeWriter(w, RATE)
        writer.max_backlog = 1040  # 4160 bytes: a page and 64 bytes
        writer.push(np.zeros(2048, np.float32))  # two pages: no room, nothing written
        assert writer.step() is False
        # The trim dropped 1008 frames; of the rest, 64 bytes fitted in the last page.
        assert writer.written_frames == 16 and writer.unread_frames == 1008
        writer.push(np.zeros(480, np.float32))
        assert writer.step() is False
        s = writer.stats()
        assert (s.overruns, s.overrun_frames, s.unread_frames) == (0, 0, 1008 + 464), s
    finally:
        os.close(r)
        os.close(w)


def test_a_reader_that_falls_behind_is_an_overrun_by_episode():
    """A server that reads, but slower than real time, is an over-run (one per episode);
    a spell of reading nothing after it caught up is unread again. Driven round by round
    (PipeWriter.step, what its thread runs), so the order of events is exact."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    writer = PipeWriter(w, RATE, max_backlog_s=0.05)
    block = np.zeros(480, np.float32)

    def push(n: int, read_every: int = 0) -> None:
        for i in range(n):
            writer.push(block)
            if read_every and i % read_every == 0:
                os.read(r, 4096)  # a page: what frees room in a pipe
            writer.step()

    def drain() -> None:
        while True:
            try:
                if not os.read(r, 1 << 16):
                    return
            except BlockingIOError:
                return

    try:
        push(200)  # nobody reads: the pipe fills, then the backlog is trimmed
        s = writer.stats()
        assert (s.overruns, s.overrun_frames) == (0, 0) and s.unread_frames > 0
        unread = s.unread_frames
        push(99, read_every=3)  # 1024 frames read per 1440 pushed: falls behind
        s = writer.stats()
        assert s.overruns == 1 and s.overrun_frames > 0 and s.unread_frames == unread
        drain()
        writer.step()  # caught up: the episode ends
        drain()
        push(200)  # nobody reads again: unread, no new over-run
        s = writer.stats()
        assert s.overruns == 1 and s.unread_frames > unread
        pushed = 499 * 480
        queued = writer.ring.readable() + len(writer._pending) // 4
        assert s.written_frames + queued + s.unread_frames + s.overrun_frames == pushed
    finally:
        writer.close()
        os.close(r)
        os.close(w)


def test_writer_reports_a_closed_fifo():
    r, w = os.pipe()
    writer = PipeWriter(w, RATE)
    writer.start()
    os.close(r)  # the server went away
    try:
        writer.push(np.ones(480, np.float32))
        wait_until(lambda: writer.stats().error, 30, "the writer's error")
        assert "FIFO failed" in writer.stats().error
    finally:
        writer.close()
        os.close(w)


def test_input_callback_feeds_the_runner_output_to_the_writer(passthrough_model: Model):
    """Input-only callbacks give the FIFO what a duplex stream would play: the input,
    delayed by the reported latency (margin included)."""
    block = 480
    r, w = os.pipe()
    with LiveRunner(passthrough_model, RATE, margin_blocks=1) as runner:
        writer = PipeWriter(w, RATE, max_backlog_s=10.0)
        writer.ring = type(writer.ring)(RATE * 4)  # hold the whole test signal
        mic = VirtualMic(runner, writer, block)
        n = 100 * block
        x = (np.random.default_rng(1).standard_normal(n) * 0.1).astype(np.float32)
        for i in range(0, n, block):
            mic.callback(x[i : i + block, None], block, None, None)
            while runner.step():
                pass
        assert writer.ring.readable() == n
        y = np.zeros(n, np.float32)
        writer.ring.read_into(y)
        lat = runner.latency()
        assert runner.plan.margin_frames == block and lat.margin_s == pytest.approx(0.01)
        assert "jitter margin 10.000" in lat.describe()
        d = round(lat.in_process_s * RATE)
        # The first callback primes the runner; the timeline starts at the second.
        np.testing.assert_allclose(y[block + d :], x[block : n - d], atol=2e-3)
        assert runner.underruns == 0
    os.close(r)
    os.close(w)


def test_input_callback_allocates_no_arrays(passthrough_model: Model):
    block = 4096
    r, w = os.pipe()
    with LiveRunner(passthrough_model, RATE) as runner:
        writer = PipeWriter(w, RATE)
        mic = VirtualMic(runner, writer, block)
        inbuf = np.ones((block, 1), dtype=np.float32)
        mic.callback(inbuf, block, None, None)
        runner.step()
        mic.callback(inbuf, block, None, None)  # warm every branch
        grown = callback_peak_bytes(lambda: mic.callback(inbuf, block, None, None))
        assert grown < 4096, f"callback allocated {grown} bytes"
        writer.close()
    os.close(r)
    os.close(w)


def test_plan_margin_adds_to_the_prefill():
    a = plan_buffering(480, RATE, 16000, 128)
    b = plan_buffering(480, RATE, 16000, 128, margin_frames=480)
    assert b.prefill_frames == a.prefill_frames + 480 and a.margin_frames == 0


@pytest.mark.parametrize("name", ["rtns_mic", "Mic-2.clean", "a"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "x;rm", "-lead", "é", "a" * 64, "a'b"])
def test_bad_names(name):
    with pytest.raises(UserInputError, match="--virtual-mic"):
        check_name(name)


def test_live_collector_reads_the_runner(passthrough_model: Model):
    """The metrics rtns run publishes (its registry, its latency wiring) read the running
    stream: the callbacks, the under-runs of a worker that fell behind, and the delay the
    status line reports once the stream is primed (NaN before)."""
    import math

    from prometheus_client import generate_latest

    from rtns.cli.live import _Live, _metrics_registry, _note_latency

    def scrape(live: _Live) -> dict[str, str]:
        text = generate_latest(_metrics_registry(live)).decode()
        return dict(ln.rsplit(" ", 1) for ln in text.splitlines() if not ln.startswith("#"))

    class Stream:  # what _note_latency reads: PortAudio's (input, output) latency
        latency = (0.012, 0.020)

    with LiveRunner(passthrough_model, 16000) as runner:
        live = _Live(runner, None)
        assert math.isnan(float(scrape(live)["rtns_live_latency_seconds"]))
        block = 128
        inbuf = np.ones((block, 1), np.float32)
        outbuf = np.zeros((block, 1), np.float32)
        runner.callback(inbuf, outbuf, block, None, None)  # the first block primes
        runner.step()
        for _ in range(40):  # the worker never runs: the prefill drains, then under-runs
            runner.callback(inbuf, outbuf, block, None, None)
        lat = _note_latency(Stream(), runner, live.lat_ms)
        lines = scrape(live)
    assert float(lines["rtns_live_callbacks_total"]) == 41
    assert runner.underruns > 0
    assert float(lines["rtns_live_underruns_total"]) == runner.underruns
    assert float(lines["rtns_live_latency_seconds"]) == pytest.approx(lat.total_s)
    assert lat.total_s > 0.032  # PortAudio's 32 ms are part of it
    assert 'rtns_live_xruns_total{kind="input_overflow"}' in lines
    assert "rtns_live_vmic_overruns_total" not in lines  # no virtual microphone here
