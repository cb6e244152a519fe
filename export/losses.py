"""Training losses on time-domain signals: every function maps (estimate [B, N], clean [B, N])
to a scalar tensor (mean over the batch; lower is better) and is differentiable.

- :func:`mse`: waveform MSE.
- :func:`spectral_mse`: MSE of STFT magnitudes (512 Hann, hop 128).
- :func:`sisnr`: negative SI-SNR in dB (both signals zero-meaned first).
- :func:`neg_snr`: negative SNR in dB, scale-dependent (the DTLN paper's loss).
- :func:`lms`: log-mel-spectra distance: |S|/512 -> triangular mel banks of 16, 32 and 64 ->
  log(. + 1e-7) -> RMSE, averaged over the three resolutions.
- :func:`cc_mse`, :func:`cmag_mse`: MSE of power-law compressed STFTs (|X|^0.3 with the
  phase kept), complex (real + imaginary MSE) and magnitude-only; GTCRN's recipe weighs them
  30 : 70 and adds an SI-SNR term.
- :func:`rtns_export.pmsqe.pmsqe`: PESQ-like perceptual loss.
- :class:`CombinedLoss`: weighted sum of named terms (base:perceptual ratios such as
  SI-SNR:LMS 1:2 or SI-SNR:PMSQE 1:8, see docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch

from rtns.framing import SAMPLE_RATE

EPS = 1e-8
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(est: torch.Tensor, ref: torch.Tensor) -> None:
    if est.shape != ref.shape or est.dim() != 2:
        raise ValueError(
            f"losses need two [B, N] tensors, got {tuple(est.shape)}, {tuple(ref.shape)}"
        )


def mse(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Waveform mean squared error."""
    _check(est, ref)
    return torch.mean((est - ref) ** 2)


def stft_mag(x: torch.Tensor, n_fft: int = 512, hop: int = 128) -> torch.Tensor:
    """|STFT| [B, frames, n_fft//2+1] with a periodic Hann window, no centering."""
    win = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, n_fft, win, center=False, return_complex=True)
    return spec.abs().transpose(1, 2)


def spectral_mse(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """MSE between STFT magnitudes (512-point Hann, hop 128)."""
    _check(est, ref)
    return torch.mean((stft_mag(est) - stft_mag(ref)) ** 2)


#: Power-law exponent of the compressed-spectrum losses.
COMPRESS = 0.3


def compressed_stft(
    x: torch.Tensor, c: float = COMPRESS, n_fft: int = 512, hop: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|X|^c, Re X |X|^(c-1), Im X |X|^(c-1)) of the STFT (periodic Hann, no centering),
    each [B, frames, bins]; |X| = sqrt(Re^2 + Im^2 + 1e-12) so gradients stay finite."""
    win = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, n_fft, win, center=False, return_complex=True)
    re, im = spec.real.transpose(1, 2), spec.imag.transpose(1, 2)
    mag = torch.sqrt(re * re + im * im + 1e-12)
    scale = mag ** (c - 1.0)
    return mag * scale, re * scale, im * scale


def cc_mse(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Compressed complex spectral MSE: MSE(Re) + MSE(Im) of |X|^0.3 e^{j angle X}."""
    _check(est, ref)
    _, re_e, im_e = compressed_stft(est)
    _, re_r, im_r = compressed_stft(ref)
    return torch.mean((re_e - re_r) ** 2) + torch.mean((im_e - im_r) ** 2)


def cmag_mse(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Compressed magnitude MSE: MSE of |X|^0.3."""
    _check(est, ref)
    return torch.mean((compressed_stft(est)[0] - compressed_stft(ref)[0]) ** 2)


def sisnr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Negative scale-invariant SNR in dB: s_t = <e, s>/||s||^2 s, -10 log10(||s_t||^2/||e - s_t||^2)."""
    _check(est, ref)
    est = est - est.mean(dim=1, keepdim=True)
    ref = ref - ref.mean(dim=1, keepdim=True)
    scale = (est * ref).sum(1, keepdim=True) / (ref.pow(2).sum(1, keepdim=True) + EPS)
    target = scale * ref
    noise = est - target
    ratio = target.pow(2).sum(1) / (noise.pow(2).sum(1) + EPS)
    return -torch.mean(10 * torch.log10(ratio + EPS))


def neg_snr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Negative SNR in dB, -10 log10(||s||^2 / ||s - e||^2) (DTLN's training loss)."""
    _check(est, ref)
    ratio = ref.pow(2).sum(1) / ((ref - est).pow(2).sum(1) + EPS)
    return -torch.mean(10 * torch.log10(ratio + EPS))


def hz_to_mel(f: float | torch.Tensor):
    return 1127.01 * (torch.log1p(f / 700) if torch.is_tensor(f) else math.log1p(f / 700))


@lru_cache(maxsize=16)
def mel_bank(n_mels: int, n_fft: int = 512, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular mel filters [n_fft//2+1, n_mels] (mel = 1127.01 ln(1 + f/700)), peak 1,
    from 0 Hz to Nyquist."""
    n_bins = n_fft // 2 + 1
    freqs = torch.linspace(0, sample_rate / 2, n_bins, dtype=torch.float64)
    mel_pts = torch.linspace(0, hz_to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    hz_pts = 700 * torch.expm1(mel_pts / 1127.01)
    lo, mid, hi = hz_pts[:-2, None], hz_pts[1:-1, None], hz_pts[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    fb = torch.clamp(torch.minimum(up, down), min=0)
    return fb.T.float().contiguous()


def lms(est: torch.Tensor, ref: torch.Tensor, banks: Sequence[int] = (16, 32, 64)) -> torch.Tensor:
    """Log-mel-spectra RMSE averaged over mel resolutions (|S|/512 features, log(+1e-7))."""
    _check(est, ref)
    me, mr = stft_mag(est) / 512, stft_mag(ref) / 512
    total = est.new_zeros(())
    for m in banks:
        fb = mel_bank(m).to(est.device, est.dtype)
        le = torch.log(me @ fb + 1e-7)
        lr = torch.log(mr @ fb + 1e-7)
        total = total + torch.sqrt(torch.mean((le - lr) ** 2) + 1e-12)
    return total / len(banks)


def _pmsqe(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    from rtns_export.pmsqe import pmsqe

    return pmsqe(est, ref)


LOSSES: dict[str, LossFn] = {
    "mse": mse,
    "spectral_mse": spectral_mse,
    "sisnr": sisnr,
    "neg_snr": neg_snr,
    "lms": lms,
    "pmsqe": _pmsqe,
    "cc_mse": cc_mse,
    "cmag_mse": cmag_mse,
}


class CombinedLoss:
    """sum_i w_i * loss_i(est, ref); call returns (total, {name: unweighted value})."""

    def __init__(self, terms: Sequence[tuple[str, float]]) -> None:
        if not terms:
            raise ValueError("a combined loss needs at least one term")
        for name, _ in terms:
            if name not in LOSSES:
                raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
        self.terms = list(terms)

    def __call__(
        self, est: torch.Tensor, ref: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        total = est.new_zeros(())
        parts: dict[str, float] = {}
        for name, w in self.terms:
            v = LOSSES[name](est, ref)
            parts[name] = float(v.detach())
            total = total + w * v
        return total, parts

    def describe(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in self.terms)
