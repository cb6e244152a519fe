"""The causal recurrent magnitude-mask family (lowlat): pack parity through the engine, a
real-valued mask, causality, batch invariance of the exported graph and config checks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rtns.engine import session_options  # noqa: E402
from rtns.framing import BLOCK_LEN, BLOCK_SHIFT, N_BINS  # noqa: E402
from rtns.pack import Provenance  # noqa: E402
from rtns_export.exporter import parity_signal  # noqa: E402
from rtns_export.lowlat import LowLat, LowLatConfig, export_lowlat  # noqa: E402


@pytest.fixture(scope="module")
def model():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = LowLat(LowLatConfig(hidden=64, layers=2))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.0 + 0.2 * torch.randn_like(p))
    yield m.eval()
    torch.set_num_threads(old)


def test_pack_parity_and_batch_invariance(model, tmp_path):
    import onnxruntime as ort

    manifest, report = export_lowlat(
        model,
        tmp_path / "p",
        name="t",
        provenance=Provenance(origin="random (test)"),
        parity_input=parity_signal(3.0, seed=1),
    )
    assert report.max_abs_err <= 1e-4 and report.n_samples > 40_000
    names = [s.input for s in manifest.graphs[0].states]
    assert names == ["conv_cache", "lstm_h", "lstm_c"]
    assert manifest.provenance.model_extra["macs_per_hop"] == model.macs_per_frame()
    sess = ort.InferenceSession(
        str(tmp_path / "p" / "lowlat_mask.onnx"),
        session_options(1),
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(0)
    feeds = {
        i.name: (rng.standard_normal([16, *i.shape[1:]]) * 0.5).astype(np.float32)
        for i in sess.get_inputs()
    }
    ref = sess.run(None, feeds)
    assert np.all(ref[0][:, 1] == 0) and np.all((ref[0][:, 0] > 0) & (ref[0][:, 0] < 1))
    for b in range(1, 17):
        got = sess.run(None, {k: v[:b] for k, v in feeds.items()})
        assert all(np.array_equal(o, r[:b]) for o, r in zip(got, ref, strict=True)), b


def test_causal(model):
    x = parity_signal(2.0, seed=3)
    n = 16000 + 77
    x2 = x.copy()
    x2[n:] = 0.3
    with torch.inference_mode():
        y = model(torch.from_numpy(x)[None])[0].numpy()
        y2 = model(torch.from_numpy(x2)[None])[0].numpy()
    first = -(-(n - BLOCK_LEN + 1) // BLOCK_SHIFT) * BLOCK_SHIFT
    assert np.array_equal(y[:first], y2[:first])
    assert np.max(np.abs(y[first:] - y2[first:])) > 1e-4


def test_step_shapes_and_bad_config(model):
    st = model.zero_states(2)
    mask, *new = model.step(torch.randn(2, 2, N_BINS), *st.values())
    assert mask.shape == (2, 2, N_BINS)
    assert [tuple(t.shape) for t in new] == [tuple(v.shape) for v in st.values()]
    from rtns_export.families import FamilyError, build_model

    for bad in ({"hidden": 100}, {"layers": 0}, {"nope": 1}):
        with pytest.raises(FamilyError, match="lowlat"):
            build_model("lowlat", bad)
