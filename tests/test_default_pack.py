"""The shipped default pack (models/rtns-dtln): present, valid, trained here (not imported),
and better than the unprocessed input on real noisy speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtns.pack import DEFAULT_PACK, read_manifest, resolve_pack, verify_files

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "models" / DEFAULT_PACK


def test_default_pack_is_shipped_and_resolves():
    assert (PACK / "manifest.json").is_file(), "the default pack models/rtns-dtln is missing"
    m = read_manifest(PACK)
    verify_files(PACK, m)
    assert m.name == DEFAULT_PACK and m.family == "dtln"
    # Without --model the installed copy of this pack is used (same graphs, same hashes).
    found = resolve_pack(None)
    assert [g.sha256 for g in read_manifest(found).graphs] == [g.sha256 for g in m.graphs]
    size = sum(p.stat().st_size for p in PACK.iterdir())
    assert size < 10 * 2**20


def test_default_pack_provenance_and_scores():
    m = read_manifest(PACK)
    prov = m.provenance.model_dump()
    assert "from scratch" in prov["origin"]
    assert prov["steps"] and prov["steps"] > 0
    assert prov["losses"]
    assert "loss_comparison" in prov
    s = m.scores["vbdemand36"]
    for k in ("pesq_wb", "stoi", "si_sdr", "dnsmos_ovrl"):
        assert k in s
    base = prov["vbdemand36_unprocessed"]
    for k in ("pesq_wb", "si_sdr", "dnsmos_ovrl"):
        assert s[k] > base[k], k


def test_default_pack_beats_input_on_every_metric():
    """Issue 3's bar, from the manifest's recorded benchmark (benchmarks/quality.py)."""
    m = read_manifest(PACK)
    base = m.provenance.model_dump()["vbdemand36_unprocessed"]
    s = m.scores["vbdemand36"]
    assert s["files"] == 36
    for k in ("pesq_wb", "stoi", "si_sdr", "dnsmos_ovrl"):
        assert s[k] > base[k], k


def test_default_limit_was_chosen_on_validation():
    """The pack's attenuation limit is recorded with the validation scores it was chosen by."""
    m = read_manifest(PACK)
    if m.atten_lim_db is None:
        pytest.skip("the shipped pack has no default attenuation limit")
    val = m.provenance.model_dump()["validation"]
    assert val["atten_lim_db"] == m.atten_lim_db
    assert val["stoi"] >= m.provenance.model_dump()["validation_input"]["stoi"]


def test_default_pack_improves_pesq_on_test_pairs(shared_dir):
    pytest.importorskip("pesq")
    import soundfile as sf

    from rtns.engine import Model, enhance_array
    from rtns_export import metrics

    folder = shared_dir / "data" / "test" / "vbdemand36"
    names = sorted(p.name for p in (folder / "noisy").iterdir())[::6]  # 6 of 36, spread
    model = Model(None)  # the default pack
    before, after = [], []
    for name in names:
        clean, sr = sf.read(folder / "clean" / name, dtype="float32")
        noisy, sr2 = sf.read(folder / "noisy" / name, dtype="float32")
        assert sr == sr2 == 16_000
        n = min(clean.shape[0], noisy.shape[0])
        clean, noisy = clean[:n], noisy[:n]
        enhanced = enhance_array(model, noisy)
        assert enhanced.shape == noisy.shape and np.isfinite(enhanced).all()
        before.append(metrics.pesq_wb(clean, noisy))
        after.append(metrics.pesq_wb(clean, enhanced))
    assert np.mean(after) > np.mean(before) + 0.05, (before, after)
