"""The WebSocket protocol of ``rtns web`` (version 1); docs/protocol.md ("The WebSocket
protocol") is its full description.

Text messages are JSON objects with a ``type``; binary messages are raw interleaved PCM in
the session's format, nothing else. The client opens a session with ``hello``, the server
answers ``ready`` (or ``error``); each binary message is answered by one binary message of
enhanced PCM (possibly empty: output comes in whole 8 ms hops), in order. ``control``
changes the bypass and the attenuation limit; ``close`` ends the session with the tail and
``closed``.

The sample formats, rate and channel bounds, PCM decoding and error codes are the daemon's
(:mod:`rtns.daemon.protocol`), so a client of one speaks the other's dialect. No aiohttp
here: the models are plain pydantic, reusable by any client.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from rtns.daemon.protocol import _FIELD_CODES as HELLO_FIELD_CODES
from rtns.daemon.protocol import ERROR_CODES as DAEMON_ERROR_CODES
from rtns.daemon.protocol import (
    MAX_CHANNELS,
    MAX_RATE,
    MIN_RATE,
    AttenField,
    Message,
    ProtocolError,
)

#: Bumped on any incompatible change of a message below.
PROTOCOL_VERSION = 1
#: Largest message (text or binary) the server accepts; a larger one closes the WebSocket
#: with status 1009 (message too big). 256 KiB: 1.3 s of 48 kHz mono float32.
MAX_FRAME_BYTES = 1 << 18
#: Largest text message the server parses (JSON headers are tiny).
MAX_TEXT_BYTES = 4096
#: Non-fatal errors one session may cause before the server closes it.
MAX_ERRORS = 20

#: The daemon's codes that this protocol uses, and its own.
ERROR_CODES: dict[str, str] = {
    **{
        k: v
        for k, v in DAEMON_ERROR_CODES.items()
        if k
        in (
            "bad_json",
            "unknown_type",
            "bad_message",
            "bad_version",
            "bad_rate",
            "bad_channels",
            "bad_format",
            "bad_atten",
            "server_full",
            "already_open",
            "no_session",
            "bad_length",
            "bad_samples",
            "internal",
        )
    },
    "timeout": "no hello within the hello timeout, or no message within the idle timeout",
    "too_many_errors": f"the session caused {MAX_ERRORS} errors; the server closes it",
    "upstream": "the rtns serve daemon behind this server refused or did not answer",
}

#: WebSocket close codes the server uses (RFC 6455).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server shuts down
CLOSE_POLICY = 1008  # a fatal protocol error
CLOSE_TOO_BIG = 1009  # a message over MAX_FRAME_BYTES
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # server_full


# -- client -> server ---------------------------------------------------------------------
class Hello(Message):
    """Opens the session of this WebSocket (one per connection)."""

    type: Literal["hello"] = "hello"
    version: int
    sample_rate: int = Field(ge=MIN_RATE, le=MAX_RATE)
    format: Literal["s16le", "f32le"] = "f32le"
    channels: int = Field(1, ge=1, le=MAX_CHANNELS)
    #: None: the model's default limit.
    atten_lim_db: AttenField | None = None
    bypass: bool = False


class Control(Message):
    """Changes the session's controls; fields left out stay as they are."""

    type: Literal["control"] = "control"
    bypass: bool | None = None
    atten_lim_db: AttenField | None = None


class Close(Message):
    type: Literal["close"] = "close"


ClientMsg = Annotated[Hello | Control | Close, Field(discriminator="type")]
_CLIENT = TypeAdapter(ClientMsg)


# -- server -> client ---------------------------------------------------------------------
class Ready(Message):
    type: Literal["ready"] = "ready"
    version: int = PROTOCOL_VERSION
    session: str
    model: str
    #: "in-process" or the endpoint of the rtns serve daemon behind this server.
    backend: str
    #: Output sample n estimates input sample n - latency (samples at the session's rate).
    latency: int
    sample_rate: int
    format: Literal["s16le", "f32le"]
    channels: int
    max_frame_bytes: int
    idle_timeout: float
    #: The session's limit in dB (None: unlimited).
    atten_lim_db: float | None
    bypass: bool


class ControlState(Message):
    """The answer to ``control``: the controls now in force."""

    type: Literal["control"] = "control"
    bypass: bool
    atten_lim_db: float | None


class Closed(Message):
    """The session has ended (after the tail's binary message); totals at the session's
    rate."""

    type: Literal["closed"] = "closed"
    reason: Literal["close", "timeout", "error", "shutdown"]
    samples_in: int
    samples_out: int


class Error(Message):
    type: Literal["error"] = "error"
    code: str
    message: str
    #: True when the server closes the connection after it.
    fatal: bool = False


def encode(msg: BaseModel) -> str:
    return msg.model_dump_json()


def parse_client(text: str) -> Hello | Control | Close:
    """Decode a client text message; raises :class:`ProtocolError` with one sentence."""
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError("bad_json", f"text message of {len(text)} characters is too long")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "text message is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", "text message is JSON but not an object")
    kind = obj.get("type")
    if kind not in ("hello", "control", "close"):
        raise ProtocolError("unknown_type", f"unknown message type {str(kind)[:40]!r}")
    try:
        return _CLIENT.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][1]) if len(first["loc"]) > 1 else ""
        code = HELLO_FIELD_CODES.get(field, "bad_message") if kind == "hello" else "bad_message"
        if kind == "control" and field == "atten_lim_db":
            code = "bad_atten"
        raise ProtocolError(
            code, f"{kind} message field {field or '?'!r}: {first['msg']}"
        ) from None


def error(code: str, message: str, fatal: bool = False) -> str:
    assert code in ERROR_CODES, code
    return encode(Error(code=code, message=message, fatal=fatal))
