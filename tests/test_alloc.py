"""Python-side allocations of the streaming hop (numpy buffers, dicts; not onnxruntime's own
C++ arena, which tracemalloc cannot see): no growth over time, and a bounded peak per hop."""

from __future__ import annotations

import tracemalloc

import numpy as np

from rtns.engine import Model

HOPS = 2_000
WARMUP = 200
#: Generous bound on the bytes a hop may hold at its peak (blocks, spectra, state copies).
PEAK_PER_HOP = 64 * 1024
#: Retained growth allowed over all measured hops (tracemalloc's own bookkeeping and
#: interpreter caches; a per-hop leak of even 8 bytes would exceed it).
GROWTH = 8 * 1024


def test_stream_push_does_not_grow_and_allocates_little(random_dtln_pack):
    model = Model(random_dtln_pack)
    st = model.stream()
    hop = model.block_shift
    x = (np.random.default_rng(0).standard_normal(hop * (WARMUP + HOPS)) * 0.1).astype(np.float32)
    for i in range(WARMUP):
        st.push(x[i * hop : (i + 1) * hop])
    peaks = np.empty(HOPS, dtype=np.int64)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(WARMUP, WARMUP + HOPS):
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            st.push(x[i * hop : (i + 1) * hop])
            _, peak = tracemalloc.get_traced_memory()
            peaks[i - WARMUP] = peak - before
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = end - base
    print(
        f"\nStream.push, {HOPS} hops of {hop} samples (random DTLN): peak Python allocation "
        f"per hop median {int(np.median(peaks))} B, max {int(peaks.max())} B; "
        f"retained growth over all hops {growth} B"
    )
    assert growth < GROWTH, f"memory grew by {growth} B over {HOPS} hops"
    assert peaks.max() < PEAK_PER_HOP
    assert peaks.min() > 0  # the measurement sees the hop's temporaries
