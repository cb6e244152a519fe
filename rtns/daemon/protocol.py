"""The wire format of ``rtns serve`` (version 1); docs/protocol.md is its full description.

Transport: ZeroMQ. The server binds a ROUTER socket, each client connects a DEALER socket.
Every message is multipart: frame 0 is a JSON object (UTF-8) with a ``type`` field; audio
messages (``audio`` both ways, and the server's ``closed``) carry exactly one more frame
with raw interleaved PCM in the session's sample format. Nothing else is ever sent, and
audio never travels inside JSON.

This module holds the pydantic models of every header, their JSON encoding, the decoding of
client headers into (model | :class:`ProtocolError` with an error code), and the PCM
conversions. It imports neither zmq nor onnxruntime so any client can reuse it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rtns.atten import MAX_DB
from rtns.dsp import CLIP_LEVEL
from rtns.errors import RtnsError

#: Bumped on any incompatible change of a message below.
PROTOCOL_VERSION = 1
#: Sample formats: little-endian signed 16-bit integers or IEEE float32, interleaved.
FORMATS: dict[str, np.dtype] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
_S16_SCALE = np.float32(1.0 / 32768.0)
#: Client sample rates the server accepts (it resamples to 16 kHz and back per session).
MIN_RATE, MAX_RATE = 8_000, 192_000
#: Channels of one session; each channel is enhanced as its own stream.
MAX_CHANNELS = 8
#: Largest JSON header the server parses (bytes); headers are tiny, this is anti-abuse.
MAX_HEADER_BYTES = 4096

#: Every error code a server may send, with when (docs/protocol.md lists the same).
ERROR_CODES: dict[str, str] = {
    "bad_json": "frame 0 is not a UTF-8 JSON object",
    "bad_frames": "wrong number of frames for the message type",
    "unknown_type": "the type field names no message of this protocol",
    "bad_message": "a field is missing, of the wrong type or out of range",
    "bad_version": "the hello asks for a protocol version this server does not speak",
    "bad_rate": "the hello's sample rate is outside 8000..192000 Hz",
    "bad_channels": "the hello's channel count is outside 1..8",
    "bad_format": "the hello's sample format is not s16le or f32le",
    "bad_atten": f'the hello\'s attenuation limit is not a number of dB in 0..{MAX_DB:g} or "off"',
    "unknown_model": "the hello names a model this server does not serve",
    "server_full": "the server already has its maximum number of sessions",
    "busy": "a new session would make the server's open sessions late (its measured capacity)",
    "draining": "the server is shutting down and takes no new sessions",
    "already_open": "a hello arrived on a connection whose session is open",
    "no_session": "audio or close arrived before a hello (or after the session ended)",
    "bad_length": "the PCM frame is not a whole number of sample frames",
    "bad_samples": "the PCM frame holds NaN or infinite float samples",
    "duplicate_seq": "the sequence number was already accepted",
    "seq_gap": "the sequence number skips ahead of the next expected one",
    "too_large": "the PCM frame is larger than the server's message limit",
    "queue_full": "the session's input queue is full; resend the same seq later",
    "internal": "the server failed processing this session",
    "not_allowed": "the request needs the operator's permission (a stats reset)",
}


class ProtocolError(RtnsError):
    """A message that breaks the protocol: ``code`` (one of ERROR_CODES) and one sentence."""

    def __init__(self, code: str, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        assert code in ERROR_CODES, code
        self.code = code
        self.message = message
        self.seq = seq


#: An attenuation limit on the wire: dB in 0..MAX_DB, or "off" (unlimited).
AttenField = Annotated[float, Field(ge=0.0, le=MAX_DB, allow_inf_nan=False)] | Literal["off"]


class Message(BaseModel):
    """Base of every wire message (daemon and WebSocket): unknown keys refused, strict
    types, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# -- client -> server -----------------------------------------------------------------------
class Hello(Message):
    """Opens a session on this connection."""

    type: Literal["hello"] = "hello"
    version: int
    sample_rate: int = Field(ge=MIN_RATE, le=MAX_RATE)
    format: Literal["s16le", "f32le"]
    channels: int = Field(1, ge=1, le=MAX_CHANNELS)
    #: Name of one of the server's models; None: the server's first (default) model.
    model: str | None = Field(None, max_length=200)
    #: At most this many dB of noise reduction; "off": unlimited; None: the model's default
    #: (its pack's ``atten_lim_db``, shown in Ready).
    atten_lim_db: AttenField | None = None


class Audio(Message):
    """PCM for the session (frame 1); ``seq`` counts accepted audio messages from 0."""

    type: Literal["audio"] = "audio"
    seq: int = Field(ge=0, lt=2**53)


class Close(Message):
    """Ends the session: the server processes what it holds, sends the tail and ``closed``."""

    type: Literal["close"] = "close"


class StatsRequest(Message):
    """Asks for the server's counters (no session needed)."""

    type: Literal["stats"] = "stats"
    #: Clear the timing percentiles and counters after answering (benchmarks).
    reset: bool = False


class Ping(Message):
    type: Literal["ping"] = "ping"


ClientMsg = Annotated[Hello | Audio | Close | StatsRequest | Ping, Field(discriminator="type")]
_CLIENT = TypeAdapter(ClientMsg)
#: Messages that must have one PCM frame after the header; all others have none.
WITH_PCM = frozenset({"audio"})

#: Which error code a bad hello field gets.
_FIELD_CODES = {
    "version": "bad_version",
    "sample_rate": "bad_rate",
    "channels": "bad_channels",
    "format": "bad_format",
    "atten_lim_db": "bad_atten",
}


# -- server -> client -----------------------------------------------------------------------
class Ready(Message):
    """The answer to a good hello."""

    type: Literal["ready"] = "ready"
    version: int = PROTOCOL_VERSION
    session: str
    model: str
    #: Algorithmic latency in samples at the session's rate: output n estimates input n-latency.
    latency: int
    #: The same at the model's 16 kHz.
    latency_16k: int
    #: Samples (at 16 kHz) the model consumes per inference; output comes in such steps.
    block_shift: int
    sample_rate: int
    format: Literal["s16le", "f32le"]
    channels: int
    #: Largest message the server accepts, in bytes (larger ones drop the connection).
    max_message_bytes: int
    #: Input the server queues per session (sample frames at 16 kHz) before ``queue_full``.
    queue_limit: int
    #: Seconds without any message after which the server ends the session.
    idle_timeout: float
    #: The session's attenuation limit in dB (None: unlimited).
    atten_lim_db: float | None = None


class AudioOut(Message):
    """Enhanced PCM (frame 1) answering the audio message ``seq``."""

    type: Literal["audio"] = "audio"
    seq: int
    #: Sample frames in frame 1 (per channel).
    samples: int
    #: Input sample frames (16 kHz) still queued for this session after this answer.
    queued: int = 0


class Closed(Message):
    """The session has ended; frame 1 holds the tail (possibly empty)."""

    type: Literal["closed"] = "closed"
    session: str
    reason: Literal["close", "shutdown", "timeout", "error"]
    samples: int
    #: Totals over the session, in sample frames at the session's rate.
    samples_in: int
    samples_out: int


class Error(Message):
    type: Literal["error"] = "error"
    code: str
    message: str
    #: The audio seq the error is about, if any.
    seq: int | None = None
    #: True when the session (if any) has been ended because of it.
    fatal: bool = False


class Pong(Message):
    type: Literal["pong"] = "pong"
    time: float


ServerMsg = Annotated[Ready | AudioOut | Closed | Error | Pong, Field(discriminator="type")]
_SERVER = TypeAdapter(ServerMsg)


def encode(msg: BaseModel) -> bytes:
    """One header frame: compact JSON (None fields are sent as null)."""
    return msg.model_dump_json().encode("utf-8")


def encode_dict(obj: dict[str, Any]) -> bytes:
    """A free-form header (the ``stats`` reply)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


#: The exact header every client library here sends for audio (compact JSON, this key order).
_AUDIO_PREFIX = b'{"type":"audio","seq":'


def audio_seq(frames: list[bytes]) -> int | None:
    """The hot path: the seq of a well-formed audio message in its canonical compact form
    (``{"type":"audio","seq":N}`` + one PCM frame), without building any object; None for
    anything else, which :func:`parse_client` then checks in full."""
    if len(frames) != 2:
        return None
    head = frames[0]
    if not (head.startswith(_AUDIO_PREFIX) and head.endswith(b"}")) or len(head) > 48:
        return None
    digits = head[len(_AUDIO_PREFIX) : -1]
    if not digits.isdigit() or (len(digits) > 1 and digits[0:1] == b"0"):
        return None
    seq = int(digits)
    return seq if seq < 2**53 else None


def encode_audio(seq: int) -> bytes:
    """A client's ``audio`` header in the canonical form :func:`audio_seq` recognises
    (what ``encode(Audio(seq=seq))`` gives, without pydantic)."""
    return b'{"type":"audio","seq":%d}' % seq


def answer_seq(head: bytes) -> int | None:
    """The seq of a server ``audio`` answer header as :func:`encode_audio_out` writes it,
    without a JSON parser (clients' hot path); None for anything else."""
    if not head.startswith(_AUDIO_PREFIX):
        return None
    end = head.find(b",", len(_AUDIO_PREFIX))
    digits = head[len(_AUDIO_PREFIX) : end]
    return int(digits) if end > 0 and digits.isdigit() else None


def encode_audio_out(seq: int, samples: int, queued: int) -> bytes:
    """The ``audio`` answer header, as :class:`AudioOut` would encode it, without pydantic."""
    return b'{"type":"audio","seq":%d,"samples":%d,"queued":%d}' % (seq, samples, queued)


def parse_client(frames: list[bytes]) -> Hello | Audio | Close | StatsRequest | Ping:
    """Decode the frames of a client message (identity removed); raises ProtocolError."""
    if not frames:
        raise ProtocolError("bad_frames", "empty message")
    head = frames[0]
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(
            "bad_json", f"header frame is {len(head)} bytes, over {MAX_HEADER_BYTES}"
        )
    try:
        obj = json.loads(head)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("bad_json", "header frame is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", "header frame is JSON but not an object")
    kind = obj.get("type")
    if kind not in ("hello", "audio", "close", "stats", "ping"):
        raise ProtocolError("unknown_type", f"unknown message type {str(kind)[:40]!r}")
    seq = obj.get("seq") if type(obj.get("seq")) is int else None
    want = 2 if kind in WITH_PCM else 1
    if len(frames) != want:
        raise ProtocolError(
            "bad_frames", f"a {kind} message has {want} frame(s), got {len(frames)}", seq
        )
    if kind == "audio" and len(obj) == 2 and seq is not None and 0 <= seq < 2**53:
        return Audio.model_construct(seq=seq)  # the hot path, already fully checked
    try:
        return _CLIENT.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][1]) if len(first["loc"]) > 1 else ""
        code = _FIELD_CODES.get(field, "bad_message") if kind == "hello" else "bad_message"
        raise ProtocolError(
            code, f"{kind} message field {field or '?'!r}: {first['msg']}", seq
        ) from None


def parse_server(frames: list[bytes]) -> Ready | AudioOut | Closed | Error | Pong | dict:
    """Decode a server message header (clients); a ``stats`` reply comes back as a dict."""
    obj = json.loads(frames[0])
    if isinstance(obj, dict) and obj.get("type") == "stats":
        return obj
    return _SERVER.validate_python(obj)


# -- PCM ------------------------------------------------------------------------------------
def decode_pcm(
    payload: bytes | memoryview, fmt: str, channels: int, writable: bool = True
) -> np.ndarray:
    """Raw interleaved PCM -> float32 [frames, channels] in [-1, 1) for s16le.

    ``writable=False`` (the daemon's hot path): f32le comes back as a read-only view of
    ``payload`` where no conversion or clipping is needed (one copy fewer per message).
    Raises ProtocolError ``bad_length`` for a partial sample frame and ``bad_samples`` for
    NaN/Inf (f32le).
    """
    dtype = FORMATS[fmt]
    frame_bytes = dtype.itemsize * channels
    n = len(payload)
    if n % frame_bytes:
        raise ProtocolError(
            "bad_length",
            f"PCM frame of {n} bytes is not a multiple of {frame_bytes} "
            f"({channels} channel(s) of {fmt})",
        )
    raw = np.frombuffer(payload, dtype=dtype).reshape(-1, channels)
    if fmt == "s16le":  # one pass: int16 -> scaled float32
        return np.multiply(raw, _S16_SCALE, dtype=np.float32)
    # f32le on a little-endian host: ``raw`` already is float32, a view of the received
    # bytes; copied for callers that may write to it, and where it must be clipped.
    x = raw if not writable and raw.dtype == np.float32 else raw.astype(np.float32)
    # One pass: the peak is NaN when any sample is, inf when any is.
    if x.size and not np.abs(x).max() <= CLIP_LEVEL:
        if not np.isfinite(x).all():
            raise ProtocolError("bad_samples", "PCM frame holds NaN or infinite samples")
        x = np.clip(x, -CLIP_LEVEL, CLIP_LEVEL)  # far beyond full scale (rtns.dsp)
    return x


def encode_pcm(x: np.ndarray, fmt: str) -> bytes:
    """float32 [frames, channels] -> raw interleaved PCM (s16le: clipped, rounded)."""
    if fmt == "s16le":
        y = np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2")
    else:
        y = np.ascontiguousarray(x, dtype="<f4")
    return y.tobytes()
