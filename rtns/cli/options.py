"""Argument types and options shared by the sub-commands, so every command checks a number
or names a model the same way."""

from __future__ import annotations

import argparse
import math

#: onnxruntime / torch thread counts above this are refused as a likely typo.
MAX_THREADS = 64


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


def thread_count(text: str) -> int:
    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{v} is out of range 1..{MAX_THREADS}")
    return v


def atten_limit(text: str) -> float:
    """An attenuation limit in dB, or ``off`` (math.inf: no limit)."""
    if text.strip().lower() in ("off", "none", "inf", "unlimited"):
        return math.inf
    return non_negative_float(text)


def limit_text(db: float | None) -> str:
    """An attenuation limit for people: '18 dB' or 'off' (None or inf)."""
    return "off" if db is None or math.isinf(db) else f"{db:g} dB"


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model/-m PACK``: a pack name on the search path or a pack folder."""
    p.add_argument(
        "--model",
        "-m",
        metavar="PACK",
        help="pack name (see `rtns models`) or pack folder; default: rtns-dtln",
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


def add_quiet(p: argparse.ArgumentParser, what: str = "no progress bar or summary") -> None:
    p.add_argument("--quiet", "-q", action="store_true", help=what)
