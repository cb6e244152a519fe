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
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from rtns import dsp
from rtns.atten import OFF, AttenLimit
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

    def bound_hop(self, state: State | None = None) -> BoundHop:
        """A one-stream hop runner over preallocated, bound buffers (see :class:`BoundHop`)."""
        return BoundHop(self, state)

    def stream(self) -> Stream:
        return Stream(self)


class BoundHop:
    """:meth:`Model.infer` for one stream, with every graph input, output and state bound
    once (onnxruntime IOBinding) to arrays allocated here: a hop copies the block's features
    into the bound input, runs each graph without building feeds or new state arrays, and
    flips between two state sets (the graph reads one and writes the other). Outputs equal
    ``Model.infer`` at batch 1 bit for bit; the saving is the per-call allocation and
    dictionary work, about a third of a DTLN hop here (``benchmarks/latency.py``).

    The state lives here; :attr:`state` gives copies, :meth:`load` writes it.
    """

    def __init__(self, model: Model, state: State | None = None) -> None:
        self.model = model
        self._init = model.initial_state(1)
        # Two state sets; hop k reads set k % 2 and writes the other.
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
        """One hop: block float32 [block_len] -> the output block float32 [block_len] (a
        view of a buffer the next hop overwrites)."""
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
            cur[k][...] = v

    def reset(self) -> None:
        self.load(self._init)

    def copy(self) -> BoundHop:
        return BoundHop(self.model, self._sets[self._cur])


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
        self._pending = np.zeros(hop, dtype=np.float32)
        self._n_pending = 0
        self._hop = model.bound_hop()
        #: Output the delayed input instead of the enhanced signal (latency unchanged).
        self.bypass = False
        self._dry_mix = 0.0
        self._atten_lim = OFF
        self.atten_lim = model.manifest.atten_lim_db
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
    def atten_lim(self, value: AttenLimit | str | float | None) -> None:
        """Takes an AttenLimit, text ('18', 'off'), dB, or None / ``math.inf`` for off."""
        self._atten_lim = OFF if value is None else AttenLimit.parse(value)
        self._dry_mix = self._atten_lim.dry_gain

    @property
    def atten_lim_db(self) -> float | None:
        """The limit in dB, None when unlimited (the manifest's encoding)."""
        return self._atten_lim.optional()

    @atten_lim_db.setter
    def atten_lim_db(self, db: float | None) -> None:
        self.atten_lim = db

    # -- state ---------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state of a new stream (controls are kept)."""
        self._block.fill(0.0)
        self._ola.fill(0.0)
        self._n_pending = 0
        self._hop.reset()
        self.samples_in = 0
        self.samples_out = 0

    def copy(self) -> Stream:
        """An independent stream in exactly this state (shares the model)."""
        other = copy.copy(self)
        other._block = self._block.copy()
        other._ola = self._ola.copy()
        other._pending = self._pending.copy()
        other._hop = self._hop.copy()
        return other

    @property
    def state(self) -> State:
        """The recurrent state tensors, float32 [1, ...] each (copies; assign to replace)."""
        return self._hop.state

    @state.setter
    def state(self, value: State) -> None:
        self._hop.load(value)

    @property
    def pending(self) -> int:
        """Input samples waiting for their hop to complete."""
        return self._n_pending

    # -- the hop, split so the daemon can batch many streams -------------------------
    def load_hop(self, hop: np.ndarray) -> np.ndarray:
        """Shift the input block by one hop and append ``hop`` (float32 [shift]).

        Returns the block to infer, float32 [block_len] (a view; do not keep it).
        """
        s = self.model.block_shift
        self._block[:-s] = self._block[s:]
        self._block[-s:] = hop
        return self._block

    def run_block(self, block: np.ndarray) -> np.ndarray:
        """The model's output block for ``block`` (float32 [block_len]), advancing this
        stream's state: a view, valid until the next hop."""
        return self._hop.run(block)

    def finish_hop(self, out_block: np.ndarray, state: State | None = None) -> np.ndarray:
        """Overlap-add a model output block and take ``state`` (None: the state
        :meth:`run_block` left); returns the hop's output samples [shift] (new)."""
        s = self.model.block_shift
        if state is not None:
            self._hop.load(state)
        self._ola[:-s] = self._ola[s:]
        self._ola[-s:] = 0.0
        self._ola += out_block
        if self.bypass:
            # The dry sample aligned with this output is the oldest of the block.
            return self._block[:s].copy()
        out = self._ola[:s].copy()
        if self._dry_mix:
            out *= 1.0 - self._dry_mix
            out += self._dry_mix * self._block[:s]
        return out

    def take_hop(self) -> np.ndarray | None:
        """Complete the pending hop if it is full: returns the block to infer or None."""
        if self._n_pending < self.model.block_shift:
            return None
        self._n_pending = 0
        return self.load_hop(self._pending)

    def feed(self, x: np.ndarray) -> int:
        """Append up to one hop's missing samples from ``x``; returns how many were taken."""
        take = min(self.model.block_shift - self._n_pending, x.shape[0])
        self._pending[self._n_pending : self._n_pending + take] = x[:take]
        self._n_pending += take
        self.samples_in += take
        return take

    # -- the simple single-stream path -------------------------------------------------
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
        n_hops = (self._n_pending + x.shape[0]) // s
        out = np.empty(n_hops * s, dtype=np.float32)
        pos = 0
        for h in range(n_hops):
            pos += self.feed(x[pos:])
            block = self.take_hop()
            assert block is not None
            out[h * s : (h + 1) * s] = self.finish_hop(self._hop.run(block))
        pos += self.feed(x[pos:])
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
    time-aligned with the input (see :func:`rtns.streams.enhance_frames`). ``controls``: a
    stream whose bypass and attenuation limit to use (default: a new stream's)."""
    from rtns.streams import enhance_frames

    c = controls or model.stream()
    y = enhance_frames(model, np.asarray(x)[:, None], atten_lim=c.atten_lim, bypass=c.bypass)
    return y[:, 0]
