"""A Python client for ``rtns serve`` (tests, benchmarks, ``rtns stream``).

One :class:`Client` owns one DEALER socket and at most one session. Low level:
:meth:`Client.hello`, :meth:`Client.send_audio`, :meth:`Client.recv`,
:meth:`Client.close_session`. High level: :meth:`Client.enhance` streams a whole signal
(real-time paced or as fast as the server allows) and returns it time-aligned and of the
input's length, like :func:`rtns.engine.enhance_array`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from rtns.atten import AttenLimit
from rtns.daemon import protocol as P
from rtns.errors import RtnsError
from rtns.framing import SAMPLE_RATE
from rtns.streams import aligned


class ServerError(RtnsError):
    """The server answered with an ``error`` message (``code`` as in the protocol)."""

    def __init__(self, err: P.Error) -> None:
        super().__init__(f"server refused: {err.message} ({err.code})")
        self.code = err.code
        self.error = err


class _SessionEnded(Exception):
    """A ``closed`` arrived while streaming (the server ended the session)."""

    def __init__(self, tail: np.ndarray | None) -> None:
        super().__init__("session ended")
        self.tail = tail


class NoReply(RtnsError):
    """No answer within the timeout."""


class NoServer(RtnsError):
    """No endpoint of the list took the session (each was busy, draining, full or silent)."""


#: Refusals after which :func:`connect` tries the next endpoint: the server is at its
#: capacity or its session limit, or shutting down. Others (a bad hello) would repeat.
RETRY_CODES = frozenset({"busy", "draining", "server_full"})


class Client:
    """A DEALER connection to a daemon.

    ``server_key``: the server's public key file (enables CURVE); ``client_key``: this
    client's secret key file (made by ``rtns keys``). ``timeout``: seconds to wait for any
    single answer.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        context: Any = None,
        timeout: float = 10.0,
        server_key: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> None:
        import zmq

        self._zmq = zmq
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://["):
            self.sock.setsockopt(zmq.IPV6, 1)  # an IPv6 server address
        if server_key is not None:
            import zmq.auth

            if client_key is None:
                raise RtnsError("CURVE needs both the server's public key and a client secret key")
            server_pub, _ = zmq.auth.load_certificate(str(server_key))
            pub, secret = zmq.auth.load_certificate(str(client_key))
            if secret is None:
                raise RtnsError(f"{client_key}: not a secret key file")
            self.sock.curve_serverkey = server_pub
            self.sock.curve_publickey = pub
            self.sock.curve_secretkey = secret
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.timeout = timeout
        self.ready: P.Ready | None = None
        self.seq = 0
        self.closed: P.Closed | None = None

    # -- low level ------------------------------------------------------------------------
    def send_frames(self, frames: list[bytes]) -> None:
        """Send raw frames (tests use this for hostile input)."""
        self.sock.send_multipart(frames)

    def recv(self, timeout: float | None = None) -> tuple[Any, np.ndarray | None]:
        """The next server message and its PCM as float32 [frames, channels] (or None)."""
        t = self.timeout if timeout is None else timeout
        if not self.sock.poll(int(t * 1000)):
            raise NoReply(f"no answer from {self.endpoint} within {t:g} s")
        frames = self.sock.recv_multipart()
        msg = P.parse_server(frames)
        pcm = None
        if len(frames) > 1 and self.ready is not None:
            pcm = P.decode_pcm(frames[1], self.ready.format, self.ready.channels)
        return msg, pcm

    def hello(
        self,
        sample_rate: int = SAMPLE_RATE,
        format: str = "f32le",
        channels: int = 1,
        model: str | None = None,
        atten_lim_db: AttenLimit | str | float | None = None,
    ) -> P.Ready:
        """Open a session; raises ServerError on refusal, NoReply when nobody answers."""
        hello = P.Hello(
            version=P.PROTOCOL_VERSION,
            sample_rate=sample_rate,
            format=format,  # type: ignore[arg-type]
            channels=channels,
            model=model,
            atten_lim_db=None if atten_lim_db is None else AttenLimit.parse(atten_lim_db).wire(),
        )
        self.sock.send(P.encode(hello))
        try:
            msg, _ = self.recv()
        except NoReply:
            raise NoReply(
                f"no answer to hello from {self.endpoint} within {self.timeout:g} s (is "
                "`rtns serve` running there? with CURVE, is this client's key allowed?)"
            ) from None
        if isinstance(msg, P.Error):
            raise ServerError(msg)
        if not isinstance(msg, P.Ready):
            raise RtnsError(f"expected ready, got {msg}")
        self.ready = msg
        self.seq = 0
        self.closed = None
        return msg

    def send_audio(self, x: np.ndarray, seq: int | None = None) -> int:
        """Send float32 samples [n] or [n, channels]; returns the seq used."""
        assert self.ready is not None, "hello first"
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[:, None]
        s = self.seq if seq is None else seq
        pcm = P.encode_pcm(x, self.ready.format)
        if len(pcm) > self.ready.max_message_bytes:
            # The server would drop the connection (ZMQ_MAXMSGSIZE) and we would time out.
            raise RtnsError(
                f"a frame of {len(pcm)} bytes is too large for this server (its limit is "
                f"{self.ready.max_message_bytes} bytes); send smaller chunks"
            )
        self.sock.send_multipart([P.encode_audio(s), pcm], copy=False)
        if seq is None:
            self.seq += 1
        return s

    def stats(self, reset: bool = False) -> dict:
        self.sock.send(P.encode(P.StatsRequest(reset=reset)))
        while True:
            msg, _ = self.recv()
            if isinstance(msg, dict):
                return msg
            if isinstance(msg, P.Error) and msg.code == "not_allowed":
                raise ServerError(msg)

    def close_session(self) -> tuple[list[tuple[Any, np.ndarray | None]], np.ndarray]:
        """Send ``close``; returns the messages that came before ``closed`` and the tail."""
        self.sock.send(P.encode(P.Close()))
        before = []
        while True:
            msg, pcm = self.recv()
            if isinstance(msg, P.Closed):
                self.closed = msg
                assert pcm is not None
                return before, pcm
            if isinstance(msg, P.Error) and (msg.fatal or msg.code == "no_session"):
                raise ServerError(msg)  # no closed will come
            before.append((msg, pcm))

    def close(self) -> None:
        """Close the socket (and the context if this client made it)."""
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- high level -----------------------------------------------------------------------
    def enhance(
        self,
        x: np.ndarray,
        sample_rate: int = SAMPLE_RATE,
        *,
        chunk: int = 512,
        realtime: bool = False,
        window: int = 32,
        model: str | None = None,
        format: str = "f32le",
        atten_lim_db: float | None = None,
    ) -> np.ndarray:
        """Stream ``x`` (float32 [n] or [n, channels]) through a new session.

        ``realtime``: send one ``chunk`` every chunk duration; else keep up to ``window``
        messages in flight. A ``queue_full`` answer makes the client resend that chunk.
        Returns the output with the first ``latency`` samples dropped, cut to ``n``: the
        same shape and alignment as :func:`rtns.engine.enhance_array`.
        """
        x = np.asarray(x, dtype=np.float32)
        channels = 1 if x.ndim == 1 else x.shape[1]
        self.hello(sample_rate, format, channels, model, atten_lim_db)
        return self.stream(x, chunk=chunk, realtime=realtime, window=window)

    def stream(
        self, x: np.ndarray, *, chunk: int = 512, realtime: bool = False, window: int = 32
    ) -> np.ndarray:
        """:meth:`enhance` in the session already open (after :meth:`hello`, or
        :func:`connect`): streams ``x`` at the session's rate, closes the session and
        returns the aligned output."""
        ready = self.ready
        assert ready is not None, "hello first"
        x = np.asarray(x, dtype=np.float32)
        mono = x.ndim == 1
        xs = x[:, None] if mono else x
        chunks = [xs[i : i + chunk] for i in range(0, xs.shape[0], chunk)]
        # Never queue more than the server holds (in 16 kHz frames) when sending fast.
        chunk16 = -(-chunk * SAMPLE_RATE // ready.sample_rate) + 1
        pump = _Pump(self, chunks, max(1, min(window, ready.queue_limit // chunk16)))
        period = chunk / ready.sample_rate if realtime else 0.0
        try:
            pump.run(period)
            before, tail = self.close_session()
            for msg, pcm in before:
                pump.handle(msg, pcm)
        except _SessionEnded as end:
            reason = self.closed.reason if self.closed else "?"
            if pump.k < len(chunks) or reason != "shutdown":
                raise RtnsError(
                    f"the server ended the session ({reason}) after {pump.k} of "
                    f"{len(chunks)} chunks were sent; the output is incomplete"
                ) from None
            # Everything was sent: a shutting-down server flushes it all, tail included.
            tail = end.tail if end.tail is not None else np.zeros((0, xs.shape[1]), np.float32)
        pump.outs.append(tail)
        y = aligned(np.concatenate(pump.outs), ready.latency, xs.shape[0])
        return y[:, 0] if mono else y


class _Pump:
    """The sending and receiving loop of :meth:`Client.stream`: ``chunks`` go out as seqs
    0.., at most ``window`` unanswered; answers collect in ``outs``; a ``queue_full``
    rewinds to its seq and holds sending until an answer shows the queue moved."""

    def __init__(self, client: Client, chunks: list[np.ndarray], window: int) -> None:
        self.client = client
        self.chunks = chunks
        self.window = window
        self.outs: list[np.ndarray] = []
        self.inflight: set[int] = set()
        self.k = 0  # next seq to send
        self.gate = True  # False after queue_full until an answer shows the queue moved
        self.rewound = False

    def handle(self, msg: Any, pcm: np.ndarray | None) -> None:
        if isinstance(msg, P.AudioOut):
            self.inflight.discard(msg.seq)
            assert pcm is not None
            self.outs.append(pcm)
            self.gate = True
        elif isinstance(msg, P.Error) and msg.code == "queue_full" and msg.seq is not None:
            if not any(q < msg.seq for q in self.inflight):
                raise ServerError(msg)  # nothing ahead of it will drain: it never fits
            # The server drops this seq and every later one (seq_gap): resend from it.
            self.inflight.difference_update({q for q in self.inflight if q >= msg.seq})
            self.k, self.gate, self.rewound = msg.seq, False, True
        elif isinstance(msg, P.Error) and msg.code == "seq_gap" and self.rewound:
            pass  # a copy sent after a refused seq; it is resent after the rewind
        elif isinstance(msg, P.Error):
            raise ServerError(msg)
        elif isinstance(msg, P.Closed):
            # The server ended the session (it is shutting down): that is the end.
            self.client.closed = msg
            raise _SessionEnded(pcm)

    def run(self, period: float) -> None:
        """Until every chunk is sent and answered; ``period`` > 0: one chunk per period."""
        c, n = self.client, len(self.chunks)
        t0 = time.monotonic()
        while self.k < n or self.inflight:
            if self.k < n and self.gate and len(self.inflight) < self.window:
                wait = t0 + self.k * period - time.monotonic() if period else 0.0
                if wait > 0:
                    if c.sock.poll(int(wait * 1000) + 1):
                        self.handle(*c.recv())
                    continue
                c.send_audio(self.chunks[self.k], seq=self.k)
                self.inflight.add(self.k)
                self.k += 1
                c.seq = self.k
                continue
            self.handle(*c.recv())


def connect(
    endpoints: str | list[str],
    *,
    sample_rate: int = SAMPLE_RATE,
    format: str = "f32le",
    channels: int = 1,
    model: str | None = None,
    atten_lim_db: AttenLimit | str | float | None = None,
    **client: Any,
) -> Client:
    """A :class:`Client` with a session open on the first of ``endpoints`` that takes it.

    An endpoint that refuses with ``busy``, ``draining`` or ``server_full``, or does not
    answer the hello within ``timeout`` (no daemon there: ZeroMQ reconnects silently), is
    skipped for the next; any other refusal is raised as it is (it would repeat). Raises
    :class:`NoServer`, naming each endpoint and why, when none takes it. ``client``: the
    keyword arguments of :class:`Client` (timeout, keys, context)."""
    endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    why = []
    for endpoint in endpoints:
        c = Client(endpoint, **client)
        try:
            c.hello(sample_rate, format, channels, model, atten_lim_db)
            return c
        except ServerError as e:
            c.close()
            if e.code not in RETRY_CODES:
                raise
            why.append(f"{endpoint}: {e.code}")
        except NoReply:
            c.close()
            why.append(f"{endpoint}: no answer")
        except BaseException:
            c.close()
            raise
    raise NoServer("no daemon took the session (" + "; ".join(why) + ")")
