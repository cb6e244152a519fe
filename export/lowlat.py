"""A causal recurrent magnitude-mask model on the 257-bin STFT (family ``lowlat``), after the
spectrogram-masking models of Wilson et al., "Exploring Tradeoffs in Models for Low-latency
Speech Enhancement" (IWAENC 2018; shared/MODELS.md section 4, shared/seeds/003), made
causal and streamable for this project's framing (512/128 sqrt-Hann STFT, 16 kHz).

The published models read power-law compressed spectra (|X|^0.3, real and imaginary parts),
apply a few convolutions (some dilated in time, all non-causal), a (B)LSTM and fully
connected layers, and output a sigmoid magnitude mask. Here every time kernel looks back
only and the LSTM is unidirectional::

    (Re X, Im X) [B, 2, T, 257] -> |X|^0.3 e^{j angle X}
      -> conv 1 x 7 along frequency (2 -> C), ReLU
      -> conv 3 x 1 causal in time, dilation d (C -> C), ReLU      (cache: 2d frames)
      -> FC (C * 257 -> H), ReLU -> LSTM (H, layers L)               (states h, c)
      -> FC (H -> 257), sigmoid = magnitude mask; Y = X * mask (phase kept)

It is exported in the engine's complex-mask pack layout (the mask's imaginary part is 0).
As in :mod:`rtns_export.gtcrn`, rows of elementwise transcendental ops are padded to a
multiple of 16 (272 bins) so the exported graph is batch-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtns.framing import N_BINS
from rtns_export.cmask import DictConfig, MaskModel, StateDef, count_params

Tensor = torch.Tensor
PAD_BINS = 272


@dataclass(frozen=True)
class LowLatConfig(DictConfig):
    LABEL = "lowlat"

    channels: int = 4
    dilation: int = 2
    hidden: int = 192
    layers: int = 2
    compress: float = 0.3

    def __post_init__(self) -> None:
        if self.channels < 1 or self.dilation < 1 or self.layers < 1:
            raise ValueError("channels, dilation and layers must be >= 1")
        if self.hidden < 16 or self.hidden % 16:
            raise ValueError(f"hidden must be a positive multiple of 16, got {self.hidden}")
        if not 0 < self.compress <= 1:
            raise ValueError("compress must be in (0, 1]")


class LowLat(MaskModel):
    def __init__(self, cfg: LowLatConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LowLatConfig()
        c, h = cfg.channels, cfg.hidden
        self.conv_f = nn.Conv2d(2, c, (1, 7), padding=(0, 3))
        self.conv_t = nn.Conv2d(c, c, (3, 1), dilation=(cfg.dilation, 1))
        self.fc_in = nn.Linear(c * N_BINS, h)
        self.lstm = nn.LSTM(h, h, cfg.layers, batch_first=True)
        self.fc_out = nn.Linear(h, N_BINS)
        with torch.no_grad():  # start near a pass-through mask (sigmoid(2) ~ 0.88)
            self.fc_out.bias.fill_(2.0)
        cache = 2 * cfg.dilation
        self.state_defs = [
            StateDef("conv_cache", (c, cache, N_BINS), f"time conv input, last {cache} frames"),
            StateDef("lstm_h", (cfg.layers, h), "LSTM hidden states per layer"),
            StateDef("lstm_c", (cfg.layers, h), "LSTM cell states per layer"),
        ]

    def net(self, feat: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """feat (Re X, Im X) [B, 2, T, 257] -> (mask [B, 2, T, 257] with imaginary 0, states)."""
        c = self.cfg.compress
        t = int(feat.shape[2])
        fp = F.pad(feat, (0, PAD_BINS - N_BINS))
        mag2 = fp[:, :1] * fp[:, :1] + fp[:, 1:] * fp[:, 1:] + 1e-12
        x = (fp * torch.pow(mag2, (c - 1.0) / 2.0))[..., :N_BINS]
        x = F.relu(self.conv_f(x))
        x = torch.cat([st["conv_cache"], x], 2)
        cache = x[:, :, -2 * self.cfg.dilation :]
        x = F.relu(self.conv_t(x))  # [B, C, T, 257]
        x = F.relu(self.fc_in(x.transpose(1, 2).reshape(-1, t, self.cfg.channels * N_BINS)))
        h0 = st["lstm_h"].transpose(0, 1).contiguous()
        c0 = st["lstm_c"].transpose(0, 1).contiguous()
        y, (hn, cn) = self.lstm(x, (h0, c0))
        m = F.pad(self.fc_out(y), (0, PAD_BINS - N_BINS))
        m = torch.sigmoid(m)[..., :N_BINS][:, None]  # [B, 1, T, 257]
        mask = torch.cat([m, torch.zeros_like(m)], 1)
        new = {"conv_cache": cache, "lstm_h": hn.transpose(0, 1), "lstm_c": cn.transpose(0, 1)}
        return mask, new

    def apply_mask(self, spec: Tensor, mask: Tensor) -> Tensor:
        """A magnitude mask: channel 0 scales the complex spectrum."""
        return spec * mask[:, 0]

    def macs_per_frame(self) -> int:
        c, h, L = self.cfg.channels, self.cfg.hidden, self.cfg.layers
        conv = N_BINS * c * 2 * 7 + N_BINS * c * c * 3
        return conv + c * N_BINS * h + L * 4 * h * 2 * h + h * N_BINS


def export_lowlat(model: LowLat, out_dir, *, name: str, provenance, **kw):
    from rtns_export.exporter import export_complex_mask_pack

    return export_complex_mask_pack(
        model,
        out_dir,
        family="lowlat",
        name=name,
        provenance=provenance,
        description=(
            f"causal recurrent magnitude mask (after Wilson et al. 2018), LSTM "
            f"{model.cfg.layers} x {model.cfg.hidden}, {count_params(model):,} parameters, "
            f"{model.macs_per_frame() / 1e6:.2f} MMAC per 8 ms hop; complex-mask pack layout"
        ),
        **kw,
    )
