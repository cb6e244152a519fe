"""One client session of the daemon: its model, its :class:`ChannelStream` and its
:class:`Ledger` (the one place that accounts for what was fed, what is owed and what was
answered).

The session does no I/O: the server feeds it decoded PCM (``cs.put``, straight into its
slots of the model's :class:`~rtns.bank.StreamBank`), runs every ready slot of every session
in one ``bank.step(collect=True)`` and sends what ``cs.take`` returns, as the ledger says.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

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


class Owed(NamedTuple):
    """An accepted audio message not yet answered."""

    seq: int
    #: :attr:`Ledger.put16` once this message was queued: the answer is due when the
    #: stream has been fed that far.
    upto16: int
    #: Its arrival (time.monotonic), for the answer latency.
    arrived: float


@dataclass
class Ledger:
    """What a session was fed, what it owes and what it answered.

    Input side, 16 kHz frames: :attr:`put16` counts what was queued to the stream (the
    client's input after resampling, then the end-of-stream padding). ``queued`` (from
    :attr:`ChannelStream.queued`) is the part still waiting for a hop to run: the backlog
    and the *complete* hops in the input rings; an incomplete hop counts as fed, since no
    more input of this message can run until the next one arrives. So
    ``fed16 = put16 - queued``.

    Output side, sample frames at the session's rate: :attr:`sent`.

    **Invariant** (per seq): the answer to seq *s* leaves only once ``fed16 >= upto16[s]``
    and no complete hop waits, carrying every output frame made so far; so the frames sent
    up to and including it are at least the framing's output for the input through *s*
    (``cs.count_out(samples_in through s)``), exactly that when nothing later has arrived,
    and never more than ``samples_in + latency``. After ``closed``,
    ``sent == samples_in + latency`` (``tests/test_server_ledger.py``).
    """

    put16: int = 0
    sent: int = 0
    next_seq: int = 0
    owed: collections.deque[Owed] = field(default_factory=collections.deque)

    def fed16(self, queued: int) -> int:
        return self.put16 - queued

    def accept(self, seq: int, added16: int, arrived: float) -> None:
        """Seq ``seq`` (the next one) was queued: ``added16`` frames at 16 kHz."""
        self.next_seq = seq + 1
        self.put16 += added16
        self.owed.append(Owed(seq, self.put16, arrived))

    def pad(self, queued_before: int, queued_after: int) -> None:
        """The end-of-stream padding was queued: what counts as fed stays where it was
        (the padding completes the last hop; no message waits for it)."""
        self.put16 = self.fed16(queued_before) + queued_after

    def due(self, queued: int, hop_waiting: bool) -> Iterator[Owed]:
        """Pop and yield the messages whose answer is due now, in order."""
        if hop_waiting:
            return
        fed, owed = self.fed16(queued), self.owed
        while owed and owed[0].upto16 <= fed:
            yield owed.popleft()

    def room(self, samples_in: int, latency: int) -> int:
        """Output frames still owed for a complete stream: input + latency - sent."""
        return samples_in + latency - self.sent


@dataclass
class Session:
    """One client stream (all of its channels) around one :class:`ChannelStream`."""

    sid: str
    ident: bytes
    served: Served
    fmt: str
    cs: ChannelStream
    last_seen: float = 0.0
    closing: str | None = None
    overruns: int = 0
    #: The client the hello came from (its CurveZMQ key or its connection; the per-client
    #: session limit, see rtns.daemon.clients).
    peer: str = "local"
    #: Slots and the peer's count given back (see Server._release).
    released: bool = False
    ledger: Ledger = field(default_factory=Ledger)

    @property
    def owed(self) -> int:
        """Frames still to send for a complete stream: input + latency - sent."""
        return self.ledger.room(self.cs.samples_in, self.cs.latency)

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
