"""Argument types and options shared by the sub-commands, so every command checks a number
or names a model the same way."""

from __future__ import annotations

import argparse
import math

from rtns.atten import AttenLimit, AttenLimitError

# Bounds of the numbers the commands take: one per quantity, used by every option of that
# quantity. Those that settings models also check (rtns.config.EngineConfig,
# rtns.daemon.server.ServerConfig) must equal theirs: tests/test_cli_options.py compares them.
#: onnxruntime / torch thread counts above this are refused as a likely typo.
MAX_THREADS = 64
#: Concurrent daemon sessions.
MAX_SESSIONS = 100_000
#: ZMQ_MAXMSGSIZE of the daemon: at least one 1 KiB frame, at most 1 GiB.
MIN_MESSAGE_BYTES = 1024
MAX_MESSAGE_BYTES = 1 << 30
#: Answers the daemon queues for a client that does not read: 64 KiB .. 64 GiB.
MIN_OUTPUT_BYTES = 1 << 16
MAX_OUTPUT_BYTES = 1 << 36
#: Rows in one batched inference call of the daemon.
MAX_BATCH = 1024
#: Device frames per PortAudio callback (256 ms at 16 kHz; 0 lets the host API choose).
MAX_BLOCK_FRAMES = 4096
#: Device sample rates of `rtns run`.
MIN_DEVICE_RATE = 8_000
MAX_DEVICE_RATE = 384_000
#: SCHED_FIFO priorities on Linux are 1..99 (0: normal scheduling).
MAX_RT_PRIORITY = 99
#: Timeouts and intervals: ZeroMQ polls take whole milliseconds as a C int (24.8 days);
#: a day is far beyond any useful wait.
MAX_WAIT_S = 86_400.0
#: Samples per `rtns stream` message (10 s at 16 kHz).
MAX_CHUNK = 160_000
#: Input one daemon session may queue, in seconds at 16 kHz: 60 s of 8 float32 channels is
#: 30 MB per session (the default is 6 s).
MAX_QUEUE_SECONDS = 60.0
#: `rtns run --duration`: a year.
MAX_DURATION_S = 366 * 86_400.0
#: `rtns make-testset`: pairs, crop length, SNR and level ranges, seed (numpy's 32 bits).
MAX_PAIRS = 1_000_000
MAX_CROP_S = 3_600.0
SNR_DB_RANGE = (-60.0, 100.0)
LEVEL_DBFS_RANGE = (-120.0, 0.0)
MAX_SEED = 2**32 - 1
#: `rtns train --average K`: snapshots averaged.
MAX_AVERAGE = 10_000


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        v = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def _at_least(kind: type[int] | type[float], low: float, *, strict: bool, message: str):
    """An argparse type: a finite ``kind`` >= ``low`` (> when ``strict``); ``message`` may
    use {text} and {v}."""

    def parse(text: str):
        v = kind(_number(text, kind))
        if v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(message.format(text=repr(text), v=v))
        return v

    return parse


positive_int = _at_least(int, 1, strict=False, message="{v} must be at least 1")
non_negative_int = _at_least(int, 0, strict=False, message="{v} must not be negative")
positive_float = _at_least(float, 0.0, strict=True, message="{text} must be a positive number")
non_negative_float = _at_least(
    float, 0.0, strict=False, message="{text} must be a non-negative number"
)


def between(kind: type[int] | type[float], low: float, high: float, *, low_open: bool = False):
    """An argparse type: a finite ``kind`` in ``low..high`` (``low`` itself excluded when
    ``low_open``); out of range: "V is out of range LOW..HIGH"."""

    def parse(text: str):
        v = kind(_number(text, kind))
        if v < low or v > high or (low_open and v == low):
            shown, lo, hi = (f"{b:g}" if kind is float else str(int(b)) for b in (v, low, high))
            if low_open:
                raise argparse.ArgumentTypeError(f"{shown} must be more than {lo} and at most {hi}")
            raise argparse.ArgumentTypeError(f"{shown} is out of range {lo}..{hi}")
        return v

    return parse


thread_count = between(int, 1, MAX_THREADS)
#: Daemon worker processes: one per core is the point; more than this is a typo.
MAX_WORKERS = 64
worker_count = between(int, 1, MAX_WORKERS)
port_number = between(int, 1, 65535)
#: The daemon's tick: more than one 8 ms hop would hold answers longer than a hop.
tick_ms = between(float, 0.0, 8.0, low_open=True)
session_count = between(int, 1, MAX_SESSIONS)
message_bytes = between(int, MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES)
batch_rows = between(int, 1, MAX_BATCH)
block_frames = between(int, 0, MAX_BLOCK_FRAMES)
device_rate = between(int, MIN_DEVICE_RATE, MAX_DEVICE_RATE)
rt_priority = between(int, 0, MAX_RT_PRIORITY)
chunk_samples = between(int, 1, MAX_CHUNK)
#: The daemon's output cap in MiB (--max-output-mb).
output_mib = between(float, MIN_OUTPUT_BYTES / 2**20, MAX_OUTPUT_BYTES / 2**20)
#: A timeout or an interval in seconds (> 0).
wait_seconds = between(float, 0.0, MAX_WAIT_S, low_open=True)
#: An interval in seconds where 0 means never.
interval_seconds = between(float, 0.0, MAX_WAIT_S)
#: `rtns serve --queue-seconds`.
queue_seconds = between(float, 0.0, MAX_QUEUE_SECONDS, low_open=True)
#: `rtns run --duration`.
duration_seconds = between(float, 0.0, MAX_DURATION_S, low_open=True)
pair_count = between(int, 1, MAX_PAIRS)
crop_seconds = between(float, 0.0, MAX_CROP_S, low_open=True)
snr_db = between(float, *SNR_DB_RANGE)
level_dbfs = between(float, *LEVEL_DBFS_RANGE)
seed = between(int, 0, MAX_SEED)
average_count = between(int, 1, MAX_AVERAGE)


def latency_hint(text: str) -> str | float:
    """PortAudio's suggested latency: ``low``, ``high`` or seconds (0 < s <= 10)."""
    if text.strip().lower() in ("low", "high"):
        return text.strip().lower()
    try:
        return between(float, 0.0, 10.0, low_open=True)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"use low, high or seconds: {e}") from None


def atten_limit(text: str) -> AttenLimit:
    """An attenuation limit: dB in 0..MAX_DB, or ``off`` (see :mod:`rtns.atten`)."""
    try:
        return AttenLimit.parse(text)
    except AttenLimitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def limit_text(limit: AttenLimit | float | None) -> str:
    """An attenuation limit for people: '18 dB' or 'off' (None means off, as in manifests)."""
    return "off" if limit is None else str(AttenLimit.parse(limit))


def one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``p`` report a bad argument as one line on stderr (``PROG: error: MESSAGE (see
    PROG --help)``, exit status 2) instead of argparse's usage block and the error."""

    def error(message: str):
        p.exit(2, f"{p.prog}: error: {message} (see `{p.prog} --help`)\n")

    p.error = error  # type: ignore[method-assign]
    return p


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model/-m PACK``: a pack name on the search path or a pack folder."""
    p.add_argument(
        "--model",
        "-m",
        metavar="PACK",
        help="pack name (see `rtns models`) or pack folder; default: rtns-gtcrn",
    )


def add_threads(p: argparse.ArgumentParser, what: str = "onnxruntime", default: int | None = 1):
    shown = "the library's default" if default is None else default
    p.add_argument(
        "--threads",
        type=thread_count,
        default=default,
        metavar="N",
        help=f"{what} threads ({shown})",
    )


def add_atten_lim(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--atten-lim",
        "--atten-lim-db",
        dest="atten_lim",
        type=atten_limit,
        default=None,
        metavar="DB",
        help="remove at most DB dB of noise, or 'off' for no limit (default: the pack's "
        "own, shown by `rtns models`)",
    )


def source_name(text: str) -> str:
    """A sound-server source name for ``--virtual-mic`` (see :data:`rtns.vmic.NAME_RX`)."""
    from rtns.errors import UserInputError
    from rtns.vmic import check_name

    try:
        return check_name(text)
    except UserInputError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None


def add_metrics(p: argparse.ArgumentParser, what: str) -> None:
    """``--metrics-port PORT`` and ``--metrics-addr ADDR`` (Prometheus, off by default)."""
    p.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help=f"serve {what} on http://ADDR:PORT/metrics (default: off)",
    )
    p.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (default: 127.0.0.1; it has no authentication)",
    )


def add_quiet(p: argparse.ArgumentParser, what: str = "no progress bar or summary") -> None:
    p.add_argument("--quiet", "-q", action="store_true", help=what)
