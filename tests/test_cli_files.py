"""rtns enhance / rtns models end to end (subprocess `python -m rtns`), and rtns.audio_io."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from cli_helpers import run_rtns

from rtns import audio_io
from rtns.errors import UserInputError
from rtns.pack import DEFAULT_PACK, MANIFEST, PACK_PATH_ENV

REPO = Path(__file__).resolve().parents[1]


def rtns(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_rtns(*args, cwd=cwd, env=env)


def assert_clean_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1 and exactly one stderr line ``rtns: error: ...`` holding every fragment."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("rtns: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def tones(n: int, sr: int, channels: int, peak: float = 0.5, seed: int = 0) -> np.ndarray:
    """Band-limited test signal float32 [n, channels] (partials 150 Hz .. 5 kHz, different
    per channel, faded in and out), so resampling to 16 kHz and back loses almost nothing."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    out = np.zeros((n, channels))
    for c in range(channels):
        for f in rng.uniform(150, 5000, 12):
            out[:, c] += np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        out[:, c] *= peak / np.max(np.abs(out[:, c]))
    # 20 ms raised-cosine fades: a step at either end is not band-limited.
    k = min(int(0.02 * sr), n // 2)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
    out[:k] *= fade[:, None]
    out[n - k :] *= fade[::-1, None]
    return out.astype(np.float32)


# -- enhance ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sr, channels, ext, subtype",
    [(44_100, 2, "wav", "FLOAT"), (48_000, 1, "flac", "PCM_16"), (16_000, 3, "wav", "PCM_16")],
)
def test_enhance_passthrough_keeps_rate_channels_length_and_signal(
    passthrough_pack, tmp_path, sr, channels, ext, subtype
):
    n = int(sr * 2.3) + 17
    x = tones(n, sr, channels)
    src = tmp_path / f"in.{ext}"
    sf.write(src, x, sr, subtype=subtype)
    x = sf.read(src, dtype="float32", always_2d=True)[0]  # as quantized on disk
    dst = tmp_path / f"out.{ext}"
    r = rtns("enhance", str(src), str(dst), "--model", str(passthrough_pack), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    info = sf.info(dst)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (sr, channels, n, subtype)
    y = sf.read(dst, dtype="float32", always_2d=True)[0]
    # Time-aligned and equal to the input up to resampling (and 16-bit quantization) error.
    err = np.max(np.abs(y - x))
    print(f"passthrough {sr} Hz x{channels} {subtype}: max abs error {err:.2e}")
    assert err < (5e-3 if sr != 16_000 else 1e-4)
    # Channels stay separate streams: each output matches its own input best.
    corr = np.corrcoef(y.T, x.T)[:channels, channels:]
    assert np.all(np.argmax(corr, axis=1) == np.arange(channels))


def test_enhance_real_model_changes_signal(random_dtln_pack, tmp_path):
    x = tones(16_000 * 2, 22_050, 1)
    sf.write(tmp_path / "in.wav", x, 22_050, subtype="FLOAT")
    r = rtns(
        "enhance",
        str(tmp_path / "in.wav"),
        str(tmp_path / "out.flac"),
        "-m",
        str(random_dtln_pack),
        "--atten-lim",
        "12",
        "--threads",
        "1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    info = sf.info(tmp_path / "out.flac")
    # FLAC cannot store float: the nearest kind is 24-bit PCM.
    assert (info.samplerate, info.frames, info.subtype) == (22_050, x.shape[0], "PCM_24")
    y = sf.read(tmp_path / "out.flac", dtype="float64")[0]
    # What the engine gives for the same signal, rate and limit, to the 24-bit rounding of
    # the file (half a step: 2**-24), and that is not the input.
    from rtns.engine import Model
    from rtns.streams import enhance_frames

    want = enhance_frames(Model(random_dtln_pack), x, 22_050, atten_lim=12.0)[:, 0]
    assert np.max(np.abs(y - want)) <= 2.0**-24 * 1.01
    assert np.max(np.abs(want - x[:, 0])) > 1000 * 2.0**-24  # a model, not the identity


def test_enhance_uses_the_pack_default_limit_unless_told(random_dtln_pack, tmp_path):
    from test_engine import limited_copy

    limited = limited_copy(random_dtln_pack, tmp_path / "limited", 12.0)
    x = tones(16_000, 16_000, 1)
    sf.write(tmp_path / "in.wav", x, 16_000, subtype="FLOAT")
    outs = {}
    for label, pack, extra in (
        ("default", limited, []),
        ("twelve", random_dtln_pack, ["--atten-lim", "12"]),
        ("off", limited, ["--atten-lim", "off"]),
        ("plain", random_dtln_pack, []),
    ):
        r = rtns("enhance", "in.wav", f"{label}.wav", "-m", str(pack), *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs[label] = sf.read(tmp_path / f"{label}.wav", dtype="float32")[0]
    np.testing.assert_array_equal(outs["default"], outs["twelve"])
    np.testing.assert_array_equal(outs["off"], outs["plain"])
    # The 12 dB limit is the dry/wet mix of the unlimited output with the input, g = -12 dB
    # (float32 arithmetic, float WAV files).
    g = 10 ** (-12 / 20)
    mixed = (1 - g) * outs["off"] + g * x[:, 0]
    np.testing.assert_allclose(outs["default"], mixed, rtol=0, atol=1e-6)
    assert np.max(np.abs(outs["off"] - x[:, 0])) > 0.1  # so the mix is not trivially equal


def test_enhance_warns_when_integer_output_clips(passthrough_pack, tmp_path):
    x = tones(16_000, 16_000, 1, peak=1.6)
    sf.write(tmp_path / "in.wav", x, 16_000, subtype="FLOAT")
    r = rtns(
        "enhance",
        str(tmp_path / "in.wav"),
        str(tmp_path / "out.flac"),
        "-m",
        str(passthrough_pack),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "rtns: warning:" in r.stderr and "clipped" in r.stderr
    peak_db = 20 * np.log10(np.max(np.abs(x)))  # pass-through: output peak = input peak
    assert f"(peak {peak_db:+.1f} dBFS)" in r.stderr
    y = sf.read(tmp_path / "out.flac", dtype="float32")[0]
    assert np.max(np.abs(y)) <= 1.0 and np.max(y) > 0.99  # clipped, not wrapped around
    # A float output keeps the peaks and does not warn.
    r = rtns(
        "enhance",
        str(tmp_path / "in.wav"),
        str(tmp_path / "out.wav"),
        "-m",
        str(passthrough_pack),
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "warning" not in r.stderr
    assert np.max(np.abs(sf.read(tmp_path / "out.wav")[0])) > 1.5


def test_enhance_nan_input(passthrough_pack, tmp_path):
    x = tones(8000, 16_000, 1)
    x[4000, 0] = np.nan
    x[4001, 0] = np.inf
    sf.write(tmp_path / "nan.wav", x, 16_000, subtype="FLOAT")
    r = rtns("enhance", "nan.wav", "out.wav", "-m", str(passthrough_pack), cwd=tmp_path)
    assert_clean_error(r, "nan.wav: 2 samples are NaN or infinite (first at 0.250 s)")
    assert not (tmp_path / "out.wav").exists()


def test_enhance_empty_file(passthrough_pack, tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16_000)
    r = rtns("enhance", "empty.wav", "out.wav", "-m", str(passthrough_pack), cwd=tmp_path)
    assert_clean_error(r, "empty.wav: the file holds no samples")


def test_enhance_missing_file(passthrough_pack, tmp_path):
    r = rtns("enhance", "missing.wav", "out.wav", "-m", str(passthrough_pack), cwd=tmp_path)
    assert_clean_error(r, "missing.wav: no such file")


def test_enhance_unreadable_file(passthrough_pack, tmp_path):
    (tmp_path / "text.wav").write_text("this is not audio\n")
    r = rtns("enhance", "text.wav", "out.wav", "-m", str(passthrough_pack), cwd=tmp_path)
    assert_clean_error(r, "text.wav: not a readable audio file")


def test_enhance_missing_output_folder(passthrough_pack, tmp_path):
    sf.write(tmp_path / "in.wav", tones(1600, 16_000, 1), 16_000)
    r = rtns("enhance", "in.wav", "no/such/out.wav", "-m", str(passthrough_pack), cwd=tmp_path)
    assert_clean_error(r, "no/such: output folder does not exist")


def test_enhance_unknown_output_type(passthrough_pack, tmp_path):
    sf.write(tmp_path / "in.wav", tones(1600, 16_000, 1), 16_000)
    r = rtns("enhance", "in.wav", "out.xyz", "-m", str(passthrough_pack), cwd=tmp_path)
    assert_clean_error(r, "unknown output file type '.xyz'")


def test_enhance_unknown_model(tmp_path):
    sf.write(tmp_path / "in.wav", tones(1600, 16_000, 1), 16_000)
    r = rtns("enhance", "in.wav", "out.wav", "--model", "no-such-pack", cwd=tmp_path)
    assert_clean_error(r, "no-such-pack: no model pack of that name", "rtns models")


def test_enhance_without_default_pack_says_pass_model(tmp_path):
    empty = tmp_path / "packs"
    empty.mkdir()
    env = {PACK_PATH_ENV: str(empty), "HOME": str(tmp_path)}
    sf.write(tmp_path / "in.wav", tones(1600, 16_000, 1), 16_000)
    r = run_rtns("enhance", "in.wav", "out.wav", cwd=tmp_path, env=env, hide_shipped_packs=True)
    assert_clean_error(r, f"no default model pack ({DEFAULT_PACK}) is installed", "--model")
    # The same folder with the shipped packs visible finds the default and succeeds.
    r = run_rtns("enhance", "in.wav", "out.wav", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.wav").is_file()


def test_enhance_bad_option_values(passthrough_pack, tmp_path):
    for opt in (["--threads", "0"], ["--atten-lim", "-3"], ["--atten-lim", "nan"]):
        r = rtns("enhance", "a.wav", "b.wav", *opt, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and opt[0] in r.stderr


# -- models ----------------------------------------------------------------------------------
def _indented(lines: list[str]) -> int:
    """How many of ``lines`` are indented (the details under a pack's row)."""
    return next((i for i, ln in enumerate(lines) if not ln.startswith(" ")), len(lines))


def test_models_lists_packs_scores_and_broken(passthrough_pack, tmp_path):
    import shutil

    d = tmp_path / "packs"
    shutil.copytree(passthrough_pack, d / "passthrough")
    scored = d / "scored"
    shutil.copytree(passthrough_pack, scored)
    text = (scored / MANIFEST).read_text()
    text = text.replace('"name": "passthrough"', '"name": "scored"')
    text = text.replace('"atten_lim_db": null', '"atten_lim_db": 15.0')
    text = text.replace(
        '"scores": {}',
        '"scores": {"vbdemand36": {"pesq_wb": 2.91, "stoi": 0.935, "si_sdr": 17.2, "files": 36},'
        ' "mine": {"custom": 1.5}}',
    )
    (scored / MANIFEST).write_text(text)
    (d / "broken").mkdir()
    (d / "broken" / MANIFEST).write_text("{not json")
    corrupt = d / "corrupt"
    shutil.copytree(passthrough_pack, corrupt)
    (corrupt / "mask.onnx").write_bytes(b"changed")
    env = {PACK_PATH_ENV: str(d), "HOME": str(tmp_path)}
    r = rtns("models", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "LATENCY", "LIMIT", "PATH"]
    # Each pack's row ends with its folder (under HOME, written ~/...); a broken pack's
    # reason is on the indented line below it.
    rows = {ln.split()[-1].rsplit("/", 1)[-1]: i for i, ln in enumerate(lines) if ln[:1] != " "}
    assert set(rows) >= {"passthrough", "scored", "broken", "corrupt"}
    row = lines[rows["passthrough"]]
    assert row.split()[:5] == ["passthrough", "passthrough", "24.0", "ms", "off"]
    assert row.split()[-1] == "~/packs/passthrough"
    assert lines[rows["scored"]].startswith("scored ") and " 15 dB " in lines[rows["scored"]]
    assert "PESQ" not in r.stdout  # scores only with --scores or a NAME

    def below(i: int) -> str:  # the indented lines under row i, joined
        return " ".join(ln.strip() for ln in lines[i + 1 :][: _indented(lines[i + 1 :])])

    assert "BROKEN" in lines[rows["broken"]] and "not readable JSON" in below(rows["broken"])
    assert "BROKEN" in lines[rows["corrupt"]] and "sha256" in below(rows["corrupt"])

    r = rtns("models", "--scores", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("scored "))
    assert lines[i + 1 : i + 3] == [
        "    mine: custom 1.5",
        "    vbdemand36 (36 files): PESQ-WB 2.910  STOI 0.935  SI-SDR 17.20",
    ]
    r = rtns("models", "scored", cwd=tmp_path, env=env)  # one pack, with its scores
    assert r.returncode == 0, r.stderr
    one = r.stdout.splitlines()
    assert len(one) == 4 and one[1].split() == lines[i].split() and one[2:] == lines[i + 1 : i + 3]
    r = rtns("models", "nope", cwd=tmp_path, env=env)
    assert_clean_error(r, "nope: no model pack of that name")


@pytest.mark.parametrize("flags", [[], ["--scores"], [DEFAULT_PACK]])
def test_models_fits_100_columns(tmp_path, flags):
    """The shipped packs' listing, scores included, fits 100 columns; every shipped pack's
    recorded test sets are shown with --scores."""
    import json

    r = rtns("models", *flags, cwd=tmp_path, env={PACK_PATH_ENV: str(tmp_path)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 100, [ln for ln in lines if len(ln) > 100]
    shipped = {p.parent.name: p for p in (REPO / "models").glob(f"*/{MANIFEST}")}
    if flags:
        for name, manifest in shipped.items():
            if flags == [DEFAULT_PACK] and name != DEFAULT_PACK:
                assert name not in r.stdout
                continue
            scores = json.loads(manifest.read_text())["scores"]
            for test_set, metrics in scores.items():
                want = f"{test_set} ({metrics['files']:g} files): PESQ-WB {metrics['pesq_wb']:.3f}"
                assert any(ln.startswith(f"    {want}") for ln in lines), (name, want)
    else:
        assert "PESQ" not in r.stdout and all(name in r.stdout for name in shipped)


def test_models_when_none_installed(tmp_path):
    """With the shipped packs hidden and nothing on the search path: one line naming the
    folders searched, exit 0. With them: a table naming every shipped pack."""
    env = {PACK_PATH_ENV: str(tmp_path), "HOME": str(tmp_path)}
    r = run_rtns("models", cwd=tmp_path, env=env, hide_shipped_packs=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no model packs found (searched: "), r.stdout
    assert str(tmp_path) in r.stdout and len(r.stdout.strip().splitlines()) == 1
    r = rtns("models", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("NAME"), r.stdout
    shipped = sorted(p.parent.name for p in (REPO / "models").glob(f"*/{MANIFEST}"))
    assert shipped and all(name in r.stdout for name in shipped), (shipped, r.stdout)


# -- import weight (torch must stay out of the runtime) ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code",
    [
        "import rtns.cli, rtns.engine, rtns.audio_io",
        # building the parser imports every sub-command module
        "import rtns.cli, rtns.engine, rtns.audio_io; rtns.cli.build_parser()",
    ],
)
def test_runtime_imports_do_not_load_torch(code):
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    modules = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln}
    assert "rtns.audio_io" in modules  # the check sees the modules it should
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


# -- audio_io in process ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "sub_in, fmt, want",
    [
        ("PCM_16", "WAV", "PCM_16"),
        ("FLOAT", "WAV", "FLOAT"),
        ("DOUBLE", "FLAC", "PCM_24"),
        ("FLOAT", "FLAC", "PCM_24"),
        ("PCM_24", "FLAC", "PCM_24"),
        ("PCM_32", "FLAC", "PCM_24"),
        ("VORBIS", "WAV", "PCM_16"),
        ("PCM_16", "OGG", "VORBIS"),
        # mp3 in, wav out: the MP3 codec is not kept in WAV (a 0-byte file before)
        ("MPEG_LAYER_III", "WAV", "PCM_16"),
        ("MPEG_LAYER_III", "MP3", "MPEG_LAYER_III"),
    ],
)
def test_output_subtype(sub_in, fmt, want):
    assert audio_io.output_subtype(sub_in, fmt) == want


def test_write_audio_reports_clipping(tmp_path):
    x = np.array([[0.5], [1.5], [-2.0], [0.25]], np.float32)
    rep = audio_io.write_audio(tmp_path / "a.wav", x, 16_000, "PCM_16")
    assert (rep.subtype, rep.clipped, rep.peak) == ("PCM_16", 2, 2.0)
    y = sf.read(tmp_path / "a.wav", dtype="float32")[0]
    np.testing.assert_allclose(y, [0.5, 1.0, -1.0, 0.25], atol=1e-4)
    rep = audio_io.write_audio(tmp_path / "b.wav", x, 16_000, "FLOAT")
    assert rep.clipped == 0
    np.testing.assert_array_equal(sf.read(tmp_path / "b.wav", dtype="float32")[0], x[:, 0])


def test_read_audio_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        audio_io.read_audio(tmp_path / "x.wav")
    with pytest.raises(UserInputError, match="not a file"):
        audio_io.read_audio(tmp_path)


# -- safe output and containers (issue "Every edge solid") ------------------------------------
def test_mp3_in_wav_out_and_opus_is_opus(tmp_path):
    """Before: mp3 -> wav kept the MP3 subtype and left a 0-byte file; .opus became Vorbis."""
    sf.write(tmp_path / "in.mp3", tones(16_000, 16_000, 1), 16_000)
    r = rtns("enhance", "in.mp3", "out.wav", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = sf.info(tmp_path / "out.wav")
    assert (info.format, info.subtype, info.frames) == ("WAV", "PCM_16", 16_000)
    r = rtns("enhance", "in.mp3", "out.opus", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sf.info(tmp_path / "out.opus").subtype == "OPUS"


def test_container_limits_refused_before_processing(tmp_path):
    """Before: a 10-channel file to .flac failed after processing, with the wrong reason."""
    sf.write(tmp_path / "ten.wav", tones(1600, 16_000, 10), 16_000, subtype="PCM_16")
    r = rtns("enhance", "ten.wav", "ten.flac", cwd=tmp_path)
    assert_clean_error(r, "ten.flac", "at most 8 channels", "10")
    assert not (tmp_path / "ten.flac").exists()
    sf.write(tmp_path / "a44.wav", tones(4410, 44_100, 1), 44_100)
    assert_clean_error(rtns("enhance", "a44.wav", "x.opus", cwd=tmp_path), "Opus", "44100")


def test_out_equal_in_is_refused_unless_forced(tmp_path):
    """Issue 31 (2): `rtns enhance s.flac s.flac` replaced the recording silently. Now it is
    refused (through a symbolic link or a hard link to IN too), and --force writes it
    safely (read to the end first, renamed over it)."""
    import os

    x = tones(32_000, 48_000, 2)
    sf.write(tmp_path / "a.wav", x, 48_000, subtype="FLOAT")
    before = (tmp_path / "a.wav").read_bytes()
    os.symlink("a.wav", tmp_path / "link.wav")
    os.link(tmp_path / "a.wav", tmp_path / "hard.wav")
    for out in ("a.wav", "./a.wav", "link.wav", "hard.wav"):
        r = rtns("enhance", "a.wav", out, "--atten-lim", "0", "-q", cwd=tmp_path)
        assert_clean_error(r, f"{Path(out)}: is the input file", "--force")
        assert (tmp_path / "a.wav").read_bytes() == before
    r = rtns("enhance", "a.wav", "a.wav", "--atten-lim", "0", "-q", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    y, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 48_000 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "hard.wav", "link.wav"]
    # a.wav had a second name (hard.wav): it was rewritten in place, both names see it
    assert (tmp_path / "hard.wav").read_bytes() == (tmp_path / "a.wav").read_bytes() != before


def test_stream_refuses_out_equal_in(tmp_path):
    """Issue 31 (2): `rtns stream s.flac s.flac` too (refused before connecting)."""
    sf.write(tmp_path / "s.flac", tones(1600, 16_000, 1), 16_000)
    before = (tmp_path / "s.flac").read_bytes()
    r = rtns("stream", "s.flac", "s.flac", "--timeout", "1", cwd=tmp_path)
    assert_clean_error(r, "s.flac: is the input file", "--force")
    assert (tmp_path / "s.flac").read_bytes() == before


def test_out_symlink_is_written_through_and_hard_links_kept(passthrough_pack, tmp_path):
    """Issue 31 (2): an OUT that is a symbolic link was replaced by a regular file, and an
    OUT with hard links was split from them. Now the link's target receives the result
    (the link stays a link), and every hard link of OUT sees it."""
    import os

    sf.write(tmp_path / "in.wav", tones(8000, 16_000, 1), 16_000, subtype="FLOAT")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "o.wav").write_bytes(b"old")
    os.symlink("real/o.wav", tmp_path / "o.wav")
    r = rtns("enhance", "in.wav", "o.wav", "-m", str(passthrough_pack), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.wav").is_symlink()
    assert sf.info(tmp_path / "real" / "o.wav").frames == 8000
    (tmp_path / "h1.wav").write_bytes(b"old")
    os.link(tmp_path / "h1.wav", tmp_path / "h2.wav")
    r = rtns("enhance", "in.wav", "h1.wav", "-m", str(passthrough_pack), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.stat(tmp_path / "h1.wav").st_nlink == 2
    assert sf.info(tmp_path / "h2.wav").frames == 8000
    assert not [p for p in tmp_path.rglob(".*.part")]


@pytest.mark.parametrize("which", ["in", "out", "./out"])
def test_plot_never_replaces_in_or_out(passthrough_pack, tmp_path, which):
    """Issue 31 (1): `--plot v.flac` replaced the recording with a PNG (exit 0), `--plot
    o.wav` the result. Refused before any work."""
    sf.write(tmp_path / "in.wav", tones(8000, 16_000, 1), 16_000)
    (tmp_path / "out.wav").write_bytes(b"old")
    target = {"in": "in.wav", "out": "out.wav", "./out": "./out.wav"}[which]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = rtns(
        "enhance", "in.wav", "out.wav", "-m", str(passthrough_pack), "--plot", target, cwd=tmp_path
    )
    assert_clean_error(r, f"--plot {target}: is", "would replace it")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_plot_in_a_missing_folder_fails_before_the_audio_is_written(passthrough_pack, tmp_path):
    """Issue 31 (1): `--plot nodir/p.png` failed only after the audio had been written."""
    sf.write(tmp_path / "in.wav", tones(8000, 16_000, 1), 16_000)
    r = rtns(
        "enhance",
        "in.wav",
        "out.wav",
        "-m",
        str(passthrough_pack),
        "--plot",
        "nodir/p.png",
        cwd=tmp_path,
    )
    assert_clean_error(r, "--plot nodir/p.png", "nodir does not exist")
    assert not (tmp_path / "out.wav").exists()


def test_out_that_is_a_folder_is_named_as_such(passthrough_pack, tmp_path):
    """Issue 31 (9): an OUT that is a folder said 'unknown output file type'."""
    sf.write(tmp_path / "in.wav", tones(1600, 16_000, 1), 16_000)
    (tmp_path / "d").mkdir()
    r = rtns("enhance", "in.wav", "d", "-m", str(passthrough_pack), cwd=tmp_path)
    assert_clean_error(r, "d: is a folder; give an output file name")


@pytest.mark.parametrize(
    "sr, channels, subtype, ext",
    [(48_000, 2, "PCM_16", "wav"), (44_100, 1, "FLOAT", "flac"), (16_000, 3, "FLOAT", "wav")],
)
def test_streamed_enhance_is_bit_identical_to_the_whole_file_path(
    random_dtln_pack, tmp_path, sr, channels, subtype, ext
):
    """Issue 31 (10): `rtns enhance` now streams file -> ChannelStream -> writer in blocks;
    its file is byte for byte what the whole-file path (read_audio, enhance_frames,
    write_audio) writes. Both run in a fresh interpreter: the test process may have other
    floating-point settings (e.g. flush-to-zero from torch), which would not be the point."""
    sub = subtype if ext == "wav" else "PCM_24"
    x = tones(int(3.3 * sr) + 17, sr, channels, peak=0.9)
    sf.write(tmp_path / f"in.{ext}", x, sr, subtype=sub)
    r = rtns("enhance", f"in.{ext}", f"out.{ext}", "-m", str(random_dtln_pack), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    whole = (
        "import sys; from rtns import audio_io; "
        "from rtns.cli.files import enhance_channels, load_model; "
        "a = audio_io.read_audio(sys.argv[1]); "
        "y = enhance_channels(load_model(sys.argv[3]), a.samples, a.sample_rate); "
        "audio_io.write_audio(sys.argv[2], y, a.sample_rate, a.subtype)"
    )
    subprocess.run(
        [sys.executable, "-c", whole, f"in.{ext}", f"whole.{ext}", str(random_dtln_pack)],
        cwd=tmp_path,
        check=True,
        timeout=300,
    )
    out, ref = tmp_path / f"out.{ext}", tmp_path / f"whole.{ext}"
    if sf.info(out).subtype != "FLOAT":
        assert out.read_bytes() == ref.read_bytes()
    else:  # libsndfile stamps float WAVs' PEAK chunk with the time of writing
        assert str(sf.info(out)).split("\n")[1:] == str(sf.info(ref)).split("\n")[1:]
        a, b = (sf.read(p, dtype="float32")[0] for p in (out, ref))
        assert a.shape == b.shape and a.tobytes() == b.tobytes()


def test_48k_limit_zero_is_the_identity_end_to_end(tmp_path):
    """Before: at 48 kHz --atten-lim 0 was -13 dB from the input (the band above 8 kHz was
    lost). The must-show: at least 50 dB SNR."""
    rng = np.random.default_rng(4)
    x = (0.05 * rng.standard_normal((48_000, 1))).astype(np.float32)  # full-band noise
    sf.write(tmp_path / "n.wav", x, 48_000, subtype="FLOAT")
    r = rtns("enhance", "n.wav", "o.wav", "--atten-lim", "0", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    y = sf.read(tmp_path / "o.wav", dtype="float32", always_2d=True)[0]
    snr = 10 * np.log10(np.sum(x**2) / max(np.sum((y - x) ** 2), 1e-30))
    assert snr > 50, snr


def test_failed_write_keeps_the_existing_file_and_names_the_error(tmp_path, monkeypatch):
    """Before: a failed write (disk full) destroyed an existing OUT, even OUT == IN, and
    said only 'System error.'"""
    import errno
    import os

    out = tmp_path / "out.wav"
    out.write_bytes(b"precious")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserInputError, match="No space left on device.*unchanged"):
        audio_io.write_audio(out, np.zeros((100, 1), np.float32), 16_000, "PCM_16")
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]


def test_unwritable_folder_refused_before_processing(tmp_path, monkeypatch):
    """The plan check names the OS error (read-only file system here) before any work."""
    import errno
    import os
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(UserInputError, match="cannot write there .Read-only file system"):
        audio_io.plan_output(tmp_path / "x.wav", 1, 16_000)
