"""A virtual microphone: the enhanced input published as a source of the PulseAudio (or
PipeWire's pipewire-pulse) sound server (``rtns run -i MIC --virtual-mic NAME``).

Mechanism (why: docs/desktop.md): the server's ``module-pipe-source`` reads raw samples
from a FIFO and posts exactly what it reads as source ``NAME``; rtns writes the enhanced
signal into that FIFO. The server is driven with ``pactl`` (pulseaudio-utils; PipeWire
systems ship it too), so no client library is linked into the audio process.

Threads and data flow (device rate R, 48 kHz by default)::

    PortAudio input callback --> LiveRunner (in ring -> worker -> out ring, fixed delay)
        the callback takes one block of output per block of input (as a duplex stream
        would play it) and appends it to the pipe ring
    pipe ring --> writer thread (normal priority) --> FIFO --> module-pipe-source NAME

* The callback only copies between preallocated arrays and rings, counts, and writes one
  byte to non-blocking wake-up pipes; the FIFO is written by :class:`PipeWriter`'s thread.
* The source is clocked by what rtns writes, so its clock is the microphone's. Under-runs
  (the worker late for a block) are silence in the virtual microphone at a fixed delay,
  exactly as ``rtns run`` plays them.
* Backlog: samples the writer could not hand to the server beyond :data:`MAX_BACKLOG_S`
  are dropped, oldest first, so the virtual microphone never lags behind the real one by
  more than that. While the server reads nothing at all (no application records from the
  source, so it does not read the FIFO) that is expected and counted apart, as *unread*
  frames. Once it has read during such a spell and still falls behind (it reads slower
  than real time, or stalls while recording) the drops are *over-runs*, a problem to look
  at: one over-run per episode, the dropped frames counted too.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import termios
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rtns.errors import RtnsError, UserInputError
from rtns.fdutil import close_quietly
from rtns.ringbuffer import RingBuffer

#: Names the sound server accepts for a source, and that a shell or unit file carries as is.
NAME_RX = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
#: The virtual microphone's rate: what desktop applications expect.
DEFAULT_RATE = 48_000
#: Device frames per callback: 10 ms at 48 kHz. PulseAudio's ALSA plugin delivers small
#: blocks in bursts (median gap 0.01 ms with 128-frame blocks); 10 ms blocks arrive one at
#: a time (median gap 10.6 ms, p99 16 ms, measured on this project's VM).
DEFAULT_BLOCK_S = 0.010
#: Extra prefill, in blocks, against that jitter (see :attr:`rtns.audio.BufferPlan.margin_frames`).
#: Measured with paplay playing into the headless server's null sink: one block gave 7
#: under-runs in 25 s (and 3 in the first second with nothing playing), two gave none.
MARGIN_BLOCKS = 2
#: The most the virtual microphone may lag the real one beyond the fixed delay before the
#: writer drops the oldest samples (an over-run).
MAX_BACKLOG_S = 0.1
#: Kernel buffer of the FIFO: 4 pages, 85 ms of float32 mono at 48 kHz. Small, so that
#: what waits while no application records is little, and stale audio never piles up.
PIPE_BYTES = 16384
#: How long one pactl call may take before rtns gives up on the sound server.
PACTL_TIMEOUT_S = 10.0
#: The same while leaving (the server may be the reason rtns leaves).
CLEANUP_TIMEOUT_S = 2.0
#: Written into the source's properties so a leftover of a crashed rtns is recognised.
PID_PROP = "rtns.pid"
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in the module only from Python 3.10 on Linux


class VirtualMicConfig(BaseModel):
    """What ``--virtual-mic`` publishes (checked at the command line's boundary)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=f"^{NAME_RX}$")
    rate: int = Field(DEFAULT_RATE, ge=8000, le=384_000)
    #: What applications show; default: "Noise-suppressed microphone NAME (rtns)".
    description: str | None = Field(None, pattern=r"^[^'\"]*$")


def check_name(name: str) -> str:
    """``name`` if the sound server takes it as a source name, else a one-line error."""
    if not re.fullmatch(NAME_RX, name):
        raise UserInputError(
            f"--virtual-mic {name!r}: use 1-63 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit"
        )
    return name


# -- the sound server ---------------------------------------------------------------------------
class SoundServerError(RtnsError):
    """No PulseAudio/PipeWire server to publish to, or it refused a request."""


def _pactl(*args: str, timeout: float = PACTL_TIMEOUT_S) -> str:
    exe = shutil.which("pactl")
    if exe is None:
        raise SoundServerError(
            "--virtual-mic needs `pactl` (Debian/Ubuntu: apt-get install pulseaudio-utils; "
            "it talks to PulseAudio and to PipeWire's pipewire-pulse)"
        )
    try:
        r = subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise SoundServerError(
            f"the sound server did not answer `pactl {args[0]}` within {timeout:g} s"
        ) from None
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        raise SoundServerError(f"pactl {args[0]}: {why[-1] if why else f'exit {r.returncode}'}")
    return r.stdout


class ServerInfo(BaseModel):
    name: str
    version: str
    local: bool
    default_source: str


def server_info() -> ServerInfo:
    """The running server (``pactl info``), or one line saying there is none."""
    try:
        out = _pactl("info")
    except SoundServerError as e:
        if "pactl info" in str(e):
            raise SoundServerError(
                "no PulseAudio or PipeWire (pipewire-pulse) sound server is running for this "
                f"user ({str(e).removeprefix('pactl info: ')}); --virtual-mic publishes into one"
            ) from None
        raise
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return ServerInfo(
        name=fields.get("Server Name", "?"),
        version=fields.get("Server Version", "?"),
        local=fields.get("Is Local", "yes") == "yes",
        default_source=fields.get("Default Source", ""),
    )


class Module(BaseModel):
    index: int
    name: str
    args: str


def list_modules() -> list[Module]:
    mods = []
    for line in _pactl("list", "short", "modules").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip().isdigit():
            args = parts[2] if len(parts) > 2 else ""
            mods.append(Module(index=int(parts[0]), name=parts[1], args=args))
    return mods


def list_sources() -> list[str]:
    return [
        line.split("\t")[1]
        for line in _pactl("list", "short", "sources").splitlines()
        if line.count("\t") >= 1
    ]


def _publisher_pid(mod: Module) -> int | None:
    m = re.search(re.escape(PID_PROP) + r"=(\d+)", mod.args)
    return int(m.group(1)) if m else None


def _is_rtns_process(pid: int) -> bool:
    """Is ``pid`` a running rtns (not a recycled pid of another program)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"rtns" in cmdline


def owned_module(name: str) -> Module | None:
    """The pipe source called ``name`` that an rtns process loaded, if any."""
    for mod in list_modules():
        if mod.name == "module-pipe-source" and re.search(
            rf"(^|\s)source_name={re.escape(name)}(\s|$)", mod.args
        ):
            return mod
    return None


def remove_leftover(name: str) -> str | None:
    """Unload the source ``name`` left by an rtns that is gone (a crash, SIGKILL); returns
    what was done, for the log. Refuses a source of a running rtns or of another program."""
    mod = owned_module(name)
    if mod is not None:
        pid = _publisher_pid(mod)
        if pid is None:
            raise SoundServerError(
                f"a pipe source called {name!r} exists (module {mod.index}) and rtns did not "
                "make it; pick another --virtual-mic name"
            )
        if pid != os.getpid() and _is_rtns_process(pid):
            raise SoundServerError(
                f"the virtual microphone {name!r} is already published by rtns (pid {pid}); "
                "stop that one first or pick another name"
            )
        _pactl("unload-module", str(mod.index))
        return (
            f"removed the virtual microphone {name!r} left by rtns pid {pid}, which is gone "
            f"(module {mod.index})"
        )
    if name in list_sources():
        raise SoundServerError(
            f"the sound server already has a source called {name!r}; pick another --virtual-mic name"
        )
    return None


def fifo_path(name: str) -> Path:
    """Where the FIFO of virtual microphone ``name`` lives: the user's runtime folder (the
    server runs as the same user), else a private folder under the temporary directory."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "rtns" if base else Path(tempfile.gettempdir()) / f"rtns-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / f"vmic-{name}.fifo"


def load_pipe_source(cfg: VirtualMicConfig, fifo: Path) -> int:
    """Load ``module-pipe-source`` for ``cfg`` reading ``fifo`` (float32 mono); returns the
    module index."""
    description = cfg.description or f"Noise-suppressed microphone {cfg.name} (rtns)"
    props = (
        f'device.description="{description}" device.icon_name=audio-input-microphone '
        f"{PID_PROP}={os.getpid()}"
    )
    out = _pactl(
        "load-module",
        "module-pipe-source",
        f"source_name={cfg.name}",
        f'file="{fifo}"' if any(c.isspace() for c in str(fifo)) else f"file={fifo}",
        "format=float32le",
        f"rate={cfg.rate}",
        "channels=1",
        f"source_properties='{props}'",
    )
    try:
        return int(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SoundServerError(f"pactl load-module answered {out.strip()!r}") from None


def unload_module(index: int, timeout: float = PACTL_TIMEOUT_S) -> None:
    _pactl("unload-module", str(index), timeout=timeout)


# -- the writer -----------------------------------------------------------------------------------
class PipeStats(BaseModel):
    written_frames: int
    overruns: int
    overrun_frames: int
    #: Dropped while the server read nothing (nobody recording): not an over-run.
    unread_frames: int
    full_frames: int
    fill_s: float
    error: str | None


class PipeWriter:
    """Moves samples from a ring (filled by the audio callback) into a FIFO, on its own
    thread, so the callback never touches the FIFO.

    The callback calls :meth:`push` (no allocation, no lock, no blocking: a ring write and
    a one-byte non-blocking wake-up). The thread writes with non-blocking I/O and waits for
    the FIFO to take more with a timeout, so :meth:`stop` is always prompt.
    """

    def __init__(self, fd: int, rate: int, max_backlog_s: float = MAX_BACKLOG_S) -> None:
        self.fd = fd
        self.rate = int(rate)
        os.set_blocking(fd, False)
        capacity = max(int(2.0 * self.rate), 1)
        self.ring = RingBuffer(capacity)
        self.max_backlog = max(1, int(max_backlog_s * self.rate))
        self._buf = np.zeros(capacity, dtype=np.float32)
        self._pending = memoryview(b"")
        # Written by the callback thread only.
        self.full_frames = 0  # the ring itself full: the writer thread is stalled
        # Written by the writer thread only.
        self.written_frames = 0
        self.overruns = 0
        self.overrun_frames = 0
        self.unread_frames = 0
        self.fill_bytes = 0
        self._trimming = False
        self._counted = False  # this episode counted as an over-run
        self._mark = 0  # written_frames when this episode began
        self._mark_fill: int | None = None  # bytes in the FIFO then (None: unknown)
        self.error: str | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None

    # -- audio thread -------------------------------------------------------------------------
    def push(self, x: np.ndarray) -> None:
        """Queue ``x`` [n] float32 for the FIFO. Never blocks, never allocates."""
        taken = self.ring.write(x)
        if taken < x.shape[0]:
            self.full_frames += x.shape[0] - taken
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # wake-ups pending anyway
            pass

    # -- writer thread -------------------------------------------------------------------------
    def _trim(self) -> None:
        """Drop the oldest samples beyond the allowed backlog: unread frames while the
        server has read nothing since the backlog began, else an over-run (one per
        episode) and its frames."""
        pending_frames = len(self._pending) // 4
        excess = self.ring.readable() + pending_frames - self.max_backlog
        if excess <= 0:
            return
        if not self._trimming:
            self._trimming, self._counted, self._mark = True, False, self.written_frames
            self._mark_fill = self._queued_bytes()
        unread = not self._server_read()
        if not unread and not self._counted:
            self.overruns += 1
            self._counted = True
        dropped = 0
        if pending_frames:
            dropped = min(excess, pending_frames)
            self._pending = self._pending[dropped * 4 :]
        if excess > dropped:
            dropped += self.ring.discard(excess - dropped)
        if unread:
            self.unread_frames += dropped
        else:
            self.overrun_frames += dropped

    def _server_read(self) -> bool:
        """Whether the server has read from the FIFO since this episode began: what the FIFO
        held then, plus what was written since, less what it holds now. (That something
        was written is no proof: a short write into a full FIFO still lands in its last,
        partly filled page, and a write after a trim is short. Only where the FIFO's fill
        cannot be read does a write count as a read.)"""
        written = (self.written_frames - self._mark) * 4
        now = self._queued_bytes() if self._mark_fill is not None else None
        if self._mark_fill is None or now is None:
            return written > 0
        return self._mark_fill + written - now > 0

    def _queued_bytes(self) -> int | None:
        """Bytes in the FIFO not read yet (FIONREAD), None if it cannot tell."""
        buf = bytearray(4)
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, buf)
        except OSError:
            return None
        return int.from_bytes(buf, sys.byteorder)

    def step(self) -> bool:
        """One round of the writer thread: write what the FIFO takes, trim the rest to the
        allowed backlog, write again; False while the FIFO is full. Caught up, a later trim
        starts a new episode. (Writing before trimming lets a read the server made since the
        last round count before anything is dropped.)"""
        self._write_some()
        self._trim()
        blocked = not self._write_some()
        if not blocked:
            self._trimming = False
        self._fill()
        return not blocked

    def _write_some(self) -> bool:
        """Write what is pending (refilled from the ring); False when the FIFO is full."""
        while True:
            if not self._pending:
                n = self.ring.read_into(self._buf)
                if n == 0:
                    return True
                self._pending = memoryview(self._buf[:n]).cast("B")
            try:
                done = os.write(self.fd, self._pending)
            except BlockingIOError:
                return False
            # A pipe takes whole pages, so done is a whole number of samples.
            self.written_frames += done // 4
            self._pending = self._pending[done:]

    def _fill(self) -> None:
        fill = self._queued_bytes()
        if fill is not None:
            self.fill_bytes = fill

    def _run(self) -> None:
        try:
            blocked = False
            while not self._stop.is_set():
                wfds = [self.fd] if blocked else []
                ready, writable, _ = select.select([self._wake_r], wfds, [], 0.1)
                if ready:
                    os.read(self._wake_r, 4096)
                blocked = not self.step()
        except OSError as e:  # the server went away (EPIPE) or the FIFO is gone
            self.error = f"writing the virtual microphone's FIFO failed: {e.strerror or e}"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rtns-vmic-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass
            self._thread.join(timeout=2.0)
            self._thread = None

    def close(self) -> None:
        self.stop()
        close_quietly(self._wake_r, self._wake_w)

    def stats(self) -> PipeStats:
        return PipeStats(
            written_frames=self.written_frames,
            overruns=self.overruns,
            overrun_frames=self.overrun_frames,
            unread_frames=self.unread_frames,
            full_frames=self.full_frames,
            fill_s=self.fill_bytes / 4 / self.rate,
            error=self.error,
        )


def open_fifo(path: Path) -> tuple[int, str | None]:
    """Open the FIFO the server reads for writing (non-blocking) and shrink its kernel
    buffer to :data:`PIPE_BYTES`; returns the descriptor and, when the buffer could not be
    shrunk, why (the caller says so: up to 0.34 s of old audio may then wait in it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SoundServerError(
            f"cannot open the virtual microphone's FIFO {path}: {e.strerror} (is the sound "
            "server running as this user?)"
        ) from None
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError as e:  # an older kernel or a lower limit: the default size works too
        return fd, (
            f"could not shrink the FIFO's buffer to {PIPE_BYTES} bytes ({e.strerror}); "
            "an application that starts recording may get more old audio at first"
        )
    return fd, None


# -- the published microphone -------------------------------------------------------------------
class VirtualMic:
    """The input side of a :class:`~rtns.audio.LiveRunner` published as a server source.

    ``callback`` goes to a PortAudio *input* stream (float32, one channel). Each block of
    input is pushed into the runner's duplex callback with a preallocated scratch output
    block, and that output block goes to the FIFO: the virtual microphone gets exactly what
    a duplex stream would have played, with the same fixed delay and under-runs.
    """

    def __init__(self, runner: Any, writer: PipeWriter, max_block: int) -> None:
        self.runner = runner
        self.writer = writer
        self._out = np.zeros((max(int(max_block), 1), 1), dtype=np.float32)

    def callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio input callback: indata float32 [frames, 1]. Never blocks."""
        cap = self._out.shape[0]
        start = 0
        while start < frames:  # a host API may hand over more than a block at a time
            n = min(cap, frames - start)
            out = self._out[:n]
            self.runner.callback(indata[start : start + n], out, n, time_info, status)
            status = None  # counted once
            self.writer.push(out[:, 0])
            start += n


def pin_input_source(info: ServerInfo, name: str) -> str | None:
    """Keep rtns's own input off the virtual microphone: PulseAudio may make a new source
    the default input, and a MIC of `pulse` or `default` follows the default. Sets
    ``PULSE_SOURCE`` (read by libpulse when the ALSA plugin connects) to the current default
    unless the user set it; returns the pinned source or None."""
    if os.environ.get("PULSE_SOURCE") or not info.default_source or info.default_source == name:
        return None
    os.environ["PULSE_SOURCE"] = info.default_source
    return info.default_source
