"""Pack loading failures: each gives one PackError sentence that names the file."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from packs import PASSTHROUGH_FAMILY

from rtns import framing
from rtns.cli.files import models_table
from rtns.engine import Model
from rtns.pack import (
    FAMILIES_ENV,
    KNOWN_FAMILIES,
    MANIFEST,
    PACK_PATH_ENV,
    PackError,
    initial_states,
    iter_packs,
    known_families,
    read_manifest,
    register_family,
    resolve_pack,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pack(passthrough_pack, tmp_path) -> Path:
    """A private copy of the pass-through pack that a test may damage."""
    return Path(shutil.copytree(passthrough_pack, tmp_path / "pack"))


def _edit_manifest(pack: Path, edit: Callable[[dict], None]) -> None:
    path = pack / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _load_error(pack: Path) -> str:
    with pytest.raises(PackError) as info:
        Model(pack)
    msg = str(info.value)
    assert "\n" not in msg, "a PackError is one sentence on one line"
    return msg


def test_intact_copy_loads(pack):
    m = Model(pack)
    assert m.name == "passthrough" and m.latency == 384
    assert set(m.initial_state()) == {"m_count", "f_count"}


def test_sha256_mismatch(pack):
    onnx = pack / "mask.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    msg = _load_error(pack)
    assert str(onnx) in msg and "sha256" in msg and "corrupt or was changed" in msg


def test_missing_onnx_file(pack):
    (pack / "frame.onnx").unlink()
    msg = _load_error(pack)
    assert str(pack / "frame.onnx") in msg and "missing" in msg and "frame graph" in msg


def test_renamed_state_input_disagrees_with_graph(pack):
    def rename(d: dict) -> None:
        d["graphs"][0]["states"][0]["input"] = "m_counter"

    _edit_manifest(pack, rename)
    msg = _load_error(pack)
    assert str(pack / "mask.onnx") in msg
    assert "graph inputs are ['feat', 'm_count']" in msg and "'m_counter'" in msg


def test_changed_state_shape_disagrees_with_graph(pack):
    def reshape(d: dict) -> None:
        d["graphs"][1]["states"][0]["shape"] = ["batch", 2]

    _edit_manifest(pack, reshape)
    msg = _load_error(pack)
    assert str(pack / "frame.onnx") in msg
    assert "'f_count' has shape ['batch', 1] but the manifest says ['batch', 2]" in msg


def test_changed_signal_shape_is_invalid_manifest(pack):
    def reshape(d: dict) -> None:
        d["graphs"][0]["signal_in"]["shape"] = ["batch", 1, 129]

    _edit_manifest(pack, reshape)
    msg = _load_error(pack)
    assert str(pack / MANIFEST) in msg and "invalid manifest" in msg and "[batch, 1, 257]" in msg


def test_corrupt_onnx_with_matching_hash(pack):
    onnx = pack / "mask.onnx"
    onnx.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 3)

    def rehash(d: dict) -> None:
        d["graphs"][0]["sha256"] = sha256_file(onnx)

    _edit_manifest(pack, rehash)
    msg = _load_error(pack)
    assert str(onnx) in msg and "onnxruntime cannot load it" in msg


def test_invalid_json(pack):
    (pack / MANIFEST).write_text('{"format": "rtns-pack/1", "name": ')
    msg = _load_error(pack)
    assert str(pack / MANIFEST) in msg and "not readable JSON" in msg


def test_unknown_family(pack):
    def fam(d: dict) -> None:
        d["family"] = "wavenet"

    _edit_manifest(pack, fam)
    msg = _load_error(pack)
    assert str(pack / MANIFEST) in msg and "invalid manifest at family" in msg
    assert (
        "unknown family 'wavenet'; known families: dtln, fastnet, frcrn, gtcrn, lowlat, passthrough"
        in msg
    )


def test_families_are_a_registry(pack, monkeypatch):
    """The runtime knows the shipped families; the tests' family is registered by the tests."""
    assert {"dtln", "frcrn", "gtcrn"} <= KNOWN_FAMILIES
    assert PASSTHROUGH_FAMILY in known_families()
    assert PASSTHROUGH_FAMILY in os.environ[FAMILIES_ENV].split(",")  # for CLI subprocesses

    def fam(d: dict) -> None:
        d["family"] = "wavenet"

    _edit_manifest(pack, fam)
    monkeypatch.setattr("rtns.pack.KNOWN_FAMILIES", set(KNOWN_FAMILIES))
    monkeypatch.setenv(FAMILIES_ENV, "other, wavenet")
    assert read_manifest(pack).family == "wavenet"
    monkeypatch.delenv(FAMILIES_ENV)
    with pytest.raises(PackError, match="unknown family 'wavenet'"):
        read_manifest(pack)
    register_family("wavenet")
    assert read_manifest(pack).family == "wavenet"
    with pytest.raises(ValueError, match="lower-case"):
        register_family("Wave Net")


def test_framing_constants_and_derived_latency():
    assert (framing.SAMPLE_RATE, framing.BLOCK_LEN, framing.BLOCK_SHIFT) == (16_000, 512, 128)
    assert framing.N_BINS == 257
    assert framing.LATENCY_SAMPLES == 384
    assert framing.LATENCY_MS == pytest.approx(24.0)
    spec = framing.FrameSpec()
    assert (spec.n_bins, spec.latency_samples, spec.latency_ms) == (257, 384, 24.0)
    # Engine-independent framings are accepted: an even block of whole hops at 16 kHz.
    other = framing.FrameSpec(block_len=256, block_shift=64)
    assert (other.n_bins, other.latency_samples, other.latency_ms) == (129, 192, 12.0)


@pytest.mark.parametrize(
    ("frames", "expect"),
    [
        (
            {"sample_rate": 8000},
            "invalid manifest at frames: sample_rate is 8000 Hz but every rtns model runs at "
            "16000 Hz",
        ),
        ({"sample_rate": 48000}, "sample_rate is 48000 Hz"),
        (
            {"block_shift": 100},
            "invalid manifest at frames: block_len 512 must be a multiple of block_shift 100",
        ),
        ({"block_len": 511}, "invalid manifest at frames: block_len must be even"),
        ({"block_len": 1 << 20}, "invalid manifest at frames.block_len"),
    ],
)
def test_framing_the_engine_cannot_honour_is_refused(pack, frames, expect):
    """A 16 kHz model must never run at another rate (8000 used to run it at 8 kHz)."""

    def edit(d: dict) -> None:
        d["frames"].update(frames)

    _edit_manifest(pack, edit)
    with pytest.raises(PackError) as info:
        read_manifest(pack)
    msg = str(info.value)
    assert msg.startswith(str(pack / MANIFEST)) and expect in msg and "\n" not in msg
    assert msg == _load_error(pack)


@pytest.mark.parametrize("latency", [1_000_000_000, 10**12, 0, 383, 512])
def test_latency_must_be_what_the_framing_implies(pack, latency):
    """1e9 made enhance run for hours, 1e12 was a traceback, 0 silently shifted output."""

    def edit(d: dict) -> None:
        d["latency_samples"] = latency

    _edit_manifest(pack, edit)
    assert _load_error(pack) == (
        f"{pack / MANIFEST}: invalid manifest at latency_samples: latency_samples is {latency} "
        "but the framing implies 384 (block_len 512 - block_shift 128)"
    )


@pytest.mark.parametrize("init", [1e39, -1e39, 1000.5, -2e3, float("nan"), float("inf")])
def test_state_init_must_be_finite_and_small(pack, init):
    def edit(d: dict) -> None:
        d["graphs"][0]["states"][0]["init"] = init

    _edit_manifest(pack, edit)  # json writes NaN and Infinity, and reads them back
    msg = _load_error(pack)
    assert msg.startswith(f"{pack / MANIFEST}: invalid manifest at graphs.0.states.0.init: ")
    assert msg.endswith(
        f"state 'm_count' has init {init!r}; an initial value must be finite and at most "
        "1000 in magnitude"
    )


def test_state_init_at_the_bound_is_used(pack):
    def edit(d: dict) -> None:
        d["graphs"][0]["states"][0]["init"] = -1000.0

    _edit_manifest(pack, edit)
    st = Model(pack).initial_state(2)
    np.testing.assert_array_equal(st["m_count"], np.full((2, 1), -1000.0, np.float32))
    np.testing.assert_array_equal(st["f_count"], np.zeros((2, 1), np.float32))


def _point_mask_graph_at(pack: Path, file: str) -> None:
    def edit(d: dict) -> None:
        d["graphs"][0]["file"] = file

    _edit_manifest(pack, edit)


@pytest.mark.parametrize(
    "file", ["../outside.onnx", "sub/../../outside.onnx", "ABSOLUTE", "..\\outside.onnx", "."]
)
def test_graph_file_outside_the_pack_is_refused(pack, tmp_path, file):
    """The graph really exists outside with the right sha256: it used to load from there."""
    outside = tmp_path / "outside.onnx"
    shutil.copy(pack / "mask.onnx", outside)
    file = str(outside) if file == "ABSOLUTE" else file
    _point_mask_graph_at(pack, file)
    assert _load_error(pack) == (
        f"{pack / MANIFEST}: invalid manifest at graphs.0.file: graph file {file!r} must be a "
        "relative path inside the pack folder (no absolute path, no '..')"
    )


def test_graph_file_symlinked_outside_the_pack_is_refused(pack, tmp_path):
    outside = tmp_path / "elsewhere" / "mask.onnx"
    outside.parent.mkdir()
    (pack / "mask.onnx").rename(outside)
    (pack / "mask.onnx").symlink_to(outside)
    msg = _load_error(pack)
    assert msg == (
        f"{pack / MANIFEST}: graph file 'mask.onnx' resolves to {outside.resolve()}, outside "
        f"the pack folder {pack.resolve()}"
    )
    # A symlinked subfolder leads outside just the same.
    (pack / "mask.onnx").unlink()
    (pack / "sub").symlink_to(outside.parent)
    _point_mask_graph_at(pack, "sub/mask.onnx")
    assert _load_error(pack) == (
        f"{pack / MANIFEST}: graph file 'sub/mask.onnx' resolves to {outside.resolve()}, "
        f"outside the pack folder {pack.resolve()}"
    )


def test_graph_file_in_a_subfolder_or_symlinked_inside_loads(pack):
    (pack / "graphs").mkdir()
    (pack / "mask.onnx").rename(pack / "graphs" / "mask.onnx")
    _point_mask_graph_at(pack, "graphs/mask.onnx")
    assert Model(pack).name == "passthrough"
    (pack / "link.onnx").symlink_to(pack / "graphs" / "mask.onnx")
    _point_mask_graph_at(pack, "link.onnx")
    assert Model(pack).name == "passthrough"


#: Every pack shipped in models/ (committed); a missing or an unlisted one fails below.
SHIPPED = ("rtns-dtln", "rtns-frcrn", "rtns-gtcrn")


def test_shipped_packs_are_all_there():
    from rtns.pack import DEFAULT_PACK, DEFAULT_SERVE_PACK

    found = sorted(p.parent.name for p in (REPO / "models").glob(f"*/{MANIFEST}"))
    assert found == sorted(SHIPPED)
    assert {DEFAULT_PACK, DEFAULT_SERVE_PACK} <= set(SHIPPED)


@pytest.mark.parametrize("pack_dir", SHIPPED)
def test_shipped_packs_pass_the_checks(pack_dir):
    """Each shipped pack loads as the engine would (file hashes, onnxruntime sessions and
    their inputs and outputs checked against the manifest), its stated latency is the
    framing's, and a second of noise gives finite output of the input's length."""
    path = REPO / "models" / pack_dir
    man = read_manifest(path)
    assert man.name == pack_dir
    assert man.latency_samples == man.frames.latency_samples
    assert man.frames == framing.FrameSpec()  # 16 kHz, 512 / 128: 384 samples, 24 ms
    model = Model(path)  # verify_files + check_session_io
    x = (0.1 * np.random.default_rng(2).standard_normal(16_000)).astype(np.float32)
    st = model.stream()
    y = np.concatenate([st.push(x), st.flush()])
    assert y.shape == (x.shape[0] + framing.LATENCY_SAMPLES,) and np.all(np.isfinite(y))


def test_missing_manifest_and_folder(pack, tmp_path):
    (pack / MANIFEST).unlink()
    assert "missing; a model pack folder needs a manifest.json" in _load_error(pack)
    assert "no such model pack folder" in _load_error(tmp_path / "nowhere")


def test_resolve_by_name_and_unknown_name(passthrough_pack, monkeypatch):
    monkeypatch.setenv(PACK_PATH_ENV, str(passthrough_pack.parent))
    assert resolve_pack("passthrough") == passthrough_pack
    with pytest.raises(PackError, match="no-such-pack: no model pack of that name; known packs:"):
        resolve_pack("no-such-pack")


def _renamed_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    _edit_manifest(dst, lambda d: d.update(name=name))
    return dst


def test_resolve_by_manifest_name(passthrough_pack, tmp_path, monkeypatch):
    """`rtns models` lists manifest names; --model used to accept only folder names."""
    d = tmp_path / "packs"
    folder = _renamed_copy(passthrough_pack, d / "folder-x", "my-model")
    monkeypatch.setenv(PACK_PATH_ENV, str(d))
    assert resolve_pack("my-model") == folder
    assert resolve_pack("folder-x") == folder  # the folder name still works
    with pytest.raises(PackError) as info:
        resolve_pack("nothing")
    assert "known packs: folder-x, my-model, " in str(info.value)


def test_ambiguous_manifest_name_names_both(passthrough_pack, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    a = _renamed_copy(passthrough_pack, one / "a", "twin")
    b = _renamed_copy(passthrough_pack, two / "b", "twin")
    monkeypatch.setenv(PACK_PATH_ENV, f"{one}{os.pathsep}{two}")
    with pytest.raises(PackError) as info:
        resolve_pack("twin")
    assert str(info.value) == (
        f"twin: ambiguous pack name; the packs in {a} and {b} both have it in their manifest "
        "(pass the folder instead)"
    )
    assert resolve_pack("a") == a and resolve_pack("b") == b
    # A folder of that name wins over manifest names, as it did before they were accepted.
    c = _renamed_copy(passthrough_pack, two / "twin", "c")
    assert resolve_pack("twin") == c


def test_models_table_shows_what_model_accepts_and_24ms(passthrough_pack, tmp_path, monkeypatch):
    """`rtns models` said 32 ms and listed manifest names --model could not resolve."""
    d = tmp_path / "packs"
    _renamed_copy(passthrough_pack, d / "folder-x", "my-model")
    _renamed_copy(passthrough_pack, d / "p1", "twin")
    _renamed_copy(passthrough_pack, d / "p2", "twin")
    shutil.copytree(passthrough_pack, d / "other")  # manifest name "passthrough"
    shutil.copytree(passthrough_pack, d / "passthrough")  # the folder wins "passthrough"
    monkeypatch.setenv(PACK_PATH_ENV, str(d))
    monkeypatch.setenv("HOME", str(tmp_path))
    rows = [r for r in models_table() if Path(r.path).parent == d]
    names = {Path(r.path).name: r.name for r in rows}
    assert names == {
        "folder-x": "my-model",
        "p1": "p1",
        "p2": "p2",
        "other": "other",
        "passthrough": "passthrough",
    }
    for r in rows:
        assert (r.family, r.latency, r.limit) == ("passthrough", "24.0 ms", "off")
        assert resolve_pack(r.name) == Path(r.path)


def test_iter_packs_reports_broken(pack, passthrough_pack, tmp_path, monkeypatch):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / MANIFEST).write_text("{")
    monkeypatch.setenv(PACK_PATH_ENV, str(tmp_path))
    found = {p.name: m for p, m in iter_packs() if p.parent == tmp_path}
    assert set(found) == {"broken", "pack"}
    assert isinstance(found["broken"], PackError)
    assert found["pack"].name == "passthrough"


def test_initial_states_shapes(passthrough_pack):
    st = initial_states(read_manifest(passthrough_pack), batch=3)
    assert {k: v.shape for k, v in st.items()} == {"m_count": (3, 1), "f_count": (3, 1)}
    assert all(v.dtype == np.float32 and not v.any() for v in st.values())


# -- issue 31 -----------------------------------------------------------------------------------
def test_deeply_nested_manifest_is_one_sentence(pack, passthrough_pack, tmp_path, monkeypatch):
    """Issue 31 (7): a manifest of deeply nested JSON raised RecursionError (a traceback in
    `rtns enhance --model DIR`, and `rtns models` crashed on one such pack on the path)."""
    from cli_helpers import run_rtns

    bad = tmp_path / "deep"
    bad.mkdir()
    (bad / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    msg = _load_error(bad)
    assert str(bad / MANIFEST) in msg and "nested too deeply" in msg
    r = run_rtns("models", cwd=tmp_path, env={PACK_PATH_ENV: str(tmp_path)}, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    rows = {ln.split()[0]: i for i, ln in enumerate(lines) if not ln.startswith(" ")}
    i = rows["deep"]
    under = " ".join(ln.strip() for ln in lines[i + 1 :] if ln.startswith(" "))  # the reason
    assert "BROKEN" in lines[i] and "nested too deeply" in under
    assert "passthrough" in rows and "BROKEN" not in lines[rows["passthrough"]]


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_graph_file_that_is_no_file_is_named_as_such(pack, kind):
    """Issue 31 (9): a graph file that is a directory or a FIFO was reported 'missing' (and
    a FIFO must not be opened: hashing it would block)."""
    target = pack / "frame.onnx"
    target.unlink()
    if kind == "folder":
        target.mkdir()
    else:
        os.mkfifo(target)
    msg = _load_error(pack)
    assert str(target) in msg and "missing" not in msg
    assert ("a folder, not a graph file" if kind == "folder" else "not a regular file") in msg


@pytest.mark.parametrize("spec", ["", " "])
def test_empty_model_argument(spec):
    """Issue 31 (9): `--model ''` said 'manifest.json: missing' (it meant the current folder)."""
    with pytest.raises(PackError, match="--model is empty; give a pack name"):
        resolve_pack(spec)


def test_a_pack_is_announced_with_its_folder_when_the_names_differ(pack, tmp_path):
    """Issue 31 (9): a pack whose manifest name disagrees with its folder was announced by
    the manifest's name alone (here 'passthrough' from a folder called 'pack')."""
    import soundfile as sf
    from cli_helpers import run_rtns

    sf.write(tmp_path / "in.wav", np.zeros(1600, np.float32), 16_000)
    r = run_rtns("enhance", "in.wav", "out.wav", "-m", str(pack), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"model passthrough (pack folder {pack})" in r.stderr
