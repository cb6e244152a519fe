"""``rtns devices`` (= ``rtns --list-devices``) and ``rtns run``: live noise suppression
between a microphone and a speaker through a PortAudio duplex stream."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from rtns.cli import options
from rtns.errors import RtnsError, UserInputError
from rtns.signals import SignalSafeEvent

RUN_HELP = """\
Runs the model between an input and an output device (mono, float32). Devices that do not
run at 16 kHz are resampled in the process. Status goes to stderr once a second:
RTF (worker compute time / audio time), under-runs (callbacks the worker was late for;
the missing samples play as silence and the delay stays fixed), PortAudio's xrun flags,
and the latency. Controls on the terminal (read only when stdin is a terminal and rtns
runs in its foreground, so `rtns run ... &` is never stopped for reading it): `b` + Enter
toggles bypass, `a DB` + Enter sets the attenuation limit (`a` alone: unlimited), `q` +
Enter quits; SIGUSR1 toggles bypass; Ctrl-C or SIGTERM stops and prints a summary (a
second one while the stream is stopping exits at once).

With --virtual-mic NAME there is no output device: the enhanced signal becomes an input
device NAME of the PulseAudio/PipeWire server (module-pipe-source fed through a FIFO by a
writer thread), at the same fixed delay, with the same under-run accounting; the status
line adds the FIFO's over-runs (samples dropped because a recording application fell
behind), the seconds discarded while no application recorded from NAME, and its fill.
The source is removed when rtns stops; one left by a crash is removed at the next start.

Exit status: 0 when stopped; 1 when the stream dies (no callback for 0.5 s or more, e.g.
the sound server quit or the device was removed) or does not stop within 1 s. Then rtns
prints the summary and one error line and leaves at once (os._exit), without PortAudio's
cleanup, which blocks or aborts when the sound server is gone."""

#: How long the main loop sleeps between checks of the stream (liveness, the worker's
#: health). Signals wake it at once; few wake-ups leave the GIL to the audio threads.
POLL_S = 0.1
#: How long PortAudio gets to start a stream, to stop and close a live one, and to abort a
#: dead one, before rtns gives up on it.
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 1.0
ABORT_TIMEOUT_S = 0.3


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "devices",
        help="list audio devices",
        description="List PortAudio devices: index, name, host API, channels, default rate.",
    )
    options.one_line_errors(p)
    p.set_defaults(func=run_devices)

    p = sub.add_parser(
        "run",
        help="live noise suppression from an input device to an output device",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-i",
        "--input",
        metavar="MIC",
        help="input device: index or name part (default: system default)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="SPK",
        help="output device: index or name part (default: system default)",
    )
    options.add_model(p)
    options.add_atten_lim(p)
    p.add_argument(
        "--samplerate",
        type=options.device_rate,
        metavar="HZ",
        help="device sample rate (default: 16000 if both devices support it, else the input's default rate)",
    )
    p.add_argument(
        "--blocksize",
        type=options.block_frames,
        default=0,
        metavar="FRAMES",
        help=f"frames per callback, 0..{options.MAX_BLOCK_FRAMES}; 0 (default) lets the host "
        "API choose, which adds no buffering",
    )
    p.add_argument(
        "--pa-latency",
        type=options.latency_hint,
        default="low",
        metavar="L",
        help="PortAudio suggested latency: low, high or seconds (default: low)",
    )
    p.add_argument(
        "--duration",
        type=options.duration_seconds,
        metavar="SEC",
        help="stop after SEC seconds (at most a year)",
    )
    p.add_argument(
        "--rt-priority",
        type=options.rt_priority,
        default=None,
        metavar="N",
        help=f"SCHED_FIFO priority of the inference thread, 0..{options.MAX_RT_PRIORITY} "
        "(default: 4, below JACK's client threads; 0: normal scheduling)",
    )
    p.add_argument("--bypass", action="store_true", help="start in bypass")
    p.add_argument(
        "--virtual-mic",
        type=options.source_name,
        metavar="NAME",
        help="publish the enhanced input as microphone NAME in the running PulseAudio or "
        "PipeWire (pipewire-pulse) server instead of playing it (no -o; 48 kHz mono; "
        "removed when rtns stops; see docs/desktop.md)",
    )
    options.add_metrics(p, "live-path Prometheus metrics (RTF, under-runs, xruns, latency)")
    options.add_quiet(p, "no once-a-second status line")
    options.one_line_errors(p)
    p.set_defaults(func=run_live)


# -- rtns devices ------------------------------------------------------------------------
def run_devices(args: argparse.Namespace) -> int:
    from rtns.audio import format_devices, import_sounddevice

    sd = import_sounddevice()
    devices = list(sd.query_devices())
    table = format_devices(devices, sd.query_hostapis(), list(sd.default.device))
    if not devices:  # a failure a script must see, not a listing
        raise UserInputError(table)
    print(table)
    return 0


# -- rtns run ----------------------------------------------------------------------------
def _pick_device(sd: Any, spec: str | None, devices: list[dict], kind: str) -> int:
    from rtns.audio import resolve_device

    if spec is not None:
        return resolve_device(spec, devices, kind)
    idx = sd.default.device[0 if kind == "input" else 1]
    if idx is None or idx < 0:
        raise UserInputError(
            f"there is no default {kind} device; pass one (`rtns devices` lists them)"
        )
    return resolve_device(str(idx), devices, kind)


def _pick_rate(
    sd: Any, i: int, o: int, devices: list[dict], wanted: int | None, engine_rate: int
) -> int:
    """The duplex rate: ``wanted``, else the engine's rate if both devices take it, else
    the input's (then the output's) default rate."""

    def ok(rate: int) -> str | None:
        try:
            sd.check_input_settings(device=i, channels=1, dtype="float32", samplerate=rate)
            sd.check_output_settings(device=o, channels=1, dtype="float32", samplerate=rate)
        except Exception as e:  # sounddevice raises PortAudioError or ValueError
            return str(e)
        return None

    if wanted is not None:
        err = ok(wanted)
        if err:
            raise UserInputError(
                f"the devices do not run at {wanted} Hz ({err}); their default rates are "
                f"{devices[i]['default_samplerate']:.0f} / {devices[o]['default_samplerate']:.0f} Hz"
            )
        return wanted
    candidates = [
        engine_rate,
        int(devices[i]["default_samplerate"]),
        int(devices[o]["default_samplerate"]),
    ]
    errors = []
    for rate in dict.fromkeys(candidates):
        err = ok(rate)
        if err is None:
            return rate
        errors.append(f"{rate} Hz: {err}")
    raise UserInputError(
        f"no common sample rate for input {i} and output {o} ({'; '.join(errors)}); try --samplerate"
    )


def _status_line(stats: Any, prev: Any, lat_ms: float) -> str:
    """One status line; RTF over the interval since ``prev`` (an earlier snapshot)."""
    audio = stats.processed_s - prev.processed_s
    rtf = (stats.busy_s - prev.busy_s) / audio if audio > 0 else 0.0
    return (
        f"[{stats.seconds:7.1f} s] RTF {rtf:.3f} (max hop {stats.max_hop_s * 1e3:.2f} ms)"
        f"  under-runs {stats.underruns}  PortAudio in-overflow {stats.pa_input_overflow}"
        f" out-underflow {stats.pa_output_underflow}  latency {lat_ms:.1f} ms"
        f"  bypass {'on' if stats.bypass else 'off'}  limit {options.limit_text(stats.atten_lim_db)}"
    )


def _summary(stats: Any, lat_ms: float) -> str:
    return (
        f"rtns: stopped after {stats.seconds:.1f} s: {stats.callbacks} callbacks,"
        f" {stats.underruns} under-runs ({stats.underrun_frames} frames),"
        f" PortAudio input overflows {stats.pa_input_overflow},"
        f" output underflows {stats.pa_output_underflow},"
        f" dropped in/out {stats.input_dropped}/{stats.output_dropped},"
        f" RTF {stats.rtf:.3f}, max hop {stats.max_hop_s * 1e3:.2f} ms, latency {lat_ms:.3f} ms"
    )


def stdin_controls_allowed(
    fd: int,
    isatty: Callable[[int], bool] = os.isatty,
    tcgetpgrp: Callable[[int], int] = os.tcgetpgrp,
    getpgrp: Callable[[], int] = os.getpgrp,
) -> bool:
    """May rtns read controls from ``fd`` now? Only when it is a terminal and this process
    is in the terminal's foreground process group: a background job that reads its
    terminal is stopped by SIGTTIN (`rtns run ... &` would freeze), and a pipe or
    /dev/null is not a person typing."""
    try:
        return isatty(fd) and tcgetpgrp(fd) == getpgrp()
    except OSError:  # not our controlling terminal, or it went away
        return False


def _terminal_lines(fd: int, stop: threading.Event) -> Iterator[str]:
    """Lines typed on the terminal ``fd``, read only while rtns is in the foreground
    (``fg``/``bg`` may move it at any time) and until ``stop`` or end of input."""
    pending = b""
    while not stop.is_set():
        try:
            ready, _, _ = select.select([fd], [], [], 0.2)
        except (OSError, ValueError):
            return
        if not ready or not stdin_controls_allowed(fd):
            if ready:
                stop.wait(0.2)  # input waits for the foreground; do not spin on it
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")


def _stdin_controls(runner: Any, stop: threading.Event, lines: Iterable[str]) -> None:
    """Apply control lines until they end or ``q`` (runs on a daemon thread)."""
    for line in lines:
        cmd = line.strip().split()
        if not cmd:
            continue
        try:
            if cmd[0] == "b":
                runner.set_bypass(None)
                print("rtns: bypass toggled", file=sys.stderr, flush=True)
            elif cmd[0] == "a":
                limit = " ".join(cmd[1:]) or "off"
                runner.set_atten_lim(limit)
                print(
                    f"rtns: attenuation limit {options.limit_text(limit)}",
                    file=sys.stderr,
                    flush=True,
                )
            elif cmd[0] == "q":
                stop.set()
                return
            else:
                print(
                    "rtns: controls: b (bypass), a DB (attenuation limit), q (quit)",
                    file=sys.stderr,
                    flush=True,
                )
        except (ValueError, RtnsError) as e:
            print(f"rtns: {e}", file=sys.stderr, flush=True)


def _bounded(fn: Callable[[], Any], timeout: float) -> bool:
    """Run ``fn()`` on a daemon thread; True if it returned (or raised) within ``timeout`` s.

    PortAudio calls can block for seconds or for ever when the sound server is gone (JACK:
    ``Pa_StopStream``/``Pa_CloseStream``), and a thread blocked in C never runs Python
    signal handlers; waiting here instead keeps the main thread responsive to signals.
    """
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except Exception:  # an error while stopping a stream changes nothing for the user
            pass
        finally:
            done.set()

    threading.Thread(target=target, name="rtns-portaudio", daemon=True).start()
    return done.wait(timeout)


def _leave_now(lines: list[str], code: int) -> None:
    """Write ``lines`` to stderr and exit at once (``os._exit``): no atexit handlers, so no
    ``Pa_Terminate``, which blocks or aborts (pa_jack.c Terminate assertion) when the sound
    server died under an open stream. Safe inside a signal handler."""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os.write(2, "".join(line + "\n" for line in lines).encode())
    os._exit(code)


def _pick_input_rate(sd: Any, i: int, devices: list[dict], wanted: int) -> int:
    """The virtual microphone's rate ``wanted`` (48 kHz unless --samplerate) on input ``i``."""
    try:
        sd.check_input_settings(device=i, channels=1, dtype="float32", samplerate=wanted)
    except Exception as e:  # sounddevice raises PortAudioError or ValueError
        raise UserInputError(
            f"input {i} ({devices[i]['name']}) does not run at {wanted} Hz ({e}); its default "
            f"rate is {devices[i]['default_samplerate']:.0f} Hz (--samplerate)"
        ) from None
    return wanted


class _VirtualMicSetup:
    """The server side of --virtual-mic: checked and cleaned before the devices are opened,
    published once the model is loaded, and removed on every way out (a context manager
    whose exit removes it and keeps any problem in :attr:`problem`)."""

    def __init__(self, name: str) -> None:
        from rtns import vmic

        self.vmic = vmic
        self.name = name
        self.info = vmic.server_info()  # one line when no server runs
        if not self.info.local:
            raise vmic.SoundServerError(
                f"the sound server ({self.info.name}) is not on this machine; --virtual-mic "
                "hands it a FIFO, so it needs a local one"
            )
        note = vmic.remove_leftover(name)
        if note:
            print(f"rtns: {note}", file=sys.stderr, flush=True)
        pinned = vmic.pin_input_source(self.info, name)
        if pinned:
            print(
                f"rtns: input pinned to source {pinned} (PULSE_SOURCE), so the new virtual "
                "microphone never becomes rtns's own input",
                file=sys.stderr,
                flush=True,
            )
        self.module: int | None = None
        self.fd: int | None = None
        self.writer: Any = None
        self.mic: Any = None
        #: Why removing it failed (set on leaving the ``with`` block), or None.
        self.problem: str | None = None

    def __enter__(self) -> _VirtualMicSetup:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.problem = self.remove()
        if self.problem and exc_type is not None:  # the exception's line must not hide it
            print(f"rtns: error: {self.problem}", file=sys.stderr, flush=True)

    def publish(self, runner: Any, rate: int, block: int) -> None:
        vmic = self.vmic
        cfg = vmic.VirtualMicConfig(name=self.name, rate=rate)
        fifo = vmic.fifo_path(self.name)
        self.module = vmic.load_pipe_source(cfg, fifo)
        self.fd, note = vmic.open_fifo(fifo)
        if note:
            print(f"rtns: warning: {note}", file=sys.stderr, flush=True)
        self.writer = vmic.PipeWriter(self.fd, rate)
        self.mic = vmic.VirtualMic(runner, self.writer, block)
        self.writer.start()

    def remove(self) -> str | None:
        """Stop the writer, close the FIFO, unload the source; returns a problem or None.
        Safe to call more than once and from a signal handler."""
        if self.writer is not None:
            self.writer.close()
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        module, self.module = self.module, None
        if module is None:
            return None
        try:
            self.vmic.unload_module(module, timeout=self.vmic.CLEANUP_TIMEOUT_S)
        except RtnsError as e:
            return f"could not remove the virtual microphone {self.name!r}: {e}"
        return None

    def status(self) -> str:
        w = self.writer.stats()
        return (
            f"  vmic over-runs {w.overruns} ({w.overrun_frames + w.full_frames} frames)"
            f" unrecorded {w.unread_frames / self.writer.rate:.1f} s"
            f" pipe {w.fill_s * 1e3:.1f} ms"
        )

    def summary(self) -> str:
        w = self.writer.stats()
        rate = self.writer.rate
        unread = ""
        if w.unread_frames:
            unread = f", {w.unread_frames / rate:.1f} s discarded while no application recorded"
        return (
            f"rtns: virtual microphone {self.name}: {w.written_frames / rate:.1f} s written,"
            f" {w.overruns} over-runs ({w.overrun_frames + w.full_frames} frames dropped)"
            f"{unread}"
        )

    def check(self) -> str | None:
        """The writer's failure (another way for the stream to fail), or None."""
        err = self.writer.stats().error
        return f"{err} (sound server gone?)" if err else None


@contextlib.contextmanager
def _signal_handlers(handlers: dict[int, Callable[[int, Any], None]]) -> Iterator[None]:
    """``handlers`` (signal number -> handler) installed for the ``with`` block; the
    previous ones are back on every way out."""
    old: dict[int, Any] = {}
    try:
        for sig, handler in handlers.items():
            old[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _stop_and_close(stream: Any, how: str) -> None:
    try:
        getattr(stream, how)()  # "stop" or "abort"
    finally:
        stream.close()


class _OpenStream:
    """The PortAudio stream as a context manager: leaving the ``with`` block any way
    aborts and closes it (bounded, :func:`_bounded`) unless :meth:`stop` or :meth:`abort`
    already did."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.done = False

    def stop(self) -> bool:
        """Stop and close; False when it did not within :data:`STOP_TIMEOUT_S`."""
        self.done = True
        return _bounded(lambda: _stop_and_close(self.stream, "stop"), STOP_TIMEOUT_S)

    def abort(self, timeout: float = ABORT_TIMEOUT_S) -> None:
        self.done = True
        _bounded(lambda: _stop_and_close(self.stream, "abort"), timeout)

    def __enter__(self) -> _OpenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.abort(STOP_TIMEOUT_S)


class _Devices(NamedTuple):
    """What ``rtns run`` opens: the input, the output (None for --virtual-mic), the rate,
    the block size and the buffering margin in blocks."""

    sd: Any
    devices: list[dict]
    input: int
    output: int | None
    rate: int
    blocksize: int
    margin: int


def _pick_devices(args: argparse.Namespace, vm: _VirtualMicSetup | None) -> _Devices:
    from rtns.audio import import_sounddevice
    from rtns.framing import SAMPLE_RATE

    sd = import_sounddevice()
    devices = list(sd.query_devices())
    if not devices:
        raise UserInputError("no audio devices found (no sound card, or no sound server running)")
    i = _pick_device(sd, args.input, devices, "input")
    if vm is not None:
        from rtns.vmic import DEFAULT_BLOCK_S, DEFAULT_RATE, MARGIN_BLOCKS

        rate = _pick_input_rate(sd, i, devices, args.samplerate or DEFAULT_RATE)
        blocksize = args.blocksize or round(rate * DEFAULT_BLOCK_S)
        return _Devices(sd, devices, i, None, rate, blocksize, MARGIN_BLOCKS)
    o = _pick_device(sd, args.output, devices, "output")
    # Devices first: their errors are cheaper to find than a pack's.
    rate = _pick_rate(sd, i, o, devices, args.samplerate, SAMPLE_RATE)
    return _Devices(sd, devices, i, o, rate, args.blocksize, 0)


def _open_stream(args: argparse.Namespace, dev: _Devices, callback: Callable) -> _OpenStream:
    """The input stream (--virtual-mic) or the duplex stream, opened, not started."""
    common = dict(
        samplerate=dev.rate,
        blocksize=dev.blocksize,
        dtype="float32",
        latency=args.pa_latency,
        callback=callback,
    )
    try:
        if dev.output is None:
            return _OpenStream(dev.sd.InputStream(device=dev.input, channels=1, **common))
        return _OpenStream(dev.sd.Stream(device=(dev.input, dev.output), channels=(1, 1), **common))
    except RtnsError:
        raise
    except Exception as e:  # PortAudioError, ValueError
        where = (
            f"device {dev.input}" if dev.output is None else f"devices {dev.input} -> {dev.output}"
        )
        raise RtnsError(f"cannot open the audio stream on {where} at {dev.rate} Hz: {e}") from None


class _Live:
    """What the signal handlers and the ways out of ``rtns run`` share: the runner, the
    virtual microphone, the latency once known, and the stop and stopping events."""

    def __init__(self, runner: Any, vm: _VirtualMicSetup | None) -> None:
        self.runner = runner
        self.vm = vm
        # Set by the signal handlers, which may interrupt this very thread inside stop.wait().
        self.stop = SignalSafeEvent()
        self.stopping = SignalSafeEvent()  # set once the stream is being stopped
        self.lat_ms = [float("nan")]  # written by _run_stream once the stream is primed

    def summary_lines(self) -> list[str]:
        lines = [_summary(self.runner.stats(), self.lat_ms[0])]
        if self.vm is not None and self.vm.writer is not None:
            lines.append(self.vm.summary())
        return lines

    def leave(self, lines: list[str], code: int) -> None:
        """Remove the virtual microphone (if any), then :func:`_leave_now`."""
        if self.vm is not None:
            problem = self.vm.remove()
            if problem:
                lines = [*lines, f"rtns: error: {problem}"]
        _leave_now(lines, code)

    def on_term(self, signum: int, frame: Any) -> None:
        if self.stopping.is_set():  # stuck stopping the stream: give up on it
            sig = signal.Signals(signum).name
            self.leave(
                [
                    *self.summary_lines(),
                    f"rtns: error: {sig} while stopping the audio stream; left without closing it",
                ],
                128 + signum,
            )
        self.stop.set()

    def on_usr1(self, signum: int, frame: Any) -> None:
        # The handler may interrupt the main thread inside its own print() to stderr (a
        # status line): a second print would be a re-entrant call into the same buffered
        # writer, so write the descriptor. set_bypass queues on a re-entrant SimpleQueue.
        self.runner.set_bypass(None)
        os.write(2, b"rtns: bypass toggled (SIGUSR1)\n")

    def handlers(self) -> dict[int, Callable[[int, Any], None]]:
        # Ctrl-C must stop the stream even when rtns was started with SIGINT ignored (a
        # background job of a non-interactive shell inherits SIG_IGN, and Python then never
        # installs its KeyboardInterrupt handler).
        handlers = {signal.SIGTERM: self.on_term, signal.SIGINT: self.on_term}
        if hasattr(signal, "SIGUSR1"):
            handlers[signal.SIGUSR1] = self.on_usr1
        return handlers

    def finish(self, stream: _OpenStream, failure: str | None, dead: bool) -> None:
        """Stop the stream after :func:`_run_stream`; leave at once (os._exit) when it is
        dead or does not stop."""
        self.stopping.set()
        if dead:
            # The host API stopped calling back: stopping or closing the stream may never
            # return, and PortAudio's exit handler may abort. Try briefly, then leave.
            stream.abort()
            self.leave([*self.summary_lines(), f"rtns: error: {failure}"], 1)
        if not stream.stop():
            self.leave(
                [
                    *self.summary_lines(),
                    f"rtns: error: the audio stream did not stop within {STOP_TIMEOUT_S:g} s "
                    "(sound server gone?); left without closing it",
                ],
                1,
            )


def _metrics_registry(live: _Live) -> Any:
    """The live path's metrics as ``rtns run`` publishes them: the runner's counters, the
    latency once the stream is primed, the virtual microphone's writer (if any)."""
    from rtns.daemon.metrics import live_registry

    vm = live.vm
    return live_registry(
        live.runner, lambda: live.lat_ms[0] / 1e3, vm.writer if vm is not None else None
    )


def _serve_metrics(args: argparse.Namespace, live: _Live) -> Any:
    """The metrics server of --metrics-port (None without it)."""
    if args.metrics_port is None:
        return None
    from rtns.daemon.metrics import serve_metrics

    try:
        return serve_metrics(args.metrics_port, args.metrics_addr, _metrics_registry(live))
    except OSError as e:
        raise UserInputError(
            f"--metrics-port {args.metrics_port}: cannot listen on "
            f"{args.metrics_addr} ({e.strerror})"
        ) from None


def _banner(args: argparse.Namespace, dev: _Devices, live: _Live, metrics: bool) -> None:
    from rtns.cli.files import model_label

    i, o, rate = dev.input, dev.output, dev.rate
    where = (
        f"to [{o}] {dev.devices[o]['name']}"
        if o is not None
        else f"publishing microphone {args.virtual_mic!r} ({rate / 1000:g} kHz mono)"
    )
    limit = options.limit_text(live.runner.stats().atten_lim_db)
    print(
        f"rtns: {model_label(live.runner.model)} from [{i}] {dev.devices[i]['name']} {where} "
        f"at {rate} Hz, attenuation limit {limit}",
        file=sys.stderr,
        flush=True,
    )
    if metrics:
        print(
            f"rtns: metrics on http://{args.metrics_addr}:{args.metrics_port}/metrics",
            file=sys.stderr,
            flush=True,
        )


def run_live(args: argparse.Namespace) -> int:
    """``rtns run``. Everything it sets up (the worker, the virtual microphone, the signal
    handlers, the stream, the metrics server) is undone by the ``with`` block on every way
    out; only the leaps out of a dead or stuck stream (os._exit) skip it, and they remove
    the virtual microphone themselves."""
    from rtns.audio import LiveRunner, set_thread_scheduling
    from rtns.config import EngineConfig
    from rtns.engine import Model

    name = getattr(args, "virtual_mic", None)
    if name and args.output is not None:
        raise UserInputError("--virtual-mic publishes the output as a microphone; leave out -o")
    # The sound server first: without one there is nothing to publish to.
    vm = _VirtualMicSetup(name) if name else None
    dev = _pick_devices(args, vm)
    model = Model(args.model, EngineConfig(threads=1))
    rt = {} if args.rt_priority is None else {"rt_priority": args.rt_priority}
    with contextlib.ExitStack() as stack:
        runner = stack.enter_context(LiveRunner(model, dev.rate, margin_blocks=dev.margin, **rt))
        stack.callback(set_thread_scheduling, 0)  # _run_stream raises this thread's priority
        # Applied at once (the worker has not started), so the banner shows what is in force.
        if args.atten_lim is not None:  # else the pack's default
            runner.set_atten_lim(args.atten_lim)
        if args.bypass:
            runner.set_bypass(True)
        live = _Live(runner, vm)
        if vm is not None:
            stack.enter_context(vm)  # removed after the handlers are restored
        stack.enter_context(_signal_handlers(live.handlers()))
        if vm is not None:
            vm.publish(runner, dev.rate, dev.blocksize)
        stream = stack.enter_context(
            _open_stream(args, dev, vm.mic.callback if vm is not None else runner.callback)
        )
        metrics_server = _serve_metrics(args, live)
        if metrics_server is not None:
            stack.callback(metrics_server.shutdown)
        _banner(args, dev, live, metrics_server is not None)
        failure, dead = _run_stream(
            args,
            stream.stream,
            runner,
            live.stop,
            live.lat_ms,
            extra_status=vm.status if vm is not None else None,
            check=vm.check if vm is not None else None,
        )
        live.finish(stream, failure, dead)
        lines = live.summary_lines()
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    problem = vm.problem if vm is not None else None
    if vm is not None and problem is None:
        print(f"rtns: virtual microphone {name} removed", file=sys.stderr, flush=True)
    if failure:
        raise RtnsError(failure)
    if problem:
        raise RtnsError(problem)
    return 0


def _run_stream(
    args: argparse.Namespace,
    stream: Any,
    runner: Any,
    stop: threading.Event,
    lat_ms: list,
    extra_status: Callable[[], str] | None = None,
    check: Callable[[], str | None] | None = None,
) -> tuple[str | None, bool]:
    """Start the stream and watch it until ``stop``, ``--duration`` or a failure.

    ``extra_status``: appended to each status line; ``check``: another way to fail (a
    message, or None while all is well), polled with the stream's liveness.

    Returns (why it failed or None, whether the stream is dead). Waits in slices of
    :data:`POLL_S` so signals, a dead stream and the worker's failure are noticed at once.
    This thread and the controls thread run at SCHED_FIFO :data:`CONTROL_RT_PRIORITY`
    (when real-time is requested) so they never hold the GIL while preempted.
    """
    from rtns.audio import CONTROL_RT_PRIORITY, set_thread_scheduling

    runner.start()
    control_rt = min(CONTROL_RT_PRIORITY, runner.rt_priority)
    set_thread_scheduling(control_rt)  # undone by run_live when the stream is stopped
    if not _bounded(stream.start, START_TIMEOUT_S):
        return f"the audio stream did not start within {START_TIMEOUT_S:g} s", True
    failed = _wait_primed(stream, runner, stop)
    if failed is not None:
        return failed
    lat = _note_latency(stream, runner, lat_ms)
    print(f"rtns: {lat.describe()}", file=sys.stderr, flush=True)
    print(
        f"rtns: inference thread scheduling: {runner.worker_scheduling}",
        file=sys.stderr,
        flush=True,
    )
    _start_controls(runner, stop, control_rt)
    t_end = None if args.duration is None else time.monotonic() + args.duration
    next_status = time.monotonic() + 1.0
    prev = runner.stats()
    while not stop.is_set():
        stop.wait(POLL_S)
        if runner.failed.is_set():
            return f"inference failed: {runner.error}", False
        why = runner.dead(_active(stream))
        if why:
            return why, True
        why = check() if check is not None else None
        if why:
            return why, False
        now = time.monotonic()
        if t_end is not None and now >= t_end:
            break
        if now >= next_status:
            next_status += 1.0
            if not args.quiet:
                stats = runner.stats()
                line = _status_line(stats, prev, lat_ms[0])
                if extra_status is not None:
                    line += extra_status()
                print(line, file=sys.stderr, flush=True)
                prev = stats
    return None, False


def _note_latency(stream: Any, runner: Any, lat_ms: list) -> Any:
    """The primed stream's delay (the runner's buffering plus PortAudio's), kept in
    ``lat_ms[0]`` for the status lines, the summary and the metrics; returns it."""
    pa_latency = stream.latency
    if not isinstance(pa_latency, (tuple, list)):  # an input-only stream: one number
        pa_latency = (pa_latency, 0.0)
    lat = runner.latency(pa_latency)
    lat_ms[0] = lat.total_s * 1e3
    return lat


def _active(stream: Any) -> bool:
    try:
        return bool(stream.active)
    except Exception:  # PortAudioError: the stream is unusable
        return False


def _wait_primed(stream: Any, runner: Any, stop: threading.Event) -> tuple[str | None, bool] | None:
    """Wait for the first callbacks (the runner's plan): None once primed, else what
    :func:`_run_stream` returns ((None, False) on ``stop``)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not runner.primed.wait(POLL_S):
        if runner.failed.is_set():
            return f"inference failed: {runner.error}", False
        if stop.is_set():
            return None, False
        if not _active(stream) or time.monotonic() > deadline:
            return f"the audio stream delivered no callback within {START_TIMEOUT_S:g} s", True
    return None


def _start_controls(runner: Any, stop: threading.Event, control_rt: int) -> None:
    """Read controls from the terminal on a daemon thread, when rtns may
    (:func:`stdin_controls_allowed`)."""
    from rtns.audio import set_thread_scheduling

    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):  # no stdin, or not a real file
        return
    if fd < 0 or not stdin_controls_allowed(fd):
        return
    lines = _terminal_lines(fd, stop)

    def controls() -> None:
        set_thread_scheduling(control_rt)
        _stdin_controls(runner, stop, lines)

    threading.Thread(target=controls, name="rtns-controls", daemon=True).start()
