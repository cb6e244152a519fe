"""Distillation from a shipped pack (issue "One flagship for every path").

A student (say a fastnet) learns from the clean speech and from what a stronger shipped model
(``models/rtns-gtcrn``) makes of the same noisy input. The teacher is the pack itself: its
weights are read back from the ONNX graph into the PyTorch model of the pack's family
(:mod:`rtns_export.pack_import`), the batch norms the export folded are calibrated on
training batches, and the result is checked against the pack through the engine (<= 1e-4)
before it teaches anything. So the teacher is exactly the model users hear, whatever
checkpoints are gone.

The loss of a step with teacher output t, student output y and clean target s is

    (1 - mix) * L(y, s) + mix * L(y, t)

with the run's combined loss L (the same terms and weights both times): ``mix`` 0 is plain
training, 1 pure imitation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rtns.pack import PackError, read_manifest


class TeacherError(ValueError):
    """The teacher pack cannot be used; one sentence."""


@dataclass
class Teacher:
    """A shipped pack's model in PyTorch, frozen, in eval mode."""

    model: nn.Module
    pack: str
    family: str
    model_cfg: dict
    sha256: str
    parity: float

    @torch.no_grad()
    def __call__(self, noisy: torch.Tensor) -> torch.Tensor:
        """Noisy waveforms [B, N] -> the teacher's enhanced waveforms (the model's forward,
        without the pack's default attenuation limit)."""
        return self.model(noisy)

    def record(self) -> dict[str, object]:
        """What a checkpoint and the pack's provenance say about the teacher."""
        return {
            "pack": self.pack,
            "family": self.family,
            "graph_sha256": self.sha256,
            "parity": self.parity,
        }


def load_teacher(
    pack_dir: str | Path, calibration: Iterable[torch.Tensor], device: torch.device
) -> Teacher:
    """Read ``pack_dir`` into its family's PyTorch model and check it through the engine.

    ``calibration``: noisy training batches [B, N] for the folded batch norms (only read when
    the pack folded some)."""
    from rtns_export.families import build_model
    from rtns_export.pack_import import PackImportError, finish_import, import_pack, pack_family

    p = Path(pack_dir)
    try:
        man = read_manifest(p)
    except PackError as e:
        raise TeacherError(f"teacher: {p} is not a readable pack ({e})") from None
    family = pack_family(man)
    cfg = getattr(man.provenance, "model", None)
    if not isinstance(cfg, dict):
        raise TeacherError(f"teacher: {p}'s manifest does not say how its model was built")
    try:
        model = build_model(family, cfg)
        rep = import_pack(p, model, family, cfg)
        err = finish_import(model, rep, calibration)
    except (PackImportError, ValueError) as e:
        raise TeacherError(f"teacher: {e}") from None
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return Teacher(model.to(device), str(p), family, cfg, rep.sha256, err)
