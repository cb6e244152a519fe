"""rtns.pipecat_filter.RtnsFilter in Pipecat: as the ``audio_in_filter`` of a real
``BaseInputTransport`` in a Pipecat pipeline (``pipecat.tests.utils.run_test``), fed Pipecat's
own ``InputAudioRawFrame``s, its output is exactly ``ChannelStream``'s for the same input;
``FilterEnableFrame`` and ``FilterUpdateSettingsFrame`` change it as documented."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    FilterEnableFrame,
    FilterUpdateSettingsFrame,
    InputAudioRawFrame,
)
from pipecat.tests.utils import run_test  # noqa: E402
from pipecat.transports.base_input import BaseInputTransport  # noqa: E402
from pipecat.transports.base_transport import TransportParams  # noqa: E402

from rtns.daemon.protocol import decode_pcm, encode_pcm  # noqa: E402
from rtns.errors import RtnsError  # noqa: E402
from rtns.pipecat_filter import RtnsFilter  # noqa: E402
from rtns.streams import ChannelStream  # noqa: E402


class _Transport(BaseInputTransport):
    """An input transport whose audio arrives as frames from upstream: ready from its setup
    (run_test sends frames once the StartFrame has gone through, which can be before the
    transport's start() ran), and the EndFrame goes on only after every queued chunk was
    filtered and pushed (waiting on the queue, not a sleep)."""

    async def setup(self, setup):
        await super().setup(setup)
        self._create_audio_task()

    async def process_frame(self, frame, direction):
        if isinstance(frame, EndFrame):
            await self._audio_in_queue.join()
        await super().process_frame(frame, direction)


@pytest.fixture(scope="module")
def rtns_filter() -> RtnsFilter:
    return RtnsFilter()


def _pcm(rate: int, seconds: float, seed: int = 0) -> list[bytes]:
    """Noisy tones as 20 ms chunks of s16le mono (what a Pipecat transport carries)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.2 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    x = (x + 0.05 * rng.standard_normal(t.size)).astype(np.float32)[:, None]
    step = rate // 50
    return [encode_pcm(x[i : i + step], "s16le") for i in range(0, len(x), step)]


def _channelstream(model, rate: int, chunks: list[bytes], **controls) -> bytes:
    cs = ChannelStream(model, 1, rate)
    for k, v in controls.items():
        setattr(cs, k, v)
    return b"".join(encode_pcm(cs.push(decode_pcm(c, "s16le", 1)), "s16le") for c in chunks)


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_in_a_pipecat_input_transport(rtns_filter, rate):
    chunks = _pcm(rate, 1.0)
    params = TransportParams(
        audio_in_enabled=True,
        audio_in_passthrough=True,
        audio_in_sample_rate=rate,
        audio_in_filter=rtns_filter,
    )
    frames = [InputAudioRawFrame(audio=c, sample_rate=rate, num_channels=1) for c in chunks]
    down, _ = asyncio.run(run_test(_Transport(params), frames_to_send=frames))
    out = [f for f in down if isinstance(f, InputAudioRawFrame)]
    assert out and all(f.sample_rate == rate for f in out)
    got = b"".join(f.audio for f in out)
    want = _channelstream(rtns_filter.model, rate, chunks)
    assert len(got) == len(want) > 0.9 * sum(map(len, chunks))
    assert got == want
    # The model did something: the output is not the input delayed.
    assert got != _channelstream(rtns_filter.model, rate, chunks, bypass=True)


def test_controls_are_pipecats_frames(rtns_filter):
    rate = 16_000
    chunks = _pcm(rate, 0.6, seed=1)

    async def go():
        await rtns_filter.start(rate)
        try:
            a = [await rtns_filter.filter(c) for c in chunks[:10]]
            await rtns_filter.process_frame(FilterEnableFrame(enable=False))
            b = [await rtns_filter.filter(c) for c in chunks[10:20]]
            await rtns_filter.process_frame(FilterEnableFrame(enable=True))
            await rtns_filter.process_frame(FilterUpdateSettingsFrame(settings={"atten_lim_db": 6}))
            c = [await rtns_filter.filter(c) for c in chunks[20:]]
            with pytest.raises(RtnsError, match="unknown settings"):
                await rtns_filter.process_frame(FilterUpdateSettingsFrame(settings={"x": 1}))
            with pytest.raises(RtnsError, match="attenuation limit"):
                await rtns_filter.process_frame(
                    FilterUpdateSettingsFrame(settings={"atten_lim_db": -3})
                )
            return b"".join(a), b"".join(b), b"".join(c), rtns_filter.latency
        finally:
            await rtns_filter.stop()
            rtns_filter.atten_lim = None
            rtns_filter.bypass = False

    a, b, c, latency = asyncio.run(go())
    cs = ChannelStream(rtns_filter.model, 1, rate)
    want = [cs.push(decode_pcm(x, "s16le", 1)) for x in chunks[:10]]
    assert a == encode_pcm(np.concatenate(want), "s16le")
    cs.bypass = True
    want = [cs.push(decode_pcm(x, "s16le", 1)) for x in chunks[10:20]]
    assert b == encode_pcm(np.concatenate(want), "s16le")
    cs.bypass = False
    cs.atten_lim = 6
    want = [cs.push(decode_pcm(x, "s16le", 1)) for x in chunks[20:]]
    assert c == encode_pcm(np.concatenate(want), "s16le")
    # Bypass is the input delayed by the latency, sample for sample.
    x = np.frombuffer(b"".join(chunks), "<i2")
    y = np.frombuffer(a + b, "<i2")
    start = len(a) // 2 + latency  # past the switch
    assert np.array_equal(y[start:], x[start - latency : len(y) - latency])
