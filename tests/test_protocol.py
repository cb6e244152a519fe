"""Protocol v1: header parsing, error codes, PCM conversions (no sockets)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtns.daemon import protocol as P


def hello(**kw) -> bytes:
    obj = {"type": "hello", "version": 1, "sample_rate": 16000, "format": "f32le"} | kw
    return json.dumps(obj).encode()


def code_of(frames: list[bytes]) -> str:
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client(frames)
    assert e.value.code in P.ERROR_CODES
    return e.value.code


def test_good_messages_parse():
    m = P.parse_client([hello(channels=2, model="x", atten_lim_db=12)])
    assert isinstance(m, P.Hello) and m.channels == 2 and m.atten_lim_db == 12
    assert P.parse_client([hello(atten_lim_db="off")]).atten_lim_db == "off"
    a = P.parse_client([b'{"type":"audio","seq":7}', b"\0" * 8])
    assert isinstance(a, P.Audio) and a.seq == 7
    assert isinstance(P.parse_client([b'{"type":"close"}']), P.Close)
    assert P.parse_client([b'{"type":"stats","reset":true}']).reset is True
    assert isinstance(P.parse_client([b'{"type":"ping"}']), P.Ping)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"{not json"], "bad_json"),
        ([b"\xff\xfe"], "bad_json"),
        ([b"[1, 2]"], "bad_json"),
        ([b"x" * (P.MAX_HEADER_BYTES + 1)], "bad_json"),
        ([b"[" * P.MAX_HEADER_BYTES], "bad_json"),  # nesting past the recursion limit
        ([b'{"type":"audio","seq":1e400}', b""], "bad_message"),
        ([b'{"type":"dance"}'], "unknown_type"),
        ([b'{"seq":1}'], "unknown_type"),
        ([b'{"type":"audio","seq":1}'], "bad_frames"),
        ([b'{"type":"close"}', b"x"], "bad_frames"),
        ([b'{"type":"audio","seq":-1}', b""], "bad_message"),
        ([b'{"type":"audio","seq":"1"}', b""], "bad_message"),
        ([b'{"type":"audio","seq":1,"extra":0}', b""], "bad_message"),
        ([hello(version="one")], "bad_version"),
        ([hello(sample_rate=0)], "bad_rate"),
        ([hello(sample_rate=10**9)], "bad_rate"),
        ([hello(sample_rate=16000.5)], "bad_rate"),
        ([hello(channels=0)], "bad_channels"),
        ([hello(channels=9)], "bad_channels"),
        ([hello(format="mp3")], "bad_format"),
        ([hello(atten_lim_db=-3)], "bad_atten"),
        ([hello(atten_lim_db="on")], "bad_atten"),
        ([], "bad_frames"),
    ],
)
def test_bad_messages_get_codes(frames, code):
    assert code_of(frames) == code


def test_audio_error_keeps_its_seq():
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client([b'{"type":"audio","seq":5}'])
    assert e.value.seq == 5


@pytest.mark.parametrize("fmt", ["s16le", "f32le"])
@pytest.mark.parametrize("channels", [1, 3])
def test_pcm_round_trip(fmt, channels):
    rng = np.random.default_rng(0)
    x = np.round(rng.uniform(-1, 1, (50, channels)) * 32767) / 32768
    x = x.astype(np.float32)
    raw = P.encode_pcm(x, fmt)
    assert len(raw) == 50 * channels * P.FORMATS[fmt].itemsize
    np.testing.assert_array_equal(P.decode_pcm(raw, fmt, channels), x)


def test_pcm_is_little_endian_and_interleaved():
    raw = np.array([[1, -2], [3, -4]], dtype="<i2").tobytes()
    x = P.decode_pcm(raw, "s16le", 2)
    np.testing.assert_array_equal(x * 32768, [[1, -2], [3, -4]])
    assert P.encode_pcm(np.array([[2.0]], np.float32), "s16le") == b"\xff\x7f"  # clipped


def test_pcm_rejects_partial_frames_and_non_finite():
    with pytest.raises(P.ProtocolError) as e:
        P.decode_pcm(b"\0" * 6, "f32le", 1)
    assert e.value.code == "bad_length"
    with pytest.raises(P.ProtocolError) as e:
        P.decode_pcm(b"\0" * 8, "s16le", 3)
    assert e.value.code == "bad_length"
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(P.ProtocolError) as e:
            P.decode_pcm(np.array([0, bad], "<f4").tobytes(), "f32le", 1)
        assert e.value.code == "bad_samples"


def test_pcm_decode_without_a_copy_only_where_it_is_safe():
    """The daemon's f32le path (writable=False) reads the message's bytes in place; every
    other caller gets its own writable array; out-of-range samples are clipped in a copy."""
    from rtns.dsp import CLIP_LEVEL

    raw = np.array([[0.25], [-0.5]], "<f4").tobytes()
    view = P.decode_pcm(raw, "f32le", 1, writable=False)
    assert view.dtype == np.float32 and view.shape == (2, 1) and not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(raw, np.uint8))
    own = P.decode_pcm(raw, "f32le", 1)
    assert own.flags.writeable and not np.shares_memory(own, np.frombuffer(raw, np.uint8))
    loud = np.array([[2 * CLIP_LEVEL], [-0.5]], "<f4").tobytes()
    x = P.decode_pcm(loud, "f32le", 1, writable=False)
    np.testing.assert_array_equal(x[:, 0], [CLIP_LEVEL, -0.5])
    for bad in (np.nan, np.inf):
        with pytest.raises(P.ProtocolError):
            P.decode_pcm(np.array([0, bad], "<f4").tobytes(), "f32le", 1, writable=False)
    s16 = P.decode_pcm(np.array([16384, -32768], "<i2").tobytes(), "s16le", 1, writable=False)
    assert s16.dtype == np.float32 and s16[:, 0].tolist() == [0.5, -1.0]


def test_server_messages_round_trip():
    r = P.Ready(
        session="ab",
        model="m",
        latency=1152,
        latency_16k=384,
        block_shift=128,
        sample_rate=48000,
        format="s16le",
        channels=2,
        max_message_bytes=1024,
        queue_limit=96000,
        idle_timeout=30.0,
    )
    assert P.parse_server([P.encode(r)]) == r
    e = P.Error(code="seq_gap", message="m", seq=3)
    assert P.parse_server([P.encode(e)]) == e
    assert P.parse_server([P.encode_dict({"type": "stats", "sessions": 2})])["sessions"] == 2


def test_audio_hot_path_agrees_with_the_full_parser():
    frames = [P.encode(P.Audio(seq=12345)), b"\0" * 8]
    assert P.audio_seq(frames) == 12345 == P.parse_client(frames).seq
    for head in (
        b'{"type":"audio","seq":-1}',
        b'{"type":"audio","seq":01}',
        b'{"type":"audio","seq":1.0}',
        b'{"type":"audio","seq":1,"x":2}',
        b'{"type":"audio", "seq":1}',
        b'{"type":"audio","seq":9007199254740992}',
    ):
        assert P.audio_seq([head, b""]) is None  # left to the full parser
    assert P.audio_seq([frames[0]]) is None
    out = P.encode_audio_out(3, 320, 64)
    assert out == P.encode(P.AudioOut(seq=3, samples=320, queued=64))


def test_fast_audio_headers_equal_the_models():
    from rtns.daemon import protocol as P

    for seq in (0, 7, 2**53 - 1):
        assert P.encode_audio(seq) == P.encode(P.Audio(seq=seq))
        assert P.audio_seq([P.encode_audio(seq), b""]) == seq
        assert P.answer_seq(P.encode_audio_out(seq, 320, 5)) == seq
        assert P.encode_audio_out(seq, 320, 5) == P.encode(
            P.AudioOut(seq=seq, samples=320, queued=5)
        )
    assert P.answer_seq(P.encode(P.Error(code="seq_gap", message="x", seq=3))) is None
    assert P.answer_seq(b'{"type":"audio","seq":}') is None
