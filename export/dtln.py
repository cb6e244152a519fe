"""DTLN (Westhausen & Meyer, Interspeech 2020) in PyTorch, for training and export only.

Two stacked cores on 512-sample blocks advanced by 128:

1. rfft of the raw block -> |X| (257 bins) -> [norm variant: log(|X| + 1e-7) -> iLN]
   -> LSTM x2 -> Dense -> sigmoid mask; Y = X * mask (phase kept) -> irfft.
2. Dense 512 -> 256 without bias (learned analysis basis) -> iLN -> LSTM x2 -> Dense ->
   sigmoid mask on the (un-normalized) encoding -> Dense 256 -> 512 without bias (learned
   synthesis basis) -> overlap-add at 128, no window.

The same parameters serve two paths: :meth:`DTLN.forward` runs whole signals for
training, and :meth:`DTLN.stage1_step` / :meth:`DTLN.stage2_step` run one block with
explicit LSTM state for ONNX export. Streaming output sample n estimates input n - 384.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rtns.framing import BLOCK_LEN, BLOCK_SHIFT, N_BINS
from rtns_export.cmask import overlap_add


class InstantLayerNorm(nn.Module):
    """Per-frame normalization over the feature axis: (x - mean) / sqrt(var + eps) * g + b."""

    def __init__(self, features: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(features))
        self.beta = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.gamma + self.beta


@dataclass(frozen=True)
class DTLNConfig:
    hidden: int = 128
    layers: int = 2
    encoder: int = 256
    dropout: float = 0.25
    #: log-magnitude + iLN before the first core (the "norm" variant of the paper's repo).
    norm: bool = False


class DTLN(nn.Module):
    block_len = BLOCK_LEN
    block_shift = BLOCK_SHIFT
    #: Output sample n estimates input n - latency in block-by-block streaming.
    latency = BLOCK_LEN - BLOCK_SHIFT

    def __init__(self, cfg: DTLNConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DTLNConfig()
        drop = cfg.dropout if cfg.layers > 1 else 0.0
        self.norm1 = InstantLayerNorm(N_BINS) if cfg.norm else None
        self.lstm1 = nn.LSTM(N_BINS, cfg.hidden, cfg.layers, batch_first=True, dropout=drop)
        self.dense1 = nn.Linear(cfg.hidden, N_BINS)
        self.encoder = nn.Linear(BLOCK_LEN, cfg.encoder, bias=False)
        self.norm2 = InstantLayerNorm(cfg.encoder)
        self.lstm2 = nn.LSTM(cfg.encoder, cfg.hidden, cfg.layers, batch_first=True, dropout=drop)
        self.dense2 = nn.Linear(cfg.hidden, cfg.encoder)
        self.decoder = nn.Linear(cfg.encoder, BLOCK_LEN, bias=False)

    # -- shared pieces ------------------------------------------------------------------
    def _features1(self, mag: torch.Tensor) -> torch.Tensor:
        if self.norm1 is None:
            return mag
        return self.norm1(torch.log(mag + 1e-7))

    def _mask1(self, mag: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None):
        y, hc = self.lstm1(self._features1(mag), hc)
        return torch.sigmoid(self.dense1(y)), hc

    def _core2(self, frames: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None):
        enc = self.encoder(frames)
        y, hc = self.lstm2(self.norm2(enc), hc)
        mask = torch.sigmoid(self.dense2(y))
        return self.decoder(enc * mask), hc

    # -- training path: whole signals ------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N] (N >= 512) -> enhanced [B, (T - 1) * 128 + 512], T = 1 + (N - 512) // 128.

        Output sample n estimates input sample n (no delay in this path).
        """
        frames = x.unfold(-1, BLOCK_LEN, BLOCK_SHIFT)  # [B, T, 512]
        spec = torch.fft.rfft(frames, dim=-1)
        mask, _ = self._mask1(spec.abs(), None)
        est = torch.fft.irfft(spec * mask, n=BLOCK_LEN, dim=-1)
        out, _ = self._core2(est, None)
        return overlap_add(out, BLOCK_SHIFT)

    # -- export path: one block with explicit state ---------------------------------------
    def stage1_step(
        self, mag: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mag [B, 1, 257], h/c [B, layers, hidden] -> mask [B, 1, 257], h', c'."""
        mask, (h2, c2) = self._mask1(mag, (h.transpose(0, 1), c.transpose(0, 1)))
        return mask, h2.transpose(0, 1), c2.transpose(0, 1)

    def stage2_step(
        self, frame: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """frame [B, 1, 512], h/c [B, layers, hidden] -> block [B, 1, 512], h', c'."""
        out, (h2, c2) = self._core2(frame, (h.transpose(0, 1), c.transpose(0, 1)))
        return out, h2.transpose(0, 1), c2.transpose(0, 1)


def dtln_graphs(model: DTLN) -> list:
    """The two ONNX graphs of a DTLN pack with their state tensors."""
    from rtns_export.exporter import GraphExport, StateExport, step_module

    lh = (model.cfg.layers, model.cfg.hidden)

    def lstm_states(stage: int) -> list[StateExport]:
        return [
            StateExport(f"s{stage}_{k}", f"s{stage}_{k}_out", lh, 0.0, f"stage-{stage} LSTM {what}")
            for k, what in (("h", "hidden state"), ("c", "cell state"))
        ]

    return [
        GraphExport(
            "mask",
            "dtln_stage1.onnx",
            step_module(model, model.stage1_step),
            ("magnitude", (1, N_BINS)),
            ("mask", (1, N_BINS)),
            lstm_states(1),
        ),
        GraphExport(
            "frame",
            "dtln_stage2.onnx",
            step_module(model, model.stage2_step),
            ("frame", (1, BLOCK_LEN)),
            ("block", (1, BLOCK_LEN)),
            lstm_states(2),
        ),
    ]


def export_dtln(model: DTLN, out_dir, *, name: str, provenance, description: str = "", **kw):
    """Export a DTLN to a pack (parity-checked); returns (manifest, parity report)."""
    from rtns.pack import FrontEnd
    from rtns_export.exporter import export_pack

    variant = "log-magnitude iLN" if model.cfg.norm else "no input normalization"
    return export_pack(
        model,
        out_dir,
        name=name,
        family="dtln",
        frontend=FrontEnd(window="none", mask="magnitude"),
        graphs=dtln_graphs(model),
        latency=model.latency,
        provenance=provenance,
        description=description
        or f"DTLN, {variant}, {sum(p.numel() for p in model.parameters()):,} parameters",
        **kw,
    )
