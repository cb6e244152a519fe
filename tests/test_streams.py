"""rtns.streams.ChannelStream: one stream plumbing at any rate, exact end of stream, full band."""

from __future__ import annotations

import numpy as np
import pytest

from rtns.engine import Model
from rtns.streams import ChannelStream, aligned, enhance_frames

RATES = [8_000, 16_000, 22_050, 44_100, 48_000]


@pytest.fixture(scope="module")
def dtln() -> Model:
    return Model("rtns-dtln")  # the shipped pack `rtns serve` hosts by default


def noise(n: int, channels: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((n, channels))).astype(np.float32)


def band_db(y: np.ndarray, x: np.ndarray, rate: int, lo: float, hi: float) -> float:
    """Energy change (dB) of y against x in [lo, hi) Hz."""
    f = np.fft.rfftfreq(x.shape[0], 1 / rate)
    sel = (f >= lo) & (f < hi)
    ey = np.sum(np.abs(np.fft.rfft(y, axis=0)[sel]) ** 2)
    ex = np.sum(np.abs(np.fft.rfft(x, axis=0)[sel]) ** 2)
    return float(10 * np.log10(ey / ex))


def test_model_rate_equals_engine_stream_bit_for_bit(dtln):
    x = noise(16_000, 2)
    y = enhance_frames(dtln, x)
    for c in range(2):
        st = dtln.stream()
        ref = np.concatenate([st.push(x[:, c]), st.flush()])[dtln.latency :][:16_000]
        np.testing.assert_array_equal(y[:, c], ref)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("how", ["limit0", "bypass"])
def test_no_attenuation_is_the_identity_at_every_rate(dtln, rate, how):
    """--atten-lim 0 and bypass give the input back (full band, any rate) to float rounding."""
    x = noise(rate, 2, seed=rate)
    cs = ChannelStream(dtln, 2, rate)
    if how == "bypass":
        cs.bypass = True
    else:
        cs.atten_lim = 0
    out = np.concatenate([cs.push(x[:7001]), cs.push(x[7001:]), cs.flush()])
    y = aligned(out, cs.latency, x.shape[0])
    np.testing.assert_allclose(y, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [16_000, 44_100, 48_000])
def test_chunking_and_exact_end_of_stream(dtln, rate):
    x = noise(rate + 333, 1, seed=1)
    whole = ChannelStream(dtln, 1, rate)
    ref = np.concatenate([whole.push(x), whole.flush()])
    assert ref.shape[0] == x.shape[0] + whole.latency  # exactly n + latency
    cs = ChannelStream(dtln, 1, rate)
    parts, i, sizes = [], 0, [1, 127, 128, 129, 2000, 3]
    while i < x.shape[0]:
        n = sizes[len(parts) % len(sizes)]
        y = cs.push(x[i : i + n])
        i += n
        assert cs.samples_out == cs.count_out(cs.samples_in)  # count_out is exact
        parts.append(y)
    parts.append(cs.flush())
    np.testing.assert_array_equal(np.concatenate(parts), ref)
    # flush reset the stream: a second run gives the same again
    np.testing.assert_array_equal(np.concatenate([cs.push(x), cs.flush()]), ref)


@pytest.mark.parametrize("rate", RATES)
def test_latency_is_whole_samples_and_states_it(dtln, rate):
    """The latency is the resamplers' delays plus the model's, rounded up to whole samples
    at the rate once (derived here from the resampler's own delays, not copied from a run),
    and the up-sampler is lengthened so that the sum is exact; at 16 kHz it is the pack's."""
    import math
    from fractions import Fraction

    from rtns.resample import Resampler

    cs = ChannelStream(dtln, 1, rate)
    sr = dtln.sample_rate
    if rate == sr:
        assert cs.latency == dtln.latency == 384
        return
    model = Fraction(dtln.latency, sr)
    natural = Resampler(rate, sr, 1).delay + model + Resampler(sr, rate, 1).delay
    assert cs.latency == math.ceil(natural * rate)
    assert (cs._down.delay + model + cs._up.delay) * rate == cs.latency  # exact, whole
    assert 0 <= cs.latency - natural * rate < 1


def test_batchable_api_equals_push(dtln):
    """put / fill / bank.step(collect=True) / take / end (the daemon's way, two streams on
    one shared bank, batched rows) == push / flush of each stream alone."""
    from rtns.bank import StreamBank

    rate = 48_000
    x = noise(20_000, 2, seed=3)
    ref = ChannelStream(dtln, 2, rate)
    want = np.concatenate([ref.push(x), ref.flush()])
    mono = noise(7_000, 1, seed=4)
    st = dtln.stream()
    want_mono = np.concatenate([st.push(mono[:, 0]), st.flush()])
    bank = StreamBank(dtln, capacity=4, max_batch=4)
    cs, other = ChannelStream(dtln, 2, rate, bank=bank), ChannelStream(dtln, 1, bank=bank)
    got, got_mono = [], []

    def tick():
        ready = [s for s in (cs, other) if s.fill()]
        while ready:
            bank.step(np.concatenate([s.slots for s in ready]), collect=True)
            ready = [s for s in ready if s.hop_ready]
        got.append(cs.take())
        got_mono.append(other.take())

    for a in range(0, x.shape[0], 960):
        cs.put(x[a : a + 960])
        other.put(mono[a * 7 // 20 : (a + 960) * 7 // 20])
        tick()
    owed = cs.samples_in + cs.latency
    owed_mono = other.samples_in + other.latency
    cs.end()
    other.end()
    tick()
    got = np.concatenate(got)[:owed]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.concatenate(got_mono)[:owed_mono, 0], want_mono)


def test_48k_keeps_the_band_above_8k_within_the_limit(dtln):
    """Before: everything above 8 kHz was lost (a 12 kHz tone fell by 77-81 dB). Now the
    band above 8 kHz follows the model's top-band gain, never below the limit (18 dB)."""
    rate = 48_000
    rng = np.random.default_rng(5)
    n = 2 * rate
    t = np.arange(n) / rate
    # speech-like low band (modulated partials) plus white noise over the full band
    low = sum(np.sin(2 * np.pi * f * t) for f in (220, 440, 880, 1760)) * (
        0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    )
    x = (0.05 * low + 0.01 * rng.standard_normal(n)).astype(np.float32)[:, None]
    y = enhance_frames(dtln, x, rate)  # the pack's 18 dB limit
    hf = band_db(y, x, rate, 9_000, 20_000)
    assert -18.5 < hf < 0.5, hf
    yoff = enhance_frames(dtln, x, rate, atten_lim="off")
    assert band_db(yoff, x, rate, 9_000, 20_000) < 0.5
    tone = (0.1 * np.sin(2 * np.pi * 12_000 * t)).astype(np.float32)[:, None]
    yt = enhance_frames(dtln, x + tone, rate)
    assert band_db(yt, x + tone, rate, 11_900, 12_100) > -18.5


def test_input_contract_int_nan_huge(dtln):
    cs = ChannelStream(dtln, 1, 16_000)
    pcm = (np.arange(-2000, 2000, dtype=np.int16) * 8)[:, None]
    a = cs.push(pcm)
    b = ChannelStream(dtln, 1, 16_000).push(pcm.astype(np.float32) / 32768)
    np.testing.assert_array_equal(a, b)  # integer PCM is scaled by its full scale
    with pytest.raises(ValueError, match="NaN or infinite"):
        cs.put(np.array([[0.0], [np.nan]], np.float32))
    huge = np.full((4000, 1), 3e38, np.float32)
    y = np.concatenate([cs.push(huge), cs.flush()])
    assert np.isfinite(y).all()  # before: NaN output with exit 0


def test_engine_stream_input_contract(dtln):
    st = dtln.stream()
    with pytest.raises(ValueError, match="NaN or infinite"):
        st.push(np.array([0.0, np.inf], np.float32))
    assert st.samples_in == 0  # nothing was taken
    y = st.push(np.full(1024, 3e38, np.float32))
    assert np.isfinite(y).all() and st.clipped == 1024
    i16 = np.full(256, 16384, np.int16)
    np.testing.assert_array_equal(
        dtln.stream().push(i16), dtln.stream().push(np.full(256, 0.5, np.float32))
    )


def test_reset_restores_a_new_stream(dtln):
    x = noise(5000, 1, seed=9)
    cs = ChannelStream(dtln, 1, 44_100)
    first = cs.push(x)
    cs.push(noise(3000, 1, seed=10))
    cs.reset()
    np.testing.assert_array_equal(cs.push(x), first)


def test_bad_shapes(dtln):
    cs = ChannelStream(dtln, 2, 48_000)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        cs.put(np.zeros(10, np.float32))
    with pytest.raises(ValueError):
        ChannelStream(dtln, 0, 48_000)


def test_a_reused_input_buffer_is_copied(dtln):
    """The live worker pushes views of one work buffer; queued frames must not change."""
    x = noise(6000, 1, seed=12)
    ref = ChannelStream(dtln, 1, 48_000)
    want = np.concatenate([ref.push(x), ref.flush()])
    cs = ChannelStream(dtln, 1, 48_000)
    work = np.zeros((1000, 1), np.float32)
    got = []
    for a in range(0, 6000, 1000):
        work[:] = x[a : a + 1000]
        got.append(cs.push(work))
        work[:] = 9.0  # the caller reuses its buffer
    got.append(cs.flush())
    np.testing.assert_array_equal(np.concatenate(got), want)
