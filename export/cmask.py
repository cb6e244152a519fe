"""What the STFT-mask families (frcrn, gtcrn, lowlat, ...) share: the sqrt-Hann 512/128 STFT
of the training path, overlap-add, the state declaration (:class:`StateDef`), zero states,
the parameter count, and the one-frame ``step`` the exporter traces.

A subclass of :class:`MaskModel` defines ``state_defs`` (a list of :class:`StateDef`),
``net(feat [B, 2, T, 257], states) -> (mask [B, 2, T, 257], new states)`` and
``macs_per_frame()``; ``apply_mask`` says how the mask acts on the spectrum (a complex ratio
mask by default). Model modules import these helpers from here, never from each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtns.framing import BLOCK_LEN, BLOCK_SHIFT

Tensor = torch.Tensor


@dataclass
class StateDef:
    """One streaming state tensor of a mask model (per stream: ``shape``, filled with ``init``
    at the start of a stream); exported as graph input ``name`` and output ``name_out``."""

    name: str
    shape: tuple[int, ...]
    description: str
    init: float = 0.0


class DictConfig:
    """``from_dict`` / ``to_dict`` for a model's frozen dataclass config: JSON lists become
    tuples for the fields named in ``TUPLE_FIELDS``; unknown keys are refused, naming
    ``LABEL``."""

    LABEL: ClassVar[str] = "model"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        for k in cls.TUPLE_FIELDS:
            if k in d:
                d[k] = tuple(d[k])
        unknown = set(d) - set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        if unknown:
            raise ValueError(f"unknown option(s) of a {cls.LABEL} config: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def analysis_window(device=None) -> Tensor:
    """sqrt-periodic-Hann of one block, float32."""
    n = torch.arange(BLOCK_LEN, dtype=torch.float64, device=device)
    return torch.sqrt(0.5 - 0.5 * torch.cos(2 * math.pi * n / BLOCK_LEN)).float()


def synthesis_window(device=None) -> Tensor:
    """sqrt-Hann divided by the OLA gain of Hann at 128 (= 2): perfect reconstruction."""
    w = analysis_window(device).double()
    gain = (w * w).reshape(-1, BLOCK_SHIFT).sum(0)  # constant: block_len / (2 * shift)
    return (w / gain[0]).float()


def overlap_add(frames: Tensor, shift: int = BLOCK_SHIFT) -> Tensor:
    """[B, T, L] blocks -> [B, (T - 1) * shift + L] by overlap-add (differentiable)."""
    b, t, n = frames.shape
    out = F.fold(
        frames.transpose(1, 2),
        output_size=(1, (t - 1) * shift + n),
        kernel_size=(1, n),
        stride=(1, shift),
    )
    return out.reshape(b, -1)


class MaskModel(nn.Module):
    """Training path (:meth:`forward`, whole signals, zero initial states) and export path
    (:meth:`step`, one frame, explicit states) over one ``net``."""

    block_len = BLOCK_LEN
    block_shift = BLOCK_SHIFT
    #: Output sample n estimates input n - latency in block-by-block streaming.
    latency = BLOCK_LEN - BLOCK_SHIFT
    state_defs: list[StateDef]

    analysis_window = staticmethod(analysis_window)
    synthesis_window = staticmethod(synthesis_window)

    def net(self, feat: Tensor, states: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def macs_per_frame(self) -> int:
        """Multiply-accumulates of one ``step`` (one 128-sample hop of one stream)."""
        raise NotImplementedError

    def apply_mask(self, spec: Tensor, mask: Tensor) -> Tensor:
        """spec [B, T, 257] complex, mask [B, 2, T, 257] -> the enhanced spectrum."""
        return spec * torch.complex(mask[:, 0], mask[:, 1])

    def zero_states(self, batch: int, device=None) -> dict[str, Tensor]:
        return {
            s.name: torch.full((batch, *s.shape), s.init, dtype=torch.float32, device=device)
            for s in self.state_defs
        }

    def state_floats(self) -> int:
        return sum(int(np.prod(s.shape)) for s in self.state_defs)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N] (N >= 512) -> enhanced [B, (T - 1) * 128 + 512], T = 1 + (N - 512) // 128.
        Output sample n estimates input sample n (no delay in this path)."""
        frames = x.unfold(-1, BLOCK_LEN, BLOCK_SHIFT) * analysis_window(x.device)
        spec = torch.fft.rfft(frames, dim=-1)  # [B, T, 257]
        feat = torch.stack([spec.real, spec.imag], 1)  # [B, 2, T, 257]
        mask, _ = self.net(feat, self.zero_states(x.shape[0], x.device))
        est = self.apply_mask(spec, mask)
        out = torch.fft.irfft(est, n=BLOCK_LEN, dim=-1) * synthesis_window(x.device)
        return overlap_add(out, BLOCK_SHIFT)

    def step(self, feat: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        """feat (Re X, Im X) [B, 2, 257] and the states in :attr:`state_defs` order
        -> (mask [B, 2, 257], *new states)."""
        st = {s.name: v for s, v in zip(self.state_defs, states, strict=True)}
        mask, new = self.net(feat[:, :, None, :], st)
        return (mask[:, :, 0, :], *(new[s.name] for s in self.state_defs))
