"""Many mono engine streams as rows of preallocated arrays: one batched hop for all of them.

A :class:`StreamBank` holds, for up to ``capacity`` slots, everything a
:class:`rtns.engine.Stream` holds for one stream: the 512-sample input block, the
overlap-add buffer, an input ring, every recurrent state tensor, and the controls (bypass,
attenuation limit). :meth:`StreamBank.step` runs one hop for a set of slots: one rFFT over
their blocks, one onnxruntime call per graph (at most ``max_batch`` rows a call; a call of
one row goes through a :class:`rtns.engine.BoundInfer`), one irFFT, one vectorised
overlap-add and the shared dry/wet mix (:func:`rtns.dsp.dry_wet_mix`). A slot's output
equals, sample for sample, what a ``Stream`` gives for the same input when the model is
batch-invariant or ``max_batch`` is 1 (:func:`batch_invariant`, checked at start by
whoever batches; the exporter makes every graph so by construction, see
``rtns_export.batchsafe``).

Every :class:`rtns.streams.ChannelStream` runs its channels as slots of a bank: the
daemon's shared one, or a private one of its own.
"""

from __future__ import annotations

import numpy as np

from rtns import dsp
from rtns.atten import OFF, AttenLimit
from rtns.engine import BoundInfer, Model, State

#: Input ring per slot, samples (32 hops at 16 kHz).
IN_LEN = 4096
#: Output buffer per slot, samples: ``step(collect=True)`` may run this many hops (32) of a
#: slot before its owner must :meth:`StreamBank.take` them.
OUT_LEN = 4096


class BankFull(RuntimeError):
    """Every slot of the bank is taken."""


class StreamBank:
    """``capacity`` mono streams of one model in preallocated [slots, ...] arrays."""

    def __init__(
        self, model: Model, capacity: int, max_batch: int = 256, max_capacity: int | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.capacity = capacity
        #: open() grows the arrays (doubling) up to this many slots.
        self.max_capacity = max(capacity, max_capacity or capacity)
        self.max_batch = max_batch
        n, hop = model.block_len, model.block_shift
        self.block_len, self.shift = n, hop
        self.blocks = np.zeros((capacity, n), np.float32)
        self.ola = np.zeros((capacity, n), np.float32)
        if IN_LEN % hop or OUT_LEN % hop:
            raise ValueError(f"block_shift {hop} does not divide the bank's buffers")
        #: Input ring per slot: n_in[slot] samples not yet stepped, from in_read[slot]
        #: (mod IN_LEN).
        self.inbuf = np.zeros((capacity, IN_LEN), np.float32)
        self.in_read = np.zeros(capacity, np.int64)
        self.n_in = np.zeros(capacity, np.int64)
        #: Output of ``step(collect=True)`` not yet taken: outbuf[slot, :n_out[slot]].
        self.outbuf = np.zeros((capacity, OUT_LEN), np.float32)
        self.n_out = np.zeros(capacity, np.int64)
        self._init = model.initial_state(1)
        self.state: State = {k: np.repeat(v, capacity, axis=0) for k, v in self._init.items()}
        #: Dry-mix gain of the attenuation limit per slot (0: unlimited) and 1 - it
        #: (:func:`rtns.dsp.mix_gains`, as :class:`rtns.engine.Stream`: same bits).
        self.dry_mix = np.zeros(capacity, np.float32)
        self.wet = np.ones(capacity, np.float32)
        self.bypass = np.zeros(capacity, bool)
        self.in_use = np.zeros(capacity, bool)
        self._limits: list[AttenLimit] = [OFF] * capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._default_limit = AttenLimit.from_optional(model.manifest.atten_lim_db)
        #: Runs a step of one row (no batch to share a call with), made on first use.
        self._one: BoundInfer | None = None
        #: Rows and calls run so far (stats).
        self.rows = 0
        self.calls = 0

    # -- slots ------------------------------------------------------------------------------
    def open(self) -> int:
        """A fresh slot (new-stream state, the pack's default limit, bypass off)."""
        if not self._free:
            if self.capacity >= self.max_capacity:
                raise BankFull(f"all {self.capacity} stream slots are in use")
            self._grow(min(2 * self.capacity, self.max_capacity))
        slot = self._free.pop()
        self.in_use[slot] = True
        self.reset(slot)
        self.set_atten_lim(slot, self._default_limit)
        self.bypass[slot] = False
        return slot

    def _grow(self, capacity: int) -> None:
        """Reallocate every array with ``capacity`` rows (slots keep their numbers)."""
        old = self.capacity

        def more(a: np.ndarray, fill: float | bool = 0) -> np.ndarray:
            b = np.full((capacity, *a.shape[1:]), fill, a.dtype)
            b[:old] = a
            return b

        self.blocks, self.ola = more(self.blocks), more(self.ola)
        self.inbuf, self.in_read = more(self.inbuf), more(self.in_read)
        self.outbuf, self.n_out = more(self.outbuf), more(self.n_out)
        self.n_in, self.dry_mix = more(self.n_in), more(self.dry_mix)
        self.wet, self.bypass, self.in_use = more(self.wet, 1), more(self.bypass), more(self.in_use)
        self.state = {
            k: np.concatenate([v, np.repeat(self._init[k], capacity - old, axis=0)])
            for k, v in self.state.items()
        }
        self._limits += [OFF] * (capacity - old)
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self.capacity = capacity

    def close(self, slot: int) -> None:
        if not self.in_use[slot]:
            raise ValueError(f"slot {slot} is not open")
        self.in_use[slot] = False
        self.n_in[slot] = 0
        self.n_out[slot] = 0
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Back to a new stream's state (controls kept)."""
        self.blocks[slot] = 0.0
        self.ola[slot] = 0.0
        self.n_in[slot] = 0
        self.in_read[slot] = 0
        self.n_out[slot] = 0
        for k, v in self._init.items():
            self.state[k][slot] = v[0]

    @property
    def open_slots(self) -> int:
        return int(self.in_use.sum())

    # -- controls ---------------------------------------------------------------------------
    def set_atten_lim(self, slot: int, limit: AttenLimit | str | float) -> None:
        lim = AttenLimit.parse(limit)
        self._limits[slot] = lim
        self.wet[slot], self.dry_mix[slot] = dsp.mix_gains(lim.dry_gain)

    def atten_lim(self, slot: int) -> AttenLimit:
        return self._limits[slot]

    # -- data -------------------------------------------------------------------------------
    def room(self, slot: int) -> int:
        """Samples the slot's input ring can still take."""
        return IN_LEN - int(self.n_in[slot])

    def feed(self, slot: int, x: np.ndarray) -> int:
        """Append as much of float32 ``x`` [n] as the input ring takes (any number of hops,
        up to :meth:`room`); returns how many."""
        k = int(self.n_in[slot])
        take = min(IN_LEN - k, x.shape[0])
        if take <= 0:
            return 0
        w = (int(self.in_read[slot]) + k) % IN_LEN
        first = min(take, IN_LEN - w)
        self.inbuf[slot, w : w + first] = x[:first]
        if first < take:  # wraps around
            self.inbuf[slot, : take - first] = x[first:take]
        self.n_in[slot] = k + take
        return take

    def ready(self) -> np.ndarray:
        """Open slots with a complete hop in their input (int64 [k], ascending)."""
        return np.flatnonzero((self.n_in >= self.shift) & self.in_use)

    def take(self, slot: int) -> np.ndarray:
        """The output that ``step(collect=True)`` left for the slot, float32 [m] (a view,
        valid until the next step), and forget it."""
        m = int(self.n_out[slot])
        self.n_out[slot] = 0
        return self.outbuf[slot, :m]

    def step(self, slots: np.ndarray, collect: bool = False) -> np.ndarray:
        """One hop for each slot in ``slots`` (all with a complete hop; int [k], no repeats).

        Returns float32 [k, shift]: the hop's output of each slot, in order. ``collect``:
        also append it to each slot's output buffer (see :meth:`take`); a slot whose buffer
        has no room for it raises ValueError, and nothing runs.
        """
        slots = np.asarray(slots, dtype=np.int64)
        k = slots.shape[0]
        out = np.empty((k, self.shift), np.float32)
        if k == 0:
            return out
        s = self.shift
        if not (self.n_in[slots] >= s).all():
            raise ValueError("step() needs a complete hop in every slot")
        if collect and (self.n_out[slots] > OUT_LEN - s).any():
            raise ValueError("a slot's output buffer is full: take() its output first")
        for a in range(0, k, self.max_batch):
            idx = slots[a : a + self.max_batch]
            if idx.shape[0] == 1:
                out[a] = self._hop_one(int(idx[0]))
            else:
                out[a : a + idx.shape[0]] = self._hop(idx)
            self.calls += 1
        self.n_in[slots] -= s
        if collect:
            pos = self.n_out[slots]
            self.outbuf.reshape(self.capacity, -1, s)[slots, pos // s] = out
            self.n_out[slots] = pos + s
        self.rows += k
        return out

    def _hop(self, idx: np.ndarray) -> np.ndarray:
        """One model call for the slots ``idx`` (int64 [k], k <= max_batch): advance their
        blocks by a hop from the input rings, infer, overlap-add, mix; returns [k, shift]."""
        s = self.shift
        # Reads start at multiples of the hop, so a hop never wraps: one row gather from the
        # [slots, IN_LEN // shift, shift] view (element-wise fancy indexing costs several
        # times more).
        rd = self.in_read[idx]
        hop_in = self.inbuf.reshape(self.capacity, -1, s)[idx, rd // s]
        self.in_read[idx] = (rd + s) % IN_LEN
        blocks = np.concatenate([self.blocks[idx, s:], hop_in], axis=1)
        self.blocks[idx] = blocks
        state = {name: v[idx] for name, v in self.state.items()}
        y, new = self.model.infer(blocks, state)
        for name, v in new.items():
            self.state[name][idx] = v
        ola = self.ola[idx]
        ola[:, :-s] = ola[:, s:]
        ola[:, -s:] = 0.0
        ola += y
        self.ola[idx] = ola
        dry = blocks[:, :s]
        out = dsp.dry_wet_mix(ola[:, :s], dry, self.wet[idx][:, None], self.dry_mix[idx][:, None])
        byp = self.bypass[idx]
        if byp.any():
            out[byp] = dry[byp]
        return out

    def _hop_one(self, slot: int) -> np.ndarray:
        """:meth:`_hop` for one slot (no batch to share a call with), on views of its rows
        and through a :class:`BoundInfer`: the same bits with less per-call work."""
        s = self.shift
        rd = int(self.in_read[slot])
        block, ola = self.blocks[slot], self.ola[slot]
        block[:-s] = block[s:]
        block[-s:] = self.inbuf[slot, rd : rd + s]
        self.in_read[slot] = (rd + s) % IN_LEN
        ola[:-s] = ola[s:]
        ola[-s:] = 0.0
        ola += self._infer_one(slot, block)
        if self.bypass[slot]:
            return block[:s]
        return dsp.dry_wet_mix(ola[:s], block[:s], self.wet[slot], self.dry_mix[slot])

    def _infer_one(self, slot: int, block: np.ndarray) -> np.ndarray:
        """``model.infer`` of one slot through a :class:`BoundInfer` (the same bits, less
        per-call work): the slot's state rows are copied in and the new state written back
        into them (rows of ``self.state``, which :meth:`_grow` may reallocate, are never
        bound)."""
        if self._one is None:
            self._one = self.model.bound_infer()
        rows = {name: v[slot : slot + 1] for name, v in self.state.items()}
        self._one.load(rows)
        y = self._one.run(block)
        self._one.save_to(rows)
        return y


def batch_invariant(model: Model, max_batch: int = 64, hops: int = 3) -> bool:
    """Does every row of every ``infer`` call of 2..max_batch rows equal, bit for bit, the
    same row run alone (batch 1)? Outputs and states are compared.

    Runs ``hops - 1`` hops of random blocks at batch ``max_batch`` to get non-trivial states,
    then one more hop at every batch size, so every (batch size, row position) a batcher
    can use with this ``max_batch`` is checked once.
    """
    rng = np.random.default_rng(1234)
    n = max_batch
    state = model.initial_state(n)
    blocks = (0.1 * rng.standard_normal((hops, n, model.block_len))).astype(np.float32)
    for h in range(hops - 1):
        _, state = model.infer(blocks[h], state)
    alone = [model.infer(blocks[-1][b : b + 1], _rows(state, b, b + 1)) for b in range(n)]
    for size in range(2, n + 1):
        y, st = model.infer(blocks[-1][:size], _rows(state, 0, size))
        for b in range(size):
            if not np.array_equal(y[b], alone[b][0][0]):
                return False
            if any(not np.array_equal(st[k][b], alone[b][1][k][0]) for k in st):
                return False
    return True


def _rows(state: State, a: int, b: int) -> State:
    return {k: v[a:b] for k, v in state.items()}
