"""Int8 copies of a pack (rtns_export.quantize): the static one keeps fixed scales and so
stays batch-invariant; the dynamic one computes its activation scale over the whole batch,
so a bank row changes with its neighbours (why the daemon must never batch it)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from rtns.bank import batch_invariant  # noqa: E402
from rtns.engine import Model, enhance_array  # noqa: E402
from rtns.pack import Provenance, read_manifest, verify_files  # noqa: E402
from rtns_export.exporter import parity_signal  # noqa: E402
from rtns_export.fastnet import FastNet, FastNetConfig, export_fastnet  # noqa: E402
from rtns_export.quantize import capture_feeds, quantize_pack  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("q") / "fp32"
    cfg = FastNetConfig(channels=16, bands=8, hidden=16, blocks=1)
    export_fastnet(
        FastNet(cfg).eval(),
        out,
        name="qtest",
        provenance=Provenance(origin="random (test)"),
        parity_input=parity_signal(1.0, seed=1),
    )
    return out


def test_static_int8_is_a_checked_batch_invariant_pack(pack, tmp_path):
    x = parity_signal(2.0, seed=3)
    feeds = capture_feeds(pack, [x])
    assert len(feeds) == (x.shape[0] - 512) // 128 // 4 + 1
    out = quantize_pack(pack, tmp_path / "int8", "static", feeds)
    man = read_manifest(out)
    verify_files(out, man)  # the new graph's hash is the manifest's
    assert man.name == "qtest-int8-static" and "static int8" in man.provenance.quantized
    model = Model(out)
    assert batch_invariant(model, max_batch=8)
    y, ref = enhance_array(model, x), enhance_array(Model(pack), x)
    assert 0 < np.max(np.abs(y - ref)) < 0.1  # int8: close to the float model, not equal


def test_dynamic_int8_is_not_batch_invariant(pack, tmp_path):
    out = quantize_pack(pack, tmp_path / "dyn", "dynamic")
    assert not batch_invariant(Model(out), max_batch=8)


def test_static_needs_feeds(pack, tmp_path):
    with pytest.raises(ValueError, match="calibration feeds"):
        quantize_pack(pack, tmp_path / "s", "static", [])
