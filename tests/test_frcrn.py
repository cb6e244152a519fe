"""The causal FRCRN family: full-sequence vs one-frame step parity, ONNX pack parity through
the engine, causality, state inventory, config checks, and the shipped pack (if present)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from packs import parameters_in_graph  # noqa: E402

from rtns.engine import Model, Stream, enhance_array  # noqa: E402
from rtns.framing import BLOCK_LEN, BLOCK_SHIFT, N_BINS  # noqa: E402
from rtns.pack import Provenance, read_manifest  # noqa: E402
from rtns_export.cmask import overlap_add  # noqa: E402
from rtns_export.exporter import parity_signal  # noqa: E402
from rtns_export.frcrn import (  # noqa: E402
    FRCRN,
    FRCRNConfig,
    bins_per_level,
    export_frcrn,
)

REPO = Path(__file__).resolve().parents[1]
LATENCY = BLOCK_LEN - BLOCK_SHIFT


def randomized(cfg: FRCRNConfig | None = None, seed: int = 0) -> FRCRN:
    """A model whose FSMN memory taps, SE, biases and BN statistics are random too (not left
    at their identity-like initial values), at the scale of a trained model, in eval mode.

    (Much larger random perturbations make activations grow by ~1e4 through the stack and
    the two paths then differ by float32 rounding alone: in float64 they agree to 1e-12.)
    """
    torch.manual_seed(seed)
    m = FRCRN(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".mem"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.split(".")[-1] in ("bias", "b1", "b2"):
                p.add_(0.05 * torch.randn_like(p))
            else:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.05, 0.05)
                mod.running_var.uniform_(0.8, 1.25)
    return m.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> FRCRN:
    return randomized()


@pytest.fixture(scope="module")
def signal10() -> np.ndarray:
    return parity_signal(10.0)


def step_loop(model: FRCRN, x: np.ndarray) -> np.ndarray:
    """Torch one-frame steps with explicit states over x [N] (frames from sample 0), the
    masked spectra synthesized and overlap-added in torch: comparable with forward(x)."""
    xt = torch.from_numpy(x)[None]
    wa, ws = model.analysis_window(), model.synthesis_window()
    spec = torch.fft.rfft(xt.unfold(-1, BLOCK_LEN, BLOCK_SHIFT) * wa, dim=-1)[0]  # [T, 257]
    states = list(model.zero_states(1).values())
    blocks = []
    with torch.inference_mode():
        for t in range(spec.shape[0]):
            feat = torch.stack([spec[t].real, spec[t].imag])[None]  # [1, 2, 257]
            mask, *states = model.step(feat, *states)
            est = spec[t] * torch.complex(mask[0, 0], mask[0, 1])
            blocks.append(torch.fft.irfft(est, n=BLOCK_LEN) * ws)
    return overlap_add(torch.stack(blocks)[None], BLOCK_SHIFT)[0].double().numpy()


def forward_np(model: FRCRN, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)[None])[0].double().numpy()


def test_windows_reproduce_the_engine_dsp(model):
    from rtns import dsp

    wa = dsp.analysis_window("sqrt_hann", BLOCK_LEN)
    ws = dsp.synthesis_window("sqrt_hann", BLOCK_LEN, BLOCK_SHIFT)
    np.testing.assert_allclose(model.analysis_window().numpy(), wa, atol=1e-7)
    np.testing.assert_allclose(model.synthesis_window().numpy(), ws, atol=1e-7)


def test_unit_mask_reconstructs_the_input():
    """With the mask forced to 1 the full-sequence path is an identity (after the first
    and before the last 384 samples, where the windows do not yet sum to one)."""
    m = FRCRN().eval()
    m.net = lambda feat, st: (torch.stack([torch.ones_like(feat[:, 0]), 0 * feat[:, 1]], 1), {})
    x = parity_signal(1.0)
    y = forward_np(m, x)
    np.testing.assert_allclose(y[LATENCY:-LATENCY], x[LATENCY : y.shape[0] - LATENCY], atol=1e-5)


def test_step_loop_matches_full_sequence(model, signal10):
    full = forward_np(model, signal10)
    stepped = step_loop(model, signal10)
    assert full.shape == stepped.shape
    assert np.max(np.abs(full)) > 1e-3  # a random model still outputs a signal
    err = float(np.max(np.abs(full - stepped)))
    assert err <= 1e-4, f"step loop differs from forward by {err:.3g}"


def test_exported_pack_matches_forward_through_the_engine(model, signal10, tmp_path):
    manifest, report = export_frcrn(
        model,
        tmp_path / "pack",
        name="test-frcrn",
        provenance=Provenance(origin="random weights (test)"),
        parity_input=signal10,
    )
    assert report.max_abs_err <= 1e-4 and report.n_samples >= 159_000
    assert manifest.family == "frcrn" and manifest.latency_samples == LATENCY
    assert manifest.frontend.window == "sqrt_hann" and manifest.frontend.mask == "complex"
    assert [g.role for g in manifest.graphs] == ["mask"]
    states = manifest.graphs[0].states
    assert [s.input for s in states] == [s.name for s in model.state_defs]
    assert sum(int(np.prod(s.shape[1:])) for s in states) == model.state_floats()
    # the recorded parameter count is the graph's (counted in it, not by the same function)
    recorded = manifest.provenance.model_extra["parameters"]
    assert recorded == parameters_in_graph(model, tmp_path / "probe.onnx")
    # batched inference: two streams in one call equal the two streams run alone
    eng = Model(tmp_path / "pack")
    rng = np.random.default_rng(1)
    blocks = rng.standard_normal((6, 2, BLOCK_LEN)).astype(np.float32) * 0.1
    st2, st_a, st_b = eng.initial_state(2), eng.initial_state(1), eng.initial_state(1)
    for b in blocks:
        y2, st2 = eng.infer(b, st2)
        ya, st_a = eng.infer(b[:1], st_a)
        yb, st_b = eng.infer(b[1:], st_b)
        np.testing.assert_allclose(y2, np.concatenate([ya, yb]), atol=1e-5)


@pytest.mark.parametrize("n", [4 * 8000, 4 * 8000 + 77])
def test_model_is_causal(model, n):
    """Changing the input from sample n on leaves every full-sequence output sample before
    the first frame that contains n unchanged (n - 384 for n on a hop boundary), and it
    does change later ones."""
    x = parity_signal(4.0, seed=3)
    x2 = x.copy()
    x2[n:] = np.random.default_rng(5).standard_normal(x.shape[0] - n).astype(np.float32) * 0.3
    y, y2 = forward_np(model, x), forward_np(model, x2)
    first = -(-(n - BLOCK_LEN + 1) // BLOCK_SHIFT) * BLOCK_SHIFT
    assert first == n - LATENCY or n % BLOCK_SHIFT
    assert np.array_equal(y[:first], y2[:first])
    assert np.max(np.abs(y[first : first + BLOCK_SHIFT] - y2[first : first + BLOCK_SHIFT])) > 0
    # the streamed path: output sample m estimates input m - 384
    assert np.max(np.abs(y[first:] - y2[first:])) > 1e-3


def test_streaming_is_causal_in_the_engine(tmp_path):
    """Through the engine, output samples up to the hop that completes at n are unchanged
    when the input changes from n on (streamed output m estimates input m - 384)."""
    m = randomized(FRCRNConfig(channels=(4, 6), freq_fsmn_levels=(0,), time_fsmn_taps=4))
    export_frcrn(
        m,
        tmp_path / "p",
        name="tiny-frcrn",
        provenance=Provenance(origin="random weights (test)"),
        parity_input=parity_signal(2.0),
    )
    eng = Model(tmp_path / "p")
    x = parity_signal(2.0, seed=4)
    n = 128 * 100
    x2 = x.copy()
    x2[n:] *= -2.0
    y = Stream(eng).push(x)
    y2 = Stream(eng).push(x2)
    assert np.array_equal(y[:n], y2[:n])
    assert np.max(np.abs(y[n:] - y2[n:])) > 1e-4


def test_state_inventory_and_sizes(model):
    cfg = model.cfg
    assert bins_per_level(4) == [257, 129, 65, 33, 17]
    names = [s.name for s in model.state_defs]
    assert len(names) == len(set(names))
    assert "se_count" in names
    for j in range(cfg.time_fsmn_layers):
        s = next(s for s in model.state_defs if s.name == f"tfsmn{j}_cache")
        assert s.shape == (2 * cfg.channels[-1], cfg.time_fsmn_taps - 1, 17)
    states = model.zero_states(3)
    mask, *new = model.step(torch.zeros(3, 2, N_BINS), *states.values())
    assert mask.shape == (3, 2, N_BINS)
    assert [tuple(t.shape) for t in new] == [tuple(v.shape) for v in states.values()]
    assert float(new[names.index("se_count")][0, 0]) == 1.0
    assert torch.all(mask.abs() <= cfg.mask_bound)


def test_default_size_is_real_time_class():
    m = FRCRN()
    params = sum(p.numel() for p in m.parameters())
    assert 50_000 <= params <= 300_000
    assert m.macs_per_frame() < 10e6  # < 1.25 GMAC/s at 8 ms hops


@pytest.mark.parametrize(
    "bad", [{"skip": "sum"}, {"channels": []}, {"freq_fsmn_levels": [7]}, {"compress": 0}]
)
def test_bad_config_is_refused(bad):
    from rtns_export.families import FamilyError, build_model

    with pytest.raises(FamilyError, match="FRCRN"):
        build_model("frcrn", bad)
    with pytest.raises(FamilyError, match="FRCRN"):
        build_model("frcrn", {"no_such_option": 1})


def test_concat_skips_and_decoder_time_kernel_keep_parity():
    cfg = FRCRNConfig(channels=(6, 8, 8), dec_time_kernel=2, skip="concat", freq_fsmn_levels=(1,))
    m = randomized(cfg, seed=2)
    x = parity_signal(1.5, seed=7)
    err = float(np.max(np.abs(forward_np(m, x) - step_loop(m, x))))
    assert err <= 1e-4


def test_shipped_pack():
    """rtns-frcrn ships in models/ (committed): a missing pack fails, never skips."""
    pack = REPO / "models" / "rtns-frcrn"
    assert (pack / "manifest.json").is_file(), f"the shipped pack {pack} is missing"
    man = read_manifest(pack)
    assert man.family == "frcrn" and man.name == "rtns-frcrn"
    assert "vbdemand36" in man.scores
    raw = json.loads((pack / "manifest.json").read_text())
    assert raw["provenance"]["training_data"]
    eng = Model(pack)
    x = parity_signal(2.0, seed=9)
    y = enhance_array(eng, x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
