"""benchmarks/quality.py on a tiny generated paired set with the pass-through pack.

The pass-through pack returns its input, so through the streaming engine its scores must
equal those of the unprocessed input: any misalignment, gain or pairing error shows up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import load_benchmark

from rtns.pack import read_manifest, verify_files

REPO = Path(__file__).resolve().parents[1]
SR = 16_000
#: 1.2 s: speechmos tiles a clip to >= 9.01 s, so this costs one DNSMOS window, not several.
N = 19_200
#: Mixing SNR of each pair: PESQ sits at its floor for the low one and moves for the others.
SNR_DB = {"a": 5.0, "b": 20.0, "c": 35.0}
# Tolerances for "the same signal up to float32 rounding".
TOL = {"pesq_wb": 2e-3, "stoi": 1e-4, "si_sdr": 1e-2, "dnsmos_sig": 1e-3}
TOL |= {"dnsmos_bak": 1e-3, "dnsmos_ovrl": 1e-3}

pytest.importorskip("pesq")
pytest.importorskip("pystoi")
pytest.importorskip("soxr")


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality", register=True)


def _speechlike(n: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced 'syllables': harmonics of a gliding f0 under a 4 Hz on/off envelope."""
    t = np.arange(n) / SR
    f0 = rng.uniform(110, 200) * (1 + 0.1 * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 25))
    env = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, np.pi)), 0, None) ** 2
    return (0.3 * x * env / np.max(np.abs(x))).astype(np.float32)


def _write_set(root: Path) -> tuple[Path, Path]:
    """3 pairs: a plain one, one whose noisy side is 100 samples longer, one at 22.05 kHz."""
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(7)
    clean_dir, noisy_dir = root / "tiny" / "clean", root / "tiny" / "noisy"
    clean_dir.mkdir(parents=True)
    noisy_dir.mkdir(parents=True)
    for name in SNR_DB:
        s = _speechlike(N + 100, rng)
        noise = rng.standard_normal(N + 100).astype(np.float32)
        noise *= np.sqrt(np.mean(s**2) / np.mean(noise**2) / 10 ** (SNR_DB[name] / 10))
        x = s + noise
        c, y, sr = s[:N], x[: N + 100 if name == "b" else N], SR
        if name == "c":
            sr = 22_050
            c, y = soxr.resample(c, SR, sr), soxr.resample(y, SR, sr)
        sf.write(clean_dir / f"{name}.flac", c, sr, subtype="PCM_24")
        sf.write(noisy_dir / f"{name}.wav", y, sr, subtype="FLOAT")
    return clean_dir, noisy_dir


@pytest.fixture(scope="module")
def paired_set(tmp_path_factory) -> tuple[Path, Path]:
    return _write_set(tmp_path_factory.mktemp("set"))


def _args(clean: Path, noisy: Path, *extra: str) -> list[str]:
    return ["--clean", str(clean), "--noisy", str(noisy), "--no-progress", *extra]


def test_passthrough_scores_equal_unprocessed(
    quality, paired_set, passthrough_pack, tmp_path, capsys
):
    pytest.importorskip("speechmos")
    clean, noisy = paired_set
    out_json, out_md = tmp_path / "q.json", tmp_path / "q.md"
    rc = quality.main(
        _args(clean, noisy, "--pack", f"pt={passthrough_pack}", "--json", str(out_json))
        + ["--markdown", str(out_md), "--per-file"]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "1 pair(s) of different lengths trimmed" in cap.err
    assert "1 pair(s) resampled" in cap.err

    rep = json.loads(out_json.read_text())
    assert rep["set"]["name"] == "tiny"
    assert rep["set"]["pairs_scored"] == 3
    assert rep["set"]["trimmed"] == {"b.flac": 100}
    assert rep["set"]["resampled"] == {"c.flac": ["clean", "noisy"]}
    assert rep["metrics"] == list(quality.METRICS)
    assert {"hostname", "cpu", "packages"} <= set(rep["machine"])
    assert "--pack" in rep["command"] and rep["date"].startswith("20")
    assert rep["errors"] == []
    unp, pt = rep["systems"]
    assert (unp["label"], unp["kind"], unp["pack"]) == ("unprocessed", "unprocessed", None)
    assert (pt["label"], pt["kind"], pt["pack"]["name"]) == ("pt", "pack", "passthrough")
    for sys_ in (unp, pt):
        assert sorted(sys_["per_file"]) == ["a.flac", "b.flac", "c.flac"]
        for key in quality.METRICS:
            vals = [f[key] for f in sys_["per_file"].values()]
            assert None not in vals and sys_["counts"][key] == 3
            assert sys_["means"][key] == pytest.approx(np.mean(vals), abs=1e-12)
            assert sys_["std"][key] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    # the real check: an identity model through the engine scores as its input
    for key, tol in TOL.items():
        assert pt["means"][key] == pytest.approx(unp["means"][key], abs=tol), key
        for name, scores in unp["per_file"].items():
            assert pt["per_file"][name][key] == pytest.approx(scores[key], abs=tol), (name, key)
    # pairing, trimming and resampling are right: each mixture was made at SNR_DB[name]
    for name, snr in SNR_DB.items():
        assert unp["per_file"][f"{name}.flac"]["si_sdr"] == pytest.approx(snr, abs=0.3), name
    pesq = [unp["per_file"][f"{name}.flac"]["pesq_wb"] for name in SNR_DB]
    assert pesq == sorted(pesq) and pesq[2] > 1.5  # in PESQ's sensitive range

    md = out_md.read_text()
    assert "| system | PESQ-WB | STOI | SI-SDR (dB) | DNSMOS SIG | DNSMOS BAK | DNSMOS OVRL |" in md
    row = f"| pt | {unp['means']['pesq_wb']:.3f} |"
    assert row in md and row in cap.out
    assert "| unprocessed |" in md
    assert "| c.flac |" in cap.out  # --per-file rows


def test_write_manifest_round_trip_and_jobs(
    quality, paired_set, passthrough_pack, tmp_path, capsys
):
    clean, noisy = paired_set
    pack = tmp_path / "pt_copy"
    shutil.copytree(passthrough_pack, pack)
    before = read_manifest(pack)

    # a subset's scores must not be stored under the whole set's name
    assert (
        quality.main(_args(clean, noisy, "--pack", str(pack), "--limit", "2", "--write-manifest"))
        == 1
    )
    assert "--set-name" in capsys.readouterr().err
    assert read_manifest(pack).scores == {}

    out = tmp_path / "q.json"
    argv = _args(clean, noisy, "--pack", str(pack), "--no-dnsmos", "--write-manifest")
    assert quality.main(argv + ["--json", str(out), "--jobs", "2"]) == 0
    rep = json.loads(out.read_text())
    assert rep["metrics"] == ["pesq_wb", "stoi", "si_sdr"]
    means = rep["systems"][1]["means"]
    after = read_manifest(pack)
    assert set(after.scores) == {"tiny"}
    assert after.scores["tiny"] == {**means, "files": 3.0}
    assert after.model_dump(exclude={"scores"}) == before.model_dump(exclude={"scores"})
    verify_files(pack, after)  # graphs untouched

    # a second set is added beside the first; the process pool gave the same numbers; a
    # labelled peer pack (--official-dtln) is another row, also written
    peer = tmp_path / "peer_copy"
    shutil.copytree(passthrough_pack, peer)
    out1 = tmp_path / "q1.json"
    extra = ["--set-name", "tiny2", "--limit", "2", "--official-dtln", f"Peer X={peer}"]
    assert quality.main(argv + extra + ["--json", str(out1)]) == 0
    rep1 = json.loads(out1.read_text())
    assert [(s["label"], s["kind"]) for s in rep1["systems"]] == [
        ("unprocessed", "unprocessed"),
        ("passthrough", "pack"),
        ("Peer X", "peer"),
    ]
    assert set(read_manifest(pack).scores) == {"tiny", "tiny2"}
    assert set(read_manifest(peer).scores) == {"tiny2"}
    for name in ("a.flac", "b.flac"):
        assert rep1["systems"][1]["per_file"][name] == rep["systems"][1]["per_file"][name]
        assert rep1["systems"][2]["per_file"][name] == rep["systems"][1]["per_file"][name]
    assert "wrote scores['tiny2']" in capsys.readouterr().err


def test_clear_errors_for_bad_folders(quality, paired_set, passthrough_pack, tmp_path, capsys):
    clean, noisy = paired_set

    def err(*argv: str) -> str:
        assert quality.main(_args(*argv[:2], "--pack", str(passthrough_pack), *argv[2:])) == 1
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("quality: error: ") and "\n" not in msg
        return msg

    missing = tmp_path / "nope"
    assert f"{missing}: no such clean folder" in err(missing, noisy)
    assert f"{missing}: no such noisy folder" in err(clean, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no audio files" in err(empty, noisy)

    extra = tmp_path / "noisy_extra"
    shutil.copytree(noisy, extra)
    shutil.copy(extra / "a.wav", extra / "zz.wav")
    msg = err(clean, extra)
    assert "unpaired files: 1 noisy file(s) without a clean file" in msg and "zz.wav" in msg

    fewer = tmp_path / "noisy_fewer"
    shutil.copytree(noisy, fewer)
    (fewer / "b.wav").unlink()
    assert "1 clean file(s) without a noisy file" in err(clean, fewer) and "b.flac" in err(
        clean, fewer
    )

    assert "no such model pack folder" in err(clean, noisy, "--pack", str(tmp_path / "nopack"))
    assert "two rows are labelled" in err(clean, noisy, "--pack", str(passthrough_pack))


def test_pack_off_row_runs_unlimited_and_is_never_written(
    quality, paired_set, random_dtln_pack, tmp_path
):
    """A pack with a default limit is scored as shipped (limited) and, with --pack-off, with
    the limit lifted; only the shipped behaviour is written to its manifest."""
    from test_engine import limited_copy

    clean, noisy = paired_set
    limited = limited_copy(random_dtln_pack, tmp_path / "limited", 6.0)
    out = tmp_path / "q.json"
    argv = [
        "--pack",
        str(limited),
        "--pack-off",
        str(limited),
        "--pack",
        f"plain={random_dtln_pack}",
    ]
    argv += ["--no-dnsmos", "--limit", "2", "--set-name", "t2", "--write-manifest"]
    assert quality.main(_args(clean, noisy, *argv, "--json", str(out))) == 0
    rows = {s["label"]: s for s in json.loads(out.read_text())["systems"]}
    name = read_manifest(limited).name
    assert rows[name]["pack"]["atten_lim_db"] == 6.0
    assert rows[f"{name} (limit off)"]["pack"]["atten_lim_db"] is None
    assert rows[f"{name} (limit off)"]["per_file"] == rows["plain"]["per_file"]
    assert rows[name]["per_file"] != rows["plain"]["per_file"]
    assert read_manifest(limited).scores["t2"]["si_sdr"] == rows[name]["means"]["si_sdr"]


def test_metrics_live_outside_the_runtime():
    """Scoring is not runtime: ``rtns.metrics`` is gone, importing the runtime loads no
    scoring code, and ``rtns_export.metrics`` imports without torch (the benchmark needs no
    ``train`` extra)."""
    code = "\n".join(
        [
            "import importlib.util, sys",
            "sys.modules['torch'] = None  # import torch -> ImportError",
            "import rtns.cli, rtns.engine",
            "assert importlib.util.find_spec('rtns.metrics') is None, 'rtns.metrics still exists'",
            "loaded = sorted(m for m in sys.modules if m.startswith('rtns_export'))",
            "assert not loaded, loaded",
            "from rtns_export import metrics",
            "print(metrics.__name__)",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rtns_export.metrics"


@pytest.mark.parametrize("target_db", [-5.0, 0.0, 20.0])
def test_si_sdr_of_a_known_mix(target_db):
    """SI-SDR of ``a * ref + noise`` (noise orthogonal to ref, any offset) is the ratio of the
    two powers, whatever the scale ``a`` and the DC offsets."""
    from rtns_export import metrics

    rng = np.random.default_rng(3)
    ref = rng.standard_normal(8000)
    r = ref - ref.mean()
    noise = rng.standard_normal(8000)
    noise -= noise.mean()
    noise -= (noise @ r) / (r @ r) * r  # orthogonal to the zero-mean reference
    for a in (0.1, 1.0, 3.0):
        noise_scaled = noise * np.sqrt(a**2 * (r @ r) / (noise @ noise) / 10 ** (target_db / 10))
        est = a * ref + noise_scaled + 0.25
        assert metrics.si_sdr(ref, est) == pytest.approx(target_db, abs=1e-6)
    with pytest.raises(ValueError, match=r"two \[N\] arrays"):
        metrics.si_sdr(ref, ref[:-1])


def test_plots_worst_best_and_metrics_chart(quality, paired_set, random_dtln_pack, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    clean, noisy = paired_set
    out = tmp_path / "plots"
    rc = quality.main(
        _args(clean, noisy, "--pack", f"rnd={random_dtln_pack}", "--no-dnsmos", "--plots", str(out))
    )
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 and names[0] == "metrics.png"
    assert names[1].startswith("rnd-best-") and names[2].startswith("rnd-worst-")
    for p in out.iterdir():
        img = mpimg.imread(p)[..., :3]
        assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.05, p.name
