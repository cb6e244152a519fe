"""A metric discriminator (MetricGAN+ style, seed 001's MossFormerGAN stage): a small network
that learns to predict the wide-band PESQ of an enhanced signal given its clean reference,
trained beside the generator; the generator gets a term that pushes that prediction to the
top of the scale.

Facts from the MetricGAN / MetricGAN+ papers (Fu et al. 2019, 2021); the code is ours:

- The discriminator sees a pair of magnitude spectrograms (the signal judged and the clean
  reference) and regresses the *normalized* metric, here PESQ-WB mapped to [0, 1]
  (:func:`normalize_pesq`).
- It is trained on three kinds of pairs each step: (clean, clean) -> 1, (enhanced, clean)
  -> the enhanced signal's true score and, MetricGAN+'s addition, (noisy, clean) -> the
  noisy input's true score, so it learns the scale at both ends.
- The generator's term is ``(D(enhanced, clean) - 1)^2``: push the predicted score to 1.

The true scores come from the ``pesq`` package (ITU-T P.862.2) on the CPU, one call per
signal: at batch 8 that is 16 calls a step, the stage's main cost.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rtns.framing import SAMPLE_RATE

#: PESQ-WB's range (P.862.2 mapping): the discriminator's target is (score - LO) / (HI - LO).
PESQ_LO, PESQ_HI = 1.04, 4.64
#: Compression of the magnitudes it sees (|X|^0.3, as the generator's spectral losses).
COMPRESS = 0.3


def normalize_pesq(score: float) -> float:
    return float(np.clip((score - PESQ_LO) / (PESQ_HI - PESQ_LO), 0.0, 1.0))


def pesq_targets(est: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Normalized PESQ-WB of every row of ``est`` [B, N] against ``ref`` [B, N] (float32
    [B]); a row PESQ cannot score (silence) counts as the bottom of the scale."""
    from pesq import pesq

    out = np.zeros(est.shape[0], np.float32)
    for i in range(est.shape[0]):
        try:
            out[i] = normalize_pesq(pesq(SAMPLE_RATE, ref[i], est[i], "wb"))
        except Exception:  # pesq's NoUtteranceError and friends: nothing to score
            out[i] = 0.0
    return out


def compressed_mag(x: torch.Tensor, n_fft: int = 512, hop: int = 128) -> torch.Tensor:
    """|STFT|^0.3 [B, frames, n_fft/2 + 1] (periodic Hann, no centering)."""
    win = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, n_fft, win, center=False, return_complex=True)
    return (spec.abs() + 1e-8).pow(COMPRESS).transpose(1, 2)


class MetricDiscriminator(nn.Module):
    """(judged, reference) waveforms [B, N] -> predicted normalized PESQ [B].

    Four 2-D convolutions over (time, frequency) of the two compressed magnitude
    spectrograms stacked as channels, each halving frequency, with spectral normalization
    (a Lipschitz bound keeps the generator's gradient tame) and leaky ReLUs; a mean over
    time and frequency; three linear layers."""

    def __init__(self, channels: int = 16, hidden: int = 50) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers: list[nn.Module] = []
        c_in = 2
        for _ in range(4):
            layers += [
                sn(nn.Conv2d(c_in, channels, (5, 5), stride=(1, 2), padding=(2, 2))),
                nn.LeakyReLU(0.3),
            ]
            c_in = channels
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(
            sn(nn.Linear(channels, hidden)),
            nn.LeakyReLU(0.3),
            sn(nn.Linear(hidden, 10)),
            nn.LeakyReLU(0.3),
            sn(nn.Linear(10, 1)),
        )

    def forward(self, judged: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        n = min(judged.shape[1], reference.shape[1])
        feats = torch.stack(
            [compressed_mag(judged[:, :n]), compressed_mag(reference[:, :n])], dim=1
        )  # [B, 2, frames, bins]
        h = self.convs(feats).mean(dim=(2, 3))  # [B, channels]
        return self.head(h).squeeze(1)


class MetricStage:
    """The discriminator, its optimizer and one step of each side's objective."""

    def __init__(
        self, weight: float, lr: float, channels: int, noisy: bool, device: torch.device
    ) -> None:
        self.weight = weight
        self.noisy = noisy
        self.disc = MetricDiscriminator(channels).to(device)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=lr)

    def generator_term(self, est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """``weight * mean((D(est, ref) - 1)^2)``: differentiable in ``est`` only (the
        discriminator's own gradients from it are dropped before its step)."""
        return self.weight * torch.mean((self.disc(est, ref) - 1.0) ** 2)

    def step(self, est: torch.Tensor, ref: torch.Tensor, noisy: torch.Tensor) -> dict[str, float]:
        """One discriminator update on (clean, clean) -> 1, (est, clean) -> its PESQ and,
        with ``noisy``, (noisy, clean) -> its PESQ. Returns the loss and the batch's mean
        true PESQ-WB of ``est`` (a training-time quality curve for free)."""
        est, ref, noisy = est.detach(), ref.detach(), noisy.detach()
        ref_np = ref.cpu().numpy()
        q_est = torch.from_numpy(pesq_targets(est.cpu().numpy(), ref_np)).to(est.device)
        pairs = [(ref, torch.ones_like(q_est)), (est, q_est)]
        if self.noisy:
            n = min(noisy.shape[1], ref.shape[1])
            q_noisy = pesq_targets(noisy[:, :n].cpu().numpy(), ref_np[:, :n])
            pairs.append((noisy[:, :n], torch.from_numpy(q_noisy).to(est.device)))
        self.opt.zero_grad(set_to_none=True)
        loss = sum(torch.mean((self.disc(x, ref) - q) ** 2) for x, q in pairs)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        self.opt.step()
        mean_pesq = float(q_est.mean()) * (PESQ_HI - PESQ_LO) + PESQ_LO
        return {"disc_loss": float(loss.detach()), "batch_pesq": mean_pesq}

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.disc.load_state_dict(d["disc"])
        self.opt.load_state_dict(d["opt"])
