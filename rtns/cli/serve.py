"""``rtns serve`` (the ZeroMQ daemon), ``rtns stream`` (a file through a daemon) and
``rtns keys`` (CurveZMQ key pairs). zmq and onnxruntime are imported when run."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from rtns.cli import options
from rtns.errors import UserInputError
from rtns.framing import SAMPLE_RATE

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_serve(sub)
    _add_stream(sub)
    _add_keys(sub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the noise-suppression daemon (ZeroMQ ROUTER, see docs/protocol.md)",
        description=(
            "Serve many concurrent client streams over ZeroMQ, batching their hops into one "
            "inference call per model. Plaintext on loopback; any other address needs CurveZMQ "
            "keys (--curve-secret, --allowed-clients; make them with `rtns keys`). SIGTERM "
            "drains: no new sessions (`draining`), open ones run for up to --drain-seconds, "
            "then are flushed, and the daemon exits 0; SIGINT flushes at once."
        ),
    )
    p.add_argument(
        "--bind",
        type=bind_endpoint,
        default=DEFAULT_ENDPOINT,
        help=f"endpoint: tcp://HOST:PORT, ipc://PATH ({DEFAULT_ENDPOINT})",
    )
    p.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="PACK",
        help="pack name or folder; repeat to serve several (the first is the default); "
        "default: rtns-dtln, the pack that keeps the most real-time clients per core",
    )
    p.add_argument(
        "--max-sessions",
        type=options.session_count,
        default=256,
        metavar="N",
        help=f"1..{options.MAX_SESSIONS} (256)",
    )
    _add_serve_limits(p)
    _add_serve_operations(p)
    options.one_line_errors(p)
    p.set_defaults(func=run_serve)


def _add_serve_limits(p: argparse.ArgumentParser) -> None:
    """Sessions, queues, messages, batching and the clock."""
    p.add_argument(
        "--idle-timeout",
        type=options.wait_seconds,
        default=30.0,
        metavar="S",
        help="seconds (30)",
    )
    p.add_argument(
        "--queue-seconds",
        type=options.queue_seconds,
        default=6.0,
        metavar="S",
        help=f"input queued per session before queue_full (0..{options.MAX_QUEUE_SECONDS:g}; 6 s)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=options.message_bytes,
        default=262_144,
        metavar="B",
        help=f"ZMQ_MAXMSGSIZE: larger frames drop the connection; "
        f"{options.MIN_MESSAGE_BYTES}..{options.MAX_MESSAGE_BYTES} (262144)",
    )
    p.add_argument(
        "--no-batch", action="store_true", help="one inference per session and hop (comparison)"
    )
    p.add_argument(
        "--max-batch",
        type=options.batch_rows,
        default=128,
        metavar="N",
        help="most rows per inference call; the start-up probe checks every size up to it "
        f"(1..{options.MAX_BATCH}; 128)",
    )
    options.add_threads(p)
    p.add_argument(
        "--tick-ms",
        type=options.tick_ms,
        default=4.0,
        metavar="MS",
        help="collect hops every MS ms (4; at most 8, one hop)",
    )
    p.add_argument(
        "--max-sessions-per-peer",
        type=options.session_count,
        default=None,
        metavar="N",
        help="sessions one client may hold: one CurveZMQ key, or without CURVE one "
        "connection (default: half of --max-sessions)",
    )
    p.add_argument(
        "--max-output-mb",
        type=options.output_mib,
        default=64.0,
        metavar="MB",
        help="answers queued for a client that does not read, in MiB, before they are "
        "dropped and counted (64)",
    )


def _add_serve_operations(p: argparse.ArgumentParser) -> None:
    """Security, workers, metrics, logs."""
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
        type=options.interval_seconds,
        default=60.0,
        metavar="S",
        help="log a stats line every S seconds (60; 0: never)",
    )
    p.add_argument(
        "--metrics-port",
        type=options.port_number,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (see docs/operations.md)",
    )
    p.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (127.0.0.1)",
    )
    p.add_argument(
        "--workers",
        type=options.worker_count,
        default=None,
        metavar="N",
        help="batching worker processes behind the one address, each session pinned to one "
        "(default: the cores this process may use)",
    )
    p.add_argument(
        "--capacity",
        type=capacity_arg,
        default="auto",
        metavar="auto|off|N",
        help="admission control: refuse a session with `busy` when its channels would "
        "take the open streams past the measured capacity (auto), N channel streams, or "
        "off (only --max-sessions); see docs/operations.md",
    )
    p.add_argument(
        "--capacity-headroom",
        type=headroom_share,
        default=0.7,
        metavar="F",
        help="share of the loop's time the measured capacity may fill (0..1; 0.7)",
    )
    p.add_argument(
        "--drain-seconds",
        type=drain_seconds,
        default=30.0,
        metavar="S",
        help="after SIGTERM, open sessions may run this long before they are flushed "
        "(0..86400; 30); /readyz says 503 meanwhile",
    )
    p.add_argument(
        "--allow-stats-reset",
        action="store_true",
        help="let clients reset the stats counters (benchmarks)",
    )
    p.add_argument("--log-format", choices=("json", "kv"), default="json")
    p.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")


def _add_stream(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--endpoint",
        "-e",
        type=connect_endpoint,
        action="append",
        help=f"the daemon: tcp://HOST:PORT or ipc://PATH ({DEFAULT_ENDPOINT}); repeat for "
        "fallbacks, tried in order when one is busy, draining, full or silent",
    )
    p.add_argument("--model", "-m", metavar="NAME", help="model name on the server")
    p.add_argument("--fast", action="store_true", help="as fast as the server allows")
    p.add_argument(
        "--chunk",
        type=options.chunk_samples,
        default=320,
        metavar="N",
        help=f"samples per message at 16 kHz (1..{options.MAX_CHUNK}; 320)",
    )
    options.add_atten_lim(p)
    p.add_argument(
        "--timeout",
        type=options.wait_seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for each answer (10)",
    )
    p.add_argument("--server-key", metavar="FILE", help="server public key (enables CURVE)")
    p.add_argument("--client-key", metavar="FILE", help="this client's secret key")
    options.add_quiet(p, "no summary")
    from rtns.cli.files import add_force

    add_force(p)
    options.one_line_errors(p)
    p.set_defaults(func=run_stream)


def _add_keys(sub: argparse._SubParsersAction) -> None:
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
    options.one_line_errors(p)
    p.set_defaults(func=run_keys)


_ENDPOINT_HELP = "use tcp://HOST:PORT or ipc://PATH"
drain_seconds = options.between(float, 0.0, 86_400.0)
headroom_share = options.between(float, 0.0, 1.0, low_open=True)
_capacity_streams = options.between(int, 1, 1_000_000)


def capacity_arg(text: str) -> str | int:
    """``auto``, ``off`` or a number of channel streams (1..1000000)."""
    if text.strip().lower() in ("auto", "off"):
        return text.strip().lower()
    try:
        return _capacity_streams(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"use auto, off or a number of streams: {e}") from None


def _endpoint(text: str, *, bind: bool) -> str:
    """A ZeroMQ endpoint rtns can use: tcp://HOST:PORT (PORT 1..65535; ``*`` for either
    part when binding), ipc://PATH or inproc://NAME."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an endpoint; {_ENDPOINT_HELP}")
    if not rest:
        raise argparse.ArgumentTypeError(f"{text!r} has no address; {_ENDPOINT_HELP}")
    if scheme != "tcp":
        return text
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise argparse.ArgumentTypeError(f"{text!r} has no port; {_ENDPOINT_HELP}")
    if host == "*" and not bind:
        raise argparse.ArgumentTypeError(f"{text!r}: '*' is only for --bind; give the host")
    if port == "*" and bind:
        return text
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be 1..65535")
    return text


def bind_endpoint(text: str) -> str:
    return _endpoint(text, bind=True)


def connect_endpoint(text: str) -> str:
    return _endpoint(text, bind=False)


def _key_file(path: str, option: str, *, secret: bool) -> None:
    """Refuse a missing or malformed CurveZMQ certificate file with one line."""
    import zmq.auth

    if not Path(path).is_file():
        raise UserInputError(f"{option} {path}: no such key file (make one with `rtns keys DIR`)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserInputError(f"{option} {path}: not a CurveZMQ key file ({e})") from None
    if public is None or (secret and secret_key is None):
        what = "secret key file (NAME.key_secret)" if secret else "public key file"
        raise UserInputError(f"{option} {path}: not a {what}")


def _curve_config(args: argparse.Namespace):
    """--curve-secret and --allowed-clients, checked (None: plaintext)."""
    from rtns.daemon.server import CurveConfig, load_client_keys

    if args.curve_secret or args.allowed_clients:
        if not (args.curve_secret and args.allowed_clients):
            raise UserInputError("CURVE needs both --curve-secret and --allowed-clients")
        _key_file(args.curve_secret, "--curve-secret", secret=True)
        load_client_keys(Path(args.allowed_clients))
        return CurveConfig(
            server_secret=Path(args.curve_secret), allowed_clients=Path(args.allowed_clients)
        )
    if args.require_curve:
        raise UserInputError("--require-curve: pass --curve-secret and --allowed-clients")
    return None


def server_config(args: argparse.Namespace):
    """The daemon's ServerConfig from ``rtns serve``'s arguments."""
    from pydantic import ValidationError

    from rtns.config import EngineConfig
    from rtns.daemon.server import ServerConfig
    from rtns.errors import first_validation_error
    from rtns.pack import DEFAULT_SERVE_PACK

    curve = _curve_config(args)
    try:
        return ServerConfig(
            freeze_gc=True,  # this process is the daemon's own
            bind=args.bind,
            models=args.model or [DEFAULT_SERVE_PACK],
            max_sessions=args.max_sessions,
            idle_timeout=args.idle_timeout,
            queue_limit=max(128, round(args.queue_seconds * SAMPLE_RATE)),
            max_message_bytes=args.max_message_bytes,
            batch=not args.no_batch,
            max_batch=args.max_batch,
            tick_ms=args.tick_ms,
            metrics=args.metrics_port is not None,
            stats_every=args.stats_every,
            drain_seconds=args.drain_seconds,
            capacity=args.capacity,
            headroom=args.capacity_headroom,
            max_sessions_per_peer=args.max_sessions_per_peer,
            max_output_bytes=round(args.max_output_mb * 2**20),
            allow_stats_reset=args.allow_stats_reset,
            curve=curve,
            engine=EngineConfig(threads=args.threads),
        )
    except ValidationError as e:  # the options' types should have refused it already
        where, msg = first_validation_error(e)
        raise UserInputError(f"rtns serve: {where}: {msg}") from None


def run_serve(args: argparse.Namespace) -> int:
    from rtns.daemon.logs import setup_logging
    from rtns.daemon.server import Server

    setup_logging(args.log_format, args.log_level)
    config = server_config(args)
    workers = args.workers or len(os.sched_getaffinity(0))
    if workers > 1:
        from rtns.daemon.workers import Supervisor

        server = _start(
            lambda: Supervisor(config, workers, args.log_format, args.log_level), args.bind
        )
    else:
        server = _start(lambda: Server(config), args.bind)
    if args.metrics_port is not None:
        from rtns.daemon.metrics import serve_metrics

        registry = None if workers > 1 else server.metrics.registry
        try:
            serve_metrics(
                args.metrics_port,
                args.metrics_addr,
                registry,
                server.alive,
                server.readiness,
                server.draining,
            )
        except OSError as e:
            if workers > 1:
                server.remove_files()
            raise UserInputError(
                f"--metrics-port {args.metrics_port}: cannot listen on "
                f"{args.metrics_addr} ({e.strerror})"
            ) from None

    def on_signal(signum: int, _frame: object) -> None:
        # SIGTERM (systemd, Kubernetes): drain; SIGINT (Ctrl-C), or a second SIGTERM: now.
        if signum == signal.SIGTERM and not drained:
            drained.append(signum)
            server.drain()
        else:
            server.stop()

    drained: list[int] = []
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run()
    return 0


def _start(make, endpoint: str):
    """``make()``, with ZeroMQ's errors (address in use, bad interface) as one line."""
    import zmq

    try:
        return make()
    except zmq.ZMQError as e:
        raise UserInputError(f"{endpoint}: {e}") from None


def run_stream(args: argparse.Namespace) -> int:
    from rtns import audio_io
    from rtns.daemon.client import connect
    from rtns.daemon.protocol import MAX_CHANNELS

    t0 = time.perf_counter()
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            raise UserInputError("CURVE needs both --server-key and --client-key")
        _key_file(args.server_key, "--server-key", secret=False)
        _key_file(args.client_key, "--client-key", secret=True)
    audio_io.output_format(args.output)
    audio_io.output_target(args.output, [args.input], args.force)
    audio = audio_io.read_audio(args.input)
    if audio.channels > MAX_CHANNELS:
        raise UserInputError(
            f"{args.input}: {audio.channels} channels; the daemon's protocol carries at most "
            f"{MAX_CHANNELS} (split the file, or use `rtns enhance`)"
        )
    plan = audio_io.plan_output(
        args.output, audio.channels, audio.sample_rate, audio.subtype, [args.input], args.force
    )
    # The session resamples and splits bands exactly as `rtns enhance` does (one
    # ChannelStream), so the file goes at its own rate and the samples match.
    x = audio.samples
    endpoints = args.endpoint or [DEFAULT_ENDPOINT]
    keys = {"server_key": args.server_key, "client_key": args.client_key}
    client = _start(
        lambda: connect(
            endpoints,
            sample_rate=audio.sample_rate,
            channels=audio.channels,
            model=args.model,
            atten_lim_db=args.atten_lim,
            timeout=args.timeout,
            **keys,
        ),
        ", ".join(endpoints),
    )
    with client:
        chunk = max(1, args.chunk * audio.sample_rate // SAMPLE_RATE)
        y = client.stream(x, chunk=chunk, realtime=not args.fast)
        model = client.ready.model if client.ready else "?"
    report = audio_io.write_audio(plan, y)
    if report.clipped:
        print(
            f"rtns: warning: {report.clipped} output samples exceeded full scale and were "
            f"clipped for {report.subtype}",
            file=sys.stderr,
        )
    if not args.quiet:
        took = time.perf_counter() - t0
        print(
            f"rtns: {plan.path}: {audio.duration:.2f} s, {audio.sample_rate} Hz, "
            f"{audio.channels} ch, model {model} via {client.endpoint}, {took:.2f} s",
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
