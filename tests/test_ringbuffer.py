"""rtns.ringbuffer: FIFO order across wrap-around, partial writes/reads, cross-thread use."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rtns.ringbuffer import RingBuffer


def test_fifo_order_with_wraparound_and_random_chunks() -> None:
    rng = np.random.default_rng(0)
    ring = RingBuffer(100)
    src = rng.standard_normal(5000).astype(np.float32)
    got = np.zeros_like(src)
    w = r = 0
    while r < src.shape[0]:
        if w < src.shape[0]:
            n = int(rng.integers(0, 90))
            w += ring.write(src[w : w + n])
        out = np.full(int(rng.integers(1, 90)), np.nan, dtype=np.float32)
        k = ring.read_into(out)
        got[r : r + k] = out[:k]
        assert np.isnan(out[k:]).all(), "read_into must not touch out[k:]"
        r += k
        assert 0 <= ring.readable() <= ring.capacity
        assert ring.readable() + ring.writable() == ring.capacity
    np.testing.assert_array_equal(got, src)


def test_full_and_empty() -> None:
    ring = RingBuffer(8)
    assert ring.write(np.arange(5, dtype=np.float32)) == 5
    assert ring.write(np.arange(10, dtype=np.float32)) == 3  # only what fits
    assert ring.writable() == 0
    assert ring.write(np.ones(4, dtype=np.float32)) == 0
    out = np.zeros(20, dtype=np.float32)
    assert ring.read_into(out) == 8
    np.testing.assert_array_equal(out[:8], [0, 1, 2, 3, 4, 0, 1, 2])
    assert ring.read_into(out) == 0
    assert ring.total_written == ring.total_read == 8


def test_discard_zeros_clear() -> None:
    ring = RingBuffer(6)
    ring.write(np.arange(1, 5, dtype=np.float32))  # 1 2 3 4
    assert ring.discard(3) == 3
    assert ring.write_zeros(10) == 5  # 4 0 0 0 0 0
    out = np.full(6, -1.0, dtype=np.float32)
    assert ring.read_into(out) == 6
    np.testing.assert_array_equal(out, [4, 0, 0, 0, 0, 0])
    ring.write(np.ones(3, dtype=np.float32))
    assert ring.discard(10) == 3
    ring.write(np.ones(3, dtype=np.float32))
    ring.clear()
    assert ring.readable() == 0 and ring.writable() == 6


def test_strided_source_and_destination() -> None:
    ring = RingBuffer(16)
    stereo = np.arange(20, dtype=np.float32).reshape(10, 2)
    assert ring.write(stereo[:, 1]) == 10
    dest = np.zeros((10, 2), dtype=np.float32)
    assert ring.read_into(dest[:, 0]) == 10
    np.testing.assert_array_equal(dest[:, 0], stereo[:, 1])
    np.testing.assert_array_equal(dest[:, 1], 0)


@pytest.mark.parametrize("capacity", [0, -3])
def test_bad_capacity(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(capacity)


def test_one_writer_one_reader_thread() -> None:
    """A ramp written in random chunks by one thread is read back intact by another."""
    total = 50_000
    ring = RingBuffer(257)
    ramp = np.arange(total, dtype=np.float32)
    got = np.zeros(total, dtype=np.float32)

    def producer() -> None:
        rng = np.random.default_rng(1)
        w = 0
        while w < total:
            n = ring.write(ramp[w : w + int(rng.integers(1, 200))])
            w += n
            if n == 0:
                time.sleep(0)  # let the reader have the GIL

    t = threading.Thread(target=producer)
    t.start()
    rng = np.random.default_rng(2)
    buf = np.zeros(300, dtype=np.float32)
    r = 0
    while r < total:
        k = ring.read_into(buf[: int(rng.integers(1, 300))])
        got[r : r + k] = buf[:k]
        r += k
        if k == 0:
            time.sleep(0)
    t.join()
    np.testing.assert_array_equal(got, ramp)
