"""rtns.bank.StreamBank: many streams in one batched hop, equal to one Stream each."""

from __future__ import annotations

import numpy as np
import pytest

from rtns.atten import AttenLimit
from rtns.bank import BankFull, StreamBank, batch_invariant
from rtns.engine import Model
from rtns.streams import ChannelStream


@pytest.fixture(scope="module")
def dtln() -> Model:
    model = Model("rtns-dtln")
    assert batch_invariant(model, 16)  # the bank's equality needs it (shipped packs are)
    return model


def signals(k: int, n: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((k, n))).astype(np.float32)


def test_bank_equals_one_stream_each_bit_for_bit(dtln):
    k, n = 7, 128 * 40
    x = signals(k, n)
    bank = StreamBank(dtln, capacity=10, max_batch=4)  # several calls per step
    slots = [bank.open() for _ in range(k)]
    limits = [None, AttenLimit(0), AttenLimit(6), "off", AttenLimit(30), None, None]
    for slot, lim in zip(slots, limits, strict=True):
        if lim is not None:
            bank.set_atten_lim(slot, lim)
    bank.bypass[slots[5]] = True
    out = np.zeros((k, n), np.float32)
    for h in range(n // 128):
        # every slot gets its hop in two pieces, and the step runs a shuffled subset order
        for i, slot in enumerate(slots):
            bank.feed(slot, x[i, h * 128 : h * 128 + 50])
            bank.feed(slot, x[i, h * 128 + 50 : (h + 1) * 128])
        ready = bank.ready()
        assert sorted(ready.tolist()) == sorted(slots)
        y = bank.step(ready[::-1])
        for row, slot in zip(y, ready[::-1], strict=True):
            out[slots.index(slot), h * 128 : (h + 1) * 128] = row
    for i in range(k):
        st = dtln.stream()
        if limits[i] is not None:
            st.atten_lim = limits[i]
        st.bypass = i == 5
        np.testing.assert_array_equal(out[i], st.push(x[i]))
    assert bank.rows == k * (n // 128) and bank.calls == 2 * (n // 128)


def test_slots_open_close_reset_and_full(dtln):
    bank = StreamBank(dtln, capacity=2)
    a, b = bank.open(), bank.open()
    with pytest.raises(BankFull):
        bank.open()
    x = signals(1, 128 * 5, seed=3)[0]
    ref = dtln.stream().push(x)
    outs = []
    for h in range(5):
        bank.feed(a, x[h * 128 : (h + 1) * 128])
        outs.append(bank.step(np.array([a]))[0])
    np.testing.assert_array_equal(np.concatenate(outs), ref)
    bank.close(a)
    c = bank.open()  # a reused slot starts as a new stream
    assert c == a and bank.n_in[c] == 0
    outs = []
    for h in range(5):
        bank.feed(c, x[h * 128 : (h + 1) * 128])
        outs.append(bank.step(np.array([c]))[0])
    np.testing.assert_array_equal(np.concatenate(outs), ref)
    with pytest.raises(ValueError, match="complete hop"):
        bank.step(np.array([b]))
    bank.close(b)
    with pytest.raises(ValueError, match="not open"):
        bank.close(b)


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_channel_stream_on_a_bank_equals_its_own_streams(dtln, rate):
    x = signals(2, rate // 2, seed=5).T.copy()
    ref = ChannelStream(dtln, 2, rate)
    want = np.concatenate([ref.push(x), ref.flush()])
    bank = StreamBank(dtln, capacity=4)
    cs = ChannelStream(dtln, 2, rate, bank=bank)
    assert bank.open_slots == 2
    got = np.concatenate([cs.push(x[:1000]), cs.push(x[1000:]), cs.flush()])
    np.testing.assert_array_equal(got, want)
    cs.close()
    assert bank.open_slots == 0
    with pytest.raises(BankFull):
        ChannelStream(dtln, 5, rate, bank=bank)
    assert bank.open_slots == 0  # a refused stream gives its slots back


def test_bank_grows_and_keeps_open_slots(dtln):
    bank = StreamBank(dtln, capacity=1, max_capacity=3)
    a = bank.open()
    x = signals(1, 256, seed=8)[0]
    bank.feed(a, x[:128])
    first = bank.step(np.array([a]))
    b, c = bank.open(), bank.open()  # grows 1 -> 2 -> 3
    assert bank.capacity == 3 and len({a, b, c}) == 3
    with pytest.raises(BankFull):
        bank.open()
    bank.feed(a, x[128:])
    st = dtln.stream()
    np.testing.assert_array_equal(
        np.concatenate([first[0], bank.step(np.array([a]))[0]]), st.push(x)
    )


def test_input_ring_and_collected_output_equal_one_stream(dtln):
    """Chunks of any size (wrapping the input ring, one larger than a hop) go straight into
    the ring; rounds of ready()/step(collect=True) and take() give Stream.push's samples."""
    from rtns.bank import IN_LEN

    k, n = 3, 128 * 70
    x = signals(k, n, seed=5)
    bank = StreamBank(dtln, capacity=4, max_batch=2)
    slots = [bank.open() for _ in range(k)]
    outs: list[list[np.ndarray]] = [[] for _ in range(k)]
    sizes = [333, 1000, 77, IN_LEN - 5]  # the last fills the ring almost to the brim
    pos = [0] * k
    while min(pos) < n:
        for i, slot in enumerate(slots):
            size = sizes[(pos[i] // 7) % len(sizes)]
            chunk = x[i, pos[i] : pos[i] + size]
            pos[i] += bank.feed(slot, chunk)
        for _ in range(40):  # at most 32 hops before the output must be taken
            ready = bank.ready()
            if not ready.size:
                break
            bank.step(ready, collect=True)
            if bank.n_out[slots].max() >= 16 * 128:
                for i, slot in enumerate(slots):
                    outs[i].append(bank.take(slot).copy())
        for i, slot in enumerate(slots):
            outs[i].append(bank.take(slot).copy())
    for i in range(k):
        ref = dtln.stream().push(x[i])
        np.testing.assert_array_equal(np.concatenate(outs[i]), ref)
    room = IN_LEN - int(bank.n_in[slots[0]])
    assert bank.feed(slots[0], np.zeros(IN_LEN + 10, np.float32)) == room


def test_collect_refuses_a_full_output_buffer(dtln):
    from rtns.bank import OUT_LEN

    bank = StreamBank(dtln, capacity=1)
    a = bank.open()
    for _ in range(OUT_LEN // 128):
        bank.feed(a, np.zeros(128, np.float32))
        bank.step(np.array([a]), collect=True)
    bank.feed(a, np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="output buffer is full"):
        bank.step(np.array([a]), collect=True)
    assert bank.take(a).shape == (OUT_LEN,)
    bank.step(np.array([a]), collect=True)
