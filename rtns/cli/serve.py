"""``rtns serve`` (the ZeroMQ daemon), ``rtns stream`` (a file through a daemon) and
``rtns keys`` (CurveZMQ key pairs). zmq, soxr and onnxruntime are imported when run."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from rtns.cli import options
from rtns.errors import UserInputError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the noise-suppression daemon (ZeroMQ ROUTER, see docs/protocol.md)",
        description=(
            "Serve many concurrent client streams over ZeroMQ, batching their hops into one "
            "inference call per model. Plaintext on loopback; any other address needs CurveZMQ "
            "keys (--curve-secret, --allowed-clients; make them with `rtns keys`). SIGTERM "
            "flushes every open session and exits."
        ),
    )
    p.add_argument("--bind", default=DEFAULT_ENDPOINT, help=f"endpoint ({DEFAULT_ENDPOINT})")
    p.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="PACK",
        help="pack name or folder; repeat to serve several (the first is the default)",
    )
    p.add_argument("--max-sessions", type=options.positive_int, default=256, metavar="N")
    p.add_argument(
        "--idle-timeout",
        type=options.positive_float,
        default=30.0,
        metavar="S",
        help="seconds (30)",
    )
    p.add_argument(
        "--queue-seconds",
        type=options.positive_float,
        default=6.0,
        metavar="S",
        help="input queued per session before queue_full (6 s)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=options.positive_int,
        default=262_144,
        metavar="B",
        help="ZMQ_MAXMSGSIZE: larger frames drop the connection (262144)",
    )
    p.add_argument(
        "--no-batch", action="store_true", help="one inference per session and hop (comparison)"
    )
    p.add_argument(
        "--max-batch",
        type=options.positive_int,
        default=64,
        metavar="N",
        help="most rows per inference call; the start-up probe checks every size up to it (64)",
    )
    options.add_threads(p)
    p.add_argument("--curve-secret", metavar="FILE", help="server secret key (NAME.key_secret)")
    p.add_argument(
        "--allowed-clients", metavar="DIR", help="folder of allowed clients' public *.key files"
    )
    p.add_argument(
        "--require-curve",
        "--curve",
        action="store_true",
        help="refuse to start without CURVE keys, even on loopback",
    )
    p.add_argument(
        "--stats-every",
        type=options.non_negative_float,
        default=60.0,
        metavar="S",
        help="log a stats line every S seconds (60; 0: never)",
    )
    p.add_argument("--log-format", choices=("json", "kv"), default="json")
    p.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    p.set_defaults(func=run_serve)

    p = sub.add_parser(
        "stream",
        help="stream an audio file through a running daemon",
        description=(
            "Stream IN through `rtns serve` in real-time-sized chunks (or --fast) and write what "
            "comes back to OUT: same rate, channels, length, format and alignment as "
            "`rtns enhance IN OUT` with the same model, and the same samples."
        ),
    )
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--endpoint", "-e", default=DEFAULT_ENDPOINT)
    p.add_argument("--model", "-m", metavar="NAME", help="model name on the server")
    p.add_argument("--fast", action="store_true", help="as fast as the server allows")
    p.add_argument(
        "--chunk",
        type=options.positive_int,
        default=320,
        metavar="N",
        help="samples per message at 16 kHz",
    )
    options.add_atten_lim(p)
    p.add_argument("--timeout", type=options.positive_float, default=10.0, metavar="S")
    p.add_argument("--server-key", metavar="FILE", help="server public key (enables CURVE)")
    p.add_argument("--client-key", metavar="FILE", help="this client's secret key")
    options.add_quiet(p, "no summary")
    p.set_defaults(func=run_stream)

    p = sub.add_parser(
        "keys",
        help="make a CurveZMQ key pair for `rtns serve` / `rtns stream`",
        description=(
            "Write OUT_DIR/NAME.key (public; give it to the other side, or put it in the "
            "server's --allowed-clients folder) and OUT_DIR/NAME.key_secret (mode 600)."
        ),
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--name", default="rtns", help="file name stem (rtns)")
    p.set_defaults(func=run_keys)


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    """Structured logs to stderr: JSON lines or key=value."""
    from rtns.server import JsonLogFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else _KvFormatter())
    root = logging.getLogger("rtns")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class _KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {"level": record.levelname.lower(), "event": record.getMessage()}
        fields |= getattr(record, "fields", {}) or {}
        parts = [f"ts={record.created:.3f}"]
        for k, v in fields.items():
            s = str(v)
            parts.append(f"{k}={s!r}" if (" " in s or "=" in s or not s) else f"{k}={s}")
        return " ".join(parts)


def run_serve(args: argparse.Namespace) -> int:
    from rtns.server import CurveConfig, Server, ServerConfig

    setup_logging(args.log_format, args.log_level)
    curve = None
    if args.curve_secret or args.allowed_clients:
        if not (args.curve_secret and args.allowed_clients):
            raise UserInputError("CURVE needs both --curve-secret and --allowed-clients")
        curve = CurveConfig(
            server_secret=Path(args.curve_secret), allowed_clients=Path(args.allowed_clients)
        )
        if not curve.server_secret.is_file():
            raise UserInputError(f"{curve.server_secret}: no such key file")
    elif args.require_curve:
        raise UserInputError("--require-curve: pass --curve-secret and --allowed-clients")
    from rtns.config import EngineConfig

    config = ServerConfig(
        bind=args.bind,
        models=args.model or ["rtns-dtln"],
        max_sessions=args.max_sessions,
        idle_timeout=args.idle_timeout,
        queue_limit=max(128, round(args.queue_seconds * 16_000)),
        max_message_bytes=args.max_message_bytes,
        batch=not args.no_batch,
        max_batch=args.max_batch,
        stats_every=args.stats_every,
        curve=curve,
        engine=EngineConfig(threads=args.threads),
    )
    server = Server(config)

    def on_signal(signum: int, _frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run()
    return 0


def run_stream(args: argparse.Namespace) -> int:
    import numpy as np

    from rtns import audio_io
    from rtns.client import Client

    t0 = time.perf_counter()
    out_path = audio_io.check_output_path(args.output)
    audio = audio_io.read_audio(args.input)
    sr = 16_000
    # Resample exactly as `rtns enhance` does (whole file, soxr HQ), so the samples match.
    x = np.ascontiguousarray(audio_io.resample(audio.samples, audio.sample_rate, sr))
    with Client(
        args.endpoint,
        timeout=args.timeout,
        server_key=args.server_key,
        client_key=args.client_key,
    ) as client:
        y = client.enhance(
            x,
            sr,
            chunk=args.chunk,
            realtime=not args.fast,
            model=args.model,
            atten_lim_db=args.atten_lim,
        )
        model = client.ready.model if client.ready else "?"
    y = audio_io.resample(y, sr, audio.sample_rate, frames_out=audio.frames)
    fmt = audio_io.output_format(out_path)
    report = audio_io.write_audio(
        out_path, y, audio.sample_rate, audio_io.output_subtype(audio.subtype, fmt)
    )
    if report.clipped:
        print(
            f"rtns: warning: {report.clipped} output samples exceeded full scale and were "
            f"clipped for {report.subtype}",
            file=sys.stderr,
        )
    if not args.quiet:
        took = time.perf_counter() - t0
        print(
            f"rtns: {out_path}: {audio.duration:.2f} s, {audio.sample_rate} Hz, "
            f"{audio.channels} ch, model {model} via {args.endpoint}, {took:.2f} s",
            file=sys.stderr,
        )
    return 0


def write_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A CurveZMQ pair in zmq.auth's certificate format: (public file, secret file)."""
    import zmq

    public, secret = zmq.curve_keypair()
    out_dir.mkdir(parents=True, exist_ok=True)
    pub_path, sec_path = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    for p in (pub_path, sec_path):
        if p.exists():
            raise UserInputError(f"{p}: already exists; refusing to overwrite a key")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    head = f"#   ****  Generated on {stamp} UTC by rtns keys  ****\n"
    pub_path.write_text(
        head + "#   ZeroMQ CURVE Public Certificate\n\nmetadata\ncurve\n"
        f'    public-key = "{public.decode("ascii")}"\n'
    )
    fd = os.open(sec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            head + "#   ZeroMQ CURVE **Secret** Certificate\n"
            "#   DO NOT PROVIDE THIS FILE TO OTHER USERS\n\nmetadata\ncurve\n"
            f'    public-key = "{public.decode("ascii")}"\n'
            f'    secret-key = "{secret.decode("ascii")}"\n'
        )
    return pub_path, sec_path


def run_keys(args: argparse.Namespace) -> int:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        raise UserInputError(f"--name {args.name!r}: use letters, digits, '_', '.', '-'")
    pub, sec = write_keypair(Path(args.out_dir), args.name)
    print(f"rtns: wrote {pub} (public) and {sec} (secret, mode 600)", file=sys.stderr)
    return 0
