"""A private headless PulseAudio server for tests, and the pieces the virtual-microphone
tests and benchmarks/virtual_mic.py share.

The server runs as the issue describes (``pulseaudio -n --daemonize=no
--exit-idle-time=-1`` with the native protocol, a null sink ``fake_mic`` and
module-always-sink) with ``XDG_RUNTIME_DIR`` and ``HOME`` in a private folder, so it never
meets a user's own server. ``fake_mic`` runs at 48 kHz mono: what is played into it reaches
``fake_mic.monitor`` without a resampler in between. Every wait polls a condition against
a deadline; nothing sleeps for a fixed time. ``PipeWireServer`` is the same desktop on
PipeWire 0.3 (pipewire, wireplumber and pipewire-pulse under a private session D-Bus).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from polling import wait_until

BINARIES = ("pulseaudio", "pactl", "paplay", "parecord")
ALSA_PULSE_PLUGIN = "libasound_module_pcm_pulse.so"
RATE = 48_000
#: Generous: both cores may be busy (a training run, the rest of the suite).
START_TIMEOUT_S = 60.0


def skip_reason(
    binaries: tuple[str, ...] = BINARIES,
    packages: str = "pulseaudio pulseaudio-utils libasound2-plugins",
) -> str | None:
    """Why the PulseAudio tests (the ``binaries`` from ``packages``) cannot run here, or
    None."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install {packages})"
    libdirs = [
        Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")
    ]
    if not any((d / "alsa-lib" / ALSA_PULSE_PLUGIN).exists() for d in libdirs):
        return "needs ALSA's pulse plugin (apt-get install libasound2-plugins)"
    try:
        import sounddevice  # noqa: F401
    except OSError:
        return "needs libportaudio2"
    return None


class PulseServer:
    """``with PulseServer(tmp) as srv:`` a running server; ``srv.env`` for its clients."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.runtime = self.folder / "run"
        self.home = self.folder / "home"
        self.log = self.folder / "pulseaudio.log"
        self.proc: subprocess.Popen | None = None
        env = dict(os.environ)
        for key in ("PULSE_SERVER", "PULSE_SOURCE", "PULSE_SINK", "PULSE_COOKIE"):
            env.pop(key, None)
        env.update(XDG_RUNTIME_DIR=str(self.runtime), HOME=str(self.home))
        env["PYTHONWARNINGS"] = "ignore"
        self.env = env

    def start(self) -> PulseServer:
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    "pulseaudio",
                    "-n",
                    "--daemonize=no",
                    "--exit-idle-time=-1",
                    "-L",
                    "module-native-protocol-unix",
                    "-L",
                    f"module-null-sink sink_name=fake_mic rate={RATE} channels=1",
                    "-L",
                    "module-always-sink",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        socket = self.runtime / "pulse" / "native"

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"pulseaudio exited:\n{self.log.read_text()}")
            return socket.exists() and self.pactl_ok("info")

        wait_until(ready, START_TIMEOUT_S, "pulseaudio to answer pactl info", step=0.05)
        return self

    def pactl_ok(self, *args: str) -> bool:
        return self.run("pactl", *args).returncode == 0

    def run(self, *cmd: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def sources(self) -> list[str]:
        out = self.run("pactl", "list", "short", "sources").stdout
        return [line.split("\t")[1] for line in out.splitlines() if "\t" in line]

    def modules(self) -> str:
        return self.run("pactl", "list", "short", "modules").stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> PulseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


PIPEWIRE_BINARIES = ("pipewire", "wireplumber", "pipewire-pulse", "dbus-daemon", *BINARIES[1:])


def pipewire_skip_reason() -> str | None:
    """Why the PipeWire tests cannot run here, or None (pulseaudio itself is not needed:
    pipewire-pulse is the server)."""
    return skip_reason(
        PIPEWIRE_BINARIES, "pipewire pipewire-pulse wireplumber pulseaudio-utils libasound2-plugins"
    )


class PipeWireServer(PulseServer):
    """A private headless PipeWire 0.3 desktop: a session D-Bus, ``pipewire``,
    ``wireplumber`` and ``pipewire-pulse`` (the PulseAudio server rtns and the tests talk
    to), with the same private ``XDG_RUNTIME_DIR``/``HOME`` and the same 48 kHz mono null
    sink ``fake_mic`` (loaded through pactl) as :class:`PulseServer`."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.log = self.folder / "pipewire.log"
        self.procs: list[subprocess.Popen] = []
        for key in ("PIPEWIRE_RUNTIME_DIR", "PIPEWIRE_REMOTE", "DBUS_SESSION_BUS_ADDRESS"):
            self.env.pop(key, None)
        self.env["XDG_CONFIG_HOME"] = str(self.home / ".config")
        self.env["XDG_STATE_HOME"] = str(self.home / ".local" / "state")

    def _spawn(self, *cmd: str) -> subprocess.Popen:
        with open(self.log, "a") as log:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)
        return proc

    def start(self) -> PipeWireServer:
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        address = f"unix:path={self.runtime}/bus"
        bus = self._spawn(
            "dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={address}"
        )
        self.env["DBUS_SESSION_BUS_ADDRESS"] = address
        wait_until(lambda: (self.runtime / "bus").exists() or bus.poll() is not None, 30, "dbus")
        self._spawn("pipewire")
        wait_until(lambda: (self.runtime / "pipewire-0").exists(), START_TIMEOUT_S, "pipewire")
        self._spawn("wireplumber")
        self._spawn("pipewire-pulse")

        def ready() -> bool:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{proc.args[0]} exited:\n{self.log.read_text()}")
            info = self.run("pactl", "info")
            return info.returncode == 0 and "on PipeWire" in info.stdout

        wait_until(ready, START_TIMEOUT_S, "pipewire-pulse to answer pactl info", step=0.05)
        r = self.run(
            "pactl", "load-module", "module-null-sink", f"sink_name=fake_mic rate={RATE} channels=1"
        )
        assert r.returncode == 0, r.stderr
        wait_until(lambda: "fake_mic.monitor" in self.sources(), 30, "fake_mic.monitor")
        return self

    def version(self) -> str:
        return self.run("pactl", "info").stdout.split("Server Name: ")[1].splitlines()[0]

    def stop(self) -> None:
        for proc in reversed(self.procs):  # pipewire-pulse, wireplumber, pipewire, the bus
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []


class Rtns:
    """``rtns run`` (or another ``command``) as a subprocess whose stderr lines are collected
    by a thread."""

    def __init__(
        self, args: list[str], env: dict[str, str], cwd: Path, command: str = "run"
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtns", command, *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        rx = re.compile(pattern)

        def found() -> re.Match | None:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                self._thread.join(timeout=5)
                raise AssertionError(f"rtns exited ({self.proc.returncode}):\n{self.output}")
            return None

        return wait_until(found, timeout, f"{pattern!r} from rtns")

    def interrupt(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=timeout)
        self._thread.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=5)


class Recorder:
    """``parecord`` of a source into a raw float32 mono 48 kHz file (low latency)."""

    def __init__(self, srv: PulseServer, source: str, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [
                "parecord",
                f"--device={source}",
                "--raw",
                "--format=float32le",
                f"--rate={RATE}",
                "--channels=1",
                "--latency-msec=20",
                str(path),
            ],
            env=srv.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def frames(self) -> int:
        try:
            return self.path.stat().st_size // 4
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def samples(self):
        import numpy as np

        return np.fromfile(self.path, dtype="<f4")


def best_lag(y, ref, max_lag: int) -> tuple[int, float]:
    """The lag ``d`` (0..max_lag) maximising the normalised correlation of ``y[d:]`` with
    ``ref`` over their overlap, and that correlation. Shapes: y [n], ref [m]."""
    import numpy as np
    from scipy.signal import fftconvolve

    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    # c[d] = sum_k y[k + d] * ref[k]
    c = fftconvolve(y, ref[::-1], mode="full")[len(ref) - 1 :][: max_lag + 1]
    d = int(np.argmax(c))
    n = min(len(ref), len(y) - d)
    a, b = y[d : d + n], ref[:n]
    corr = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return d, corr


def piecewise_match(y, ref, lag: int, seg: int, search: int):
    """How well each speech-active piece of ``ref`` (``seg`` samples, RMS within 20 dB of the
    loudest piece) is found in ``y`` near ``lag``: the best normalised correlation of the
    piece with ``y[lag + start + e:]`` over ``e`` in -search..search, and that ``e``. A piece
    a seam cuts (its halves found at different shifts) scores the worse of its halves where
    that is better than the whole.

    A glitch in a sound server (a few ms of silence inserted, or a few ms lost) shifts
    everything after it; one lag for the whole recording then correlates poorly though every
    piece is intact. Pieces aligned one by one tell an intact signal with a few seams from a
    different one. Returns (corr [k], shift [k]), k active pieces."""
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    starts = range(0, len(ref) - seg + 1, seg)
    rms = np.array([np.sqrt(np.mean(ref[s : s + seg] ** 2)) for s in starts])
    corr, shift = [], []
    for s, r in zip(starts, rms, strict=True):
        if r < 0.1 * rms.max():
            continue
        whole, e = _match(y, ref[s : s + seg], lag + s, search)
        h = seg // 2
        halves = min(
            _match(y, ref[s : s + h], lag + s, search)[0],
            _match(y, ref[s + h : s + seg], lag + s + h, search)[0],
        )
        corr.append(max(whole, halves))
        shift.append(e)
    return np.array(corr), np.array(shift, dtype=np.int64)


def _match(y, p, at: int, search: int) -> tuple[float, int]:
    """The best normalised correlation of ``p`` with ``y[at + e:]``, e in -search..search,
    and that e (0.0, 0 where y does not reach)."""
    import numpy as np
    from scipy.signal import fftconvolve

    n = len(p)
    lo, hi = max(0, at - search), min(len(y), at + n + search)
    w = y[lo:hi]
    if len(w) < n:
        return 0.0, 0
    c = fftconvolve(w, p[::-1], mode="valid")  # c[j] = sum_k w[j + k] p[k]
    e2 = np.cumsum(np.concatenate([[0.0], w**2]))
    rho = c / (np.sqrt((e2[n:] - e2[:-n]) * np.dot(p, p)) + 1e-12)
    j = int(np.argmax(rho))
    return float(rho[j]), lo + j - at
