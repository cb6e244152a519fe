"""Reading a pack's ONNX weights back into its PyTorch model (rtns_export.pack_import): every
parameter recovered exactly, folded batch norms calibrated to the identity, the result equal
to the pack through the engine, clear refusals, and a fine-tuning run started from a pack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from packs import perturbed  # noqa: E402

from rtns.pack import Provenance, read_manifest, write_manifest  # noqa: E402
from rtns_export.exporter import check_parity, parity_signal  # noqa: E402
from rtns_export.frcrn import FRCRN, FRCRNConfig, export_frcrn  # noqa: E402
from rtns_export.gtcrn import GTCRN, GTCRNConfig, export_gtcrn  # noqa: E402
from rtns_export.lowlat import LowLat, LowLatConfig, export_lowlat  # noqa: E402
from rtns_export.pack_import import (  # noqa: E402
    PackImportError,
    calibrate_folded_norms,
    import_pack,
)

SMALL = GTCRNConfig(dilations=(1, 2), dp_blocks=1)
FAMILIES = {
    "gtcrn": (GTCRN, SMALL, export_gtcrn),
    "frcrn": (
        FRCRN,
        FRCRNConfig(channels=(4, 6), freq_fsmn_levels=(0,), time_fsmn_taps=4),
        export_frcrn,
    ),
    "lowlat": (LowLat, LowLatConfig(hidden=32, layers=1), export_lowlat),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_like(cls, cfg, seed: int):
    torch.manual_seed(seed)
    return perturbed(cls(cfg))


def export(family: str, tmp: Path, seed: int = 0, **prov):
    cls, cfg, fn = FAMILIES[family]
    m = trained_like(cls, cfg, seed)
    out = tmp / f"{family}-pack"
    fn(
        m,
        out,
        name=f"test-{family}",
        provenance=Provenance(origin="random weights (test)", model=cfg.to_dict(), **prov),
        parity_input=parity_signal(3.0, seed=2),
    )
    return m, out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_weight_comes_back(family, tmp_path):
    src, pack = export(family, tmp_path, steps=1234, total_train_minutes=56.5)
    cls, cfg, _ = FAMILIES[family]
    torch.manual_seed(99)
    dst = cls(cfg)
    rep = import_pack(pack, dst, family, cfg.to_dict())
    assert (rep.steps, rep.minutes) == (1234, 56.5)
    norms = {n for n, m in src.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(rep.folded_norms) <= norms
    if family == "gtcrn":  # only the norm after the transposed conv stays in the graph
        assert norms - set(rep.folded_norms) == {"dec1_bn"} and len(
            rep.folded_norms
        ) == 2 + 3 * 2 * len(SMALL.dilations)
    # every parameter outside the convolutions (which hold folded norms) and the folded
    # norms themselves is the pack's float32 copy of the source's, exactly
    mods = dict(dst.named_modules())
    for name, mod in src.named_modules():
        if name in rep.folded_norms or isinstance(mod, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            continue
        for k, v in mod.named_parameters(recurse=False):
            assert torch.equal(v, getattr(mods[name], k)), f"{name}.{k}"
    # folded norms made the identity in eval mode with real statistics, then the whole model
    # equals the pack through the engine and the source model's forward; with a default
    # attenuation limit in the manifest, as a shipped pack has (the check compares the graph:
    # limited, the stream differed by 0.011 and every init_from a shipped pack was refused)
    write_manifest(pack, read_manifest(pack).model_copy(update={"atten_lim_db": 24.0}))
    x = torch.from_numpy(parity_signal(2.0, seed=5))[None]
    calibrate_folded_norms(dst, rep.folded_norms, [x])
    assert check_parity(dst, pack, parity_signal(2.0, seed=6)).max_abs_err <= 1e-5
    y = torch.from_numpy(parity_signal(1.0, seed=7))[None]
    with torch.no_grad():
        assert float((src.eval()(y) - dst.eval()(y)).abs().max()) <= 1e-5


def test_calibrated_norms_are_the_identity_on_their_batch(tmp_path):
    """Calibrated on one batch, the model in training mode (batch statistics) computes on that
    batch what it computes in eval mode (the norms it folded; the one it kept has statistics of
    its own): a warm restart starts where the pack is. The norms are the identity (scale
    sqrt(var + eps), shift mean)."""
    _, pack = export("gtcrn", tmp_path)
    dst = GTCRN(SMALL)
    rep = import_pack(pack, dst, "gtcrn", SMALL.to_dict())
    x = torch.from_numpy(np.stack([parity_signal(1.5, seed=s) for s in (3, 4, 5)]))
    calibrate_folded_norms(dst, rep.folded_norms, [x])
    bn = dict(dst.named_modules())[rep.folded_norms[0]]
    assert torch.allclose(bn.weight, torch.sqrt(bn.running_var + bn.eps))
    assert torch.equal(bn.bias, bn.running_mean)
    with torch.no_grad():
        ev = dst.eval()(x)
        dst.train().dec1_bn.eval()  # the norm the export kept has its own statistics
        tr = dst(x)
    assert float((ev - tr).abs().max()) <= 1e-4 * float(ev.abs().max())


def test_refusals(tmp_path):
    _, pack = export("gtcrn", tmp_path)
    other = GTCRNConfig(dilations=(1, 2), dp_blocks=1, channels=32)
    with pytest.raises(PackImportError, match="channels"):
        import_pack(pack, GTCRN(other), "gtcrn", other.to_dict())
    with pytest.raises(PackImportError, match="holds a gtcrn model"):
        import_pack(pack, LowLat(LowLatConfig()), "lowlat", LowLatConfig().to_dict())
    with pytest.raises(PackImportError, match="not supported"):
        import_pack(pack, GTCRN(SMALL), "dtln", {})
    with pytest.raises(PackImportError, match="not a readable pack"):
        import_pack(tmp_path / "nowhere", GTCRN(SMALL), "gtcrn", SMALL.to_dict())
    onnx_file = next(pack.glob("*.onnx"))
    good = onnx_file.read_bytes()
    onnx_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(PackImportError, match="not a readable pack"):
        import_pack(pack, GTCRN(SMALL), "gtcrn", SMALL.to_dict())
    onnx_file.write_bytes(good)
    # a pack without its model options, exported by another configuration: the graph says so
    man = json.loads((pack / "manifest.json").read_text())
    del man["provenance"]["model"]
    (pack / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PackImportError, match="graph differs"):
        import_pack(pack, GTCRN(other), "gtcrn", other.to_dict())


def test_fine_tune_starts_from_a_pack(synth_data, tmp_path):
    """``init_from`` naming a pack folder: the trainer reads it back, calibrates on training
    batches, checks it through the engine, starts where the pack scored, and counts the
    pack's training in the lineage."""
    from rtns.pack import read_manifest
    from rtns_export.train import ConfigError, _lineage, run_training
    from rtns_export.train_config import TrainConfig

    def cfg(name: str, **kw) -> TrainConfig:
        return TrainConfig.model_validate(
            {
                "name": name,
                "family": "gtcrn",
                "model": SMALL.to_dict(),
                "data": {**synth_data, "segment_seconds": 1.0, "snr_db": [0, 10]},
                "losses": [
                    {"name": "cc_mse", "weight": 30.0},
                    {"name": "cmag_mse", "weight": 70.0},
                ],
                "optim": {"lr": 0.003, "batch": 4, "steps": 4},
                "valid": {
                    "items": 3,
                    "seconds": 1.5,
                    "pesq_items": 0,
                    "select": "si_sdr",
                    "every_steps": 4,
                },
                "export": {"name": "tiny-gtcrn"},
                "out_dir": str(tmp_path / "runs"),
                "checkpoint_every": 2,
                **kw,
            }
        )

    base = cfg("base")
    run_training(base, threads=1, progress=False)
    pack = base.run_dir / "pack"
    prov = read_manifest(pack).provenance
    ft = cfg("ft", init_from=str(pack))
    tr, _ = run_training(ft, threads=1, progress=False, export=False)
    init = tr.state.init
    assert init["init_from"] == str(pack) and init["init_parity"] <= 1e-4
    assert init["init_valid_now"]["si_sdr"] == pytest.approx(prov.validation["si_sdr"], abs=1e-3)
    rec = torch.load(ft.run_dir / "imported.pt", weights_only=False)
    assert rec["step"] == 0 and rec["valid"]["si_sdr"] == init["init_valid_now"]["si_sdr"]
    assert "fine-tuned this project's own pack" in tr.provenance({}).origin
    minutes, steps = _lineage(torch.load(ft.run_dir / "last.pt", weights_only=False))
    assert steps == 4 + prov.steps
    assert minutes == pytest.approx(tr.state.elapsed_s / 60 + prov.total_train_minutes, abs=0.02)
    # a pack of another configuration is refused before any data is read
    bad = cfg("bad", init_from=str(pack), model={**SMALL.to_dict(), "channels": 32})
    with pytest.raises(ConfigError, match="init_from.*channels"):
        run_training(bad, threads=1, progress=False, export=False)
