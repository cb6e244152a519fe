"""One client session of the daemon: its model and its :class:`ChannelStream`.

The session does no I/O: the server feeds it decoded PCM (``cs.put``, straight into its
slots of the model's :class:`~rtns.bank.StreamBank`), runs every ready slot of every session
in one ``bank.step(collect=True)`` and sends what ``cs.take`` returns. Bookkeeping is in
16 kHz frames on the input side (what has been fed to the engine) and in client-rate
frames on the output side (what has been sent).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from rtns.bank import StreamBank
from rtns.engine import Model
from rtns.streams import ChannelStream


@dataclass
class Served:
    """A loaded model, how the server runs it, and the bank holding its sessions' streams
    (``max_batch`` 1 when not batched: one row per call, independent by construction)."""

    model: Model
    batched: bool
    why: str
    bank: StreamBank
    #: The session holding each open slot of the bank (to end them if a step fails).
    owner: dict[int, Session] = field(default_factory=dict)


@dataclass
class Session:
    """One client stream (all of its channels) around one :class:`ChannelStream`."""

    sid: str
    ident: bytes
    served: Served
    fmt: str
    cs: ChannelStream
    #: Accepted audio messages not yet answered: (seq, 16 kHz frames queued up to its end).
    unanswered: collections.deque = field(default_factory=collections.deque)
    #: 16 kHz frames queued over the session (input plus end-of-stream padding).
    queued_total: int = 0
    last_seen: float = 0.0
    closing: str | None = None
    overruns: int = 0
    next_seq: int = 0
    #: The client the hello came from (its CurveZMQ key or its connection; the per-client
    #: session limit, see rtns.daemon.clients).
    peer: str = "local"
    #: Slots and the peer's count given back (see Server._release).
    released: bool = False
    #: Frames sent back (client rate).
    sent: int = 0

    @property
    def owed(self) -> int:
        """Frames still to send for a complete stream: input + latency - sent."""
        return self.cs.samples_in + self.cs.latency - self.sent

    @property
    def channels(self) -> int:
        return self.cs.channels

    @property
    def rate(self) -> int:
        return self.cs.rate

    @property
    def latency(self) -> int:
        return self.cs.latency

    @property
    def queued(self) -> int:
        return self.cs.queued

    @property
    def fed(self) -> int:
        """16 kHz frames handed to the engine streams so far."""
        return self.queued_total - self.cs.queued
