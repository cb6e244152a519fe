"""Model families the trainer can build and export: one :class:`Family` entry each.

A family builds a model from the config's ``model`` dict and exports a trained model to a
pack. The trainer only relies on the convention shared by all families:
``model(x[B, N]) -> y[B, N']`` with N' <= N and output sample n estimating clean sample n
(losses compare y with clean[:, :N']), plus the exporter's streaming parity.

Adding a family (e.g. a complex-mask STFT model "frcrn"): write its module with a
``forward`` following that convention and an ``export_*`` function, then add one entry::

    FAMILIES["frcrn"] = Family("frcrn", _build_frcrn, _export_frcrn)

where ``_build_frcrn(cfg: dict) -> nn.Module`` and ``_export_frcrn(model, out_dir, *, name,
provenance, scores) -> (manifest, parity report)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rtns.pack import Provenance
from rtns_export import fastnet, frcrn, gtcrn, lowlat


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[dict[str, Any]], nn.Module]
    export: Callable[..., Any]


class FamilyError(ValueError):
    """Unknown family or bad model options; one sentence."""


def _build_dtln(cfg: dict[str, Any]) -> nn.Module:
    from rtns_export.dtln import DTLN, DTLNConfig

    known = {f.name for f in dataclasses.fields(DTLNConfig)}
    bad = sorted(set(cfg) - known)
    if bad:
        raise FamilyError(f"unknown DTLN model option(s) {bad}; known: {sorted(known)}")
    return DTLN(DTLNConfig(**cfg))


def _export_dtln(
    model: nn.Module,
    out_dir: Path,
    *,
    name: str,
    provenance: Provenance,
    scores: dict[str, dict[str, float]] | None = None,
):
    from rtns_export.dtln import export_dtln

    return export_dtln(model, out_dir, name=name, provenance=provenance, scores=scores)


def config_builder(model_cls: type, config_cls: Any, label: str) -> Callable[[dict], nn.Module]:
    """A family's builder from a model class and its config dataclass (``from_dict``)."""

    def build(cfg: dict[str, Any]) -> nn.Module:
        try:
            return model_cls(config_cls.from_dict(cfg))
        except (TypeError, ValueError) as e:
            raise FamilyError(f"bad {label} model options: {e}") from None

    return build


# the complex-mask families' export functions take (model, out_dir, *, name, provenance,
# scores) as the trainer passes them
FAMILIES: dict[str, Family] = {
    "dtln": Family("dtln", _build_dtln, _export_dtln),
    "frcrn": Family(
        "frcrn", config_builder(frcrn.FRCRN, frcrn.FRCRNConfig, "FRCRN"), frcrn.export_frcrn
    ),
    "gtcrn": Family(
        "gtcrn", config_builder(gtcrn.GTCRN, gtcrn.GTCRNConfig, "GTCRN"), gtcrn.export_gtcrn
    ),
    "fastnet": Family(
        "fastnet",
        config_builder(fastnet.FastNet, fastnet.FastNetConfig, "FastNet"),
        fastnet.export_fastnet,
    ),
    "lowlat": Family(
        "lowlat",
        config_builder(lowlat.LowLat, lowlat.LowLatConfig, "lowlat"),
        lowlat.export_lowlat,
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyError(
            f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}"
        ) from None


def build_model(family: str, cfg: dict[str, Any]) -> nn.Module:
    return get_family(family).build(dict(cfg))
