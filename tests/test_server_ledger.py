"""The session ledger's invariant (rtns.daemon.session.Ledger), seen from the wire: the
frames sent up to and including the answer to seq s are at least the framing's output for
the input through s (``ChannelStream.count_out``), exactly that when nothing later has
arrived (lockstep), never more than input + latency; one answer per accepted seq, in
order; after ``closed`` the total is exactly ``samples_in + latency``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("zmq")

from test_server import noise, running_server  # noqa: E402

from rtns.daemon import protocol as P  # noqa: E402
from rtns.daemon.client import Client  # noqa: E402
from rtns.engine import Model  # noqa: E402
from rtns.streams import ChannelStream  # noqa: E402


def _sizes(rate: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    # Empty, shorter than a hop, exactly a hop, several hops, beyond the input rings.
    fixed = [0, 1, 127, 128 * rate // 16_000, 3 * rate // 50, 40 * 128 * rate // 16_000]
    return fixed + [int(n) for n in rng.integers(0, 2 * rate // 50, 30)]


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_answers_follow_the_framing_per_seq(passthrough_pack, rate):
    framing = ChannelStream(Model(passthrough_pack), 1, rate)  # only for count_out
    sizes = _sizes(rate, rate)
    x = noise(sum(sizes) + 200_000, seed=1)
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint) as c:
        latency = c.hello(sample_rate=rate).latency
        pos = sent = 0
        for seq, n in enumerate(sizes):  # lockstep: exactly the framing's output
            c.send_audio(x[pos : pos + n])
            pos += n
            msg, pcm = c.recv(10)
            assert isinstance(msg, P.AudioOut) and msg.seq == seq and msg.samples == pcm.shape[0]
            sent += pcm.shape[0]
            assert sent == framing.count_out(pos), (seq, sent, framing.count_out(pos))
        ends = []
        # Pipelined: bounded by the framing, in order; a message of 40 hops first, so
        # later ones end inside hops that wait for the next tick (8 hops a tick).
        for n in [40 * 128 * rate // 16_000, *range(1, 3000, 97)]:
            c.send_audio(x[pos : pos + n])
            pos += n
            ends.append(pos)
        for i, end in enumerate(ends):
            msg, pcm = c.recv(10)
            assert isinstance(msg, P.AudioOut) and msg.seq == len(sizes) + i, msg
            sent += pcm.shape[0]
            assert framing.count_out(end) <= sent <= framing.count_out(pos)
        before, tail = c.close_session()
    assert not before
    assert c.closed.samples_in == pos and c.closed.samples_out == pos + latency
    assert sent + tail.shape[0] == pos + latency


def test_ledger_keeps_fed_across_the_end_padding(passthrough_pack):
    """A message that ends inside a hop is answered (its input is all fed) even when
    ``close`` comes before the tick, and the padding's hop goes to the tail."""
    x = noise(1000, seed=2)
    with running_server([passthrough_pack]) as srv, Client(srv.endpoint) as c:
        c.hello()
        c.send_audio(x[:200])  # one hop and 72 frames of the next
        c.send_audio(x[200:250])  # inside the incomplete hop
        before, tail = c.close_session()
    got = [(m.seq, p.shape[0]) for m, p in before]
    assert [s for s, _ in got] == [0, 1]
    assert sum(n for _, n in got) + tail.shape[0] == 250 + 384
