"""A single-producer single-consumer FIFO of float32 samples in preallocated storage.

The audio callback writes input into one ring and reads output from another while the
inference worker does the opposite, so each ring has exactly one writer thread and one
reader thread. No lock is taken: the writer alone advances ``_written`` and the reader
alone advances ``_read`` (both are monotonic sample counts, so ``_written - _read`` is the
fill level without the full/empty ambiguity of wrapped indices). Each side copies the
samples first and publishes its counter afterwards; under CPython's global interpreter
lock an attribute store is atomic and seen by the other thread in program order, so a
reader never sees a count before the samples it covers. A stale view of the other
side's counter only makes a side more conservative (less to read, less room to write).

No method allocates an array: data moves with slice assignment into the preallocated
storage or into the caller's ``out`` array.
"""

from __future__ import annotations

import numpy as np


class RingBuffer:
    """FIFO of float32 samples with a fixed capacity (one writer, one reader thread).

    Shapes: every array argument is 1-D float32 ``[n]`` (a strided view such as
    ``indata[:, 0]`` is fine).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"ring buffer capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, dtype=np.float32)
        self._written = 0  # total samples ever written; only the writer stores it
        self._read = 0  # total samples ever read or discarded; only the reader stores it

    # -- either side ------------------------------------------------------------------
    def readable(self) -> int:
        """Samples waiting to be read."""
        return self._written - self._read

    def writable(self) -> int:
        """Free room, in samples."""
        return self.capacity - (self._written - self._read)

    @property
    def total_written(self) -> int:
        return self._written

    @property
    def total_read(self) -> int:
        return self._read

    # -- writer side --------------------------------------------------------------------
    def write(self, x: np.ndarray) -> int:
        """Append as many samples of ``x`` [n] as fit; returns how many were taken."""
        n = min(x.shape[0], self.capacity - (self._written - self._read))
        if n <= 0:
            return 0
        start = self._written % self.capacity
        first = min(n, self.capacity - start)
        self._buf[start : start + first] = x[:first]
        if n > first:
            self._buf[: n - first] = x[first:n]
        self._written += n
        return n

    def write_zeros(self, n: int) -> int:
        """Append up to ``n`` zeros (as many as fit); returns how many."""
        n = min(n, self.capacity - (self._written - self._read))
        if n <= 0:
            return 0
        start = self._written % self.capacity
        first = min(n, self.capacity - start)
        self._buf[start : start + first] = 0.0
        if n > first:
            self._buf[: n - first] = 0.0
        self._written += n
        return n

    # -- reader side --------------------------------------------------------------------
    def read_into(self, out: np.ndarray) -> int:
        """Move up to ``len(out)`` samples into ``out[:k]``; returns ``k``.

        ``out[k:]`` is left untouched (the caller decides what fills a shortfall).
        """
        n = min(out.shape[0], self._written - self._read)
        if n <= 0:
            return 0
        start = self._read % self.capacity
        first = min(n, self.capacity - start)
        out[:first] = self._buf[start : start + first]
        if n > first:
            out[first:n] = self._buf[: n - first]
        self._read += n
        return n

    def discard(self, n: int) -> int:
        """Drop up to ``n`` of the oldest samples; returns how many were dropped."""
        n = min(n, self._written - self._read)
        if n <= 0:
            return 0
        self._read += n
        return n

    def clear(self) -> None:
        """Drop everything (reader side)."""
        self._read = self._written
