"""The streaming engine: one shared :class:`Model`, one :class:`Stream` per audio stream.

A ``Model`` holds the onnxruntime sessions of a pack and does one hop for a batch of
streams (:meth:`Model.infer`): spectrum, mask graph, mask, inverse spectrum, optional frame
graph, synthesis window. It keeps no per-stream data, so any number of streams (and the
daemon's batched ticks) share it.

A ``Stream`` owns everything that belongs to one stream: the 512-sample input block, the
overlap-add buffer, the samples of an incomplete hop, the recurrent state tensors, and the
user controls (bypass, attenuation limit). It accepts chunks of any size and returns the
enhanced samples of every hop completed so far. Output sample n estimates input sample
``n - latency`` where ``latency`` is the pack's algorithmic latency.

Words: a *hop* is ``block_shift`` (128) samples, the amount a stream advances per model
call; a *block* is the ``block_len`` (512) samples the model sees in one call.

This module is the bottom floor of the runtime: it imports nothing of rtns above it
(``rtns.bank``, ``rtns.streams``, the CLI and the daemon build on it; a test enforces it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from rtns import dsp
from rtns.atten import AttenLimit
from rtns.config import EngineConfig
from rtns.pack import (
    GraphSpec,
    Manifest,
    PackError,
    check_session_io,
    initial_states,
    read_manifest,
    resolve_pack,
    verify_files,
)

State = dict[str, np.ndarray]


def session_options(threads: int):  # -> onnxruntime.SessionOptions
    """onnxruntime settings for one block per call (shared with the reference loops)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core between 8 ms hops for nothing.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def _make_session(path: Path, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = session_options(threads)
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises several private exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PackError(f"{path}: onnxruntime cannot load it ({msg})") from None


class _Graph:
    """One ORT session with its manifest entry; maps state outputs back to inputs."""

    def __init__(self, pack_dir: Path, spec: GraphSpec, threads: int) -> None:
        path = pack_dir / spec.file
        self.spec = spec
        self.session = _make_session(path, threads)
        check_session_io(path, spec, self.session)
        self.output_names = [spec.signal_out.name] + [s.output for s in spec.states]
        self.state_inputs = [s.input for s in spec.states]

    def run(self, signal: np.ndarray, state: State, new_state: State) -> np.ndarray:
        feeds = {self.spec.signal_in.name: signal}
        for name in self.state_inputs:
            feeds[name] = state[name]
        outs = self.session.run(self.output_names, feeds)
        for name, value in zip(self.state_inputs, outs[1:], strict=True):
            new_state[name] = value
        return outs[0]


class Model:
    """A loaded pack: verified files, ORT sessions, and the DSP its front end needs."""

    def __init__(self, pack: str | Path | None = None, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.pack_dir = resolve_pack(pack)
        self.manifest: Manifest = read_manifest(self.pack_dir)
        verify_files(self.pack_dir, self.manifest)
        m = self.manifest
        self.block_len = m.frames.block_len
        self.block_shift = m.frames.block_shift
        self.sample_rate = m.frames.sample_rate
        self.latency = m.latency_samples
        if self.block_len % self.block_shift:
            raise PackError(f"{self.pack_dir}: block_len must be a multiple of block_shift")
        self._graphs = [_Graph(self.pack_dir, g, self.config.threads) for g in m.graphs]
        self._win_a = dsp.analysis_window(m.frontend.window, self.block_len)
        self._win_s = dsp.synthesis_window(m.frontend.window, self.block_len, self.block_shift)
        self._complex = m.frontend.mask == "complex"

    @property
    def name(self) -> str:
        return self.manifest.name

    def initial_state(self, batch: int = 1) -> State:
        return initial_states(self.manifest, batch)

    def infer(self, blocks: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One hop for a batch of streams.

        blocks: float32 [B, block_len], the newest block of each stream.
        state: per state input name, float32 [B, ...] (row b belongs to stream b).
        Returns the output blocks float32 [B, block_len] (to be overlap-added at the shift)
        and the new state dict (fresh arrays; the inputs are not modified).
        """
        new_state: State = {}
        spec = dsp.spectrum(blocks, self._win_a)
        mask_graph = self._graphs[0]
        if self._complex:
            feat = np.stack((spec.real, spec.imag), axis=1)
            m = mask_graph.run(feat, state, new_state)
            spec = dsp.apply_complex_mask(spec, m)
        else:
            feat = np.abs(spec)[:, None, :]
            m = mask_graph.run(feat, state, new_state)
            spec = spec * m[:, 0]
        out = dsp.inverse_spectrum(spec, self.block_len, self._win_s)
        if len(self._graphs) == 2:
            out = self._graphs[1].run(out[:, None, :], state, new_state)[:, 0]
        return out, new_state

    def bound_infer(self, state: State | None = None) -> BoundInfer:
        """:meth:`infer` for one stream over preallocated, bound buffers (see
        :class:`BoundInfer`)."""
        return BoundInfer(self, state)

    def stream(self) -> Stream:
        return Stream(self)


class BoundInfer:
    """:meth:`Model.infer` for one stream, with every graph input, output and state bound
    once (onnxruntime IOBinding) to arrays allocated here: a call copies the block's features
    into the bound input, runs each graph without building feeds or new state arrays, and
    flips between two state sets (the graph reads one and writes the other). Outputs equal
    ``Model.infer`` at batch 1 bit for bit; the saving is the per-call allocation and
    dictionary work, about a third of a DTLN hop here (``benchmarks/latency.py``).

    The state lives here; :attr:`state` gives copies, :meth:`load` and :meth:`save_to`
    copy it in and out.

    Binding rule: onnxruntime holds the *addresses* of ``_ins``, ``_outs`` and every array
    of ``_sets``. Write into them (``a[...] = v``, ``out=``), never rebind them
    (``self._sets[0][name] = v`` or ``_ins[0] = ...``): a rebound array is silently no
    longer what the graph reads or writes (``tests/test_engine.py`` fails if it happens).
    """

    def __init__(self, model: Model, state: State | None = None) -> None:
        self.model = model
        self._init = model.initial_state(1)
        # Two state sets; call k reads set k % 2 and writes the other. Bound below: write
        # into these arrays, never replace them (the binding rule above).
        self._sets: tuple[State, State] = (
            {k: v.copy() for k, v in self._init.items()},
            {k: v.copy() for k, v in self._init.items()},
        )
        self._cur = 0
        self._ins: list[np.ndarray] = []
        self._outs: list[np.ndarray] = []
        #: bindings[parity][graph]
        self._bindings: tuple[list, list] = ([], [])
        for g in model._graphs:
            spec = g.spec
            x = np.zeros((1, *spec.signal_in.inner_shape), np.float32)
            y = np.zeros((1, *spec.signal_out.inner_shape), np.float32)
            self._ins.append(x)
            self._outs.append(y)
            for parity in (0, 1):
                src, dst = self._sets[parity], self._sets[1 - parity]
                b = g.session.io_binding()
                _bind(b.bind_input, spec.signal_in.name, x)
                _bind(b.bind_output, spec.signal_out.name, y)
                for st in spec.states:
                    _bind(b.bind_input, st.input, src[st.input])
                    _bind(b.bind_output, st.output, dst[st.input])
                self._bindings[parity].append(b)
        if state is not None:
            self.load(state)

    def run(self, block: np.ndarray) -> np.ndarray:
        """One call: block float32 [block_len] -> the output block float32 [block_len] (a
        view of a buffer the next call overwrites)."""
        m = self.model
        bindings = self._bindings[self._cur]
        spec = dsp.spectrum(block[None, :], m._win_a)
        feat, mask = self._ins[0], self._outs[0]
        sessions = [g.session for g in m._graphs]
        if m._complex:
            feat[:, 0] = spec.real
            feat[:, 1] = spec.imag
            sessions[0].run_with_iobinding(bindings[0])
            spec = dsp.apply_complex_mask(spec, mask)
        else:
            np.abs(spec, out=feat[:, 0])
            sessions[0].run_with_iobinding(bindings[0])
            spec *= mask[:, 0]
        out = dsp.inverse_spectrum(spec, m.block_len, m._win_s)
        if len(sessions) == 2:
            self._ins[1][:, 0] = out
            sessions[1].run_with_iobinding(bindings[1])
            out = self._outs[1][:, 0]
        self._cur = 1 - self._cur
        return out[0]

    @property
    def state(self) -> State:
        """The current state tensors, float32 [1, ...] each (copies)."""
        return {k: v.copy() for k, v in self._sets[self._cur].items()}

    def load(self, state: State) -> None:
        """Take these state tensors (float32 [1, ...] each, every name of the pack)."""
        cur = self._sets[self._cur]
        if state.keys() != cur.keys():
            raise ValueError(f"state names {sorted(state)} are not the pack's {sorted(cur)}")
        for k, v in state.items():
            cur[k][...] = v  # into the bound array (the binding rule)

    def save_to(self, state: State) -> None:
        """Write the current state tensors into ``state``'s arrays (float32 [1, ...] each,
        e.g. views of a bank's rows)."""
        for k, v in self._sets[self._cur].items():
            state[k][...] = v

    def reset(self) -> None:
        self.load(self._init)

    def copy(self) -> BoundInfer:
        return BoundInfer(self.model, self._sets[self._cur])


def _bind(bind, name: str, a: np.ndarray) -> None:
    """Bind a C-contiguous float32 array by address (it must outlive the binding)."""
    bind(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)


class Stream:
    """Per-stream buffers and state over a shared :class:`Model`.

    ``push(x)`` accepts float32 samples of any count and returns those of every completed
    hop (a multiple of the shift). ``flush()`` ends the stream: it pads the incomplete hop
    and the algorithmic latency with zeros, returns the rest, and resets.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        n, hop = model.block_len, model.block_shift
        self._block = np.zeros(n, dtype=np.float32)
        self._ola = np.zeros(n, dtype=np.float32)
        self._partial = np.zeros(hop, dtype=np.float32)  # the incomplete hop's input
        self._n_partial = 0
        self._infer = model.bound_infer()
        #: Output the delayed input instead of the enhanced signal (latency unchanged).
        self.bypass = False
        self.atten_lim = AttenLimit.from_optional(model.manifest.atten_lim_db)
        #: Input samples clipped to +-dsp.CLIP_LEVEL by :meth:`push` (far outside full scale).
        self.clipped = 0
        self.samples_in = 0
        self.samples_out = 0

    # -- user controls -------------------------------------------------------------
    @property
    def atten_lim(self) -> AttenLimit:
        """At most this much noise reduction (see :mod:`rtns.atten`); a new stream starts
        with its pack's ``atten_lim_db``."""
        return self._atten_lim

    @atten_lim.setter
    def atten_lim(self, value: AttenLimit | str | float) -> None:
        """Takes an AttenLimit, text ('18', 'off') or dB (``math.inf``: off)."""
        self._atten_lim = AttenLimit.parse(value)
        self._gains = dsp.mix_gains(self._atten_lim.dry_gain)

    # -- state ---------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state of a new stream (controls are kept)."""
        self._block.fill(0.0)
        self._ola.fill(0.0)
        self._n_partial = 0
        self._infer.reset()
        self.samples_in = 0
        self.samples_out = 0

    def copy(self) -> Stream:
        """An independent stream in exactly this state (shares the model)."""
        other = copy.copy(self)
        other._block = self._block.copy()
        other._ola = self._ola.copy()
        other._partial = self._partial.copy()
        other._infer = self._infer.copy()
        return other

    @property
    def state(self) -> State:
        """The recurrent state tensors, float32 [1, ...] each (copies; assign to replace)."""
        return self._infer.state

    @state.setter
    def state(self, value: State) -> None:
        self._infer.load(value)

    @property
    def partial(self) -> int:
        """Input samples of the incomplete hop (waiting for the rest of it)."""
        return self._n_partial

    # -- one hop -------------------------------------------------------------------
    def _fill_partial(self, x: np.ndarray) -> int:
        """Append up to the incomplete hop's missing samples from ``x``; returns how many."""
        take = min(self.model.block_shift - self._n_partial, x.shape[0])
        self._partial[self._n_partial : self._n_partial + take] = x[:take]
        self._n_partial += take
        self.samples_in += take
        return take

    def _run_hop(self) -> np.ndarray:
        """The complete hop in ``_partial``: shift it into the block, run the model,
        overlap-add; returns the hop's output samples [shift] (new)."""
        s = self.model.block_shift
        self._n_partial = 0
        self._block[:-s] = self._block[s:]
        self._block[-s:] = self._partial
        self._ola[:-s] = self._ola[s:]
        self._ola[-s:] = 0.0
        self._ola += self._infer.run(self._block)
        # The dry sample aligned with this output is the oldest of the block.
        if self.bypass:
            return self._block[:s].copy()
        return dsp.dry_wet_mix(self._ola[:s], self._block[:s], *self._gains)

    # -- samples in, samples out ---------------------------------------------------------
    def push(self, x: np.ndarray) -> np.ndarray:
        """Process samples [n] of any length; returns float32 [k * shift].

        x: float in [-1, 1] (values beyond +-CLIP_LEVEL are clipped and counted in
        ``clipped``), or integer PCM, scaled by its full scale. NaN or infinite samples raise
        ValueError and change nothing.
        """
        x, clipped = dsp.to_float_pcm(x)
        if x.ndim != 1:
            raise ValueError(f"a stream takes mono samples of shape [n], got {x.shape}")
        self.clipped += clipped
        s = self.model.block_shift
        n_hops = (self._n_partial + x.shape[0]) // s
        out = np.empty(n_hops * s, dtype=np.float32)
        pos = 0
        for h in range(n_hops):
            pos += self._fill_partial(x[pos:])
            out[h * s : (h + 1) * s] = self._run_hop()
        pos += self._fill_partial(x[pos:])
        self.samples_out += out.shape[0]
        return out

    def flush(self) -> np.ndarray:
        """End the stream: returns the samples still owed so that the total output is
        ``samples_in + latency``, then resets the stream."""
        owed = self.samples_in + self.model.latency - self.samples_out
        s = self.model.block_shift
        zeros = np.zeros(-(-owed // s) * s, dtype=np.float32)
        tail = self.push(zeros)[:owed] if owed > 0 else np.zeros(0, dtype=np.float32)
        self.reset()
        return tail


def enhance_array(model: Model, x: np.ndarray, controls: Stream | None = None) -> np.ndarray:
    """Enhance a whole mono signal [N] at the model's rate; returns float32 [N],
    time-aligned with the input (output sample n estimates input sample n). ``controls``: a
    stream whose bypass and attenuation limit to use (default: a new stream's). Equals
    :func:`rtns.streams.enhance_frames` on the same signal bit for bit."""
    st = model.stream()
    if controls is not None:
        st.bypass, st.atten_lim = controls.bypass, controls.atten_lim
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"enhance_array takes mono samples of shape [n], got {x.shape}")
    y = np.concatenate([st.push(x), st.flush()])
    return y[model.latency : model.latency + x.shape[0]]
