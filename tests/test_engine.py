from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rtns.engine import Model, enhance_array


def _signal(n: int = 16_000 * 3, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


@pytest.mark.parametrize("pack", ["passthrough_pack", "passthrough_stft_pack"])
def test_passthrough_reconstructs_input_after_latency(pack, request):
    model = Model(request.getfixturevalue(pack))
    x = _signal()
    st = model.stream()
    y = np.concatenate([st.push(x), st.flush()])
    assert model.latency == 384
    assert y.shape[0] == x.shape[0] + model.latency
    np.testing.assert_allclose(y[:384], 0.0, atol=1e-7)
    np.testing.assert_allclose(y[384:], x, atol=2e-6, rtol=0)
    np.testing.assert_allclose(enhance_array(model, x), x, atol=2e-6, rtol=0)


@pytest.mark.parametrize("pack", ["passthrough_pack", "random_dtln_pack"])
def test_chunk_size_does_not_change_output(pack, request):
    model = Model(request.getfixturevalue(pack))
    x = _signal(16_000 * 2 + 77)
    outs = []
    for chunk in (1, 7, 128, 1000, x.shape[0]):
        st = model.stream()
        parts = [st.push(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
        outs.append(np.concatenate(parts + [st.flush()]))
    for y in outs[1:]:
        assert np.array_equal(y, outs[0])


def test_streams_are_independent_and_reset(random_dtln_pack):
    model = Model(random_dtln_pack)
    a, b = _signal(seed=2), _signal(seed=3)
    ref_a = enhance_array(model, a)
    s1, s2 = model.stream(), model.stream()
    ya, yb = [], []
    for i in range(0, a.shape[0], 500):
        ya.append(s1.push(a[i : i + 500]))
        yb.append(s2.push(b[i : i + 500]))
    ya = np.concatenate(ya + [s1.flush()])[384 : 384 + a.shape[0]]
    assert np.array_equal(ya, ref_a)
    # reset mid-stream returns to the initial state
    s2.reset()
    assert np.array_equal(enhance_array(model, a, s2), ref_a)


def test_copy_forks_state(random_dtln_pack):
    model = Model(random_dtln_pack)
    x = _signal()
    st = model.stream()
    st.push(x[:10_000])
    twin = st.copy()
    assert np.array_equal(st.push(x[10_000:]), twin.push(x[10_000:]))


def test_state_counter_advances_and_resets(passthrough_pack):
    model = Model(passthrough_pack)
    st = model.stream()
    st.push(np.zeros(128 * 5, np.float32))
    assert st.state["m_count"][0, 0] == 5 and st.state["f_count"][0, 0] == 5
    st.reset()
    assert st.state["m_count"][0, 0] == 0


def test_batched_infer_matches_single(random_dtln_pack):
    model = Model(random_dtln_pack)
    rng = np.random.default_rng(0)
    blocks = rng.standard_normal((4, 512)).astype(np.float32)
    state = model.initial_state(4)
    y, st = model.infer(blocks, state)
    for b in range(4):
        y1, st1 = model.infer(blocks[b : b + 1], {k: v[b : b + 1] for k, v in state.items()})
        np.testing.assert_allclose(y1[0], y[b], atol=1e-6)


def test_bypass_and_attenuation_limit(random_dtln_pack):
    model = Model(random_dtln_pack)
    x = _signal()
    st = model.stream()
    st.bypass = True
    np.testing.assert_allclose(enhance_array(model, x, st), x, atol=0)
    st.bypass = False
    st.atten_lim_db = 6.0
    assert st.atten_lim_db == pytest.approx(6.0)
    wet = enhance_array(model, x)
    mixed = enhance_array(model, x, st)
    g = 10 ** (-6 / 20)
    np.testing.assert_allclose(mixed, g * x + (1 - g) * wet, atol=1e-6)
    with pytest.raises(ValueError):
        st.atten_lim_db = -3.0


def limited_copy(pack: Path, dest: Path, db: float | None) -> Path:
    """A copy of ``pack`` whose manifest sets the default attenuation limit to ``db``."""
    from rtns.pack import read_manifest, write_manifest

    shutil.copytree(pack, dest)
    write_manifest(dest, read_manifest(dest).model_copy(update={"atten_lim_db": db}))
    return dest


def test_pack_default_attenuation_limit(random_dtln_pack, tmp_path):
    """A pack's atten_lim_db is where every new stream starts; users can lift or change it."""
    x = _signal()
    wet = enhance_array(Model(random_dtln_pack), x)
    model = Model(limited_copy(random_dtln_pack, tmp_path / "lim", 12.0))
    st = model.stream()
    assert st.atten_lim_db == pytest.approx(12.0)
    g = 10 ** (-12 / 20)
    np.testing.assert_allclose(enhance_array(model, x, st), g * x + (1 - g) * wet, atol=1e-6)
    st.atten_lim_db = math.inf  # "off"
    assert st.atten_lim_db is None
    np.testing.assert_array_equal(enhance_array(model, x, st), wet)
    st.reset()  # controls survive a reset; a new stream starts at the default again
    assert st.atten_lim_db is None and model.stream().atten_lim_db == pytest.approx(12.0)


def test_non_mono_input_rejected(passthrough_pack):
    st = Model(passthrough_pack).stream()
    with pytest.raises(ValueError, match="mono"):
        st.push(np.zeros((10, 2), np.float32))


@pytest.mark.parametrize("pack", ["rtns-dtln", "rtns-frcrn", "rtns-gtcrn", "passthrough_stft_pack"])
def test_bound_hop_equals_infer_bit_for_bit(pack, request):
    """The single-stream hop over bound buffers (what Stream.push runs) == Model.infer at
    batch 1, outputs and every state tensor, over hops that flip its two state sets."""
    model = Model(request.getfixturevalue(pack) if pack.endswith("_pack") else pack)
    rng = np.random.default_rng(7)
    hop = model.bound_hop()
    state = model.initial_state(1)
    for _ in range(5):
        block = (0.1 * rng.standard_normal(model.block_len)).astype(np.float32)
        want, state = model.infer(block[None, :], state)
        got = hop.run(block)
        assert got.dtype == np.float32 and got.shape == (model.block_len,)
        assert np.array_equal(got, want[0])
        st = hop.state
        assert st.keys() == state.keys()
        assert all(np.array_equal(st[k], state[k]) for k in st)


def test_bound_hop_copy_load_and_reset_are_independent(random_dtln_pack):
    model = Model(random_dtln_pack)
    block = (0.1 * np.random.default_rng(3).standard_normal(512)).astype(np.float32)
    a = model.bound_hop()
    a.run(block)
    b = a.copy()
    ya = a.run(block).copy()
    assert np.array_equal(b.run(block), ya)  # same state, separate buffers
    fresh = model.bound_hop()
    y0 = fresh.run(block).copy()
    a.reset()
    assert np.array_equal(a.run(block), y0)
    c = model.bound_hop(b.state)
    assert all(np.array_equal(c.state[k], v) for k, v in b.state.items())
    with pytest.raises(ValueError, match="state names"):
        c.load({"nope": np.zeros((1, 2), np.float32)})
