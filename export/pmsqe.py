"""PMSQE: a differentiable PESQ-like loss (Martín-Doñas, Gómez, González, Peinado, "A deep
learning loss function based on the perceptual evaluation of the speech quality", IEEE
Signal Processing Letters 25(11), 2018), written from the published definition for 16 kHz.

Per frame (512-point Hann, hop 256, as PESQ's 32 ms / 50 % frames):

1. Level alignment: each signal's power spectrum is scaled so that its mean in-band power
   (350-3250 Hz, summed over bins, averaged over frames) is ``R`` = 1e7, PESQ's standard
   listening level of 79 dB SPL. The loss is therefore invariant to the overall gain.
2. Bark spectrum: 49 bands equally spaced on the Bark scale from 0 Hz to 8 kHz
   (z = 13 atan(0.76 f/kHz) + 3.5 atan((f/7.5 kHz)^2)); each DFT bin's power is split
   between bands by the overlap of its Bark interval with them.
3. Frequency equalisation of the reference: per band, times the ratio of the degraded to
   the reference power averaged over speech-active frames (offset by 1000 x threshold,
   bounded to +-20 dB). Gain equalisation of the degraded: per frame, times
   (audible ref power + 5e3) / (audible deg power + 5e3), bounded to [3e-4, 5]; "audible"
   counts bands above 100 x the hearing threshold.
4. Zwicker loudness: L = Sl (T/0.5)^g ((0.5 + 0.5 B/T)^g - 1), 0 below threshold, with
   the threshold in quiet T (Terhardt's formula at the band centre, in the R scale), the
   exponent g = 0.23 x clip(6 / (z + 2), 1, 2)^0.15 (steeper below 4 Bark, as in PESQ),
   and Sl set so that a 1 kHz tone at 40 dB SPL is 1 sone.
5. Disturbance: r = L_deg - L_ref, masked by 0.25 min(L_deg, L_ref) (dead zone);
   asymmetry factor h = ((B_deg + 50) / (B_ref + 50))^1.2, 0 below 3, capped at 12.
   D = sqrt(W) ||d w||_2 (symmetric), DA = sum |d h| w (asymmetric), w the band widths
   in Bark and W their sum (PESQ's pseudo-Lp norms with p = 2 and 1).
6. Per frame 0.1 D + 0.0309 DA, averaged over frames and the batch.

Differences from PESQ itself (by design of PMSQE or for lack of PESQ's tables): no time
alignment, no IRS filter, no temporal smoothing of the gain equalisation, no frame
weighting or clipping of disturbances, and Bark bands and thresholds from formulas instead
of PESQ's tables.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from rtns.framing import SAMPLE_RATE

N_FFT = 512
HOP = 256
N_BANDS = 49
#: Power of the standard listening level (79 dB SPL) after level alignment.
R = 1e7
SLL_DB = 79.0


def hz_to_bark(f: np.ndarray) -> np.ndarray:
    """Zwicker & Terhardt's critical-band rate in Bark."""
    f = np.asarray(f, dtype=np.float64)
    return 13 * np.arctan(0.00076 * f) + 3.5 * np.arctan((f / 7500) ** 2)


def threshold_in_quiet_db(f: np.ndarray) -> np.ndarray:
    """Terhardt's absolute hearing threshold in dB SPL (frequencies clipped to 50 Hz..,
    values capped at 80 dB)."""
    k = np.maximum(np.asarray(f, dtype=np.float64), 50.0) / 1000
    t = 3.64 * k**-0.8 - 6.5 * np.exp(-0.6 * (k - 3.3) ** 2) + 1e-3 * k**4
    return np.minimum(t, 80.0)


def _bark_to_hz(z: np.ndarray) -> np.ndarray:
    """Numerical inverse of :func:`hz_to_bark` on 0..8 kHz."""
    grid = np.linspace(0, SAMPLE_RATE / 2, 16001)
    return np.interp(z, hz_to_bark(grid), grid)


@lru_cache(maxsize=1)
def _tables() -> dict[str, np.ndarray | float]:
    """Band matrix [257, 49], widths [49], thresholds [49] (R scale), exponents [49], Sl,
    and the level-alignment bin mask [257]."""
    n_bins = N_FFT // 2 + 1
    df = SAMPLE_RATE / N_FFT
    z_max = float(hz_to_bark(SAMPLE_RATE / 2))
    edges = np.linspace(0, z_max, N_BANDS + 1)
    width = np.diff(edges)
    centre_z = 0.5 * (edges[:-1] + edges[1:])
    centre_hz = _bark_to_hz(centre_z)
    # each bin covers [f - df/2, f + df/2]; split it between bands by Bark overlap
    f = np.arange(n_bins) * df
    lo = hz_to_bark(np.clip(f - df / 2, 0, SAMPLE_RATE / 2))
    hi = hz_to_bark(np.clip(f + df / 2, 0, SAMPLE_RATE / 2))
    overlap = np.clip(
        np.minimum(hi[:, None], edges[None, 1:]) - np.maximum(lo[:, None], edges[None, :-1]),
        0,
        None,
    )
    bands = overlap / np.maximum(hi - lo, 1e-12)[:, None]
    thresh = R * 10 ** ((threshold_in_quiet_db(centre_hz) - SLL_DB) / 10)
    h = np.clip(6 / (centre_z + 2), 1, 2) ** 0.15
    gamma = 0.23 * h
    # Sl: a 1 kHz tone at 40 dB SPL has loudness 1 sone
    j = int(np.argmin(np.abs(centre_hz - 1000)))
    t1k = R * 10 ** ((float(threshold_in_quiet_db(np.array(1000.0))) - SLL_DB) / 10)
    b40 = R * 10 ** ((40 - SLL_DB) / 10)
    g = gamma[j]
    sl = 1.0 / ((t1k / 0.5) ** g * ((0.5 + 0.5 * b40 / t1k) ** g - 1))
    sll_mask = ((f >= 350) & (f <= 3250)).astype(np.float64)
    return {
        "bands": bands,
        "width": width,
        "thresh": thresh,
        "gamma": gamma,
        "sl": float(sl),
        "sll_mask": sll_mask,
    }


def _t(name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(_tables()[name], dtype=like.dtype, device=like.device)


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """|STFT|^2 [B, T, 257] (Hann 512, hop 256, no centering)."""
    win = torch.hann_window(N_FFT, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, N_FFT, HOP, N_FFT, win, center=False, return_complex=True)
    return spec.real.pow(2).add(spec.imag.pow(2)).transpose(1, 2)


def align_level(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale power spectra [B, T, F] so that the mean per-frame power in 350-3250 Hz is R."""
    band = (p * _t("sll_mask", p)).sum(-1).mean(-1)  # [B]
    return p * (R / (band + eps))[:, None, None]


def loudness(b: torch.Tensor) -> torch.Tensor:
    """Zwicker loudness [B, T, 49] of Bark powers [B, T, 49] (0 below threshold)."""
    t, g = _t("thresh", b), _t("gamma", b)
    val = _tables()["sl"] * (t / 0.5) ** g * ((0.5 + 0.5 * b / t) ** g - 1)
    return torch.relu(val)


def pmsqe_frames(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-frame PMSQE [B, T] of estimate/degraded vs reference, both [B, N] at 16 kHz."""
    if est.shape != ref.shape or est.dim() != 2:
        raise ValueError(
            f"pmsqe needs two [B, N] tensors, got {tuple(est.shape)}, {tuple(ref.shape)}"
        )
    if est.shape[1] < N_FFT:
        raise ValueError(f"pmsqe needs at least {N_FFT} samples")
    bands = _t("bands", est)
    thresh = _t("thresh", est)
    width = _t("width", est)
    b_ref = align_level(power_spectrum(ref)) @ bands  # [B, T, 49]
    b_deg = align_level(power_spectrum(est)) @ bands
    # frequency equalisation of the reference over speech-active frames
    audible_ref = (b_ref * (b_ref > 100 * thresh)).sum(-1)  # [B, T]
    active = (audible_ref > 1e7 * 1e-2).to(est.dtype)[..., None]  # within 20 dB of the SLL
    n_act = active.sum(1).clamp(min=1)
    avg_ref = (b_ref * active).sum(1) / n_act  # [B, 49]
    avg_deg = (b_deg * active).sum(1) / n_act
    ratio = ((avg_deg + 1000 * thresh) / (avg_ref + 1000 * thresh)).clamp(0.01, 100)
    b_ref = b_ref * ratio[:, None, :]
    # gain equalisation of the degraded, per frame
    aud_r = (b_ref * (b_ref > 100 * thresh)).sum(-1)
    aud_d = (b_deg * (b_deg > 100 * thresh)).sum(-1)
    gain = ((aud_r + 5e3) / (aud_d + 5e3)).clamp(3e-4, 5.0)
    b_deg = b_deg * gain[..., None]
    # loudness and disturbance
    l_ref, l_deg = loudness(b_ref), loudness(b_deg)
    r = l_deg - l_ref
    m = 0.25 * torch.minimum(l_ref, l_deg)
    d = torch.sign(r) * torch.relu(r.abs() - m)
    h = ((b_deg + 50) / (b_ref + 50)) ** 1.2
    h = torch.where(h < 3, torch.zeros_like(h), h.clamp(max=12.0))
    w_tot = width.sum()
    sym = torch.sqrt(w_tot) * torch.sqrt(((d * width) ** 2).sum(-1) + 1e-20)
    asym = (d.abs() * h * width).sum(-1)
    return 0.1 * sym + 0.0309 * asym


def pmsqe(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PMSQE of est against ref ([B, N] each): mean over frames and batch (0 = identical)."""
    return pmsqe_frames(est, ref).mean()


__all__ = ["pmsqe", "pmsqe_frames", "loudness", "hz_to_bark", "threshold_in_quiet_db"]
