"""import-dtln: Keras .h5 -> DTLN -> pack, checked against the official split-ONNX loop.

The official-weight tests need ../shared (weights and the VoiceBank+DEMAND subset); the
mapping and error tests run anywhere torch and h5py are installed, on synthetic .h5 files
written in the official layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

from cli_helpers import run_rtns  # noqa: E402

from rtns.engine import Model, enhance_array  # noqa: E402
from rtns.errors import UserInputError  # noqa: E402
from rtns_export.dtln import DTLN, DTLNConfig  # noqa: E402
from rtns_export.dtln_import import (  # noqa: E402
    build_dtln,
    default_pack_name,
    import_dtln,
    read_keras_h5,
)

REPO = Path(__file__).resolve().parents[1]
NORM_FILES = ("DTLN_norm_500h.h5", "DTLN_norm_40h.h5")


# -- synthetic files in the official layout ---------------------------------------------------
def _keras_tensors(model: DTLN, norm_names: bool) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The model's weights as Keras layers in file order: [(layer, [(weight name, array)])].

    ``norm_names`` uses the norm files' naming (``lstm/lstm_cell/kernel:0``, iLN layers)."""

    def np_(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float32)

    def lstm(layer: str, mod: torch.nn.LSTM, k: int):
        # lstm -> lstm/lstm_cell/..., lstm_3 -> lstm_3/lstm_cell_3/... in the norm files
        suffix = layer[len("lstm") :]
        prefix = f"{layer}/lstm_cell{suffix}/" if norm_names else f"{layer}/"
        bias = getattr(mod, f"bias_ih_l{k}") + getattr(mod, f"bias_hh_l{k}")
        return (
            layer,
            [
                (prefix + "kernel:0", np_(getattr(mod, f"weight_ih_l{k}")).T),
                (prefix + "recurrent_kernel:0", np_(getattr(mod, f"weight_hh_l{k}")).T),
                (prefix + "bias:0", np_(bias)),
            ],
        )

    layers = [("input_1", []), ("lambda", [])]
    if model.norm1 is not None:
        ln = "instant_layer_normalization"
        layers.append(
            (
                ln,
                [
                    (f"{ln}/gamma:0", np_(model.norm1.gamma)),
                    (f"{ln}/beta:0", np_(model.norm1.beta)),
                ],
            )
        )
    layers += [lstm("lstm", model.lstm1, 0), ("dropout", []), lstm("lstm_1", model.lstm1, 1)]
    layers.append(
        (
            "dense",
            [
                ("dense/kernel:0", np_(model.dense1.weight).T),
                ("dense/bias:0", np_(model.dense1.bias)),
            ],
        )
    )
    layers.append(("conv1d", [("conv1d/kernel:0", np_(model.encoder.weight).T[None])]))
    ln2 = "instant_layer_normalization_1" if norm_names else "layer_normalization"
    layers.append(
        (
            ln2,
            [(f"{ln2}/gamma:0", np_(model.norm2.gamma)), (f"{ln2}/beta:0", np_(model.norm2.beta))],
        )
    )
    layers += [lstm("lstm_2", model.lstm2, 0), lstm("lstm_3", model.lstm2, 1)]
    layers.append(
        (
            "dense_1",
            [
                ("dense_1/kernel:0", np_(model.dense2.weight).T),
                ("dense_1/bias:0", np_(model.dense2.bias)),
            ],
        )
    )
    layers.append(("conv1d_1", [("conv1d_1/kernel:0", np_(model.decoder.weight).T[None])]))
    return layers


def write_keras_h5(path: Path, model: DTLN, *, drop_layer: str | None = None) -> Path:
    """Write ``model`` as a Keras ``save_weights`` file in the official layout."""
    layers = [lay for lay in _keras_tensors(model, model.cfg.norm) if lay[0] != drop_layer]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        f.attrs["backend"] = b"tensorflow"
        for name, tensors in layers:
            g = f.create_group(name)
            g.attrs["weight_names"] = np.array([w.encode() for w, _ in tensors], dtype="S")
            for wname, arr in tensors:
                g.create_dataset(wname, data=arr)
    return path


@pytest.mark.parametrize("norm", [False, True])
def test_synthetic_h5_roundtrip_reproduces_model(tmp_path, norm):
    torch.manual_seed(3)
    ref = DTLN(DTLNConfig(norm=norm)).eval()
    w = read_keras_h5(write_keras_h5(tmp_path / "w.h5", ref))
    assert w.norm is norm
    got = build_dtln(w)
    assert got.cfg.norm is norm
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((1, 16_000)).astype(np.float32) * 0.1
    )
    with torch.no_grad():
        np.testing.assert_allclose(got(x).numpy(), ref(x).numpy(), atol=1e-5, rtol=0)


def test_missing_file_error(tmp_path):
    with pytest.raises(UserInputError, match=r"nope\.h5: no such file"):
        read_keras_h5(tmp_path / "nope.h5")


def test_non_h5_error(tmp_path):
    p = tmp_path / "model.h5"
    p.write_bytes(b"not hdf5 at all\n" * 10)
    with pytest.raises(UserInputError, match=r"model\.h5: not an HDF5 file"):
        read_keras_h5(p)


def test_h5_without_keras_layout_error(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(UserInputError, match="not a Keras weight file"):
        read_keras_h5(p)


@pytest.mark.parametrize("layer", ["lstm_2", "conv1d_1", "layer_normalization"])
def test_missing_layer_is_named(tmp_path, layer):
    torch.manual_seed(0)
    p = write_keras_h5(tmp_path / "w.h5", DTLN(), drop_layer=layer)
    with pytest.raises(
        UserInputError, match=f"not a DTLN weight file \\(layer '{layer}' is missing\\)"
    ):
        build_dtln(read_keras_h5(p))


def test_wrong_shape_is_named(tmp_path):
    torch.manual_seed(0)
    p = write_keras_h5(tmp_path / "w.h5", DTLN(DTLNConfig(encoder=128)))
    with pytest.raises(
        UserInputError, match=r"layer 'conv1d' weight 'kernel' has shape \(1, 512, 128\)"
    ):
        build_dtln(read_keras_h5(p))


def test_default_names():
    assert default_pack_name("x/model.h5") == "dtln-official"
    assert default_pack_name("DTLN_norm_500h.h5") == "dtln-official-norm-500h"
    assert default_pack_name("DTLN_norm_40h.h5") == "dtln-official-norm-40h"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.h5", "no such file"),
        (lambda d: (d / "bad.h5").write_text("hello") and d / "bad.h5", "not an HDF5 file"),
        (
            lambda d: write_keras_h5(d / "w.h5", DTLN(), drop_layer="lstm_2"),
            "w.h5: not a DTLN weight file (layer 'lstm_2' is missing)",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path, make, message):
    path = make(tmp_path)
    r = run_rtns("import-dtln", str(path), str(tmp_path / "pack"), cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtns: error: ") and message in lines[0]
    assert not (tmp_path / "pack").exists()


def test_synthetic_import_end_to_end(tmp_path):
    """The whole import (h5 -> DTLN -> ONNX pack -> parity) without the official files;
    missing parent folders of OUT_DIR are created."""
    from rtns.pack import read_manifest, sha256_file
    from rtns_export.exporter import offline_reference

    torch.manual_seed(5)
    ref = DTLN(DTLNConfig(norm=True)).eval()
    h5 = write_keras_h5(tmp_path / "DTLN_norm_40h.h5", ref)
    out = tmp_path / "a" / "b" / "pack"
    manifest, err = import_dtln(h5, out)
    assert err <= 1e-4 and manifest.name == "dtln-official-norm-40h"
    assert read_manifest(out).provenance.model_dump()["source_sha256"] == sha256_file(h5)
    x = np.random.default_rng(2).standard_normal(16_000).astype(np.float32) * 0.1
    y = enhance_array(Model(out), x)
    # trailing zeros: the engine's flush feeds zeros through the last blocks too
    tail = np.zeros(512, np.float32)
    want = offline_reference(ref, np.concatenate([x, tail]), 384)[384 : 384 + x.shape[0]]
    np.testing.assert_allclose(y, want, atol=1e-4, rtol=0)


def test_refuses_non_empty_out_dir(tmp_path):
    torch.manual_seed(0)
    p = write_keras_h5(tmp_path / "w.h5", DTLN())
    out = tmp_path / "pack"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserInputError, match="not empty"):
        import_dtln(p, out)
    assert sorted(q.name for q in out.iterdir()) == ["keep.txt"]


# -- the official weights ------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_dir(shared_dir) -> Path:
    d = shared_dir / "weights" / "dtln"
    need = ["model.h5", "model_1.onnx", "model_2.onnx", *NORM_FILES]
    missing = [n for n in need if not (d / n).is_file()]
    if missing:
        pytest.skip(f"official DTLN weights absent from {d}: {', '.join(missing)}")
    return d


@pytest.fixture(scope="module")
def noisy_speech(shared_dir) -> np.ndarray:
    """Real noisy recordings: 4 VoiceBank+DEMAND test utterances end to end, 16 kHz mono."""
    import soundfile as sf

    files = sorted((shared_dir / "data" / "test" / "vbdemand36" / "noisy").glob("*.flac"))[:4]
    if len(files) < 4:
        pytest.skip("needs the vbdemand36 noisy test files in ../shared/data")
    parts = []
    for f in files:
        x, sr = sf.read(f, dtype="float32")
        assert sr == 16_000 and x.ndim == 1
        parts.append(x)
    x = np.concatenate(parts)
    assert x.shape[0] > 16_000 * 5
    return x


def _pack_files_in_repo() -> set[tuple[str, int, int]]:
    """Files under the repo that an import could write (ONNX graphs, manifests), with size
    and mtime. Colleagues edit other files in the tree concurrently, so only these count."""
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in {".git", "__pycache__", ".pytest_cache"}]
        for name in files:
            if name.endswith(".onnx") or name == "manifest.json":
                st = os.stat(os.path.join(root, name))
                found.add((os.path.join(root, name), st.st_size, st.st_mtime_ns))
    return found


@pytest.fixture(scope="module")
def official_pack(official_dir, tmp_path_factory) -> Path:
    """model.h5 imported through the CLI (run from the repo root) into a tmp folder."""
    before = _pack_files_in_repo()
    out = tmp_path_factory.mktemp("official") / "dtln-official"
    r = run_rtns("import-dtln", str(official_dir / "model.h5"), str(out), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert _pack_files_in_repo() == before, "import-dtln wrote into the repository"
    assert sorted(p.name for p in out.iterdir()) == [
        "dtln_stage1.onnx",
        "dtln_stage2.onnx",
        "manifest.json",
    ]
    return out


def test_engine_with_imported_pack_matches_official_loop(official_dir, official_pack, noisy_speech):
    from rtns_export.official_dtln import OfficialDTLN

    x = noisy_speech
    ref = OfficialDTLN(official_dir).process(x)
    y = enhance_array(Model(official_pack), x)
    assert y.shape == ref.shape == x.shape
    err = float(np.max(np.abs(y.astype(np.float64) - ref)))
    print(f"engine vs official DTLN over {x.shape[0]} samples: max abs error {err:.3g}")
    assert err <= 1e-4
    # The reference really denoises (the comparison is not between two silent outputs).
    assert np.std(ref) > 0.01 and np.max(np.abs(ref - x)) > 0.01


def test_official_loop_hop_api_equals_process(official_dir, noisy_speech):
    from rtns_export.official_dtln import LATENCY, OfficialDTLN

    ref = OfficialDTLN(official_dir)
    x = noisy_speech[: 128 * 100]
    whole = ref.process(x)
    ref.reset()
    hops = np.concatenate([ref.hop(x[i : i + 128]) for i in range(0, x.shape[0], 128)])
    np.testing.assert_array_equal(hops[LATENCY:], whole[: x.shape[0] - LATENCY])


def test_imported_manifest_records_origin(official_dir, official_pack):
    from rtns.pack import read_manifest, sha256_file

    m = read_manifest(official_pack)
    assert m.family == "dtln" and m.name == "dtln-official" and m.latency_samples == 384
    prov = m.provenance.model_dump()
    assert prov["source_file"] == "model.h5"
    assert prov["source_sha256"] == sha256_file(official_dir / "model.h5")
    assert "breizhn/DTLN" in prov["origin"] and "MIT" in prov["licence"]


@pytest.mark.parametrize("fname", NORM_FILES)
def test_norm_files_import_and_run(official_dir, noisy_speech, tmp_path, fname):
    w = read_keras_h5(official_dir / fname)
    assert w.norm
    manifest, err = import_dtln(official_dir / fname, tmp_path / "pack")
    assert err <= 1e-4
    assert manifest.name == default_pack_name(fname)
    assert "iLN" in manifest.description
    x = noisy_speech[: 16_000 * 3]
    y = enhance_array(Model(tmp_path / "pack"), x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    assert np.max(np.abs(y - x)) > 0.01
    assert 0.01 < np.std(y) < 2 * np.std(x)
