"""Objective speech-quality metrics on float arrays at 16 kHz (``rtns_export.metrics``).

Scoring, not runtime: the trainer's validation (``export/train.py``), ``benchmarks/quality.py``
and the tests use it; the runtime package ``rtns`` never does. It imports neither torch nor
anything the runtime does not have: SI-SDR is computed here; PESQ (``pesq``), STOI
(``pystoi``) and DNSMOS P.835 (``speechmos``) come from their packages, imported on first use
(the ``bench`` and ``test`` extras have all three; ``train`` has PESQ only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtns.errors import RtnsError

#: The rate every metric here is defined at: ITU-T P.862.2 (wide-band PESQ) takes 16 kHz and
#: DNSMOS P.835's models were trained at 16 kHz. It is the engine's rate too, but it is the
#: metrics' own: a model running at another rate would still be scored at this one.
SAMPLE_RATE = 16_000


def si_sdr(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-10) -> float:
    """Scale-invariant SDR in dB of estimate [N] against reference [N] (both zero-meaned)."""
    if reference.shape != estimate.shape or reference.ndim != 1:
        raise ValueError(f"si_sdr needs two [N] arrays, got {reference.shape}, {estimate.shape}")
    r = reference.astype(np.float64) - reference.mean()
    e = estimate.astype(np.float64) - estimate.mean()
    target = (np.dot(e, r) / (np.dot(r, r) + eps)) * r
    noise = e - target
    return float(10.0 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


def _need(module: str, extra: str = "bench") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RtnsError(
            f"the {module} package is needed for this metric; install it with "
            f"`pip install 'rtns[{extra}]'`"
        ) from None


def pesq_wb(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """ITU-T P.862.2 wide-band PESQ (MOS-LQO, about 1.0 to 4.64)."""
    pesq = _need("pesq")
    return float(
        pesq.pesq(sample_rate, reference.astype(np.float64), estimate.astype(np.float64), "wb")
    )


def stoi(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Short-time objective intelligibility (0..1)."""
    pystoi = _need("pystoi")
    return float(
        pystoi.stoi(reference.astype(np.float64), estimate.astype(np.float64), sample_rate)
    )


def dnsmos(estimate: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, float]:
    """Non-intrusive DNSMOS P.835: {'sig', 'bak', 'ovrl'} on a 1-5 scale."""
    _need("speechmos")
    from speechmos import dnsmos as _dnsmos

    x = estimate.astype(np.float64)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1.0:  # speechmos refuses samples outside [-1, 1]
        x = x / peak
    r = _dnsmos.run(x, sample_rate)
    return {"sig": float(r["sig_mos"]), "bak": float(r["bak_mos"]), "ovrl": float(r["ovrl_mos"])}
