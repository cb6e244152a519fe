"""The shared argument types of the sub-commands."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import soundfile as sf
from cli_helpers import run_rtns

from rtns.atten import OFF, AttenLimit
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
    assert (a.model, a.threads, a.atten_lim, a.quiet) == ("x", 2, AttenLimit(6), True)
    assert (b.model, b.atten_lim, b.quiet) == ("x", AttenLimit(6), True)
    # one bound for the limit everywhere: 200 dB is the top, 'off' is no limit
    for cmd in (["enhance", "i", "o"], ["run"], ["stream", "i", "o"]):
        assert p.parse_args([*cmd, "--atten-lim", "off"]).atten_lim == OFF
        with pytest.raises(SystemExit):
            p.parse_args([*cmd, "--atten-lim", "300"])


def test_bounds_agree_with_the_settings_models():
    """The options' bounds are the settings models' bounds (one bound per quantity)."""
    from rtns.config import EngineConfig
    from rtns.daemon.server import ServerConfig

    def bounds(model, name):
        meta = model.model_fields[name].metadata
        return (
            next((m.ge for m in meta if hasattr(m, "ge")), None),
            next((m.le for m in meta if hasattr(m, "le")), None),
        )

    assert bounds(EngineConfig, "threads") == (1, options.MAX_THREADS)
    assert bounds(ServerConfig, "max_sessions") == (1, options.MAX_SESSIONS)
    assert bounds(ServerConfig, "max_batch") == (1, options.MAX_BATCH)
    assert bounds(ServerConfig, "max_message_bytes") == (
        options.MIN_MESSAGE_BYTES,
        options.MAX_MESSAGE_BYTES,
    )
    assert bounds(ServerConfig, "max_output_bytes") == (
        options.MIN_OUTPUT_BYTES,
        options.MAX_OUTPUT_BYTES,
    )
    assert bounds(ServerConfig, "queue_limit")[1] == options.MAX_QUEUE_SECONDS * 16000
    assert bounds(ServerConfig, "idle_timeout")[1] == options.MAX_WAIT_S
    assert bounds(ServerConfig, "stats_every")[1] == options.MAX_WAIT_S
    assert bounds(ServerConfig, "max_sessions_per_peer")[1] == options.MAX_SESSIONS


def _typed_options(parser: argparse.ArgumentParser, prog: str = "rtns"):
    """(command, option, type) of every option with a type, in every sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _typed_options(sub, f"{prog} {name}")
        elif action.type is not None:
            yield prog, "/".join(action.option_strings) or action.dest, action.type


def test_every_number_option_has_a_bound():
    """Issue 31 (11): `rtns serve --queue-seconds 1e12` was accepted (unbounded memory per
    session), `--atten-lim inf` / `1e400` were silently 'off'. Every option that takes a
    number (found by walking the parsers, so a new option is covered too) refuses infinity,
    NaN and absurdly large or small values."""
    numeric = 0
    for prog, opt, kind in _typed_options(build_parser()):
        try:
            sample = kind("1")
        except (argparse.ArgumentTypeError, ValueError):
            sample = None
        if not isinstance(sample, int | float | AttenLimit):
            continue  # names, endpoints
        numeric += 1
        for text in ("inf", "-inf", "nan", "1e400", "-1e400", str(10**15), str(-(10**15))):
            with pytest.raises((argparse.ArgumentTypeError, ValueError)):
                kind(text)
                pytest.fail(f"{prog} {opt} accepted {text}")
    assert numeric >= 25


# Each case: arguments, and what the one error line must name. Before the bounds were in
# the option types, the serve cases were pydantic tracebacks, --blocksize 100000 reached
# PortAudio, and the stream endpoints were ZMQError tracebacks.
OUT_OF_RANGE = [
    (["serve", "--max-message-bytes", "100"], "--max-message-bytes: 100 is out of range 1024.."),
    (["serve", "--max-batch", "2000"], "--max-batch: 2000 is out of range 1..1024"),
    (["serve", "--max-sessions", "1000000000"], "--max-sessions: 1000000000 is out of range"),
    (["serve", "--threads", "65"], "--threads: 65 is out of range 1..64"),
    (["serve", "--workers", "100000"], "--workers: 100000 is out of range 1..64"),
    (["serve", "--tick-ms", "9"], "--tick-ms: 9 must be more than 0 and at most 8"),
    (["serve", "--idle-timeout", "1e300"], "--idle-timeout: 1e+300 must be more than 0"),
    (["serve", "--stats-every", "-1"], "--stats-every: -1 is out of range 0..86400"),
    (["serve", "--max-output-mb", "0.01"], "--max-output-mb: 0.01 is out of range 0.0625.."),
    (["serve", "--max-output-mb", "1e300"], "--max-output-mb: 1e+300 is out of range"),
    (["serve", "--max-sessions-per-peer", "0"], "--max-sessions-per-peer: 0 is out of range"),
    (["serve", "--bind", "foo://x"], "--bind: 'foo://x' is not an endpoint"),
    (["serve", "--bind", "tcp://127.0.0.1:0"], "the port must be 1..65535"),
    (["run", "--blocksize", "100000"], "--blocksize: 100000 is out of range 0..4096"),
    (["run", "--samplerate", "5"], "--samplerate: 5 is out of range 8000..384000"),
    (["run", "--rt-priority", "1000"], "--rt-priority: 1000 is out of range 0..99"),
    (["run", "--pa-latency", "-1"], "--pa-latency: use low, high or seconds"),
    (["stream", "a.wav", "b.wav", "-e", "foo://x"], "'foo://x' is not an endpoint"),
    (["stream", "a.wav", "b.wav", "-e", "tcp://127.0.0.1:99999"], "port must be 1..65535"),
    (["stream", "a.wav", "b.wav", "-e", "tcp://*:5555"], "'*' is only for --bind"),
    (["stream", "a.wav", "b.wav", "--timeout", "1e300"], "--timeout: 1e+300 must be more"),
    (["stream", "a.wav", "b.wav", "--chunk", "0"], "--chunk: 0 is out of range 1..160000"),
    (["serve", "--queue-seconds", "1e12"], "--queue-seconds: 1e+12 must be more than 0 and at"),
    (["enhance", "a.wav", "b.wav", "--atten-lim", "inf"], "0..200 dB or 'off', got 'inf'"),
    (["enhance", "a.wav", "b.wav", "--atten-lim", "1e400"], "0..200 dB or 'off', got '1e400'"),
]


@pytest.mark.parametrize("argv, says", OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_out_of_range_options_are_one_line(argv, says, tmp_path):
    r = run_rtns(*argv, cwd=tmp_path, timeout=60)
    assert_one_line(r, 2, says, f"rtns {argv[0]}: error: argument")


def assert_one_line(r, code: int, *fragments: str) -> str:
    """Exit ``code``, no traceback, exactly one stderr line holding every fragment."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def keys(tmp_path):
    """A CurveZMQ pair made by `rtns keys`, and a file that is no key."""
    r = run_rtns("keys", str(tmp_path / "k"), "--name", "c", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    (tmp_path / "bad.key").write_text("hello\n")
    return tmp_path / "k" / "c.key", tmp_path / "k" / "c.key_secret", tmp_path / "bad.key"


def test_stream_key_files_are_checked_first(keys, tmp_path):
    public, secret, bad = keys
    sf.write(tmp_path / "in.wav", np.zeros(1600, np.float32), 16000)

    def stream(*extra):
        return run_rtns("stream", "in.wav", "out.wav", "--timeout", "1", *extra, cwd=tmp_path)

    assert_one_line(
        stream("--server-key", "missing.key", "--client-key", str(secret)),
        1,
        "rtns: error: --server-key missing.key: no such key file",
    )
    assert_one_line(
        stream("--server-key", str(bad), "--client-key", str(secret)),
        1,
        "--server-key",
        "not a CurveZMQ key file",
    )
    assert_one_line(
        stream("--server-key", str(public), "--client-key", str(public)),
        1,
        "--client-key",
        "not a secret key file",
    )
    assert_one_line(stream("--server-key", str(public)), 1, "needs both --server-key")
    assert not (tmp_path / "out.wav").exists()


def test_serve_key_files_are_checked(keys, tmp_path):
    public, secret, bad = keys
    assert_one_line(
        run_rtns(
            "serve", "--curve-secret", str(public), "--allowed-clients", str(tmp_path), cwd=tmp_path
        ),
        1,
        "--curve-secret",
        "not a secret key file",
    )
    assert_one_line(
        run_rtns("serve", "--curve-secret", str(secret), "--allowed-clients", "nope", cwd=tmp_path),
        1,
        "--allowed-clients nope: no such folder",
    )


def test_serve_refuses_a_malformed_or_missing_client_key(keys, tmp_path):
    """Issue 31 (3, 4): one malformed *.key in --allowed-clients made pyzmq's authenticator
    drop every key (the server started, logged "keys": 3, and a valid client got "no answer
    to hello"); an empty folder started a server nobody could reach ("keys": 0); a file
    path was refused only as "no such folder". Each is refused at start, naming the file."""
    public, secret, bad = keys
    folder = tmp_path / "clients"
    folder.mkdir()

    def serve():
        return run_rtns(
            "serve",
            "--curve-secret",
            str(secret),
            "--allowed-clients",
            str(folder),
            "--workers",
            "1",
            cwd=tmp_path,
            timeout=60,
        )

    assert_one_line(serve(), 1, f"--allowed-clients {folder}: holds no *.key files")
    (folder / "alice.key").write_text(public.read_text())
    (folder / "mallory.key").write_text(bad.read_text())
    assert_one_line(serve(), 1, "mallory.key is not a CurveZMQ public key file")
    (folder / "mallory.key").write_text(
        public.read_text().replace('public-key = "', 'public-key = "#')
    )
    assert_one_line(serve(), 1, "mallory.key is not a CurveZMQ public key file")
    assert_one_line(
        run_rtns(
            "serve",
            "--curve-secret",
            str(secret),
            "--allowed-clients",
            str(public),
            cwd=tmp_path,
            timeout=60,
        ),
        1,
        "is not a folder",
    )


def test_stream_refuses_more_channels_than_the_protocol_carries(tmp_path):
    """Refused before connecting (no daemon is running here), naming the limit."""
    from rtns.daemon.protocol import MAX_CHANNELS

    sf.write(tmp_path / "in.wav", np.zeros((1600, MAX_CHANNELS + 1), np.float32), 16000)
    line = assert_one_line(
        run_rtns("stream", "in.wav", "out.wav", "--timeout", "1", cwd=tmp_path),
        1,
        f"{MAX_CHANNELS + 1} channels",
        f"at most {MAX_CHANNELS}",
    )
    assert line.startswith("rtns: error: in.wav")


def test_help_and_listing_name_the_two_defaults(capsys):
    """One stream without --model runs DEFAULT_PACK (the flagship); `rtns serve` without
    --model hosts DEFAULT_SERVE_PACK (the cheaper pack, for clients per core). The help
    texts, the server's settings and `rtns models` all say so."""
    from rtns.cli.files import models_table
    from rtns.daemon.server import ServerConfig
    from rtns.pack import DEFAULT_PACK, DEFAULT_SERVE_PACK

    assert DEFAULT_PACK != DEFAULT_SERVE_PACK
    assert ServerConfig().models == [DEFAULT_SERVE_PACK]
    p = build_parser()
    for cmd, name in (
        (["enhance"], DEFAULT_PACK),
        (["run"], DEFAULT_PACK),
        (["serve"], DEFAULT_SERVE_PACK),
    ):
        with pytest.raises(SystemExit):
            p.parse_args([*cmd, "--help"])
        assert f"default: {name}" in " ".join(capsys.readouterr().out.split()), cmd
    names = [row.name for row in models_table()]
    listed = {n.split()[0] for n in names}
    assert {DEFAULT_PACK, DEFAULT_SERVE_PACK} <= listed, names  # both ship in models/
    want = {f"{DEFAULT_PACK} (default)", f"{DEFAULT_SERVE_PACK} (serve default)"}
    assert {n for n in names if "default)" in n} == want
