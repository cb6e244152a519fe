"""Pack loading failures: each gives one PackError sentence that names the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rtns.engine import Model
from rtns.pack import (
    MANIFEST,
    PACK_PATH_ENV,
    PackError,
    initial_states,
    iter_packs,
    read_manifest,
    resolve_pack,
    sha256_file,
)


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


def test_missing_manifest_and_folder(pack, tmp_path):
    (pack / MANIFEST).unlink()
    assert "missing; a model pack folder needs a manifest.json" in _load_error(pack)
    assert "no such model pack folder" in _load_error(tmp_path / "nowhere")


def test_resolve_by_name_and_unknown_name(passthrough_pack, monkeypatch):
    monkeypatch.setenv(PACK_PATH_ENV, str(passthrough_pack.parent))
    assert resolve_pack("passthrough") == passthrough_pack
    with pytest.raises(PackError, match="no-such-pack: no model pack of that name; known packs:"):
        resolve_pack("no-such-pack")


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
