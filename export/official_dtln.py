"""The official DTLN block loop on the official split ONNX models (numpy + onnxruntime only).

This is the reference the engine and the importer are checked against, and the peer the
latency benchmark times. It follows breizhn/DTLN's real-time loop (shared/MODELS.md §1):
per 128 new samples, shift the 512-sample input buffer and append; X = rfft(buffer) (no
window); model_1(|X|, state1) -> mask; Y = |X| * mask * exp(j angle X); y = irfft(Y);
model_2(y, state2) -> 512 samples; shift the overlap-add buffer left by 128, zero its tail,
add the block; emit its first 128 samples. Output sample n estimates input n - 384.

Unlike the upstream script, the state tensors are bound by name: each session's inputs
are split into the signal input (the one whose shape has no state layout) and the state
input, and the matching outputs likewise, from the session metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtns.engine import session_options

BLOCK_LEN = 512
BLOCK_SHIFT = 128
#: Output sample n estimates input sample n - LATENCY.
LATENCY = BLOCK_LEN - BLOCK_SHIFT


def _session(path: Path, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    # The same settings as the engine, so timings compare like with like.
    return ort.InferenceSession(
        str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )


class _Stage:
    """One official model: signal in/out and a 4-D state [1, 2, 128, 2] in/out, by name."""

    def __init__(self, path: Path, threads: int) -> None:
        self.session = _session(path, threads)
        ins = self.session.get_inputs()
        outs = self.session.get_outputs()
        state_in = [i for i in ins if len(i.shape) == 4]
        signal_in = [i for i in ins if len(i.shape) == 3]
        state_out = [o for o in outs if len(o.shape) == 4]
        signal_out = [o for o in outs if len(o.shape) == 3]
        if not (len(state_in) == len(signal_in) == len(state_out) == len(signal_out) == 1):
            raise ValueError(
                f"{path}: expected one [1, 1, n] signal and one [1, 2, 128, 2] state on each "
                f"side, got inputs {[(i.name, i.shape) for i in ins]}, "
                f"outputs {[(o.name, o.shape) for o in outs]}"
            )
        self.signal_in = signal_in[0].name
        self.state_in = state_in[0].name
        self.outputs = [signal_out[0].name, state_out[0].name]
        self.state_shape = tuple(int(d) if isinstance(d, int) else 1 for d in state_in[0].shape)
        self.state = np.zeros(self.state_shape, dtype=np.float32)

    def reset(self) -> None:
        self.state = np.zeros(self.state_shape, dtype=np.float32)

    def __call__(self, signal: np.ndarray) -> np.ndarray:
        out, self.state = self.session.run(
            self.outputs, {self.signal_in: signal, self.state_in: self.state}
        )
        return out


class OfficialDTLN:
    """The official two-model DTLN loop for one stream.

    ``hop(x128)`` processes one hop; ``process(x)`` a whole signal (time-aligned, same
    length, the stream reset first); ``reset()`` returns to a fresh stream.
    """

    def __init__(self, model_dir: str | Path, threads: int = 1) -> None:
        model_dir = Path(model_dir)
        self.stage1 = _Stage(model_dir / "model_1.onnx", threads)
        self.stage2 = _Stage(model_dir / "model_2.onnx", threads)
        self._in = np.zeros(BLOCK_LEN, dtype=np.float32)
        self._ola = np.zeros(BLOCK_LEN, dtype=np.float32)

    def reset(self) -> None:
        self.stage1.reset()
        self.stage2.reset()
        self._in.fill(0.0)
        self._ola.fill(0.0)

    def hop(self, x: np.ndarray) -> np.ndarray:
        """One hop: float32 [128] new samples -> float32 [128] output (a new array)."""
        self._in[:-BLOCK_SHIFT] = self._in[BLOCK_SHIFT:]
        self._in[-BLOCK_SHIFT:] = x
        spec = np.fft.rfft(self._in)
        mag = np.abs(spec)
        mask = self.stage1(mag.reshape(1, 1, -1).astype(np.float32))
        est = np.fft.irfft(mag * mask.reshape(-1) * np.exp(1j * np.angle(spec)), n=BLOCK_LEN)
        block = self.stage2(est.reshape(1, 1, -1).astype(np.float32))
        self._ola[:-BLOCK_SHIFT] = self._ola[BLOCK_SHIFT:]
        self._ola[-BLOCK_SHIFT:] = 0.0
        self._ola += block.reshape(-1)
        return self._ola[:BLOCK_SHIFT].copy()

    def process(self, x: np.ndarray) -> np.ndarray:
        """Whole mono signal float [N] -> float32 [N], time-aligned (latency removed).

        The input is padded with zeros to whole hops plus the latency, like the engine's
        ``enhance_array``.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected a mono signal [n], got shape {x.shape}")
        self.reset()
        n = x.shape[0]
        n_hops = -(-(n + LATENCY) // BLOCK_SHIFT)
        padded = np.zeros(n_hops * BLOCK_SHIFT, dtype=np.float32)
        padded[:n] = x
        out = np.empty_like(padded)
        for h in range(n_hops):
            s = slice(h * BLOCK_SHIFT, (h + 1) * BLOCK_SHIFT)
            out[s] = self.hop(padded[s])
        self.reset()
        return out[LATENCY : LATENCY + n]
