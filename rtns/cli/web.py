"""``rtns web``: the browser page and its WebSocket (docs/web.md). aiohttp and the engine are
imported only when the command runs."""

from __future__ import annotations

import argparse

from rtns.cli import options
from rtns.errors import UserInputError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "web",
        help="serve a page that enhances the microphone and dropped files in a browser",
        description=(
            "Serve a page (http://HOST:PORT/) that streams the browser's microphone through "
            "rtns and plays the enhanced voice back, and enhances dropped files; and a "
            "WebSocket (/ws, docs/protocol.md) for other apps. Without --endpoint the model "
            "runs in this process; with it, sessions go to a running `rtns serve`. Needs "
            "aiohttp: pip install 'rtns[web]'."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument(
        "--port", type=options.between(int, 0, 65535), default=8080, help="TCP port (8080; 0: any)"
    )
    p.add_argument(
        "--endpoint",
        metavar="URL",
        help="a running `rtns serve` (tcp://HOST:PORT) to send sessions to, instead of "
        "running the model here",
    )
    p.add_argument("--server-key", metavar="FILE", help="with --endpoint: the server's key")
    p.add_argument("--client-key", metavar="FILE", help="with --endpoint: this client's key")
    options.add_model(p)
    options.add_threads(p)
    p.add_argument(
        "--max-sessions",
        type=options.between(int, 1, 10_000),
        default=16,
        metavar="N",
        help="concurrent WebSocket sessions (16)",
    )
    p.add_argument(
        "--idle-timeout",
        type=options.wait_seconds,
        default=30.0,
        metavar="S",
        help="end a session after S seconds without a message (30)",
    )
    p.add_argument(
        "--hello-timeout",
        type=options.wait_seconds,
        default=10.0,
        metavar="S",
        help="close a WebSocket that sends no hello within S seconds (10)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=options.between(float, 0.0, 4096.0, low_open=True),
        default=64.0,
        metavar="MB",
        help="largest dropped file (64 MiB)",
    )
    p.set_defaults(func=run_web)


def run_web(args: argparse.Namespace) -> int:
    import asyncio

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UserInputError("rtns web needs aiohttp: pip install 'rtns[web]'") from None
    from rtns.web.server import WebConfig, serve
    from rtns.web.sessions import LocalBackend, RemoteBackend

    if args.endpoint:
        if args.model:
            raise UserInputError(
                "--model picks the in-process model; with --endpoint the daemon's default "
                "model serves the sessions"
            )
        backend = RemoteBackend(args.endpoint, args.server_key, args.client_key)
    else:
        from rtns.cli.files import load_model

        backend = LocalBackend(load_model(args.model, args.threads))
    config = WebConfig(
        host=args.host,
        port=args.port,
        max_sessions=args.max_sessions,
        idle_timeout=args.idle_timeout,
        hello_timeout=args.hello_timeout,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    try:
        asyncio.run(serve(backend, config))
    finally:
        backend.close()
    return 0
