"""What rtns does above 8 kHz: 48 kHz speech + noise through the engine, band energy in/out.

The models run at 16 kHz; at higher rates :class:`rtns.streams.ChannelStream` resamples the
model's change back and passes the band above 8 kHz through a complementary crossover with
a gain measured from the model's own 4-8 kHz change. This script measures, per file:

* identity: with ``--atten-lim 0`` the output must equal the input (SNR in dB);
* band energy change (dB) in 0-8 kHz and 9-20 kHz with the pack's limit and with none;
* a 12 kHz tone added to the file: its level change with the pack's limit.

Input: the noisy side of a paired set (16 kHz files; band-limited), upsampled to 48 kHz,
plus white noise over the whole band 30 dB below the speech level so that there is
something above 8 kHz to remove. The figures describe this synthetic 48 kHz material.

    python benchmarks/fullband.py --pack rtns-dtln --files 12
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SET = REPO.parent / "shared" / "data" / "test" / "vbdemand36" / "noisy"
RATE = 48_000


def band_db(y: np.ndarray, x: np.ndarray, lo: float, hi: float, rate: int = RATE) -> float:
    f = np.fft.rfftfreq(x.shape[0], 1 / rate)
    sel = (f >= lo) & (f < hi)
    ey = float(np.sum(np.abs(np.fft.rfft(y)[sel]) ** 2))
    ex = float(np.sum(np.abs(np.fft.rfft(x)[sel]) ** 2))
    return 10 * np.log10(ey / ex)


def tone_db(y: np.ndarray, x: np.ndarray, freq: float, rate: int = RATE) -> float:
    w = np.hanning(x.shape[0])
    f = np.fft.rfftfreq(x.shape[0], 1 / rate)
    k = int(np.argmin(np.abs(f - freq)))
    return float(20 * np.log10(np.abs(np.fft.rfft(y * w)[k]) / np.abs(np.fft.rfft(x * w)[k])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", default="rtns-dtln")
    ap.add_argument("--set", type=Path, default=DEFAULT_SET, help="folder of 16 kHz noisy files")
    ap.add_argument("--files", type=int, default=12)
    args = ap.parse_args()

    from rtns import audio_io
    from rtns.engine import Model
    from rtns.resample import Resampler
    from rtns.streams import enhance_frames

    model = Model(args.pack)
    files = sorted(args.set.glob("*.flac"))[: args.files]
    if not files:
        raise SystemExit(f"no .flac files in {args.set}")
    rng = np.random.default_rng(0)
    rows = []
    for path in files:
        a = audio_io.read_audio(path)
        up = Resampler(a.sample_rate, RATE)
        x = up.process(np.concatenate([a.samples[:, :1], np.zeros((2000, 1), np.float32)]))
        x = x[round(up.delay_s * RATE) :][:, 0]
        level = np.sqrt(np.mean(x**2))
        x = (x + level * 10 ** (-30 / 20) * rng.standard_normal(x.shape[0])).astype(np.float32)
        t = np.arange(x.shape[0]) / RATE
        tone = (0.1 * level * np.sin(2 * np.pi * 12_000 * t)).astype(np.float32)
        same = enhance_frames(model, x[:, None], RATE, atten_lim=0)[:, 0]
        snr = 10 * np.log10(np.sum(x**2) / max(float(np.sum((same - x) ** 2)), 1e-30))
        y = enhance_frames(model, x[:, None], RATE)[:, 0]
        yoff = enhance_frames(model, x[:, None], RATE, atten_lim="off")[:, 0]
        yt = enhance_frames(model, (x + tone)[:, None], RATE)[:, 0]
        rows.append(
            (
                path.stem,
                snr,
                band_db(y, x, 0, 8000),
                band_db(y, x, 9000, 20_000),
                band_db(yoff, x, 9000, 20_000),
                tone_db(yt, x + tone, 12_000),
            )
        )
    lim = model.manifest.atten_lim_db
    print(
        f"pack {model.name} (limit {lim if lim is not None else 'off'} dB), 48 kHz, {len(rows)} files"
    )
    head = ("file", "identity SNR dB", "0-8k dB", "9-20k dB", "9-20k dB (off)", "12k tone dB")
    print(" | ".join(head))
    for r in rows:
        print(f"{r[0]} | {r[1]:.1f} | {r[2]:+.2f} | {r[3]:+.2f} | {r[4]:+.2f} | {r[5]:+.2f}")
    m = np.array([r[1:] for r in rows])
    print(
        f"median | {np.median(m[:, 0]):.1f} | {np.median(m[:, 1]):+.2f} | "
        f"{np.median(m[:, 2]):+.2f} | {np.median(m[:, 3]):+.2f} | {np.median(m[:, 4]):+.2f}"
    )
    print(
        f"min    | {m[:, 0].min():.1f} | {m[:, 1].min():+.2f} | {m[:, 2].min():+.2f} | "
        f"{m[:, 3].min():+.2f} | {m[:, 4].min():+.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
