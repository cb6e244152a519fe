"""A causal, streamable FRCRN-style network (after Zhao et al., ICASSP 2022) for rtns.

Complex convolutional encoder-decoder on the 512/128 STFT with a sqrt-periodic-Hann
window (257 bins), frequency recurrence by complex FSMN blocks along the bins of a frame,
a temporal memory of left-only (causal) FSMN taps at the bottleneck, complex
squeeze-excitation whose squeeze is the cumulative mean over past frames, and a
tanh-bounded complex ratio mask (cIRM) multiplied into the noisy spectrum.

Layout. A complex tensor with C channels is a real tensor [B, 2C, T, F]: channels 0..C-1
hold the real parts, C..2C-1 the imaginary parts. A complex convolution with weights
``Wr + j Wi`` is one real convolution with the block weight ``[[Wr, -Wi], [Wi, Wr]]``.

Frequency plan for 257 bins (no bin dropped): encoder convs with frequency kernel 3,
stride 2, padding 1 map F -> (F + 1) / 2: 257 -> 129 -> 65 -> 33 -> 17. Decoders upsample
F -> 2F - 1 with a transposed convolution along frequency written in polyphase
(sub-pixel) form: one conv produces both output phases, which are interleaved along
frequency and the last bin trimmed. Every time kernel is causal (frames t-k..t).

One code path serves both uses. Every layer takes its left context (the ``cache``) as an
argument and returns the new one: :meth:`FRCRN.forward` runs whole signals with zero
initial caches (training), :meth:`FRCRN.step` runs one frame with every cache as an
explicit state tensor (ONNX export, one call per 128-sample hop). Streaming output sample
n estimates input n - 384.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtns.framing import N_BINS
from rtns_export.cmask import DictConfig, MaskModel, StateDef, count_params

Tensor = torch.Tensor
States = dict[str, Tensor]

# -- MAC accounting (analytical, counted while a step runs) ------------------------------
_MACS: list[int] | None = None


@contextmanager
def count_macs() -> Iterator[list[int]]:
    """Inside the block, every convolution/linear of this module adds its MACs to ``[0]``."""
    global _MACS
    _MACS = [0]
    try:
        yield _MACS
    finally:
        _MACS = None


def _count(n: int) -> None:
    if _MACS is not None:
        _MACS[0] += int(n)


# -- the config --------------------------------------------------------------------------
@dataclass(frozen=True)
class FRCRNConfig(DictConfig):
    LABEL = "FRCRN"
    TUPLE_FIELDS = ("channels", "freq_fsmn_levels")

    """Sizes of the network; counts of channels are complex channels."""

    #: Encoder output channels per level (each level halves the bins: 129, 65, 33, 17).
    channels: tuple[int, ...] = (16, 24, 32, 32)
    #: Time kernel (frames t-k+1..t) of encoder / decoder convolutions.
    enc_time_kernel: int = 2
    dec_time_kernel: int = 1
    #: Frequency FSMN after encoder levels (and before the mirrored decoder) with these
    #: indices (0 = first level); the bottleneck always gets one.
    freq_fsmn_levels: tuple[int, ...] = (0, 1, 2)
    #: Half-width of the frequency FSMN memory (taps f-k..f+k).
    freq_fsmn_context: int = 4
    #: Hidden (complex) width of the FSMN projections, as a multiple of the channels.
    fsmn_expand: float = 1.0
    #: Number of time-FSMN layers at the bottleneck and their causal taps (t-taps+1..t).
    time_fsmn_layers: int = 2
    time_fsmn_taps: int = 16
    #: Complex squeeze-excitation on encoder and decoder outputs; reduction of its FCs.
    se: bool = True
    se_reduction: int = 4
    #: Skip connections: "add" or "concat".
    skip: str = "add"
    #: Power-law compression of the input magnitude (phase kept): |X|^c e^{j angle X}.
    compress: float = 0.5
    #: Each mask component is mask_bound * tanh(.) (bounded cIRM).
    mask_bound: float = 1.0
    leaky_slope: float = 0.01

    def __post_init__(self) -> None:
        if len(self.channels) < 1:
            raise ValueError("channels must name at least one encoder level")
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        if self.skip not in ("add", "concat"):
            raise ValueError(f"skip must be 'add' or 'concat', got {self.skip!r}")
        if any(not 0 <= i < len(self.channels) for i in self.freq_fsmn_levels):
            raise ValueError("freq_fsmn_levels must index encoder levels")
        for name in ("enc_time_kernel", "dec_time_kernel", "time_fsmn_taps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 < self.compress <= 1:
            raise ValueError("compress must be in (0, 1]")


def bins_per_level(n_levels: int, bins: int = N_BINS) -> list[int]:
    """[257, 129, 65, ...]: bins at the input and after each encoder level."""
    out = [bins]
    for _ in range(n_levels):
        out.append((out[-1] + 1) // 2)
    return out


# -- complex building blocks ---------------------------------------------------------------
def _complex_weight(wr: Tensor, wi: Tensor) -> Tensor:
    """[[Wr, -Wi], [Wi, Wr]]: [Co, Ci, ...] x 2 -> [2Co, 2Ci, ...]."""
    return torch.cat([torch.cat([wr, -wi], 1), torch.cat([wi, wr], 1)], 0)


class ComplexConv(nn.Module):
    """Complex 2-D convolution over [B, 2Ci, T, F], causal in time, cache = last k_t-1 frames.

    ``kernel`` = (k_t, k_f); frequency stride ``stride_f`` with padding ``pad_f``.
    """

    def __init__(
        self,
        ci: int,
        co: int,
        kernel: tuple[int, int],
        stride_f: int = 1,
        pad_f: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kf = kernel
        self.ci, self.co, self.kt, self.kf = ci, co, kt, kf
        self.stride_f, self.pad_f = stride_f, pad_f
        self.wr = nn.Parameter(torch.empty(co, ci, kt, kf))
        self.wi = nn.Parameter(torch.empty(co, ci, kt, kf))
        self.bias = nn.Parameter(torch.zeros(2 * co)) if bias else None
        bound = 1.0 / math.sqrt(2 * ci * kt * kf)
        nn.init.uniform_(self.wr, -bound * math.sqrt(3), bound * math.sqrt(3))
        nn.init.uniform_(self.wi, -bound * math.sqrt(3), bound * math.sqrt(3))

    @property
    def cache_frames(self) -> int:
        return self.kt - 1

    def forward(self, x: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x [B, 2Ci, T, F], cache [B, 2Ci, k_t-1, F] (None if k_t == 1)
        -> y [B, 2Co, T, F'], new cache."""
        if cache is not None:
            x = torch.cat([cache, x], 2)
            cache = x[:, :, -self.cache_frames :]
        w = _complex_weight(self.wr, self.wi)
        y = F.conv2d(x, w, self.bias, stride=(1, self.stride_f), padding=(0, self.pad_f))
        _count(y[0].numel() * w.shape[1] * self.kt * self.kf)
        return y, cache


class ComplexSE(nn.Module):
    """Complex squeeze-excitation with a causal squeeze.

    s_t = (running sum of mean_F x over frames <= t) / (frames so far), per channel re/im;
    g_r = fc_r(s_r) - fc_i(s_i), g_i = fc_r(s_i) + fc_i(s_r) with fc = C -> C/r -> C (ReLU,
    sigmoid); out_re = x_re * g_r, out_im = x_im * g_i (as published FRCRN's complex SE).
    The four fc evaluations run as three matrix products with structured weights.
    """

    def __init__(self, c: int, reduction: int) -> None:
        super().__init__()
        h = max(1, c // reduction)
        self.c, self.h = c, h
        # fc_r and fc_i: first layers [C, h], second layers [h, C] (x @ W convention).
        self.w1 = nn.Parameter(torch.empty(2, c, h))
        self.b1 = nn.Parameter(torch.zeros(2, h))
        self.w2 = nn.Parameter(torch.empty(2, h, c))
        self.b2 = nn.Parameter(torch.zeros(2, c))
        nn.init.uniform_(self.w1, -1 / math.sqrt(c), 1 / math.sqrt(c))
        nn.init.uniform_(self.w2, -1 / math.sqrt(h), 1 / math.sqrt(h))
        # (fc_r(s_r), fc_i(s_r), fc_r(s_i), fc_i(s_i)) -> (g_r, g_i)
        eye = torch.eye(c)
        z = torch.zeros(c, c)
        comb = torch.cat(
            [
                torch.cat([eye, z], 1),
                torch.cat([z, eye], 1),
                torch.cat([z, eye], 1),
                torch.cat([-eye, z], 1),
            ],
            0,
        )
        self.register_buffer("comb", comb, persistent=False)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c, h = self.c, self.h
        zc = self.w1.new_zeros(c, 2 * h)
        a = torch.cat([self.w1[0], self.w1[1]], 1)  # [C, 2h]: s -> (fc_r1 s, fc_i1 s)
        w1 = torch.cat([torch.cat([a, zc], 1), torch.cat([zc, a], 1)], 0)  # [2C, 4h]
        b1 = torch.cat([self.b1[0], self.b1[1], self.b1[0], self.b1[1]])
        zh = self.w2.new_zeros(h, c)
        blocks = [self.w2[0], self.w2[1], self.w2[0], self.w2[1]]
        w2 = torch.cat(
            [
                torch.cat([blk if j == i else zh for j in range(4)], 1)
                for i, blk in enumerate(blocks)
            ],
            0,
        )  # [4h, 4C] block diagonal
        b2 = torch.cat([self.b2[0], self.b2[1], self.b2[0], self.b2[1]])
        return w1, b1, w2, b2

    def forward(self, x: Tensor, total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 2C, T, F]; total [B, 2C] running sum; count [B, T] frames up to each t
        (already including t) -> (y [B, 2C, T, F], new total [B, 2C])."""
        m = x.mean(3)  # [B, 2C, T]
        if m.shape[2] == 1:
            csum = total[:, :, None] + m
            new_total = csum[:, :, 0]
        else:
            csum = total[:, :, None] + torch.cumsum(m, 2)
            new_total = csum[:, :, -1]
        s = (csum / count[:, None, :]).transpose(1, 2)  # [B, T, 2C] = (s_r, s_i)
        w1, b1, w2, b2 = self._weights()
        hid = F.relu(s @ w1 + b1)
        o = torch.sigmoid(hid @ w2 + b2)
        g = (o @ self.comb).transpose(1, 2)[..., None]  # [B, 2C, T, 1] = (g_r, g_i)
        _count(s.shape[1] * 4 * 2 * self.c * self.h)
        return x * g, new_total


class ComplexFSMN(nn.Module):
    """Complex FSMN unit: p = W_p ReLU(W_l x + b); y = x + p + memory(p).

    ``axis="freq"``: memory taps f-k..f+k along the bins of one frame (frequency
    recurrence), no state. ``axis="time"``: causal taps t-taps+1..t along frames, the last
    taps-1 frames of p are the cache. The memory filter is depthwise with real taps per
    complex channel (applied alike to re and im).
    """

    def __init__(self, c: int, hidden: int, axis: str, taps: int) -> None:
        super().__init__()
        self.c, self.axis, self.taps = c, axis, taps
        self.lin = ComplexConv(c, hidden, (1, 1))
        self.proj = ComplexConv(hidden, c, (1, 1), bias=False)
        self.mem = nn.Parameter(torch.zeros(c, 1, taps))

    @property
    def cache_frames(self) -> int:
        return self.taps - 1 if self.axis == "time" else 0

    def forward(self, x: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x [B, 2C, T, F]; cache [B, 2C, taps-1, F] for time FSMN."""
        h, _ = self.lin(x, None)
        h = F.relu(h)
        p, _ = self.proj(h, None)
        w = torch.cat([self.mem, self.mem], 0)  # [2C, 1, taps]
        if self.axis == "time":
            pp = torch.cat([cache, p], 2)
            cache = pp[:, :, -self.cache_frames :]
            m = F.conv2d(pp, w[..., None], groups=2 * self.c)
        else:
            m = F.conv2d(p, w[:, :, None, :], padding=(0, self.taps // 2), groups=2 * self.c)
        _count(m[0].numel() * self.taps)
        return x + p + m, cache


class EncoderLevel(nn.Module):
    """ComplexConv (k_t x 3, freq stride 2) -> BN (re/im separately) -> LeakyReLU -> SE."""

    def __init__(self, ci: int, co: int, cfg: FRCRNConfig) -> None:
        super().__init__()
        self.conv = ComplexConv(ci, co, (cfg.enc_time_kernel, 3), stride_f=2, pad_f=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * co)
        self.slope = cfg.leaky_slope
        self.se = ComplexSE(co, cfg.se_reduction) if cfg.se else None


class DecoderLevel(nn.Module):
    """Polyphase transposed conv along frequency: ComplexConv (k_t x 3) to 2 x Co channels,
    both phases interleaved along frequency (F -> 2F - 1); then BN, LeakyReLU, SE unless
    it is the output level (linear, 1 complex channel: the mask before tanh)."""

    def __init__(self, ci: int, co: int, cfg: FRCRNConfig, last: bool) -> None:
        super().__init__()
        self.co, self.last = co, last
        self.conv = ComplexConv(ci, 2 * co, (cfg.dec_time_kernel, 3), pad_f=1, bias=last)
        self.bn = None if last else nn.BatchNorm2d(2 * co)
        self.slope = cfg.leaky_slope
        self.se = ComplexSE(co, cfg.se_reduction) if (cfg.se and not last) else None

    def upsample(self, y: Tensor) -> Tensor:
        """[B, 2*(2Co), T, F] with complex channel index phase*Co + c -> [B, 2Co, T, 2F-1]."""
        t, f = int(y.shape[2]), int(y.shape[3])  # constants in the one-frame graph
        y = y.reshape(-1, 2, 2, self.co, t, f).permute(0, 1, 3, 4, 5, 2)
        return y.reshape(-1, 2 * self.co, t, 2 * f)[..., : 2 * f - 1]


# -- the network -----------------------------------------------------------------------------
class FRCRN(MaskModel):
    def __init__(self, cfg: FRCRNConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FRCRNConfig()
        ch = list(cfg.channels)
        self.bins = bins_per_level(len(ch))
        ins = [1] + ch[:-1]
        self.enc = nn.ModuleList(EncoderLevel(ci, co, cfg) for ci, co in zip(ins, ch, strict=True))

        def fsmn(c: int, axis: str, taps: int) -> ComplexFSMN:
            return ComplexFSMN(c, max(1, round(c * cfg.fsmn_expand)), axis, taps)

        fk = 2 * cfg.freq_fsmn_context + 1
        self.enc_fsmn = nn.ModuleDict(
            {str(i): fsmn(ch[i], "freq", fk) for i in cfg.freq_fsmn_levels}
        )
        self.dec_fsmn = nn.ModuleDict(
            {str(i): fsmn(ch[i], "freq", fk) for i in cfg.freq_fsmn_levels}
        )
        self.mid_freq = fsmn(ch[-1], "freq", fk)
        self.mid_time = nn.ModuleList(
            fsmn(ch[-1], "time", cfg.time_fsmn_taps) for _ in range(cfg.time_fsmn_layers)
        )
        # decoder level i maps bins[i+1] -> bins[i]; its input is (decoder out, skip i).
        outs = [1] + ch[:-1]
        mult = 2 if cfg.skip == "concat" else 1
        self.dec = nn.ModuleList(
            DecoderLevel(mult * ch[i], outs[i], cfg, last=(i == 0)) for i in range(len(ch))
        )
        # start near a pass-through mask: real part tanh(1) ~ 0.76, imaginary 0.
        with torch.no_grad():
            self.dec[0].conv.bias.zero_()
            self.dec[0].conv.bias[0] = 1.0
        self.state_defs = self._state_plan()

    # -- state inventory ---------------------------------------------------------------
    def _state_plan(self) -> list[StateDef]:
        cfg, states = self.cfg, []
        ins = [1] + list(cfg.channels[:-1])
        for i, lvl in enumerate(self.enc):
            if lvl.conv.cache_frames:
                states.append(
                    StateDef(
                        f"enc{i}_cache",
                        (2 * ins[i], lvl.conv.cache_frames, self.bins[i]),
                        f"encoder {i} conv input, last {lvl.conv.cache_frames} frame(s)",
                    )
                )
        for j, lyr in enumerate(self.mid_time):
            states.append(
                StateDef(
                    f"tfsmn{j}_cache",
                    (2 * lyr.c, lyr.cache_frames, self.bins[-1]),
                    f"bottleneck time FSMN {j}: last {lyr.cache_frames} projected frames",
                )
            )
        for i, lvl in enumerate(self.dec):
            if lvl.conv.cache_frames:
                states.append(
                    StateDef(
                        f"dec{i}_cache",
                        (lvl.conv.ci * 2, lvl.conv.cache_frames, self.bins[i + 1]),
                        f"decoder {i} conv input, last {lvl.conv.cache_frames} frame(s)",
                    )
                )
        for i, lvl in enumerate(self.enc):
            if lvl.se is not None:
                states.append(
                    StateDef(
                        f"enc{i}_se_sum", (2 * lvl.se.c,), f"encoder {i} SE running sum (re, im)"
                    )
                )
        for i, lvl in enumerate(self.dec):
            if lvl.se is not None:
                states.append(
                    StateDef(
                        f"dec{i}_se_sum", (2 * lvl.se.c,), f"decoder {i} SE running sum (re, im)"
                    )
                )
        if cfg.se:
            states.append(StateDef("se_count", (1,), "frames seen (SE running mean)"))
        return states

    # -- the shared per-frame(s) network -------------------------------------------------------
    def _features(self, feat: Tensor) -> Tensor:
        """(Re X, Im X) [B, 2, T, F] -> power-law compressed, phase kept."""
        if self.cfg.compress == 1.0:
            return feat
        mag2 = feat[:, :1] ** 2 + feat[:, 1:] ** 2
        return feat * (mag2 + 1e-8) ** ((self.cfg.compress - 1.0) / 2.0)

    def _act(self, x: Tensor, bn: nn.Module) -> Tensor:
        return F.leaky_relu(bn(x), self.cfg.leaky_slope)

    def net(self, feat: Tensor, st: States) -> tuple[Tensor, States]:
        """feat (Re X, Im X) [B, 2, T, 257] and states -> complex mask [B, 2, T, 257] and
        the new states. Works for any T; the states are the left context (zeros at start)."""
        cfg = self.cfg
        new: States = {}
        t = int(feat.shape[2])
        count = None
        if cfg.se:
            c0 = st["se_count"]  # [B, 1]
            if t == 1:
                count = c0 + 1.0
                new["se_count"] = count
            else:
                count = c0 + torch.arange(1, t + 1, dtype=feat.dtype, device=feat.device)[None]
                new["se_count"] = count[:, -1:]
        x = self._features(feat)
        skips = []
        for i, lvl in enumerate(self.enc):
            x, c = lvl.conv(x, st.get(f"enc{i}_cache"))
            if c is not None:
                new[f"enc{i}_cache"] = c
            x = self._act(x, lvl.bn)
            if lvl.se is not None:
                x, new[f"enc{i}_se_sum"] = lvl.se(x, st[f"enc{i}_se_sum"], count)
            if str(i) in self.enc_fsmn:
                x, _ = self.enc_fsmn[str(i)](x, None)
            skips.append(x)
        x, _ = self.mid_freq(x, None)
        for j, lyr in enumerate(self.mid_time):
            x, new[f"tfsmn{j}_cache"] = lyr(x, st[f"tfsmn{j}_cache"])
        for i in reversed(range(len(self.dec))):
            lvl = self.dec[i]
            s = skips[i]
            x = torch.cat([x, s], 1) if cfg.skip == "concat" else x + s
            y, c = lvl.conv(x, st.get(f"dec{i}_cache"))
            if c is not None:
                new[f"dec{i}_cache"] = c
            x = lvl.upsample(y)
            if lvl.last:
                break
            x = self._act(x, lvl.bn)
            if lvl.se is not None:
                x, new[f"dec{i}_se_sum"] = lvl.se(x, st[f"dec{i}_se_sum"], count)
            if str(i - 1) in self.dec_fsmn:
                x, _ = self.dec_fsmn[str(i - 1)](x, None)
        return cfg.mask_bound * torch.tanh(x), new

    # -- accounting ------------------------------------------------------------------------
    def macs_per_frame(self) -> int:
        """Multiply-accumulates of one step (convolutions, FSMN taps, SE FCs)."""
        st = self.zero_states(1)
        with torch.no_grad(), count_macs() as acc:
            self.eval().step(torch.zeros(1, 2, N_BINS), *st.values())
        return acc[0]


def export_frcrn(model: FRCRN, out_dir, *, name: str, provenance, description: str = "", **kw):
    """Export an FRCRN to a pack (parity-checked); returns (manifest, parity report)."""
    from rtns_export.exporter import export_complex_mask_pack

    return export_complex_mask_pack(
        model,
        out_dir,
        family="frcrn",
        name=name,
        provenance=provenance,
        description=description
        or (
            f"causal FRCRN-style complex CED, channels {list(model.cfg.channels)}, "
            f"{count_params(model):,} parameters, "
            f"{model.macs_per_frame() / 1e6:.2f} MMAC per 8 ms frame"
        ),
        **kw,
    )
