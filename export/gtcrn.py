"""A causal, streamable GTCRN-class network (after Rong et al., ICASSP 2024) for rtns.

Written for this project's framing (512-sample blocks, 128-sample hop, 16 kHz, 257 bins,
sqrt-periodic-Hann analysis/synthesis: the complex-mask pack layout, one mask graph).
Facts about the published design are from shared/MODELS.md section 6; the code is ours.

Layer plan (C = ``channels``, default 16; H = C/2; F = bands at each level)::

    (Re X, Im X) [B, 2, T, 257]
      -> power-law compression (|X|^c, phase kept) -> (|X|^c, Re, Im) [B, 3, T, 257]
      -> ERB compression: bins 0..64 linear, 65..256 -> 64 triangular ERB bands  [B, 3, T, 129]
      -> SFE (3-tap unfold along bands)                                          [B, 9, T, 129]
    encoder
      conv 1x5 freq-stride 2, BN, PReLU                                           [B, C, T, 65]
      conv 1x5 freq-stride 2 (2 groups), BN, PReLU                                [B, C, T, 33]
      3 x GTConv (time dilations 1, 2, 5)                                         [B, C, T, 33]
    2 x grouped dual-path RNN (intra: bidirectional grouped GRU across the 33 bands of a
        frame; inter: causal grouped GRU across frames per band; each FC + LayerNorm(F, C)
        + residual)
    decoder (additive skips from the encoder)
      3 x GTConv (dilations 5, 2, 1)
      transposed conv 1x5 freq-stride 2 (2 groups), BN, PReLU                      [B, C, T, 65]
      transposed conv 1x5 freq-stride 2 -> 2 channels                             [B, 2, T, 129]
      tanh -> ERB expansion (the transpose of the compression's triangles)        [B, 2, T, 257]
    complex ratio mask: Y = X * (M_r + j M_i)

GTConv (grouped temporal convolution): split the channels in halves; the first half goes
SFE -> 1x1 conv (3H -> C), BN, PReLU -> depthwise 3x3 conv, causal in time with dilation d
(frames t-2d, t-d, t), BN, PReLU -> 1x1 conv (C -> H), BN -> temporal recurrent attention
(per-channel energy averaged over bands -> GRU(H, 2H) -> FC -> sigmoid gain); the halves
are concatenated and channel-shuffled. SFE followed by the 1x1 conv is one linear map, a
1x3 conv along bands, and is computed as that (the input SFE stays explicit).

Grouped GRUs (the dual-path RNN's, 2 groups) run as one GRU with block-diagonal weights
per gate (:class:`GroupedGRU`): the same function, one recurrent call instead of two.

Streaming: every time-dependent operator takes its left context as an argument and
returns the new one, so one code path serves training (:meth:`GTCRN.forward`, whole
signals, zero initial state) and export (:meth:`GTCRN.step`, one frame per 128-sample hop,
every state an explicit tensor). States: the depthwise-conv input caches (2d frames each),
the TRA GRU states and the inter-frame GRU states (:attr:`GTCRN.state_defs`).

Batch invariance in onnxruntime: elementwise kernels vectorise over the flattened tensor
and finish with a scalar tail, so an element's result could depend on the batch size when
the per-row length is not a multiple of the SIMD width (16 floats on AVX-512). The
transcendental elementwise ops here act on rows whose length is a multiple of 16: the
257-bin feature compression runs on bins padded to 272, the output tanh on bands padded to
144 (both sliced back or multiplied by zero rows); every other elementwise op acts on
C x 65 or C x 33 elements per row (C a multiple of 16) or is exact arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtns.framing import N_BINS, SAMPLE_RATE
from rtns_export.cmask import DictConfig, MaskModel, StateDef, count_params

Tensor = torch.Tensor
States = dict[str, Tensor]

#: SIMD-safe lengths: rows of elementwise transcendental ops are padded to multiples of this.
SIMD = 16


def _ceil_to(n: int, m: int = SIMD) -> int:
    return -(-n // m) * m


# -- ERB band matrices ------------------------------------------------------------------------
def hz_to_erb(f):
    """ERB-rate (Glasberg & Moore): 21.4 log10(1 + 0.00437 f)."""
    return 21.4 * np.log10(1.0 + 0.00437 * np.asarray(f, dtype=np.float64))


def erb_to_hz(e):
    return (10.0 ** (np.asarray(e, dtype=np.float64) / 21.4) - 1.0) / 0.00437


def erb_triangles(
    n_bins: int = N_BINS, low_bins: int = 65, bands: int = 64, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Triangular weights [bands, n_bins - low_bins] on the bins above ``low_bins``: band
    centres equally spaced on the ERB-rate scale from the first high bin's frequency to
    Nyquist, each triangle 1 at its centre and 0 at its neighbours' (the first and last
    held at 1 outside the centres). Columns sum to 1 (a partition of unity)."""
    n_fft = 2 * (n_bins - 1)
    hz = np.arange(low_bins, n_bins) * sample_rate / n_fft
    centres = erb_to_hz(np.linspace(hz_to_erb(hz[0]), hz_to_erb(hz[-1]), bands))
    w = np.zeros((bands, hz.shape[0]))
    for k in range(bands):
        if k > 0:
            lo, c = centres[k - 1], centres[k]
            m = (hz >= lo) & (hz <= c)
            w[k, m] = (hz[m] - lo) / (c - lo)
        else:
            w[k, hz <= centres[0]] = 1.0
        if k < bands - 1:
            c, hi = centres[k], centres[k + 1]
            m = (hz > c) & (hz < hi)
            w[k, m] = (hi - hz[m]) / (hi - c)
        else:
            w[k, hz >= centres[-1]] = 1.0
    return w


def erb_matrices(
    n_bins: int = N_BINS, low_bins: int = 65, bands: int = 64, pad_bins: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(compress [pad_bins, low_bins + bands], expand [low_bins + bands, n_bins]) float32.

    compress: the first ``low_bins`` bins pass unchanged; each ERB band is the
    triangle-weighted mean of its bins (rows beyond ``n_bins`` are zero: padded inputs).
    expand: bins 0..low_bins-1 copy their band; every higher bin interpolates its bands with
    the triangle weights (columns sum to 1, so a constant band mask gives the same constant
    on every bin)."""
    pad_bins = pad_bins or n_bins
    w = erb_triangles(n_bins, low_bins, bands)
    nb = low_bins + bands
    comp = np.zeros((pad_bins, nb))
    comp[:low_bins, :low_bins] = np.eye(low_bins)
    comp[low_bins:n_bins, low_bins:] = (w / w.sum(1, keepdims=True)).T
    exp = np.zeros((nb, n_bins))
    exp[:low_bins, :low_bins] = np.eye(low_bins)
    exp[low_bins:, low_bins:] = w
    return comp.astype(np.float32), exp.astype(np.float32)


# -- the config -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GTCRNConfig(DictConfig):
    LABEL = "GTCRN"
    TUPLE_FIELDS = ("dilations",)

    #: Channels of the encoder/decoder (a multiple of 16: SIMD-safe rows, even halves).
    channels: int = 16
    #: Time dilations of the encoder's grouped temporal blocks (the decoder mirrors them).
    dilations: tuple[int, ...] = (1, 2, 5)
    #: Grouped dual-path RNN blocks and their GRU width (split over ``rnn_groups``).
    dp_blocks: int = 2
    rnn_hidden: int = 16
    rnn_groups: int = 2
    #: TRA GRU width as a multiple of its input channels (C/2).
    tra_expand: int = 2
    #: Linear bins kept below the ERB bands, and the number of ERB bands above them.
    erb_low: int = 65
    erb_bands: int = 64
    #: Input power-law compression: features (|X|^c, Re X |X|^(c-1), Im X |X|^(c-1)).
    compress: float = 0.3

    def __post_init__(self) -> None:
        if self.channels < 16 or self.channels % 16:
            raise ValueError(f"channels must be a positive multiple of 16, got {self.channels}")
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError(f"dilations must be >= 1, got {self.dilations}")
        if self.dp_blocks < 0:
            raise ValueError("dp_blocks must be >= 0")
        if self.rnn_hidden % (2 * self.rnn_groups) or self.channels % self.rnn_groups:
            raise ValueError("rnn_hidden must divide into 2 directions x rnn_groups")
        if self.erb_low < 1 or self.erb_bands < 2 or self.erb_low + self.erb_bands > N_BINS:
            raise ValueError("erb_low + erb_bands must be at most 257")
        if not 0 < self.compress <= 1:
            raise ValueError("compress must be in (0, 1]")
        if self.tra_expand < 1:
            raise ValueError("tra_expand must be >= 1")


def freq_sizes(cfg: GTCRNConfig) -> tuple[int, int, int]:
    """Bands at the ERB level and after each of the two strided encoder convs."""
    f0 = cfg.erb_low + cfg.erb_bands
    f1 = (f0 - 1) // 2 + 1
    f2 = (f1 - 1) // 2 + 1
    return f0, f1, f2


# -- building blocks ---------------------------------------------------------------------------
class PReLU(nn.Module):
    """Per-channel PReLU on [B, C, ...] written as ``relu(x) - a relu(-x)``: exactly the values
    of ``nn.PReLU`` (one of the two terms is zero), with a cheaper CPU backward."""

    def __init__(self, c: int, init: float = 0.25) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((c,), init))

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():  # one PRelu node in the graph, the same values
            return F.prelu(x, self.weight)
        a = self.weight.reshape(1, -1, *([1] * (x.dim() - 2)))
        return F.relu(x) - a * F.relu(-x)


def sfe(x: Tensor, k: int = 3) -> Tensor:
    """Subband feature extraction: each band gets its k neighbours' values as channels.
    [B, C, T, F] -> [B, C*k, T, F] (zero beyond the edges)."""
    p = k // 2
    c = int(x.shape[1])
    if torch.onnx.is_in_onnx_export():  # one grouped Conv node with one-hot taps
        w = torch.eye(k, dtype=x.dtype).repeat(c, 1).reshape(c * k, 1, 1, k)
        return F.conv2d(x, w, padding=(0, p), groups=c)
    xp = F.pad(x, (p, p))
    t, f = int(x.shape[2]), int(x.shape[3])
    parts = [xp[..., i : i + f] for i in range(k)]
    return torch.stack(parts, 2).reshape(-1, c * k, t, f)


def shuffle(a: Tensor, b: Tensor) -> Tensor:
    """Concatenate two [B, H, T, F] halves and interleave their channels."""
    h, t, f = int(a.shape[1]), int(a.shape[2]), int(a.shape[3])
    if torch.onnx.is_in_onnx_export():  # two nodes (Concat, Gather) instead of four
        order = torch.arange(2 * h).reshape(2, h).t().reshape(-1)
        return torch.cat([a, b], 1).index_select(1, order)
    return torch.stack([a, b], 2).reshape(-1, 2 * h, t, f)


class TRA(nn.Module):
    """Temporal recurrent attention: g_t = sigmoid(FC(GRU(mean_F x_t^2))), y = x * g."""

    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        self.c, self.hidden = c, c * expand
        self.gru = nn.GRU(c, self.hidden, batch_first=True)
        self.fc = nn.Linear(self.hidden, c)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, T, F], h [B, hidden] -> (y, new h)."""
        if torch.onnx.is_in_onnx_export() and int(x.shape[2]) == 1:
            # the one-frame graph: the same function without the time axis's transposes
            z = (x * x).mean((2, 3))  # [B, C]
            _, hn = torch._VF.gru(
                z[None], h[None], self.gru._flat_weights, True, 1, 0.0, False, False, False
            )
            hn = hn[0]
            g = torch.sigmoid(self.fc(hn))  # [B, C]
            return x * g.reshape(-1, self.c, 1, 1), hn
        z = (x * x).mean(3).transpose(1, 2)  # [B, T, C]
        o, hn = self.gru(z, h[None])
        g = torch.sigmoid(self.fc(o)).transpose(1, 2)[..., None]  # [B, C, T, 1]
        return x * g, hn[0]


class GTConv(nn.Module):
    """Grouped temporal convolution block with a causal dilated depthwise conv and TRA."""

    def __init__(self, c: int, dilation: int, tra_expand: int) -> None:
        super().__init__()
        h = c // 2
        self.c, self.h, self.d = c, h, dilation
        # SFE (3-tap unfold along bands) followed by a 1x1 conv is one linear map: a 1x3
        # conv along bands (same weights, 3H x C, in another order); run as that.
        self.pw1 = nn.Conv2d(h, c, (1, 3), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = PReLU(c)
        self.dw = nn.Conv2d(c, c, (3, 3), padding=(0, 1), dilation=(dilation, 1), groups=c)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = PReLU(c)
        self.pw2 = nn.Conv2d(c, h, 1)
        self.bn3 = nn.BatchNorm2d(h)
        self.tra = TRA(h, tra_expand)

    @property
    def cache_frames(self) -> int:
        return 2 * self.d

    def forward(self, x: Tensor, cache: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, C, T, F]; cache [B, C, 2d, F] (last depthwise-conv inputs); h [B, 2H]."""
        x1, x2 = torch.split(x, self.h, 1)
        y = self.act1(self.bn1(self.pw1(x1)))
        y = torch.cat([cache, y], 2)
        cache = y[:, :, -self.cache_frames :]
        y = self.act2(self.bn2(self.dw(y)))
        y = self.bn3(self.pw2(y))
        y, h = self.tra(y, h)
        return shuffle(y, x2), cache, h


def block_diag(blocks: list[Tensor]) -> Tensor:
    """Block-diagonal matrix of 2-D blocks, written with cat (exportable to ONNX; folded to a
    constant at export)."""
    rows = []
    for i, b in enumerate(blocks):
        rows.append(
            torch.cat(
                [
                    b if j == i else b.new_zeros(b.shape[0], o.shape[1])
                    for j, o in enumerate(blocks)
                ],
                1,
            )
        )
    return torch.cat(rows, 0)


class GroupedGRU(nn.Module):
    """``groups`` independent GRUs, each on its share of the input features, run as ONE GRU
    whose input and recurrent weights are block-diagonal per gate (the gates act per hidden
    unit, so the groups never mix): one recurrent call instead of ``groups``, in training and
    in the exported graph. Parameters are only the groups' own blocks.

    Hidden layout of the fused GRU: group-major within a direction (unit u of group g at
    g * per + u); bidirectional outputs are [forward units, backward units]."""

    def __init__(self, inp: int, hidden: int, groups: int, bidirectional: bool) -> None:
        super().__init__()
        dirs = 2 if bidirectional else 1
        self.groups, self.gi, self.dirs = groups, inp // groups, dirs
        self.per = hidden // groups // dirs  # units per group and direction
        self.hidden = hidden
        k_i, k_h = 1 / math.sqrt(self.per), 1 / math.sqrt(self.per)
        self.w_ih = nn.Parameter(
            torch.empty(dirs, groups, 3, self.per, self.gi).uniform_(-k_i, k_i)
        )
        self.w_hh = nn.Parameter(
            torch.empty(dirs, groups, 3, self.per, self.per).uniform_(-k_h, k_h)
        )
        self.b_ih = nn.Parameter(torch.empty(dirs, groups, 3, self.per).uniform_(-k_i, k_i))
        self.b_hh = nn.Parameter(torch.empty(dirs, groups, 3, self.per).uniform_(-k_h, k_h))

    def flat_weights(self) -> list[Tensor]:
        out = []
        for d in range(self.dirs):
            # torch gate order (r, z, n), each gate a block-diagonal over the groups
            w_ih = torch.cat([block_diag(list(self.w_ih[d, :, q])) for q in range(3)], 0)
            w_hh = torch.cat([block_diag(list(self.w_hh[d, :, q])) for q in range(3)], 0)
            b_ih = self.b_ih[d].transpose(0, 1).reshape(-1)
            b_hh = self.b_hh[d].transpose(0, 1).reshape(-1)
            out += [w_ih, w_hh, b_ih, b_hh]
        return out

    def forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x [N, L, inp]; h [N, hidden] (unidirectional) or None (zeros) -> y [N, L, hidden]."""
        h0 = x.new_zeros(self.dirs, x.shape[0], self.groups * self.per) if h is None else h[None]
        y, hn = torch._VF.gru(
            x, h0, self.flat_weights(), True, 1, 0.0, self.training, self.dirs == 2, True
        )
        return y, (None if h is None else hn[0])


class DPGRNN(nn.Module):
    """Grouped dual-path RNN: intra-frame (bidirectional across bands) then inter-frame
    (causal across frames, per band), each GRU -> FC -> LayerNorm over (bands, channels)
    -> residual."""

    def __init__(self, c: int, f: int, hidden: int, groups: int) -> None:
        super().__init__()
        self.c, self.f, self.hidden = c, f, hidden
        self.intra = GroupedGRU(c, hidden, groups, bidirectional=True)
        self.intra_fc = nn.Linear(hidden, c)
        self.intra_ln = nn.LayerNorm((f, c), eps=1e-8)
        self.inter = GroupedGRU(c, hidden, groups, bidirectional=False)
        self.inter_fc = nn.Linear(hidden, c)
        self.inter_ln = nn.LayerNorm((f, c), eps=1e-8)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, T, F]; h [B, F, hidden] (inter GRU state per band) -> (y, new h)."""
        if torch.onnx.is_in_onnx_export() and int(x.shape[2]) == 1:
            return self._one_frame(x, h)
        t, f, c = int(x.shape[2]), self.f, self.c
        x = x.permute(0, 2, 3, 1)  # [B, T, F, C]
        a, _ = self.intra(x.reshape(-1, f, c), None)
        a = self.intra_ln(self.intra_fc(a).reshape(-1, t, f, c))
        x = x + a
        xi = x.transpose(1, 2).reshape(-1, t, c)  # [B*F, T, C]
        b, hn = self.inter(xi, h.reshape(-1, self.hidden))
        b = self.inter_fc(b).reshape(-1, f, t, c).transpose(1, 2)
        x = x + self.inter_ln(b)
        return x.permute(0, 3, 1, 2), hn.reshape(-1, f, self.hidden)

    def _one_frame(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` for T = 1 in the exported graph: the same function with both GRUs
        called sequence-first, so that no transposes wrap them."""
        f, c, gi, ge = self.f, self.c, self.intra, self.inter
        x = x.permute(0, 2, 3, 1).reshape(-1, f, c)  # [B, F, C]
        xs = x.transpose(0, 1)  # [F, B, C]: the bands are the intra GRU's sequence
        h0 = xs.new_zeros(2, xs.shape[1], gi.groups * gi.per)
        a, _ = torch._VF.gru(xs, h0, gi.flat_weights(), True, 1, 0.0, False, True, False)
        x = x + self.intra_ln(self.intra_fc(a).transpose(0, 1))
        # one frame: the (batch x band) rows are the inter GRU's batch, sequence length 1
        b, hn = torch._VF.gru(
            x.reshape(1, -1, c),
            h.reshape(1, -1, self.hidden),
            ge.flat_weights(),
            True,
            1,
            0.0,
            False,
            False,
            False,
        )
        x = x + self.inter_ln(self.inter_fc(b).reshape(-1, f, c))
        return x.reshape(-1, 1, f, c).permute(0, 3, 1, 2), hn.reshape(-1, f, self.hidden)


# -- the network -------------------------------------------------------------------------------
class GTCRN(MaskModel):
    def __init__(self, cfg: GTCRNConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GTCRNConfig()
        c = cfg.channels
        self.f0, self.f1, self.f2 = freq_sizes(cfg)
        self.pad_bins = _ceil_to(N_BINS)
        self.pad_bands = _ceil_to(self.f0)
        comp, exp = erb_matrices(N_BINS, cfg.erb_low, cfg.erb_bands, self.pad_bins)
        self.register_buffer("erb_comp", torch.from_numpy(comp), persistent=False)
        self.register_buffer("erb_exp", torch.from_numpy(exp), persistent=False)
        # expansion applied to tanh over the padded bands: zero rows for the padding
        exp_pad = np.zeros((self.pad_bands, N_BINS), dtype=np.float32)
        exp_pad[: self.f0] = exp
        self.register_buffer("erb_exp_pad", torch.from_numpy(exp_pad), persistent=False)

        self.enc0 = nn.Conv2d(9, c, (1, 5), stride=(1, 2), padding=(0, 2))
        self.enc0_bn, self.enc0_act = nn.BatchNorm2d(c), PReLU(c)
        self.enc1 = nn.Conv2d(c, c, (1, 5), stride=(1, 2), padding=(0, 2), groups=2)
        self.enc1_bn, self.enc1_act = nn.BatchNorm2d(c), PReLU(c)
        self.enc_gt = nn.ModuleList(GTConv(c, d, cfg.tra_expand) for d in cfg.dilations)
        self.dp = nn.ModuleList(
            DPGRNN(c, self.f2, cfg.rnn_hidden, cfg.rnn_groups) for _ in range(cfg.dp_blocks)
        )
        self.dec_gt = nn.ModuleList(GTConv(c, d, cfg.tra_expand) for d in reversed(cfg.dilations))
        self.dec1 = nn.ConvTranspose2d(c, c, (1, 5), stride=(1, 2), padding=(0, 2), groups=2)
        self.dec1_bn, self.dec1_act = nn.BatchNorm2d(c), PReLU(c)
        self.dec0 = nn.ConvTranspose2d(c, 2, (1, 5), stride=(1, 2), padding=(0, 2))
        # start near a pass-through mask: tanh(1) ~ 0.76 real, 0 imaginary, on every band
        with torch.no_grad():
            self.dec0.weight.mul_(0.1)
            self.dec0.bias.copy_(torch.tensor([1.0, 0.0]))
        self.state_defs = self._state_plan()

    # -- state inventory ---------------------------------------------------------------------
    def _state_plan(self) -> list[StateDef]:
        out = []
        for side, blocks in (("enc", self.enc_gt), ("dec", self.dec_gt)):
            for i, b in enumerate(blocks):
                out.append(
                    StateDef(
                        f"{side}{i}_conv_cache",
                        (b.c, b.cache_frames, self.f2),
                        f"{side} GTConv {i} (dilation {b.d}): depthwise-conv input, "
                        f"last {b.cache_frames} frames",
                    )
                )
        for side, blocks in (("enc", self.enc_gt), ("dec", self.dec_gt)):
            for i, b in enumerate(blocks):
                out.append(
                    StateDef(
                        f"{side}{i}_tra_h", (b.tra.hidden,), f"{side} GTConv {i}: TRA GRU state"
                    )
                )
        for j, blk in enumerate(self.dp):
            out.append(
                StateDef(
                    f"dp{j}_inter_h",
                    (self.f2, blk.hidden),
                    f"dual-path RNN {j}: inter-frame GRU state per band "
                    f"({self.cfg.rnn_groups} groups concatenated)",
                )
            )
        return out

    # -- the shared per-frame(s) network ---------------------------------------------------------
    def features(self, feat: Tensor) -> Tensor:
        """(Re X, Im X) [B, 2, T, 257] -> (|X|^c, Re, Im with |X|^(c-1)) [B, 3, T, 272]
        (bins padded with zeros to a multiple of 16 before the elementwise power)."""
        c = self.cfg.compress
        feat = F.pad(feat, (0, self.pad_bins - N_BINS))
        mag2 = feat[:, :1] * feat[:, :1] + feat[:, 1:] * feat[:, 1:] + 1e-12
        scale = torch.pow(mag2, (c - 1.0) / 2.0)  # |X|^(c-1)
        return torch.cat([scale * torch.sqrt(mag2), feat * scale], 1)

    def net(self, feat: Tensor, st: States) -> tuple[Tensor, States]:
        """feat (Re X, Im X) [B, 2, T, 257] and states -> complex mask [B, 2, T, 257] and the
        new states. Works for any T; the states are the left context (zeros at start)."""
        new: States = {}
        x = self.features(feat) @ self.erb_comp  # [B, 3, T, 129]
        x = sfe(x)
        x = self.enc0_act(self.enc0_bn(self.enc0(x)))
        e0 = x
        x = self.enc1_act(self.enc1_bn(self.enc1(x)))
        skips = [x]
        for i, blk in enumerate(self.enc_gt):
            x, new[f"enc{i}_conv_cache"], new[f"enc{i}_tra_h"] = blk(
                x, st[f"enc{i}_conv_cache"], st[f"enc{i}_tra_h"]
            )
            skips.append(x)
        for j, blk in enumerate(self.dp):
            x, new[f"dp{j}_inter_h"] = blk(x, st[f"dp{j}_inter_h"])
        for i, blk in enumerate(self.dec_gt):
            x = x + skips[-1 - i]
            x, new[f"dec{i}_conv_cache"], new[f"dec{i}_tra_h"] = blk(
                x, st[f"dec{i}_conv_cache"], st[f"dec{i}_tra_h"]
            )
        x = x + skips[0]
        x = self.dec1_act(self.dec1_bn(self.dec1(x)))
        x = x + e0
        m = self.dec0(x)  # [B, 2, T, 129]
        m = torch.tanh(F.pad(m, (0, self.pad_bands - self.f0)))
        return m @ self.erb_exp_pad, new

    # -- accounting ----------------------------------------------------------------------------
    def macs_per_frame(self) -> int:
        """Multiply-accumulates of one step: convolutions, linear layers, GRUs (3 gates, input
        and recurrent products), the ERB matrices and the TRA energy."""
        total = [0]

        def conv(mod, inp, out):
            w = mod.weight
            if isinstance(mod, nn.ConvTranspose2d):
                total[0] += inp[0][0].numel() * w.shape[1] * w.shape[2] * w.shape[3]
            else:
                total[0] += out[0].numel() * w.shape[1] * w.shape[2] * w.shape[3]

        def lin(mod, inp, out):  # every row of the one stream (the bands, for inter_fc)
            total[0] += inp[0].numel() // mod.in_features * mod.in_features * mod.out_features

        def gru(mod, inp, out):
            x = inp[0]  # [N, L, in] batch_first
            dirs = 2 if mod.bidirectional else 1
            steps = x.shape[0] * x.shape[1] * dirs
            total[0] += steps * 3 * mod.hidden_size * (mod.input_size + mod.hidden_size)

        def grouped(mod, inp, out):
            x = inp[0]  # [N, L, inp]
            steps = x.shape[0] * x.shape[1] * mod.dirs * mod.groups
            total[0] += steps * 3 * mod.per * (mod.gi + mod.per)

        hooks = []
        for m in self.modules():
            if isinstance(m, GroupedGRU):
                hooks.append(m.register_forward_hook(grouped))
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                hooks.append(m.register_forward_hook(conv))
            elif isinstance(m, nn.Linear):
                hooks.append(m.register_forward_hook(lin))
            elif isinstance(m, nn.GRU):
                hooks.append(m.register_forward_hook(gru))
        try:
            with torch.no_grad():
                self.eval().step(torch.zeros(1, 2, N_BINS), *self.zero_states(1).values())
        finally:
            for h in hooks:
                h.remove()
        c = self.cfg
        erb = 3 * N_BINS * c.erb_bands + 2 * c.erb_bands * (N_BINS - c.erb_low)  # dense part
        tra = sum(b.h * self.f2 for b in (*self.enc_gt, *self.dec_gt))
        return total[0] + erb + tra


def export_gtcrn(model: GTCRN, out_dir, *, name: str, provenance, description: str = "", **kw):
    """Export a GTCRN to a pack (parity-checked through the engine); returns (manifest, parity
    report). The pack uses the engine's complex-mask layout (one mask graph on (Re X, Im X) of
    the sqrt-Hann 512/128 STFT) under family ``gtcrn``; the parameter count, MACs per hop and
    state size are in the provenance and description."""
    from rtns_export.exporter import export_complex_mask_pack

    return export_complex_mask_pack(
        model,
        out_dir,
        family="gtcrn",
        name=name,
        provenance=provenance,
        description=description
        or (
            f"causal GTCRN-class network (ERB bands, subband features, grouped temporal "
            f"convolutions with temporal recurrent attention, grouped dual-path GRU, complex "
            f"ratio mask), channels {model.cfg.channels}, {count_params(model):,} parameters, "
            f"{model.macs_per_frame() / 1e6:.3f} MMAC per 8 ms hop; complex-mask pack layout"
        ),
        **kw,
    )
