"""The causal GTCRN-class family: ERB matrices, grouped GRUs, full-sequence vs one-frame step
parity, causality, state inventory vs manifest, pack parity through the engine, and batch
invariance of the exported graph (bit-for-bit) in the engine's onnxruntime settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from packs import parameters_in_graph, perturbed  # noqa: E402

from rtns.engine import Model, Stream, enhance_array, session_options  # noqa: E402
from rtns.framing import BLOCK_LEN, BLOCK_SHIFT, N_BINS  # noqa: E402
from rtns.pack import Provenance, read_manifest  # noqa: E402
from rtns_export.cmask import (  # noqa: E402
    analysis_window,
    overlap_add,
    synthesis_window,
)
from rtns_export.exporter import parity_signal  # noqa: E402
from rtns_export.gtcrn import (  # noqa: E402
    GTCRN,
    GroupedGRU,
    GTCRNConfig,
    PReLU,
    erb_matrices,
    erb_triangles,
    export_gtcrn,
    sfe,
)

REPO = Path(__file__).resolve().parents[1]
LATENCY = BLOCK_LEN - BLOCK_SHIFT
SMALL = GTCRNConfig(dilations=(1, 2), dp_blocks=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomized(cfg: GTCRNConfig | None = None, seed: int = 0) -> GTCRN:
    """A model with every weight perturbed (PReLU slopes, biases, BN statistics too) at the
    scale of a trained model, in eval mode."""
    torch.manual_seed(seed)
    return perturbed(GTCRN(cfg))


@pytest.fixture(scope="module")
def model() -> GTCRN:
    return randomized()


@pytest.fixture(scope="module")
def pack(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gtcrn") / "pack"
    manifest, report = export_gtcrn(
        model,
        out,
        name="test-gtcrn",
        provenance=Provenance(origin="random weights (test)"),
        parity_input=parity_signal(4.0, seed=2),
    )
    return out, manifest, report


def _bands(c: GTCRNConfig) -> tuple[int, int, int]:
    """Bands after the ERB compression and after each band-stride-2 convolution (129, 65, 33)."""
    b0 = c.erb_low + c.erb_bands
    return b0, (b0 + 1) // 2, ((b0 + 1) // 2 + 1) // 2


def macs_from_layer_plan(c: GTCRNConfig) -> int:
    """MACs of one hop of one stream, from the layer plan (docs/training-log.md, "Layer
    plan"), not from the modules: each convolution is output positions x input channels per
    group x taps (a transposed one: input positions x output channels per group x taps), a
    linear layer rows x in x out, a GRU step 3 x hidden x (input + hidden) per group and
    direction; plus the model's stated conventions: the dense part of the ERB matrices and
    the TRA energy (one product per channel and band)."""
    _, b1, b2 = _bands(c)
    h = c.channels // 2  # a GTConv's half
    tra = h * c.tra_expand  # the TRA GRU's width
    enc = c.channels * b1 * 9 * 5 + c.channels * b2 * h * 5  # SFE: 3 features x 3 taps
    gtconv = (
        c.channels * b2 * h * 3  # SFE + 1x1 conv of the first half, as one 1x3 conv
        + c.channels * b2 * 9  # depthwise 3x3
        + h * b2 * c.channels  # 1x1 conv back to the half
        + 3 * tra * (h + tra)  # TRA GRU
        + tra * h  # TRA FC
        + h * b2  # TRA energy
    )
    gi, per = c.channels // c.rnn_groups, c.rnn_hidden // c.rnn_groups
    intra = b2 * 2 * c.rnn_groups * 3 * (per // 2) * (gi + per // 2)  # over bands, both ways
    inter = b2 * c.rnn_groups * 3 * per * (gi + per)  # one frame, every band
    dp = intra + inter + 2 * b2 * c.rnn_hidden * c.channels  # + the two FCs, every band
    dec = b2 * c.channels * h * 5 + b1 * c.channels * 2 * 5
    erb = 3 * N_BINS * c.erb_bands + 2 * c.erb_bands * (N_BINS - c.erb_low)
    return enc + 2 * len(c.dilations) * gtconv + c.dp_blocks * dp + dec + erb


def state_floats_from_layer_plan(c: GTCRNConfig) -> int:
    """Floats of one stream's state: each GTConv's depthwise-conv input over its last 2d
    frames (encoder and decoder), each TRA GRU's state, each dual-path block's inter-frame
    GRU state per band."""
    _, _, b2 = _bands(c)
    caches = 2 * sum(c.channels * 2 * d * b2 for d in c.dilations)
    tra = 2 * len(c.dilations) * (c.channels // 2) * c.tra_expand
    return caches + tra + c.dp_blocks * b2 * c.rnn_hidden


def spectra(x: np.ndarray) -> torch.Tensor:
    xt = torch.from_numpy(x)[None]
    return torch.fft.rfft(xt.unfold(-1, BLOCK_LEN, BLOCK_SHIFT) * analysis_window(), dim=-1)[0]


def step_loop(model: GTCRN, x: np.ndarray) -> np.ndarray:
    """One-frame steps with explicit states over x (frames from sample 0), synthesized and
    overlap-added in torch: comparable with forward(x)."""
    spec = spectra(x)
    states = list(model.zero_states(1).values())
    blocks = []
    with torch.inference_mode():
        for t in range(spec.shape[0]):
            feat = torch.stack([spec[t].real, spec[t].imag])[None]
            mask, *states = model.step(feat, *states)
            est = spec[t] * torch.complex(mask[0, 0], mask[0, 1])
            blocks.append(torch.fft.irfft(est, n=BLOCK_LEN) * synthesis_window())
    return overlap_add(torch.stack(blocks)[None], BLOCK_SHIFT)[0].double().numpy()


def forward_np(model: GTCRN, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)[None])[0].double().numpy()


# -- building blocks ----------------------------------------------------------------------------
def test_erb_matrices():
    w = erb_triangles()
    assert w.shape == (64, N_BINS - 65)
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)  # partition of unity
    assert np.all(w >= 0) and np.all(w.max(1) > 0.5)  # every band owns a bin
    comp, exp = erb_matrices(pad_bins=272)
    assert comp.shape == (272, 129) and exp.shape == (129, N_BINS)
    assert np.all(comp[N_BINS:] == 0)
    # a constant spectrum stays constant through the compression (band means) ...
    np.testing.assert_allclose(np.ones(272) @ comp, 1.0, atol=1e-6)
    # ... and a constant band mask is the same constant on every bin
    np.testing.assert_allclose(np.full(129, 0.7) @ exp, 0.7, atol=1e-6)
    # the linear part passes bins 0..64 unchanged
    x = np.arange(272, dtype=np.float32)
    np.testing.assert_array_equal((x @ comp)[:65], x[:65])
    # band centres rise monotonically in frequency
    centre = (w * np.arange(w.shape[1])).sum(1) / w.sum(1)
    assert np.all(np.diff(centre) > 0)


def test_sfe_unfolds_neighbours():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 2, 1, 5)
    y = sfe(x)
    assert y.shape == (1, 6, 1, 5)
    # channel c*3 + k holds band f + k - 1 of channel c (zeros beyond the edges)
    assert y[0, :3, 0, 2].tolist() == [1.0, 2.0, 3.0]
    assert y[0, 3:, 0, 0].tolist() == [0.0, 5.0, 6.0]
    assert y[0, 5, 0, 4].item() == 0.0


def test_prelu_matches_torch_prelu():
    torch.manual_seed(0)
    p = PReLU(4)
    with torch.no_grad():
        p.weight.copy_(torch.tensor([0.25, -0.5, 0.0, 1.5]))
    x = torch.randn(3, 4, 5, 6)
    ref = torch.nn.functional.prelu(x, p.weight)
    assert torch.equal(p(x), ref)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_grouped_gru_equals_independent_grus(bidirectional):
    torch.manual_seed(1)
    g = GroupedGRU(16, 16, 2, bidirectional)
    x = torch.randn(3, 7, 16)
    h = None if bidirectional else torch.randn(3, 16)
    y, hn = g(x, h)
    per = g.per
    outs = {}
    for grp in range(2):
        ref = torch.nn.GRU(8, per, batch_first=True, bidirectional=bidirectional)
        with torch.no_grad():
            for d in range(g.dirs):
                sfx = "_reverse" if d else ""
                getattr(ref, f"weight_ih_l0{sfx}").copy_(g.w_ih[d, grp].reshape(3 * per, 8))
                getattr(ref, f"weight_hh_l0{sfx}").copy_(g.w_hh[d, grp].reshape(3 * per, per))
                getattr(ref, f"bias_ih_l0{sfx}").copy_(g.b_ih[d, grp].reshape(-1))
                getattr(ref, f"bias_hh_l0{sfx}").copy_(g.b_hh[d, grp].reshape(-1))
        h0 = None if h is None else h[None, :, grp * per : (grp + 1) * per].contiguous()
        o, hr = ref(x[..., grp * 8 : (grp + 1) * 8], h0)
        outs[grp] = (o, hr)
    for d in range(g.dirs):
        for grp in range(2):
            got = y[..., d * 2 * per + grp * per : d * 2 * per + (grp + 1) * per]
            want = outs[grp][0][..., d * per : (d + 1) * per]
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if not bidirectional:
        torch.testing.assert_close(hn, torch.cat([outs[0][1][0], outs[1][1][0]], -1))
    # parameters are the groups' blocks only
    n_ref = 2 * g.dirs * (3 * per * 8 + 3 * per * per + 6 * per)
    assert sum(p.numel() for p in g.parameters()) == n_ref


# -- the network --------------------------------------------------------------------------------
def test_unit_mask_reconstructs_the_input():
    m = GTCRN().eval()
    m.net = lambda feat, st: (torch.stack([torch.ones_like(feat[:, 0]), 0 * feat[:, 1]], 1), {})
    x = parity_signal(1.0)
    y = forward_np(m, x)
    np.testing.assert_allclose(y[LATENCY:-LATENCY], x[LATENCY : y.shape[0] - LATENCY], atol=1e-5)


def test_initial_mask_is_a_mild_pass_through():
    """Untrained, the mask starts near tanh(1) ~ 0.76 (real) on every bin."""
    m = GTCRN().eval()
    spec = spectra(parity_signal(1.0))
    feat = torch.stack([spec.real, spec.imag], 0)[None]  # [1, 2, T, 257]
    with torch.no_grad():
        mask, _ = m.net(feat, m.zero_states(1))
    assert mask.shape == (1, 2, spec.shape[0], N_BINS)
    assert 0.5 < float(mask[:, 0].mean()) < 0.9
    assert float(mask[:, 1].abs().mean()) < 0.2


def test_step_loop_matches_full_sequence(model):
    x = parity_signal(3.0, seed=1)
    full = forward_np(model, x)
    stepped = step_loop(model, x)
    assert full.shape == stepped.shape
    assert np.max(np.abs(full)) > 1e-3
    assert float(np.max(np.abs(full - x[: full.shape[0]]))) > 1e-3  # the mask does something
    err = float(np.max(np.abs(full - stepped)))
    assert err <= 1e-4, f"step loop differs from forward by {err:.3g}"


@pytest.mark.parametrize("n", [2 * 16000, 2 * 16000 + 77])
def test_model_is_causal(model, n):
    """Changing the input from sample n on leaves every output sample before the first frame
    that contains n unchanged, and changes later ones."""
    x = parity_signal(3.0, seed=3)
    x2 = x.copy()
    x2[n:] = np.random.default_rng(5).standard_normal(x.shape[0] - n).astype(np.float32) * 0.3
    y, y2 = forward_np(model, x), forward_np(model, x2)
    first = -(-(n - BLOCK_LEN + 1) // BLOCK_SHIFT) * BLOCK_SHIFT
    assert np.array_equal(y[:first], y2[:first])
    assert np.max(np.abs(y[first:] - y2[first:])) > 1e-3


def test_state_inventory(model):
    cfg = model.cfg
    names = [s.name for s in model.state_defs]
    assert len(names) == len(set(names))
    n_blocks = len(cfg.dilations)
    assert sum(n.endswith("_conv_cache") for n in names) == 2 * n_blocks
    assert sum(n.endswith("_tra_h") for n in names) == 2 * n_blocks
    assert sum(n.endswith("_inter_h") for n in names) == cfg.dp_blocks
    for i, d in enumerate(cfg.dilations):
        s = next(s for s in model.state_defs if s.name == f"enc{i}_conv_cache")
        assert s.shape == (cfg.channels, 2 * d, 33)
    s = next(s for s in model.state_defs if s.name == "dp0_inter_h")
    assert s.shape == (33, cfg.rnn_hidden)
    states = model.zero_states(3)
    with torch.no_grad():
        mask, *new = model.step(torch.randn(3, 2, N_BINS), *states.values())
    assert mask.shape == (3, 2, N_BINS)
    assert torch.all(mask.abs() <= 1.0 + 1e-6)
    assert [tuple(t.shape) for t in new] == [tuple(v.shape) for v in states.values()]
    # every state is live: one step from zeros changes all of them
    assert all(float(t.abs().max()) > 0 for t in new)


def test_exported_pack_matches_forward_and_manifest(model, pack, tmp_path):
    out, manifest, report = pack
    assert report.max_abs_err <= 1e-4 and report.n_samples >= 60_000
    assert manifest.family == "gtcrn"  # its own family, on the complex-mask pack layout
    assert manifest.latency_samples == LATENCY
    assert manifest.frontend.window == "sqrt_hann" and manifest.frontend.mask == "complex"
    assert [g.role for g in manifest.graphs] == ["mask"]
    states = manifest.graphs[0].states
    assert [s.input for s in states] == [s.name for s in model.state_defs]
    assert [tuple(s.shape[1:]) for s in states] == [s.shape for s in model.state_defs]
    floats = sum(int(np.prod(s.shape[1:])) for s in states)
    raw = json.loads((out / "manifest.json").read_text())["provenance"]
    assert raw["architecture"] == "gtcrn"
    # the recorded sizes, counted independently: parameters in the exported graph, MACs
    # and state floats from the layer plan
    assert raw["parameters"] == parameters_in_graph(model, tmp_path / "probe.onnx")
    assert raw["macs_per_hop"] == macs_from_layer_plan(model.cfg)
    assert raw["state_floats"] == floats == state_floats_from_layer_plan(model.cfg)


def test_streaming_is_causal_in_the_engine(pack):
    eng = Model(pack[0])
    x = parity_signal(1.5, seed=4)
    n = 128 * 80
    x2 = x.copy()
    x2[n:] *= -2.0
    y, y2 = Stream(eng).push(x), Stream(eng).push(x2)
    assert np.array_equal(y[:n], y2[:n])
    assert np.max(np.abs(y[n:] - y2[n:])) > 1e-4


def test_exported_graph_is_batch_invariant(pack):
    """Rows of a batched onnxruntime call equal the same rows run at any other batch size,
    bit for bit (random spectra and random states), in the engine's session settings."""
    import onnxruntime as ort

    out, manifest, _ = pack
    sess = ort.InferenceSession(
        str(out / manifest.graphs[0].file), session_options(1), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feeds = {
        i.name: (rng.standard_normal([16, *i.shape[1:]]) * 0.5).astype(np.float32)
        for i in sess.get_inputs()
    }
    ref = sess.run(None, feeds)
    for b in range(1, 17):
        for start in sorted({0, 16 - b, (16 - b) // 2}):
            got = sess.run(None, {k: v[start : start + b] for k, v in feeds.items()})
            for o, r, spec in zip(got, ref, sess.get_outputs(), strict=True):
                assert np.array_equal(o, r[start : start + b]), (b, start, spec.name)


@pytest.mark.parametrize("cfg", [GTCRNConfig(), SMALL, GTCRNConfig(channels=32, rnn_hidden=32)])
def test_size_and_cost_are_the_layer_plans(cfg):
    """The model's own counts (written into every manifest) equal the layer plan's."""
    m = GTCRN(cfg)
    assert m.macs_per_frame() == macs_from_layer_plan(cfg)
    assert m.state_floats() == state_floats_from_layer_plan(cfg)


def test_default_size_and_cost(tmp_path):
    """The default model is GTCRN's size class: 20-60 k parameters (counted in the exported
    graph), under 1 MMAC per hop (125 MMAC/s), under 100 KB of state per stream."""
    m = GTCRN()
    assert 20_000 <= parameters_in_graph(m, tmp_path / "probe.onnx") <= 60_000
    assert 2e5 < macs_from_layer_plan(m.cfg) < 1e6
    assert 4 * state_floats_from_layer_plan(m.cfg) < 100_000


@pytest.mark.parametrize(
    "bad",
    [{"channels": 24}, {"dilations": []}, {"compress": 0}, {"rnn_hidden": 10}, {"erb_bands": 200}],
)
def test_bad_config_is_refused(bad):
    from rtns_export.families import FamilyError, build_model

    with pytest.raises(FamilyError, match="GTCRN"):
        build_model("gtcrn", bad)
    with pytest.raises(FamilyError, match="GTCRN"):
        build_model("gtcrn", {"no_such_option": 1})


def test_small_variant_keeps_parity():
    m = randomized(SMALL, seed=3)
    x = parity_signal(1.5, seed=7)
    err = float(np.max(np.abs(forward_np(m, x) - step_loop(m, x))))
    assert err <= 1e-4


def test_shipped_pack():
    """rtns-gtcrn ships in models/ (committed): a missing pack fails, never skips."""
    pack = REPO / "models" / "rtns-gtcrn"
    assert (pack / "manifest.json").is_file(), f"the shipped pack {pack} is missing"
    man = read_manifest(pack)
    assert man.name == "rtns-gtcrn"
    raw = json.loads((pack / "manifest.json").read_text())
    assert raw["provenance"]["architecture"] == "gtcrn" and raw["provenance"]["training_data"]
    x = parity_signal(2.0, seed=9)
    y = enhance_array(Model(pack), x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
