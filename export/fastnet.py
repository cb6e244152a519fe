"""A runtime-first mask network for rtns ("fastnet"): band-wise GRUs over time and attention
across bands, built to onnxruntime's cost (issue "One flagship for every path").

Design rules, each from a measurement of the GTCRN-class flagship in onnxruntime (one thread:
one stream is dispatch-bound at about 1 us a kernel; a 64-stream bank step goes to the GRUs,
PRelu, conv-cache Concat/Slice and layout reorders):

- no recurrent scan along frequency: the only recurrence is a GRU over time with the bands
  as its batch (``bands x hidden`` state floats a block; one frame of it runs as two Gemms and a
  few elementwise kernels, about three times faster than the GRU kernel on a bank step);
- frequency context comes from attention across the bands of one frame (one Softmax over a
  [bands, bands] matrix per head) and from the learned band split and merge, so there are
  no convolution caches at all: the GRU states are the whole streaming state;
- channels last, every dense layer a 2-D Gemm (its bias inside; no Conv, no NCHWc layout
  reorders, two Transpose kernels in all); LayerNorm as one kernel;
- every matrix product has at least ``bands`` (or ``channels``) rows even for one stream,
  so one stream and a batched bank row take the same GEMM path (batch invariance).

Written for the project's framing (512-sample blocks, 128-sample hop, 16 kHz, 257 bins,
sqrt-periodic-Hann STFT: the complex-mask pack layout). Facts about the published
FastEnhancer design (GRUs over time per band, attention across bands, 1-D convolutions over
frequency, folded BN) are from its paper (arXiv 2509.21867); the code is ours.

Layer plan (C = ``channels``, F = ``bands``, H = ``hidden``; T frames; channels last)::

    (Re X, Im X) [B, 2, T, 257], bins padded to 272
      -> |X|^(1/4) and (Re X, Im X) |X|^(1/4 - 1) per bin, 4 bins to a patch   [B*T*68, 12]
      -> patch embedding: linear 12 -> C, ReLU                             e  [B*T, 68, C]
      -> band split: a learned linear map of the 68 positions to F bands
         + a learned band embedding                                           [B, T, F, C]
      -> ``blocks`` x (GRU over time per band (H), FC H -> C, + residual, LayerNorm;
                       self-attention across the F bands, FC, + residual, LayerNorm)
      -> band merge: linear F -> 68 positions, + e, ReLU                      [B*T, 68, C]
      -> (``dec_mlp``: linear C -> C, ReLU)
      -> mask projection: linear C -> (4 real, 4 imaginary) per position, tanh [B, 2, T, 272]
    complex ratio mask on bins 0..256: Y = X * (M_r + j M_i)

Streaming: the GRU states ([B, F, H] per block) are the only left context; one code path
(:meth:`FastNet.net`) serves training (whole signals, zero initial state) and export (one
frame per 128-sample hop, every state an explicit tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtns.framing import N_BINS
from rtns_export.cmask import DictConfig, MaskModel, StateDef, count_params

Tensor = torch.Tensor
States = dict[str, Tensor]

#: Rows of elementwise transcendental ops are padded to multiples of this (batch invariance).
SIMD = 16
#: Bins are padded to 272 and read as 68 positions of 4 neighbouring bins (patches).
PAD_BINS = 272
PATCH = 4
POSITIONS = PAD_BINS // PATCH


@dataclass(frozen=True)
class FastNetConfig(DictConfig):
    LABEL = "FastNet"

    channels: int = 32
    bands: int = 16
    hidden: int = 32
    blocks: int = 2
    heads: int = 1
    #: a hidden layer (C -> C, ReLU) before the mask projection of every position
    dec_mlp: bool = False

    def __post_init__(self) -> None:
        if self.channels % self.heads:
            raise ValueError(f"channels ({self.channels}) must be a multiple of heads")
        for name in ("channels", "hidden"):
            if getattr(self, name) % SIMD:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of {SIMD}")
        if not 2 <= self.bands <= POSITIONS:
            raise ValueError(f"bands ({self.bands}) must be in 2..{POSITIONS}")
        if self.blocks < 1:
            raise ValueError("blocks must be >= 1")


def compressed_features(feat: Tensor) -> Tensor:
    """(Re X, Im X) [B, 2, T, 257] -> channels-last patches [B, T, 68, 12]: for each bin
    (padded with zeros to 272) |X|^0.25 and Re X, Im X scaled by |X|^(0.25 - 1), four
    neighbouring bins to a patch.

    The exponent 1/4 is three exact square roots (no Pow kernel, which costs about 5 % of a
    bank row), and every op here is exact IEEE arithmetic, so rows are batch-invariant."""
    feat = F.pad(feat, (0, PAD_BINS - N_BINS))
    re, im = feat[:, 0], feat[:, 1]  # [B, T, 272]
    mag = torch.sqrt(re * re + im * im + 1e-12)
    q = torch.sqrt(torch.sqrt(mag))  # |X|^(1/4)
    s = q / mag
    x = torch.stack([q, re * s, im * s], -1)  # [B, T, 272, 3]
    return x.reshape(-1, int(feat.shape[2]), POSITIONS, PATCH * 3)


def to_rows(x: Tensor) -> Tensor:
    """[B, T, F, C] -> [T, B*F, C], the GRU's sequence-first layout (whole signals; one
    frame takes :func:`gru_frame` on a plain reshape instead)."""
    t, c = int(x.shape[1]), int(x.shape[3])
    return x.transpose(0, 1).reshape(t, -1, c)


def from_rows(y: Tensor, t: int, f: int) -> Tensor:
    """The inverse of :func:`to_rows`: [T * B*F, C] (or [T, B*F, C]) -> [B, T, F, C]."""
    c = int(y.shape[-1])
    if t == 1:
        return y.reshape(-1, 1, f, c)
    return y.reshape(t, -1, f, c).transpose(0, 1)


def linear2d(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer`` on the last axis of x [..., in] as one 2-D product -> [rows, out] (one Gemm
    kernel with its bias at export, where a 3-D MatMul leaves the bias Add as a kernel of
    its own). The caller restores the leading axes with static sizes (no Shape kernels)."""
    return layer(x.reshape(-1, int(x.shape[-1])))


def gru_frame(gru: nn.GRU, x: Tensor, h: Tensor) -> Tensor:
    """One step of a one-layer unidirectional ``gru`` (torch's gate order r, z, n and its
    reset-after-product form) as one Gemm and elementwise kernels: x [N, I], h [N, H] ->
    h' [N, H]. The same function as ``gru(x[None], h[None])``; in onnxruntime it runs about
    three times faster than the GRU kernel on the many rows of a bank step.

    The Gemm multiplies [x, h] by one block matrix (folded to a constant at export) whose
    columns are the summed r and z pre-activations, then W_in x + b_in and W_hn h + b_hn."""
    hid, inp = gru.hidden_size, gru.input_size
    w_ih, w_hh = gru.weight_ih_l0, gru.weight_hh_l0  # [3H, I], [3H, H]
    b_ih, b_hh = gru.bias_ih_l0, gru.bias_hh_l0
    top = torch.cat([w_ih[: 2 * hid].t(), w_ih[2 * hid :].t(), w_ih.new_zeros(inp, hid)], 1)
    low = torch.cat([w_hh[: 2 * hid].t(), w_hh.new_zeros(hid, hid), w_hh[2 * hid :].t()], 1)
    bias = torch.cat([b_ih[: 2 * hid] + b_hh[: 2 * hid], b_ih[2 * hid :], b_hh[2 * hid :]])
    g = torch.addmm(bias, torch.cat([x, h], 1), torch.cat([top, low], 0))  # [N, 4H]
    rz, gin, ghn = g.split([2 * hid, hid, hid], 1)
    r, z = torch.sigmoid(rz).split(hid, 1)
    n = torch.tanh(gin + r * ghn)
    return n + z * (h - n)


class BandBlock(nn.Module):
    """GRU over time per band, then attention across the bands of each frame.

    x [B, T, F, C], h [B, F, H] -> (y [B, T, F, C], new h)."""

    def __init__(self, c: int, f: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.c, self.f, self.hidden, self.heads = c, f, hidden, heads
        self.gru = nn.GRU(c, hidden)  # sequence-first: [T, B*F, C]
        self.fc = nn.Linear(hidden, c)
        self.ln1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        t, f, c = int(x.shape[1]), self.f, self.c
        if t == 1:  # one frame (the exported graph): the GRU as Gemms, the same function
            o = hn = gru_frame(self.gru, x.reshape(-1, c), h.reshape(-1, self.hidden))
        else:
            o, hn = self.gru(to_rows(x), h.reshape(1, -1, self.hidden))
        x = self.ln1(x + from_rows(linear2d(self.fc, o), t, f))
        x = self.ln2(x + linear2d(self.proj, self._attend(x)).reshape(-1, t, f, c))
        return x, hn.reshape(-1, self.f, self.hidden)

    def _attend(self, x: Tensor) -> Tensor:
        """Multi-head self-attention across the F bands of every frame: [B, T, F, C]."""
        t, f, c = int(x.shape[1]), self.f, self.c
        nh, d = self.heads, c // self.heads
        qkv = linear2d(self.qkv, x).reshape(-1, f, 3 * c)  # [B*T, F, 3C]
        if nh == 1:  # no head axis: no transposes
            q, k, v = qkv.split(c, -1)
        else:
            q, k, v = qkv.reshape(-1, f, 3, nh, d).permute(2, 0, 3, 1, 4)
        w = torch.softmax((q * (1.0 / math.sqrt(d))) @ k.transpose(-1, -2), -1)
        o = w @ v
        if nh > 1:
            o = o.transpose(1, 2)
        return o.reshape(-1, t, f, c)


class FastNet(MaskModel):
    def __init__(self, cfg: FastNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FastNetConfig()
        c, f = cfg.channels, cfg.bands
        self.enc = nn.Linear(PATCH * 3, c)
        # band split / merge: linear maps over the 68 positions, started as box filters
        split = torch.zeros(f, POSITIONS)
        edges = torch.linspace(0, POSITIONS, f + 1)
        for j in range(f):
            lo, hi = int(edges[j]), max(int(edges[j + 1]), int(edges[j]) + 1)
            split[j, lo:hi] = 1.0 / (hi - lo)
        self.split = nn.Parameter(split)  # [F, 68]
        self.merge = nn.Parameter((split > 0).float().t().contiguous())  # [68, F]
        self.band_emb = nn.Parameter(torch.zeros(f, c))
        nn.init.normal_(self.band_emb, std=0.02)
        self.blocks = nn.ModuleList(
            BandBlock(c, f, cfg.hidden, cfg.heads) for _ in range(cfg.blocks)
        )
        self.dec_hidden = nn.Linear(c, c) if cfg.dec_mlp else None
        self.dec = nn.Linear(c, 2 * PATCH)
        # start near a pass-through mask: tanh(1) ~ 0.76 real, 0 imaginary, on every bin
        with torch.no_grad():
            self.dec.weight.mul_(0.1)
            self.dec.bias.copy_(torch.tensor([1.0] * PATCH + [0.0] * PATCH))
        self.state_defs = [
            StateDef(
                f"block{i}_h",
                (f, cfg.hidden),
                f"band block {i}: GRU-over-time state of each of the {f} bands",
            )
            for i in range(cfg.blocks)
        ]

    def net(self, feat: Tensor, st: States) -> tuple[Tensor, States]:
        """feat (Re X, Im X) [B, 2, T, 257] and states -> complex mask [B, 2, T, 257] and the
        new states. Works for any T; the states are the left context (zeros at start).
        Channels-last throughout: every layer but attention is a 2-D Gemm."""
        new: States = {}
        t, c, f = int(feat.shape[2]), self.cfg.channels, self.cfg.bands
        e = F.relu(linear2d(self.enc, compressed_features(feat)))  # [B*T*68, C]
        e = e.reshape(-1, POSITIONS, c)  # [B*T, 68, C]
        x = (self.split @ e + self.band_emb).reshape(-1, t, f, c)  # [B, T, F, C]
        for i, blk in enumerate(self.blocks):
            x, new[f"block{i}_h"] = blk(x, st[f"block{i}_h"])
        y = F.relu(self.merge @ x.reshape(-1, f, c) + e)  # [B*T, 68, C]
        if self.dec_hidden is not None:
            y = F.relu(linear2d(self.dec_hidden, y))
        re, im = linear2d(self.dec, y).split(PATCH, 1)  # [B*T*68, 4] each
        m = torch.cat([re.reshape(-1, 1, t, PAD_BINS), im.reshape(-1, 1, t, PAD_BINS)], 1)
        return torch.tanh(m)[..., :N_BINS], new

    def redundant_elements(self) -> dict[str, object]:
        """The recurrent biases of the r and z gates: the one-frame graph holds only their
        sums with the input biases (see :func:`gru_frame`), so a pack import sets them to
        zero and the input biases to the sums (``rtns_export.pack_import``)."""
        h = self.cfg.hidden
        return {f"blocks.{i}.gru.bias_hh_l0": slice(0, 2 * h) for i in range(self.cfg.blocks)}

    # -- accounting ----------------------------------------------------------------------------
    def macs_per_frame(self) -> int:
        """Multiply-accumulates of one frame, counted from the layer shapes (the patch
        embedding, the band maps, GRUs (3 gates, input and recurrent products), linear layers,
        the two attention products and the mask projection)."""
        cfg, c, f, h = self.cfg, self.cfg.channels, self.cfg.bands, self.cfg.hidden
        total = POSITIONS * PATCH * 3 * c  # patch embedding
        total += 2 * POSITIONS * f * c  # split, merge
        per_block = f * 3 * h * (c + h) + f * h * c  # GRU, FC
        per_block += f * c * 3 * c + 2 * f * f * c + f * c * c  # qkv, scores, values, proj
        total += cfg.blocks * per_block
        if cfg.dec_mlp:
            total += POSITIONS * c * c
        total += POSITIONS * c * 2 * PATCH  # mask projection
        return int(total)


def export_fastnet(model: FastNet, out_dir, *, name: str, provenance, description: str = "", **kw):
    """Export a FastNet to a pack (parity-checked through the engine); returns (manifest,
    parity report). Parameters, MACs per hop and state floats go in the provenance; the
    kernel count after onnxruntime's optimisation is measured by ``benchmarks/cost.py``."""
    from rtns_export.exporter import export_complex_mask_pack

    cfg = model.cfg
    return export_complex_mask_pack(
        model,
        out_dir,
        family="fastnet",
        name=name,
        provenance=provenance,
        description=description
        or (
            f"runtime-first band network ({cfg.blocks} blocks of a GRU over time per band and "
            f"attention across {cfg.bands} bands, channels-last dense layers, complex ratio "
            f"mask), channels {cfg.channels}, hidden {cfg.hidden}, "
            f"{count_params(model):,} parameters, {model.macs_per_frame() / 1e6:.3f} MMAC per "
            f"8 ms hop, {model.state_floats()} state floats"
        ),
        **kw,
    )
