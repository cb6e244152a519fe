"""A JACK dummy server, a player and a recorder client, and ``rtns run`` as a subprocess:
real PortAudio duplex streams without a sound card (see shared/AUDIO_TESTING.md).

Wiring of a measurement::

    rtns_player:out -> PortAudio:in_0   (rtns run)   PortAudio:out_0 -> rtns_recorder:in

JACK runs the three clients in dependency order within each cycle, and the player and
the recorder index their buffers by the cycle's frame time, so a pass-through client
shows a delay of 0 and the measured delay is exactly the delay inside rtns. PortAudio's
own ``stream.latency`` (the system ports' latency) is not on this path.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

_COUNTER = [0]
T = TypeVar("T")


def skip_reason() -> str | None:
    """Why JACK tests cannot run here, or None."""
    if shutil.which("jackd") is None or shutil.which("jack_wait") is None:
        return "needs jackd2 (apt-get install jackd2)"
    if shutil.which("setsid") is None:
        return "needs setsid (util-linux)"
    if ctypes.util.find_library("portaudio") is None:
        return "needs libportaudio2 (apt-get install libportaudio2)"
    try:
        import jack  # noqa: F401
    except (ImportError, OSError) as e:
        return f"needs the JACK-Client Python package ({e})"
    return None


class JackServer:
    """``jackd -n NAME -d dummy -r RATE -p PERIOD`` for the duration of a ``with`` block."""

    def __init__(self, rate: int, period: int = 128) -> None:
        _COUNTER[0] += 1
        self.rate, self.period = rate, period
        self.name = f"rtns-test-{os.getpid()}-{_COUNTER[0]}"
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        #: time.monotonic() when each line of ``log`` was read.
        self.log_at: list[float] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for a client of this server: today's os.environ (fixtures may
        have added to it since the server started, e.g. $RTNS_EXTRA_FAMILIES) + the server."""
        return {**os.environ, "JACK_DEFAULT_SERVER": self.name, "JACK_NO_START_SERVER": "1"}

    def __enter__(self) -> JackServer:
        StealMonitor.start()
        reclaim_stale_servers()
        cmd = [
            "jackd",
            "-n",
            self.name,
            "-d",
            "dummy",
            "-r",
            str(self.rate),
            "-p",
            str(self.period),
        ]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._drain, daemon=True).start()
        r = subprocess.run(
            ["jack_wait", "-w", "-t", "10"], env=self.env, capture_output=True, text=True
        )
        if r.returncode != 0 or self.proc.poll() is not None:
            self.__exit__()
            raise RuntimeError(f"jackd did not start: {r.stdout} {''.join(self.log[-20:])}")
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        realtime_thread(1)  # stamps xruns on time even on a busy host
        for line in self.proc.stdout:
            self.log_at.append(time.monotonic())
            self.log.append(line)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.returncode not in (0, -signal.SIGTERM):
            _reclaim(self.name)  # it died without unregistering (a test killed it)
        _remove_semaphores(self.name)

    def xruns(self) -> int:
        """XRuns jackd has logged so far."""
        return sum("XRun" in line for line in self.log)

    def xrun_times(self) -> list[float]:
        """time.monotonic() of each xrun jackd has logged so far."""
        return [t for t, line in zip(self.log_at, self.log, strict=False) if "XRun" in line]

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` to jackd; returns the time.monotonic() just before."""
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(sig)
        return t


#: JACK's table of running servers (at most 8). A server that dies without unregistering
#: (SIGKILL) keeps its entry until a server of the same name starts again.
JACK_REGISTRY = Path("/dev/shm/jack-shm-registry")


def _remove_semaphores(name: str) -> None:
    for f in glob.glob(f"/dev/shm/jack_sem.*_{name}_*"):
        try:
            os.remove(f)
        except OSError:
            pass


def _reclaim(name: str) -> None:
    """Start a server named ``name`` and stop it cleanly: frees a dead server's entry."""
    env = {**os.environ, "JACK_DEFAULT_SERVER": name, "JACK_NO_START_SERVER": "1"}
    proc = subprocess.Popen(
        ["jackd", "-n", name, "-d", "dummy", "-r", "16000", "-p", "128"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(["jack_wait", "-w", "-t", "10"], env=env, capture_output=True)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _remove_semaphores(name)


def reclaim_stale_servers() -> list[str]:
    """Free the registry entries of test servers whose test process is gone (they fill the
    8 slots and then no server starts: "Too many servers already active")."""
    try:
        data = JACK_REGISTRY.read_bytes()
    except OSError:
        return []
    stale = []
    for pid, n in sorted(set(re.findall(rb"rtns-test-(\d+)-(\d+)", data))):
        try:
            os.kill(int(pid), 0)
            continue  # its test session still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        name = f"rtns-test-{pid.decode()}-{n.decode()}"
        _reclaim(name)
        stale.append(name)
    return stale


class StealMonitor:
    """When the hypervisor ran something else while this VM's CPUs had work ("steal" in
    /proc/stat, 10 ms ticks), sampled every 50 ms by one real-time thread per process.

    A vCPU taken away for more than a hop stalls whatever runs on it, rtns's real-time
    worker included, while jackd on the other vCPU may keep time: an under-run then that
    neither rtns nor jackd could prevent.
    """

    times: list[float] = []
    _started = False

    @classmethod
    def start(cls) -> None:
        if not cls._started:
            cls._started = True
            threading.Thread(target=cls._run, name="steal-monitor", daemon=True).start()

    @staticmethod
    def _steal() -> int:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
            return int(fields[8]) if len(fields) > 8 else 0
        except (OSError, ValueError):
            return 0

    @classmethod
    def _run(cls) -> None:
        realtime_thread(1)
        last = cls._steal()
        while True:
            time.sleep(0.05)
            now = cls._steal()
            if now != last:
                cls.times.append(time.monotonic())
                last = now


class Lateness(AssertionError):
    """rtns under-ran during an attempt, so its output could not be compared exactly."""


def retry_on_host_xruns(server: JackServer, attempt: Callable[[], T], tries: int = 3) -> T:
    """Run ``attempt``; if it fails while jackd itself logged xruns (the host missed the
    dummy driver's deadlines, which no client can make up for) or with :class:`Lateness`
    (an under-run, which a busy host causes now and then), run it again, at most ``tries``
    times in all. Any other failure is raised at once, and so is the last attempt's."""
    for _ in range(tries - 1):
        before = server.xruns()
        try:
            return attempt()
        except AssertionError as e:
            host = server.xruns() - before
            if host == 0 and not isinstance(e, Lateness):
                raise
            print(f"\nfailed attempt ({e}; jackd logged {host} xruns); retrying", flush=True)
    return attempt()


def realtime_thread(priority: int = 1) -> None:
    """SCHED_FIFO ``priority`` for the calling thread (0: normal), where permitted.

    The player and recorder callbacks run Python on JACK's real-time threads and need this
    process's GIL: a normal-priority thread of the test process preempted by other work
    while it holds the GIL would make them miss the cycle (a jackd xrun). So the threads
    that wake while audio runs (the test's main thread, the output readers) are real-time
    too, below JACK's own client threads.
    """
    try:
        if priority > 0:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass


class Loopback:
    """A player client (one output port) and a recorder client (one input port).

    ``play(signal)`` schedules ``signal`` (float32 [n]) to start at a JACK frame time a
    little in the future; the recorder keeps the same span plus ``tail`` frames. Both
    index by the cycle's frame time, so ``recording[k]`` is what arrived while
    ``signal[k]`` was being sent.
    """

    def __init__(self, server: JackServer) -> None:
        import jack

        self.server = server
        self.player = jack.Client("rtns_player", servername=server.name, no_start_server=True)
        self.recorder = jack.Client("rtns_recorder", servername=server.name, no_start_server=True)
        self.out = self.player.outports.register("out")
        self.inp = self.recorder.inports.register("in")
        self.signal = np.zeros(0, dtype=np.float32)
        self.recording = np.zeros(0, dtype=np.float32)
        self.t0: int | None = None
        self.player.set_process_callback(self._play)
        self.recorder.set_process_callback(self._record)
        # Hand the GIL to the JACK callbacks within 0.5 ms, as rtns does for its own.
        self._old_switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        realtime_thread(1)
        self.player.activate()
        self.recorder.activate()

    def _play(self, frames: int) -> None:
        buf = self.out.get_array()
        buf.fill(0.0)
        t0 = self.t0
        if t0 is None:
            return
        s = self.player.last_frame_time - t0  # signal index of buf[0]
        a, b = max(s, 0), min(s + frames, self.signal.shape[0])
        if a < b:
            buf[a - s : b - s] = self.signal[a:b]

    def _record(self, frames: int) -> None:
        t0 = self.t0
        if t0 is None:
            return
        s = self.recorder.last_frame_time - t0
        a, b = max(s, 0), min(s + frames, self.recording.shape[0])
        if a < b:
            self.recording[a:b] = self.inp.get_array()[a - s : b - s]

    def wire(self, timeout: float = 10.0) -> None:
        """Connect player -> rtns's PortAudio input, its output -> recorder."""
        deadline = time.monotonic() + timeout
        while True:
            ins = self.player.get_ports("PortAudio", is_audio=True, is_input=True)
            outs = self.player.get_ports("PortAudio", is_audio=True, is_output=True)
            if ins and outs:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("rtns's PortAudio ports did not appear")
            time.sleep(0.05)
        pa_in, pa_out = ins[0], outs[0]
        for src in self.player.get_all_connections(pa_in):
            self.player.disconnect(src, pa_in)
        self.player.connect(self.out, pa_in)
        self.recorder.connect(pa_out, self.inp)

    def play(self, signal: np.ndarray, tail: int, lead_s: float = 0.2) -> None:
        self.signal = np.ascontiguousarray(signal, dtype=np.float32)
        self.recording = np.zeros(self.signal.shape[0] + tail, dtype=np.float32)
        self.t0 = self.player.frame_time + int(lead_s * self.server.rate)

    def wait_until(self, index: int, timeout: float = 60.0) -> None:
        """Block until the recorder has passed signal index ``index``."""
        assert self.t0 is not None
        deadline = time.monotonic() + timeout
        while self.recorder.frame_time < self.t0 + index:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the JACK clock did not reach signal index {index}")
            time.sleep(0.01)

    def wait(self, timeout: float = 120.0) -> np.ndarray:
        """Block until the recording is complete; returns it (float32 [n + tail])."""
        assert self.t0 is not None
        end = self.t0 + self.recording.shape[0] + 2 * self.server.period
        deadline = time.monotonic() + timeout
        while self.recorder.frame_time < end:
            if time.monotonic() > deadline:
                raise TimeoutError("recording did not complete")
            time.sleep(0.05)
        return self.recording.copy()

    def close(self) -> None:
        for c in (self.player, self.recorder):
            c.deactivate()
            c.close()
        realtime_thread(0)
        sys.setswitchinterval(self._old_switch)


class RtnsProcess:
    """``python -m rtns <args>`` on a terminal of its own, stderr/stdout collected by a thread.

    rtns reads controls only from a terminal it has in the foreground, so stdin is a
    pseudo-terminal that ``setsid --ctty`` makes the controlling terminal of a new session
    (rtns is its foreground process group); :meth:`send` types on it.
    """

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self._master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(
                ["setsid", "--ctty", sys.executable, "-m", "rtns", *args],
                env=env,
                stdin=slave,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
        finally:
            os.close(slave)
        self.lines: list[str] = []
        #: time.monotonic() when each line of ``lines`` was read.
        self.stamps: list[float] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        realtime_thread(1)
        for line in self.proc.stdout:
            with self._changed:
                self.stamps.append(time.monotonic())
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first output line matching ``pattern``, waiting up to ``timeout`` s for it."""
        rx = re.compile(pattern)

        def first() -> re.Match | None:
            return next((m for line in self.lines if (m := rx.search(line))), None)

        with self._changed:
            self._changed.wait_for(lambda: first() or not self._reader.is_alive(), timeout)
            m = first()
        if m:
            return m
        if not self._reader.is_alive():
            self.proc.wait()
            raise RuntimeError(f"rtns exited ({self.proc.returncode}):\n{self.output}")
        raise TimeoutError(f"no {pattern!r} from rtns:\n{self.output}")

    def send(self, text: str) -> None:
        """Type ``text`` on rtns's terminal."""
        os.write(self._master, text.encode())

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        self._close_terminal()
        return rc

    def exit_time(self, timeout: float = 30.0) -> float:
        """Wait for the exit; returns time.monotonic() when it was seen (within 5 ms)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rtns did not exit within {timeout:g} s:\n{self.output}")
            time.sleep(0.005)
        t = time.monotonic()
        self._reader.join(5)
        return t

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_terminal()

    def _close_terminal(self) -> None:
        # Only once rtns is gone: closing a session's terminal hangs it up (SIGHUP).
        if self._master >= 0:
            os.close(self._master)
            self._master = -1


LATENCY_RX = (
    r"latency (?P<total>[\d.]+) ms = algorithmic (?P<alg>[\d.]+) \+ worker (?P<worker>[\d.]+)"
    r" \+ hop alignment (?P<align>[\d.]+) \+ resampling (?P<rs>[\d.]+)"
    r" \+ PortAudio in (?P<pa_in>[\d.]+) \+ out (?P<pa_out>[\d.]+)"
    r" \(device (?P<rate>\d+) Hz, (?P<block>\d+)-frame blocks\)"
)
SUMMARY_RX = (
    r"stopped after (?P<secs>[\d.]+) s: (?P<callbacks>\d+) callbacks, (?P<underruns>\d+) under-runs"
    r" \((?P<uframes>\d+) frames\), PortAudio input overflows (?P<in_over>\d+),"
    r" output underflows (?P<out_under>\d+), dropped in/out (?P<in_drop>\d+)/(?P<out_drop>\d+),"
    r" RTF (?P<rtf>[\d.]+), max hop (?P<max_hop>[\d.]+) ms"
)


STATUS_RX = r"^\[\s*(?P<secs>[\d.]+) s\] RTF [\d.]+ .*  under-runs (?P<underruns>\d+) "


class UnderrunAudit:
    """rtns's under-runs split by whether the host kept time around them.

    rtns prints its cumulative under-run count once a second; jackd logs an xrun whenever
    the host missed the dummy driver's deadline (then no client, rtns included, can be on
    time), and :class:`StealMonitor` notes when the hypervisor took CPU time from this
    machine. An under-run in a status interval is *excused* when either happened within
    ``margin`` seconds of that interval, and *unexcused* otherwise: those are rtns's own.
    """

    def __init__(self, proc: RtnsProcess, server: JackServer, margin: float = 0.3) -> None:
        xruns = server.xrun_times() + list(StealMonitor.times)
        status = re.compile(STATUS_RX)
        summary = re.compile(SUMMARY_RX)
        self.unexcused = self.excused = self.clean = self.tainted = 0
        prev_count, prev_t = 0, None
        for t, line in zip(proc.stamps, proc.lines, strict=False):
            m = status.search(line) or summary.search(line)
            if prev_t is None:
                if line.startswith("rtns: latency"):
                    prev_t = t
                continue
            if not m:
                continue
            count = int(m["underruns"])
            lo, hi = prev_t - margin, t + margin
            if any(lo <= x <= hi for x in xruns):
                self.tainted += 1
                self.excused += count - prev_count
            else:
                self.clean += 1
                self.unexcused += count - prev_count
            prev_count, prev_t = count, t

    def __repr__(self) -> str:
        return (
            f"under-runs: {self.unexcused} in {self.clean} clean intervals, {self.excused} in "
            f"{self.tainted} intervals with jackd xruns or CPU steal"
        )


def underrun_gaps(y: np.ndarray, expected: np.ndarray, min_len: int = 64) -> np.ndarray:
    """Bool mask of the silence under-runs played: runs of at least ``min_len`` exact zeros
    in ``y`` where ``expected`` (aligned with it) is not silent. Comparisons skip them; the
    caller checks they add up to no more than the under-run frames rtns reported."""
    z = np.concatenate(([0], (y == 0.0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(z))
    mask = np.zeros(y.shape[0], dtype=bool)
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if b - a >= min_len and np.any(expected[a:b] != 0):
            mask[a:b] = True
    return mask


class PieceMatch:
    """Where each piece of a played signal came back in a recording.

    When the host misses the dummy driver's deadlines, JACK skips whole cycles: the player
    and the recorder index their buffers by frame time and skip them too, but the audio in
    flight inside rtns (one latency's worth) was taken before the skip and comes out after
    it, so for about one latency the output is the input shifted by whole periods. PortAudio
    reports such a skip to rtns as an input overflow and an output underflow. Comparing the
    whole recording at the measured delay would blame rtns for it; so the signal is cut
    into pieces, each compared at the measured delay first and else at the delay moved by
    whole periods (up to ``max_shift`` frames).

    ``at_delay``, ``shifted``, ``unmatched``: bool [pieces] (pieces with nothing to compare
    count as at the delay); ``compared``: bool [pieces], those with something to compare.
    ``samples``: bool [n], the samples of the pieces at the delay.
    """

    def __init__(
        self,
        recording: np.ndarray,
        ref: np.ndarray,
        keep: np.ndarray,
        delay: int,
        period: int,
        close: Callable[[np.ndarray, np.ndarray], bool],
        piece: int = 256,
        max_shift: int = 4800,
    ) -> None:
        n = ref.shape[0] // piece
        self.piece, self.delay = piece, delay
        self.at_delay = np.zeros(n, dtype=bool)
        self.shifted = np.zeros(n, dtype=bool)
        self.compared = np.zeros(n, dtype=bool)
        shifts = [s * period for k in range(1, max_shift // period + 1) for s in (k, -k)]
        for i in range(n):
            lo = i * piece
            m = keep[lo : lo + piece]
            self.compared[i] = m.any()
            want = ref[lo : lo + piece][m]
            if not self.compared[i] or close(recording[delay + lo : delay + lo + piece][m], want):
                self.at_delay[i] = True
                continue
            for s in shifts:
                a = delay + lo + s
                if 0 <= a and a + piece <= recording.shape[0]:
                    if close(recording[a : a + piece][m], want):
                        self.shifted[i] = True
                        break
        self.unmatched = ~(self.at_delay | self.shifted)
        self.samples = np.zeros(ref.shape[0], dtype=bool)
        self.samples[: n * piece] = np.repeat(self.at_delay, piece)

    def check(self, host_events: int) -> None:
        """Pieces off the delay only where the host skipped cycles (``host_events``: jackd's
        xruns plus the overflows and underflows PortAudio reported to rtns), at most one
        latency and a few pieces around it per event, and at least half the compared pieces
        at the delay; a recording off the delay with no host event is rtns's fault."""
        off = int((~self.at_delay).sum())
        what = (
            f"{off} of {int(self.compared.sum())} pieces off the delay ({int(self.shifted.sum())}"
            f" shifted by whole periods, {int(self.unmatched.sum())} unmatched);"
            f" {host_events} host events"
        )
        print(f"\npieces: {what}", flush=True)
        if off:
            assert host_events > 0, what
            assert off <= host_events * (self.delay // self.piece + 8), what
            assert self.at_delay[self.compared].mean() >= 0.5, what


def host_events(summary: dict, host_xruns: int) -> int:
    """jackd's xruns during a measurement plus the input overflows and output underflows
    PortAudio reported to rtns (``summary``: its stop line, SUMMARY_RX), each a skipped
    cycle."""
    return host_xruns + int(summary["in_over"]) + int(summary["out_under"])


def measure_delay(signal: np.ndarray, recording: np.ndarray, max_delay: int) -> int:
    """The lag (samples, 0..max_delay) at which ``recording`` best matches ``signal``
    (peak of their cross-correlation, computed with FFTs)."""
    size = 1 << int(np.ceil(np.log2(signal.shape[0] + recording.shape[0])))
    spec = np.fft.rfft(recording.astype(np.float64), size) * np.conj(
        np.fft.rfft(signal.astype(np.float64), size)
    )
    corr = np.fft.irfft(spec, size)[: max_delay + 1]
    return int(np.argmax(corr))


def click_train(n: int, every: int, first: int, amp: float = 0.5) -> np.ndarray:
    """float32 [n] with single-sample clicks of ``amp`` at first, first + every, ..."""
    x = np.zeros(n, dtype=np.float32)
    x[first::every] = amp
    return x


def band_limited_noise(
    n: int, rate: int, top_hz: float, seed: int = 0, rms: float = 0.1
) -> np.ndarray:
    """float32 [n] white noise with everything above ``top_hz`` removed (FFT brick wall)."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[np.fft.rfftfreq(n, 1 / rate) > top_hz] = 0
    x = np.fft.irfft(spec, n)
    return (x * rms / np.sqrt(np.mean(x**2))).astype(np.float32)


def run_click_measurement(
    server: JackServer,
    rtns_args: list[str],
    seconds: float = 2.0,
    max_delay_s: float = 0.2,
    signal: np.ndarray | None = None,
) -> dict:
    """Start ``rtns run``, play clicks (or ``signal``) through it, stop it with SIGINT
    (as Ctrl-C would).

    Returns {"measured": frames, "latency": regex groups (ms), "summary": regex groups,
    "rc": exit code, "output": text, "audit": :class:`UnderrunAudit`, "signal", "recording"}.
    """
    loop = Loopback(server)
    xruns_before = server.xruns()
    proc = RtnsProcess(["run", *rtns_args], server.env)
    try:
        lat = proc.wait_for(LATENCY_RX).groupdict()
        loop.wire()
        r = server.rate
        n = int(seconds * r)
        x = click_train(n, every=r // 4 + 7, first=r // 10) if signal is None else signal
        max_delay = int(max_delay_s * r)
        loop.play(x, tail=max_delay)
        rec = loop.wait()
        proc.interrupt()
        rc = proc.finish()
        summary = proc.wait_for(SUMMARY_RX).groupdict()
    finally:
        proc.kill()
        loop.close()
    return {
        "measured": measure_delay(x, rec, max_delay),
        "latency": lat,
        "summary": summary,
        "rc": rc,
        "output": proc.output,
        "audit": UnderrunAudit(proc, server),
        "host_xruns": server.xruns() - xruns_before,
        "signal": x,
        "recording": rec,
    }
