"""The shared argument types of the sub-commands."""

from __future__ import annotations

import argparse

import pytest

from rtns.cli import build_parser, options


@pytest.mark.parametrize(
    "fn, good, bad",
    [
        (options.positive_int, {"1": 1, "64": 64}, ["0", "-2", "1.5", "x", ""]),
        (options.thread_count, {"1": 1, "64": 64}, ["0", "65", "two"]),
        (options.non_negative_int, {"0": 0, "7": 7}, ["-1", "nan"]),
        (options.positive_float, {"0.5": 0.5, "3": 3.0}, ["0", "-1", "inf", "nan", "x"]),
        (options.non_negative_float, {"0": 0.0, "12.5": 12.5}, ["-0.1", "inf", "nan"]),
    ],
)
def test_argument_types(fn, good, bad):
    for text, want in good.items():
        assert fn(text) == want
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["enhance", "a.wav", "b.wav", "--threads", "0"],
        ["enhance", "a.wav", "b.wav", "--atten-lim", "-3"],
        ["run", "--atten-lim", "nan"],
        ["run", "--duration", "0"],
        ["run", "--blocksize", "-1"],
        ["serve", "--threads", "100"],
        ["stream", "a.wav", "b.wav", "--atten-lim", "-1"],
        ["train", "--config", "c.json", "--threads", "0"],
        ["make-testset", "c", "n", "o", "--count", "0"],
    ],
)
def test_every_command_refuses_bad_numbers(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_same_options_same_spelling():
    """--model/-m, --threads, --atten-lim and --quiet/-q parse alike wherever they appear."""
    p = build_parser()
    a = p.parse_args(["enhance", "i", "o", "-m", "x", "--threads", "2", "--atten-lim", "6", "-q"])
    b = p.parse_args(["run", "-m", "x", "--atten-lim-db", "6", "-q"])
    assert (a.model, a.threads, a.atten_lim, a.quiet) == ("x", 2, 6.0, True)
    assert (b.model, b.atten_lim, b.quiet) == ("x", 6.0, True)
