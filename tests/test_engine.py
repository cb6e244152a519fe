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
    for _ in range(2):  # the second call starts from non-trivial states
        y, st = model.infer(blocks, state)
        assert st.keys() == state.keys()
        for b in range(4):
            y1, st1 = model.infer(blocks[b : b + 1], {k: v[b : b + 1] for k, v in state.items()})
            assert np.array_equal(y1[0], y[b])  # exported packs are batch-invariant: bit-exact
            assert all(np.array_equal(st1[k][0], st[k][b]) for k in st)
        state = st


def test_bypass_and_attenuation_limit(random_dtln_pack):
    model = Model(random_dtln_pack)
    x = _signal()
    st = model.stream()
    st.bypass = True
    np.testing.assert_allclose(enhance_array(model, x, st), x, atol=0)
    st.bypass = False
    st.atten_lim = 6.0
    assert st.atten_lim.db == pytest.approx(6.0)
    wet = enhance_array(model, x)
    mixed = enhance_array(model, x, st)
    g = 10 ** (-6 / 20)
    np.testing.assert_allclose(mixed, g * x + (1 - g) * wet, atol=1e-6)
    with pytest.raises(ValueError):
        st.atten_lim = -3.0


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
    assert st.atten_lim.db == pytest.approx(12.0)
    g = 10 ** (-12 / 20)
    np.testing.assert_allclose(enhance_array(model, x, st), g * x + (1 - g) * wet, atol=1e-6)
    st.atten_lim = math.inf  # "off"
    assert st.atten_lim.off
    np.testing.assert_array_equal(enhance_array(model, x, st), wet)
    st.reset()  # controls survive a reset; a new stream starts at the default again
    assert st.atten_lim.off and model.stream().atten_lim.db == pytest.approx(12.0)


def test_non_mono_input_rejected(passthrough_pack):
    st = Model(passthrough_pack).stream()
    with pytest.raises(ValueError, match="mono"):
        st.push(np.zeros((10, 2), np.float32))


@pytest.mark.parametrize("pack", ["rtns-dtln", "rtns-frcrn", "rtns-gtcrn", "passthrough_stft_pack"])
def test_bound_infer_equals_infer_bit_for_bit(pack, request):
    """The single-stream call over bound buffers (what Stream.push runs) == Model.infer at
    batch 1, outputs and every state tensor, over hops that flip its two state sets."""
    model = Model(request.getfixturevalue(pack) if pack.endswith("_pack") else pack)
    rng = np.random.default_rng(7)
    hop = model.bound_infer()
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


def test_bound_infer_copy_load_and_reset_are_independent(random_dtln_pack):
    model = Model(random_dtln_pack)
    block = (0.1 * np.random.default_rng(3).standard_normal(512)).astype(np.float32)
    a = model.bound_infer()
    a.run(block)
    b = a.copy()
    ya = a.run(block).copy()
    assert np.array_equal(b.run(block), ya)  # same state, separate buffers
    fresh = model.bound_infer()
    y0 = fresh.run(block).copy()
    a.reset()
    assert np.array_equal(a.run(block), y0)
    c = model.bound_infer(b.state)
    assert all(np.array_equal(c.state[k], v) for k, v in b.state.items())
    with pytest.raises(ValueError, match="state names"):
        c.load({"nope": np.zeros((1, 2), np.float32)})


@pytest.mark.parametrize("pack", ["rtns-gtcrn", "random_dtln_pack"])
def test_bound_infer_writes_into_its_bound_arrays(pack, request):
    """The binding rule of BoundInfer: load, reset and save_to write into the arrays
    onnxruntime holds by address. A load that rebinds a state array (``cur[k] = v``) leaves
    the graph reading the old state: the output after a load would no longer equal
    Model.infer from the loaded state."""
    model = Model(request.getfixturevalue(pack) if pack.endswith("_pack") else pack)
    rng = np.random.default_rng(11)
    blocks = (0.1 * rng.standard_normal((6, model.block_len))).astype(np.float32)
    other = model.bound_infer()
    for b in blocks[:3]:
        other.run(b)
    loaded = other.state  # a state no fresh stream has
    bound = model.bound_infer()
    bound.run(blocks[3])  # now reading its second state set
    for start in (loaded, model.initial_state(1)):
        if start is loaded:
            bound.load(start)
        else:
            bound.reset()
        want, _ = model.infer(blocks[4][None], start)
        assert np.array_equal(bound.run(blocks[4]), want[0])
    out = {k: np.full_like(v, np.nan) for k, v in loaded.items()}
    bound.save_to(out)
    assert all(np.array_equal(out[k], v) for k, v in bound.state.items())


def test_engine_is_the_bottom_floor():
    """rtns.engine imports nothing of rtns above it: only the modules below (dsp, atten,
    config, framing, pack and what they use), at the top of the file or inside a function.
    Fails if engine.py imports rtns.streams, rtns.bank, the CLI, the daemon or any other
    module that builds on the engine."""
    import ast

    import rtns.engine

    below = {"rtns", "rtns.dsp", "rtns.atten", "rtns.config", "rtns.framing", "rtns.pack"}
    tree = ast.parse(Path(rtns.engine.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "rtns":  # from rtns import dsp
            imported |= {f"rtns.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} if node.module.startswith("rtns") else set()
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("rtns")}
    assert imported, "the walk found no rtns import at all"
    above = imported - below
    assert not above, f"rtns.engine imports from above it: {sorted(above)}"
