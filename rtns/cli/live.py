"""``rtns devices`` (= ``rtns --list-devices``) and ``rtns run``: live noise suppression
between a microphone and a speaker through a PortAudio duplex stream."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from rtns.cli import options
from rtns.errors import RtnsError, UserInputError

RUN_HELP = """\
Runs the model between an input and an output device (mono, float32). Devices that do not
run at 16 kHz are resampled in the process. Status goes to stderr once a second:
RTF (worker compute time / audio time), under-runs (callbacks the worker was late for;
the missing samples play as silence and the delay stays fixed), PortAudio's xrun flags,
and the latency. Controls on stdin: `b` + Enter toggles bypass, `a DB` + Enter sets the
attenuation limit (`a` alone: unlimited), `q` + Enter quits; SIGUSR1 toggles bypass;
Ctrl-C stops and prints a summary."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "devices",
        help="list audio devices",
        description="List PortAudio devices: index, name, host API, channels, default rate.",
    )
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
        type=options.positive_int,
        metavar="HZ",
        help="device sample rate (default: 16000 if both devices support it, else the input's default rate)",
    )
    p.add_argument(
        "--blocksize",
        type=options.non_negative_int,
        default=0,
        metavar="FRAMES",
        help="frames per callback; 0 (default) lets the host API choose, which adds no buffering",
    )
    p.add_argument(
        "--pa-latency",
        default="low",
        metavar="L",
        help="PortAudio suggested latency: low, high or seconds (default: low)",
    )
    p.add_argument(
        "--duration", type=options.positive_float, metavar="SEC", help="stop after SEC seconds"
    )
    p.add_argument(
        "--rt-priority",
        type=options.non_negative_int,
        default=None,
        metavar="N",
        help="SCHED_FIFO priority of the inference thread (default: 4, below JACK's client "
        "threads; 0: normal scheduling)",
    )
    p.add_argument("--bypass", action="store_true", help="start in bypass")
    options.add_quiet(p, "no once-a-second status line")
    p.set_defaults(func=run_live)


# -- rtns devices ------------------------------------------------------------------------
def run_devices(args: argparse.Namespace) -> int:
    from rtns.audio import format_devices, import_sounddevice

    sd = import_sounddevice()
    devices = list(sd.query_devices())
    print(format_devices(devices, sd.query_hostapis(), list(sd.default.device)))
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


def _pa_latency(text: str) -> str | float:
    if text in ("low", "high"):
        return text
    try:
        return float(text)
    except ValueError:
        raise UserInputError(f"--pa-latency must be low, high or seconds, got {text!r}") from None


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


def _stdin_controls(runner: Any, stop: threading.Event) -> None:
    """Read control lines from stdin until EOF (runs on a daemon thread)."""
    for line in sys.stdin:
        cmd = line.strip().split()
        if not cmd:
            continue
        try:
            if cmd[0] == "b":
                runner.set_bypass(None)
                print("rtns: bypass toggled", file=sys.stderr, flush=True)
            elif cmd[0] == "a":
                db = float(cmd[1]) if len(cmd) > 1 and cmd[1] != "off" else None
                runner.set_atten_lim_db(db)
                print(
                    f"rtns: attenuation limit {options.limit_text(db)}",
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


def run_live(args: argparse.Namespace) -> int:
    from rtns.audio import LiveRunner, import_sounddevice
    from rtns.config import SAMPLE_RATE, EngineConfig
    from rtns.engine import Model

    sd = import_sounddevice()
    devices = list(sd.query_devices())
    if not devices:
        raise UserInputError("no audio devices found (no sound card, or no sound server running)")
    i = _pick_device(sd, args.input, devices, "input")
    o = _pick_device(sd, args.output, devices, "output")
    if args.blocksize < 0:
        raise UserInputError(f"--blocksize must be >= 0, got {args.blocksize}")
    # Devices first: their errors are cheaper to find than a pack's.
    rate = _pick_rate(sd, i, o, devices, args.samplerate, SAMPLE_RATE)
    model = Model(args.model, EngineConfig(threads=1))
    rt = {} if args.rt_priority is None else {"rt_priority": args.rt_priority}
    runner = LiveRunner(model, rate, **rt)
    if args.atten_lim is not None:  # else the pack's default
        runner.set_atten_lim_db(args.atten_lim)
    if args.bypass:
        runner.set_bypass(True)

    stop = threading.Event()
    old_handlers = {}

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    def on_usr1(signum: int, frame: Any) -> None:
        # Python runs signal handlers on the main thread, between bytecodes: printing is safe.
        runner.set_bypass(None)
        print("rtns: bypass toggled (SIGUSR1)", file=sys.stderr, flush=True)

    old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must stop the stream even when rtns was started with SIGINT ignored (a
    # background job of a non-interactive shell inherits SIG_IGN, and Python then never
    # installs its KeyboardInterrupt handler).
    old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, on_term)
    if hasattr(signal, "SIGUSR1"):
        old_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_usr1)

    try:
        stream = sd.Stream(
            device=(i, o),
            samplerate=rate,
            blocksize=args.blocksize,
            channels=(1, 1),
            dtype="float32",
            latency=_pa_latency(args.pa_latency),
            callback=runner.callback,
        )
    except Exception as e:  # PortAudioError, ValueError
        runner.close()
        raise RtnsError(
            f"cannot open the audio stream on devices {i} -> {o} at {rate} Hz: {e}"
        ) from None

    print(
        f"rtns: {model.name} from [{i}] {devices[i]['name']} to [{o}] {devices[o]['name']} "
        f"at {rate} Hz, attenuation limit {options.limit_text(runner.stream.atten_lim_db)}",
        file=sys.stderr,
        flush=True,
    )
    lat_ms = float("nan")
    try:
        runner.start()
        stream.start()
        if not runner.primed.wait(5.0):
            raise RtnsError("the audio stream delivered no callback within 5 s")
        lat = runner.latency(stream.latency)
        lat_ms = lat.total_s * 1e3
        print(f"rtns: {lat.describe()}", file=sys.stderr, flush=True)
        print(
            f"rtns: inference thread scheduling: {runner.worker_scheduling}",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=_stdin_controls, args=(runner, stop), daemon=True).start()
        t_end = None if args.duration is None else time.monotonic() + args.duration
        next_status = time.monotonic() + 1.0
        prev = runner.stats()
        while not stop.is_set():
            now = time.monotonic()
            wait = next_status - now
            if t_end is not None:
                wait = min(wait, t_end - now)
            stop.wait(max(wait, 0.0))
            if runner.failed.is_set():
                raise RtnsError(f"inference failed: {runner.error}")
            if not stream.active:
                raise RtnsError("the audio stream stopped (device removed or sound server gone)")
            now = time.monotonic()
            if t_end is not None and now >= t_end:
                break
            if now >= next_status:
                next_status += 1.0
                if not args.quiet:
                    stats = runner.stats()
                    print(_status_line(stats, prev, lat_ms), file=sys.stderr, flush=True)
                    prev = stats
    except KeyboardInterrupt:
        pass
    finally:
        try:
            stream.stop()
            stream.close()
        finally:
            runner.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
    print(_summary(runner.stats(), lat_ms), file=sys.stderr, flush=True)
    return 0
