"""The ``rtns`` command. Each sub-command lives in its own module of this package, which
registers its parser in ``add_parsers`` and imports heavy dependencies only when run
(``import rtns.cli`` must stay light and must never import torch)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rtns import __version__
from rtns.errors import RtnsError

#: Modules under rtns.cli that define ``add_parsers(subparsers)``.
COMMAND_MODULES = ("files", "train", "serve", "live", "service", "web")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtns",
        description="Real-time streaming noise suppression (16 kHz, 32 ms blocks, 8 ms hops).",
    )
    parser.add_argument("--version", action="version", version=f"rtns {__version__}")
    parser.add_argument(
        "--list-devices", action="store_true", help="list audio devices and exit (= rtns devices)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"rtns.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"rtns.cli.{name}":
                raise
            continue
        mod.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_devices:
        args = parser.parse_args(["devices"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RtnsError as e:
        print(f"rtns: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rtns: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
