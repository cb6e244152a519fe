"""``rtns serve``: a ZeroMQ ROUTER daemon that enhances many client streams at once.

One thread runs everything (no locks): it polls the socket with a timeout, drains the
messages that have arrived, then *ticks*. Each model has one :class:`rtns.bank.StreamBank`
and each session's channels are slots of it (its :class:`rtns.streams.ChannelStream` puts
the decoded input straight into their input rings). A tick round is ``bank.ready()`` and
one ``bank.step(collect=True)``: every slot with a complete 128-sample hop is one row, run
in chunks of at most ``max_batch`` rows per :meth:`rtns.engine.Model.infer` call (states
gathered from and scattered back into the bank's rows). Rounds repeat while hops are
ready, at most ``hops_per_tick``, so one client sending a long chunk cannot starve the
others; left-over input stays in the session's bounded queue and the loop polls with a
zero timeout until it is processed. Each audio message is answered once all its samples
have been fed and every completed hop run, with all output produced since the previous
answer.

Batch independence: a session's output must not depend on which other sessions are active.
onnxruntime's CPU kernels (MLAS GEMM/LSTM, element-wise kernels) and numpy's FFT compute
each row with the same instruction sequence whatever the batch size on the machines we
measured (tests/test_server.py checks bit identity alone vs among 50 others), but nothing
in their contracts promises it. So the server runs at most ``max_batch`` rows per call, and
at start probes each model at every batch size up to that (:func:`batch_invariant`); if any
row differs in any bit from batch 1, the model's batches are capped at the largest power of
two at which none does, or it runs one row per call (independent by construction); the log,
stats and `ready` say which and why. See docs/protocol.md, "Batching".
"""

from __future__ import annotations

import collections
import gc
import ipaddress
import logging
import math
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rtns.atten import AttenLimit
from rtns.bank import StreamBank, batch_invariant
from rtns.config import EngineConfig
from rtns.daemon import protocol as P
from rtns.daemon.capacity import Capacity, probe_hop_s
from rtns.daemon.clients import ConnectionWatch, client_key, describe
from rtns.daemon.lifecycle import Lifecycle
from rtns.daemon.logs import log, log_event
from rtns.daemon.metrics import LATE_S, DaemonMetrics, NoMetrics, PendingMetrics
from rtns.daemon.session import Served, Session
from rtns.engine import Model
from rtns.errors import UserInputError
from rtns.pack import DEFAULT_SERVE_PACK
from rtns.streams import ChannelStream

#: zmq send flags as plain ints (the hot path; see Server._send_raw).
_NOBLOCK = 1  # zmq.NOBLOCK
_MORE_NOBLOCK = 3  # zmq.SNDMORE | zmq.NOBLOCK

#: Relay control frame: the supervisor tells a worker that a client's connection is gone.
VANISHED = b"\x00vanished"


class CurveConfig(BaseModel):
    """CurveZMQ: the server's secret certificate and a folder of allowed client public keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server_secret: Path
    allowed_clients: Path


def load_client_keys(folder: Path) -> list[bytes]:
    """The public keys of ``folder``'s ``*.key`` files (CurveZMQ certificates, as pyzmq's
    authenticator reads them), each checked: one malformed file makes the authenticator drop
    every key, so it is refused here, by name. A missing or empty folder is refused too (a
    server nobody can reach)."""
    import zmq.auth
    from zmq.utils import z85

    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "no such folder"
        raise UserInputError(f"--allowed-clients {folder}: {what} (of clients' public *.key files)")
    keys = []
    for path in sorted(folder.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
            if len(public) != 40 or len(z85.decode(public)) != 32:
                raise ValueError("the public key is not 40 Z85 characters")
        except (OSError, ValueError, UnicodeDecodeError, KeyError, struct.error) as e:
            raise UserInputError(
                f"--allowed-clients {folder}: {path.name} is not a CurveZMQ public key file "
                f"({e}); fix or remove it (`rtns keys DIR` makes them)"
            ) from None
        keys.append(public)
    if not keys:
        raise UserInputError(
            f"--allowed-clients {folder}: holds no *.key files, so no client could connect "
            "(copy the clients' NAME.key files there; `rtns keys DIR` makes them)"
        )
    return keys


def _invariant_cap(model: Model, max_batch: int) -> int:
    """The largest power of two below ``max_batch`` at which :func:`batch_invariant` holds
    (1: none does)."""
    cap = 1
    while cap * 2 < max_batch:
        cap *= 2
    while cap > 1 and not batch_invariant(model, cap):
        cap //= 2
    return cap


class ServerConfig(BaseModel):
    """Everything ``rtns serve`` can be told (validated once, at start)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    bind: str = "tcp://127.0.0.1:5555"
    #: Pack names or folders; sessions pick by manifest name, the first is the default.
    models: list[str] = Field(default_factory=lambda: [DEFAULT_SERVE_PACK])
    max_sessions: int = Field(256, ge=1, le=100_000)
    #: ZMQ_MAXMSGSIZE on the socket (bytes, per frame): a larger frame drops the connection.
    max_message_bytes: int = Field(262_144, ge=1024, le=1 << 30)
    #: Seconds without any message after which a session is ended.
    idle_timeout: float = Field(30.0, gt=0, le=86_400.0)
    #: Queued input per session, sample frames at 16 kHz (6 s; at most 60 s): more gives
    #: ``queue_full``.
    queue_limit: int = Field(96_000, ge=128, le=960_000)
    #: Hops are collected every this many ms (the clocked tick; at most one hop, 8 ms, so
    #: an answer is never held longer than a hop).
    tick_ms: float = Field(4.0, gt=0, le=8.0)
    #: Most hops one session gets per tick (fairness between big and small chunks).
    hops_per_tick: int = Field(8, ge=1, le=32)
    #: False: one infer per session and hop (for comparison; ``--no-batch``).
    batch: bool = True
    #: Most rows in one infer call; more ready rows run in several calls. The start-up
    #: probe checks every batch size up to this one.
    max_batch: int = Field(128, ge=1, le=1024)
    #: Skip the batch-invariance probe (tests that want a known mode).
    probe: bool = True
    poll_ms: int = Field(50, ge=1, le=1000)
    #: Log a ``stats`` line every this many seconds (0: never).
    stats_every: float = Field(60.0, ge=0, le=86_400.0)
    #: After drain() (SIGTERM): open sessions may run this long before they are flushed.
    drain_seconds: float = Field(30.0, ge=0, le=86_400.0)
    #: Admission control (rtns.daemon.capacity): "auto" refuses a hello with ``busy`` when
    #: its channels would take the open streams past the measured capacity; a number fixes
    #: the capacity in channel streams; "off" admits up to max_sessions (the estimate is
    #: still measured and shown). `rtns serve` defaults to "auto".
    capacity: Literal["auto", "off"] | Annotated[int, Field(ge=1, le=1_000_000)] = "off"
    #: The share of the loop's time the capacity may fill (the rest is slack).
    headroom: float = Field(0.7, gt=0.0, le=1.0)
    curve: CurveConfig | None = None
    #: Refuse non-loopback binds without CURVE (always True outside tests of that check).
    require_curve_off_loopback: bool = True
    #: Socket receive high-water mark, and a ceiling on the send one (messages).
    hwm: int = Field(10_000, ge=10)
    #: Answers queued for one client that does not read, in bytes (the send high-water mark
    #: is this over the largest answer, max_message_bytes); beyond it answers are dropped
    #: and counted (``send_hwm``), never blocking the server.
    max_output_bytes: int = Field(64 * 2**20, ge=2**16, le=2**36)
    #: Sessions one client may hold: one CurveZMQ key, or (without CURVE) one connection.
    #: None: half of max_sessions.
    max_sessions_per_peer: int | None = Field(None, ge=1, le=100_000)
    #: Let clients reset the stats counters (benchmarks); off, a reset request is refused.
    allow_stats_reset: bool = False
    #: Internal: a worker of `rtns serve --workers` (a PAIR socket at ``bind`` carrying
    #: [client id, peer address, frames...] from the supervisor).
    relay: bool = False
    #: Record Prometheus metrics (``rtns serve --metrics-port``; see rtns.daemon.metrics).
    metrics: bool = False
    #: Worker processes of the whole daemon (the ``rtns_workers`` metric).
    workers_total: int = Field(1, ge=1)
    #: Once loaded, move every object out of the garbage collector's sight (``gc.freeze``:
    #: no multi-millisecond collections in the loop). Process-wide, so only for a process
    #: that is the daemon (`rtns serve` and its workers), never for a Server embedded in
    #: another program.
    freeze_gc: bool = False
    engine: EngineConfig = EngineConfig()


def wants_ipv6(endpoint: str) -> bool:
    """tcp:// with a bracketed IPv6 host or the wildcard: the socket needs ZMQ_IPV6."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    return host.startswith("[") or host == "*"


def is_loopback(endpoint: str) -> bool:
    """True for inproc://, ipc:// and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("inproc://", "ipc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    if host == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name, '*', or a host name: not provably loopback
        return False


def check_bind(config: ServerConfig) -> None:
    """Refuse a plaintext bind off loopback (one line, before anything starts)."""
    if config.require_curve_off_loopback and not is_loopback(config.bind) and config.curve is None:
        raise UserInputError(
            f"binding to {config.bind} (not loopback) requires CurveZMQ keys: pass "
            "--curve-secret and --allowed-clients (make keys with `rtns keys DIR`)"
        )


def send_hwm(config: ServerConfig) -> int:
    """The public socket's send high-water mark in messages for ``max_output_bytes``.

    ZeroMQ counts messages, not bytes: an answer is at most about max_message_bytes, so this
    many queued answers stay under max_output_bytes (at least 64, because the pipe
    acknowledges reads in batches of half its high-water mark: at 64 a burst of 50 small
    answers was measured to overflow, at 256 not)."""
    return min(config.hwm, max(64, config.max_output_bytes // config.max_message_bytes))


def io_context() -> Any:
    """A zmq context whose I/O thread (TCP reads and writes) runs SCHED_BATCH: waking it
    (each answer sent, each message arrived) then does not preempt the loop, so on one core
    its work runs in batches while the loop waits in poll instead of costing two context
    switches per message."""
    import zmq

    ctx = zmq.Context()
    if hasattr(os, "SCHED_BATCH"):  # Linux
        ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    return ctx


def open_front_socket(ctx: Any, config: ServerConfig) -> tuple[Any, Any, str]:
    """The public ROUTER socket with every option of ``config`` (CURVE with its
    authenticator thread, message size, high-water marks, IPv6), bound. Returns (socket,
    authenticator or None, the bound endpoint)."""
    import zmq

    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, send_hwm(config))
    sock.setsockopt(zmq.RCVHWM, config.hwm)
    if wants_ipv6(config.bind):
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT, and dual stack for tcp://*
    auth = None
    curve = config.curve
    if curve is not None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        pub, secret = zmq.auth.load_certificate(str(curve.server_secret))
        if secret is None:
            sock.close(linger=0)
            raise UserInputError(f"{curve.server_secret}: not a secret key file")
        try:
            n_keys = len(load_client_keys(curve.allowed_clients))
        except UserInputError:
            sock.close(linger=0)
            raise
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("rtns.daemon.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(curve.allowed_clients))
        sock.curve_secretkey = secret
        sock.curve_publickey = pub
        sock.curve_server = True
        log_event(
            "curve",
            allowed_clients=str(curve.allowed_clients),
            keys=n_keys,
            note="CurveZMQ on: only clients whose public key is in that folder get in",
        )
    else:
        log_event("curve", note="CurveZMQ off: plaintext, loopback only")
    try:
        sock.bind(config.bind)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        raise UserInputError(f"cannot bind {config.bind}: {e.strerror}") from None
    return sock, auth, sock.getsockopt_string(zmq.LAST_ENDPOINT) or config.bind


class Server(Lifecycle):
    """The daemon. ``run()`` blocks until ``stop()``; everything else is internal."""

    def __init__(self, config: ServerConfig, context: Any = None) -> None:
        import zmq

        assert (zmq.NOBLOCK, zmq.SNDMORE | zmq.NOBLOCK) == (_NOBLOCK, _MORE_NOBLOCK)
        self.config = config
        check_bind(config)
        self._zmq = zmq
        self._own_ctx = context is None
        # A relay worker's only socket is the supervisor's ipc pipe: no TCP work to defer.
        self.ctx = context or (zmq.Context() if config.relay else io_context())
        self.metrics = DaemonMetrics() if config.metrics else NoMetrics()
        self.metrics.workers.set(config.workers_total)
        self.models: dict[str, Served] = {}
        for spec in config.models:
            model = Model(spec, config.engine)
            if model.name in self.models:
                raise UserInputError(f"two --model packs are both named {model.name!r}")
            max_batch = config.max_batch
            if not config.batch:
                batched, why = False, "--no-batch"
            elif not config.probe:
                batched, why = True, "probe skipped"
            elif batch_invariant(model, max_batch):
                batched = True
                why = f"rows bit-identical at every batch size 1..{max_batch}"
            else:
                # Degraded, loudly (the log's "model" event, stats and `ready` say so, and
                # load.py prints it): the largest power-of-two cap at which every row still
                # equals its batch-1 run, else one row per call.
                max_batch = _invariant_cap(model, max_batch)
                batched = max_batch > 1
                why = (
                    f"batches capped at {max_batch} rows: rows differ from batch 1 at "
                    f"{config.max_batch} rows on this CPU"
                    if batched
                    else "batched rows differ from batch 1 on this CPU"
                )
                log.warning(
                    "batching capped" if batched else "batching off",
                    extra={"fields": {"model": model.name, "why": why}},
                )
            bank = StreamBank(
                model,
                capacity=min(config.max_sessions, 64),
                max_batch=max_batch if batched else 1,
                max_capacity=config.max_sessions * P.MAX_CHANNELS,
            )
            self.models[model.name] = Served(model, batched, why, bank)
            self.metrics.batching.labels(model.name, why).set(1 if batched else 0)
        self.default_model = next(iter(self.models))
        prior = max(probe_hop_s(s.model, min(64, s.bank.max_batch)) for s in self.models.values())
        self.capacity = Capacity(config.capacity, config.headroom, prior)
        #: Channel streams of the open sessions (what the capacity counts).
        self.open_streams = 0
        self.sessions: dict[bytes, Session] = {}
        #: Sessions with work (input queued, answers owed, closing), by client id.
        self._active: dict[bytes, Session] = {}
        #: Open sessions per client (see rtns.daemon.clients.client_key).
        self.per_peer: collections.Counter[str] = collections.Counter()
        self.peer_limit = config.max_sessions_per_peer or max(1, config.max_sessions // 2)
        #: Disconnects of the public socket's connections (None for a relay worker).
        self._watch: ConnectionWatch | None = None
        Lifecycle.__init__(self)  # stop/drain events, bound, heartbeat (/healthz, /readyz)
        #: The drain's deadline (time.monotonic) once draining; None before.
        self.drain_until: float | None = None
        self._auth: Any = None
        self._peer_frame: Any = None
        self._relay_peer = "local"
        self.sock: Any = None
        self.endpoint: str | None = None
        #: Per-message metric updates, handed to the recorder once a tick.
        self._pending = PendingMetrics()
        self._reset_counters()

    # -- counters -------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.infer_ms: collections.deque[float] = collections.deque(maxlen=100_000)
        self.rows_per_tick: collections.deque[int] = collections.deque(maxlen=100_000)
        self.started = time.monotonic()
        self._cpu0 = time.process_time()

    # -- life cycle -----------------------------------------------------------------------
    def _open(self) -> None:
        zmq = self._zmq
        if self.config.relay:
            # A worker behind `rtns serve --workers`: the supervisor owns the public socket
            # (CURVE, message size, peers) and relays [client id, peer, frames...] here.
            sock = self.ctx.socket(zmq.PAIR)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.bind(self.config.bind)
            self.endpoint = self.config.bind
        else:
            sock, self._auth, self.endpoint = open_front_socket(self.ctx, self.config)
            self._watch = ConnectionWatch(sock)
        self.sock = sock
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        if self._watch is not None:
            self.poller.register(self._watch.monitor, zmq.POLLIN)
        for name, s in self.models.items():
            log_event(
                "model",
                name=name,
                pack=str(s.model.pack_dir),
                latency=s.model.latency,
                batched=s.batched,
                why=s.why,
            )
        self.capacity.log()
        self._measure(time.monotonic())
        log_event("listening", endpoint=self.endpoint, max_sessions=self.config.max_sessions)
        self.bound.set()

    def run(self) -> None:
        """Serve until :meth:`stop`; then flush every open session and close the socket."""
        try:
            self._open()
            if self.config.freeze_gc:
                # Everything loaded so far (models, buffers) lives as long as the loop:
                # out of the collector's sight, a collection of the objects the hot path
                # makes scans only those (a generation-1 pass over everything took 4-5 ms,
                # every answer of that tick later by as much; benchmarks/daemon_loop.py).
                gc.collect()
                gc.freeze()
            # Client data (huge or odd samples) must not print numpy warnings into the log.
            with np.errstate(all="ignore"):
                self._loop()
                self._shutdown()
        finally:
            if self._watch is not None:
                self._watch.close()
            if self.sock is not None:
                self.sock.close(linger=1000)
            if self._auth is not None:
                self._auth.stop()
            if self._own_ctx:
                self.ctx.term()
            log_event("stopped")

    def _loop(self) -> None:
        """Poll, drain, tick on the clock, expire idle sessions, log stats; until stop()."""
        next_expiry = time.monotonic() + 0.5
        next_stats = time.monotonic() + self.config.stats_every
        # The clock: hops are collected on a fixed cadence (half a hop by default), not
        # per message, so each tick carries the hops of many sessions in one batch.
        tick_s = self.config.tick_ms / 1e3
        next_tick = time.monotonic()
        busy = work = False
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if busy or work:
                wait_ms = max(0.0, 1e3 * (next_tick - time.monotonic()))
                events = self.poller.poll(math.ceil(wait_ms))
            else:
                events = self.poller.poll(self.config.poll_ms)
            t_work = time.perf_counter()
            if events:
                self._reap()
                self._drain()
                work = True
            now = time.monotonic()
            everyone = work and len(self._active) >= len(self.sessions)
            if (now >= next_tick and (busy or work)) or everyone:
                # On the clock: every tick_ms, whatever the message rate, so a tick carries
                # the hops of many sessions. At once: after an idle spell, or when every
                # open session has work (nothing to wait for: a lone client is not delayed).
                self._tick()
                work = False
                now = time.monotonic()
                next_tick = now + tick_s
                busy = bool(self._active)
            if now >= next_expiry:
                self._expire(now)
                self._measure(now)
                next_expiry = now + 0.5
                if self._drained(now):
                    return
            if self.config.stats_every and now >= next_stats:
                st = self.stats()
                log_event(
                    "stats",
                    sessions=st["sessions"],
                    blocks=st["blocks_processed"],
                    overruns=st["overruns"],
                    dropped=sum(st["dropped"].values()),
                    tick_p50_ms=st["tick_infer_ms"]["p50"],
                    tick_p99_ms=st["tick_infer_ms"]["p99"],
                )
                next_stats = now + self.config.stats_every
            self.capacity.work(time.perf_counter() - t_work, 0)

    def _measure(self, now: float) -> None:
        """Close the capacity's measuring window (about once a second) and show it."""
        cap = self.capacity
        cap.update(now, self.open_streams)
        self.metrics.capacity.set(cap.streams if cap.streams is not None else -1)
        self.metrics.hop_cost.set(cap.hop_s)
        self.metrics.streams_open.set(self.open_streams)

    def _drained(self, now: float) -> bool:
        """Draining (after drain()): True once no session is open or the deadline passed."""
        if not self._draining.is_set():
            return False
        if self.drain_until is None:
            self.drain_until = now + self.config.drain_seconds
            self.metrics.draining.set(1)
            log_event("drain", sessions=len(self.sessions), seconds=self.config.drain_seconds)
        return not self.sessions or now >= self.drain_until

    def _shutdown(self, deadline_s: float = 5.0) -> None:
        """Close every session, sending its tail and ``closed`` (reason ``shutdown``)."""
        log_event("shutdown", sessions=len(self.sessions))
        for s in list(self.sessions.values()):
            if s.closing is None:
                self._begin_close(s, "shutdown")
        end = time.monotonic() + deadline_s
        while self.sessions and time.monotonic() < end:
            self._tick()
        for s in list(self.sessions.values()):
            self._end(s, "error", send=True)

    # -- receiving ------------------------------------------------------------------------
    def _drain(self, max_messages: int = 512) -> None:
        zmq = self._zmq
        recv = self.sock.recv
        for _ in range(max_messages):
            try:
                # The identity frame as a Frame: it carries the peer's address (hello only).
                first = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            # Every part as a Frame, whose ``more`` is read from the message itself
            # (``sock.get(RCVMORE)`` builds an option enum per call: 15-20 % of this loop).
            body = []
            part = first
            while part.more:
                part = recv(copy=False)
                body.append(part.bytes)
            ident = first.bytes
            if self.config.relay:
                if len(body) < 2:
                    continue  # not from the supervisor's relay
                self._relay_peer = body[0].decode("utf-8", "replace")
                body = body[1:]
                if body == [VANISHED]:
                    self._vanished(ident)
                    continue
            self.counters["messages_in"] += 1
            self._peer_frame = first
            try:
                self._handle(ident, body)
            except P.ProtocolError as e:
                self.dropped[e.code] += 1
                self.metrics.errors.labels(e.code).inc()
                self._send(ident, P.Error(code=e.code, message=e.message, seq=e.seq))
            except Exception:  # a bug must cost one session, never the daemon
                log.exception("internal error handling a message")
                self.dropped["internal"] += 1
                self.metrics.errors.labels("internal").inc()
                sess = self.sessions.get(ident)
                if sess is not None:
                    self._end(sess, "error", send=False)
                self._send(
                    ident,
                    P.Error(
                        code="internal", message="the server failed on this message", fatal=True
                    ),
                )

    def _handle(self, ident: bytes, frames: list[bytes]) -> None:
        sess = self.sessions.get(ident)
        if sess is not None:
            sess.last_seen = time.monotonic()
            seq = P.audio_seq(frames)
            if seq is not None and not sess.closing:  # the hot path: no header objects
                self._audio(sess, seq, frames[1])
                return
        msg = P.parse_client(frames)
        if isinstance(msg, P.Audio):
            if sess is None or sess.closing:
                raise P.ProtocolError(
                    "no_session", "no open session on this connection; send a hello first", msg.seq
                )
            self._audio(sess, msg.seq, frames[1])
        elif isinstance(msg, P.Hello):
            self._hello(ident, msg)
        elif isinstance(msg, P.Close):
            if sess is None or sess.closing:
                raise P.ProtocolError("no_session", "close without an open session")
            self._begin_close(sess, "close")
        elif isinstance(msg, P.StatsRequest):
            if msg.reset and not self.config.allow_stats_reset:
                raise P.ProtocolError(
                    "not_allowed", "this server's operator did not allow stats resets"
                )
            self._send_raw(ident, [P.encode_dict(self.stats())])
            if msg.reset:
                self._reset_counters()
        else:
            self._send(ident, P.Pong(time=time.time()))

    def _admit(self, ident: bytes, msg: P.Hello) -> tuple[Served, str]:
        """The model and client of a hello this server takes; else a ProtocolError
        (``already_open``, ``draining``, ``bad_version``, ``unknown_model``, ``server_full``)."""
        if ident in self.sessions:
            raise P.ProtocolError("already_open", "this connection already has an open session")
        if self._draining.is_set():
            self.counters["refused_draining"] += 1
            raise P.ProtocolError(
                "draining", "this server is shutting down and takes no new sessions; use another"
            )
        if msg.version != P.PROTOCOL_VERSION:
            raise P.ProtocolError(
                "bad_version",
                f"protocol version {msg.version} is not supported; this server speaks "
                f"{P.PROTOCOL_VERSION}",
            )
        name = msg.model or self.default_model
        served = self.models.get(name)
        if served is None:
            raise P.ProtocolError(
                "unknown_model", f"no model {name[:60]!r}; this server has {sorted(self.models)}"
            )
        self._reap()  # sessions of connections gone by now no longer count
        peer = self._peer(ident)
        if self.per_peer[peer] >= self.peer_limit:
            self.counters["refused_peer"] += 1
            raise P.ProtocolError(
                "server_full",
                f"{describe(peer)} already holds {self.per_peer[peer]} sessions, the most one "
                f"client may (--max-sessions-per-peer {self.peer_limit})",
            )
        if len(self.sessions) >= self.config.max_sessions:
            self.counters["refused_full"] += 1
            raise P.ProtocolError(
                "server_full", f"the server is at its limit of {self.config.max_sessions} sessions"
            )
        if not self.capacity.admits(self.open_streams, msg.channels):
            self.counters["refused_busy"] += 1
            raise P.ProtocolError(
                "busy",
                f"{self.open_streams} channel streams are open and this server's measured "
                f"capacity is {self.capacity.streams}; try another server",
            )
        return served, peer

    def _hello(self, ident: bytes, msg: P.Hello) -> None:
        served, peer = self._admit(ident, msg)
        name = served.model.name
        model = served.model
        cs = ChannelStream(model, msg.channels, msg.sample_rate, bank=served.bank)
        if msg.atten_lim_db is not None:  # None: the pack's default
            cs.atten_lim = AttenLimit.parse(msg.atten_lim_db)
        sess = Session(
            sid=secrets.token_hex(6),
            ident=ident,
            served=served,
            fmt=msg.format,
            cs=cs,
            last_seen=time.monotonic(),
        )
        sess.peer = peer
        if self._watch is not None:
            self._watch.tie(ident, self._peer_frame)
        for slot in cs.slots.tolist():
            served.owner[slot] = sess
        self.per_peer[peer] += 1
        self.sessions[ident] = sess
        self.open_streams += cs.channels
        self.counters["sessions_opened"] += 1
        self.metrics.sessions.inc()
        self.metrics.sessions_open.set(len(self.sessions))
        log_event(
            "open",
            session=sess.sid,
            model=name,
            rate=msg.sample_rate,
            format=msg.format,
            channels=msg.channels,
            sessions=len(self.sessions),
        )
        self._send(
            ident,
            P.Ready(
                session=sess.sid,
                model=name,
                latency=cs.latency,
                latency_16k=model.latency,
                block_shift=model.block_shift,
                sample_rate=msg.sample_rate,
                format=msg.format,
                channels=msg.channels,
                max_message_bytes=self.config.max_message_bytes,
                queue_limit=self.config.queue_limit,
                idle_timeout=self.config.idle_timeout,
                atten_lim_db=cs.atten_lim.optional(),
            ),
        )

    def _audio(self, sess: Session, seq: int, payload: bytes) -> None:
        ledger = sess.ledger
        if seq < ledger.next_seq:
            raise P.ProtocolError(
                "duplicate_seq", f"seq {seq} was already accepted; next is {ledger.next_seq}", seq
            )
        if seq > ledger.next_seq:
            raise P.ProtocolError(
                "seq_gap", f"seq {seq} skips ahead; the next expected is {ledger.next_seq}", seq
            )
        if len(payload) > self.config.max_message_bytes:
            raise P.ProtocolError(
                "too_large",
                f"PCM frame of {len(payload)} bytes is over {self.config.max_message_bytes}",
                seq,
            )
        cs = sess.cs
        try:
            x = P.decode_pcm(payload, sess.fmt, cs.channels, writable=False)
        except P.ProtocolError as e:
            e.seq = seq
            raise
        # An upper bound of the 16 kHz frames this message adds (resampling rounds).
        n16 = -(-x.shape[0] * cs.model.sample_rate // cs.rate) + 1
        if cs.queued + n16 > self.config.queue_limit:
            sess.overruns += 1
            self.counters["overruns"] += 1
            raise P.ProtocolError(
                "queue_full",
                f"queue holds {sess.queued} of {self.config.queue_limit} frames; resend seq "
                f"{seq} after an answer arrives",
                seq,
            )
        try:
            added = cs.put(x, owned=True)
        except ValueError as e:  # NaN / Inf in float PCM (decode_pcm checks first)
            raise P.ProtocolError("bad_samples", str(e), seq) from None
        ledger.accept(seq, added, time.monotonic())
        self.counters["audio_messages"] += 1
        self._pending.audio_in += x.shape[0] / cs.rate
        self._active[sess.ident] = sess

    # -- closing --------------------------------------------------------------------------
    def _begin_close(self, sess: Session, reason: str) -> None:
        """Queue the silence that pushes the last ``latency`` samples out; mark as closing."""
        before = sess.cs.queued
        sess.cs.end()
        sess.ledger.pad(before, sess.cs.queued)
        sess.closing = reason
        self._active[sess.ident] = sess

    def _end(self, sess: Session, reason: str, send: bool = True) -> None:
        """Send the tail and ``closed``; forget the session."""
        self._pending.flush(self.metrics)  # a client that saw ``closed`` sees its figures
        self.sessions.pop(sess.ident, None)
        self.counters[f"closed_{reason}"] += 1
        self._release(sess)
        cs = sess.cs
        tail = np.zeros((0, sess.channels), np.float32)
        if reason in ("close", "shutdown") and sess.closing is not None:
            owed = sess.owed
            tail = cs.take()[: max(owed, 0)]
            if tail.shape[0] < owed:  # only when the shutdown deadline cut processing short
                pad = np.zeros((owed - tail.shape[0], sess.channels), np.float32)
                tail = np.concatenate([tail, pad])
            sess.ledger.sent += tail.shape[0]
            self.metrics.audio_out.inc(tail.shape[0] / sess.rate)
        log_event(
            "close",
            session=sess.sid,
            reason=reason,
            samples_in=cs.samples_in,
            samples_out=sess.ledger.sent,
            overruns=sess.overruns,
            sessions=len(self.sessions),
        )
        if send:
            self._send_raw(
                sess.ident,
                [
                    P.encode(
                        P.Closed(
                            session=sess.sid,
                            reason=reason,  # type: ignore[arg-type]
                            samples=tail.shape[0],
                            samples_in=cs.samples_in,
                            samples_out=sess.ledger.sent,
                        )
                    ),
                    P.encode_pcm(tail, sess.fmt),
                ],
            )

    def _expire(self, now: float) -> None:
        limit = self.config.idle_timeout
        for s in list(self.sessions.values()):
            if now - s.last_seen > limit and not s.closing:
                self.dropped["timeout"] += 1
                self.metrics.errors.labels("timeout").inc()
                self._end(s, "timeout")

    # -- the tick -------------------------------------------------------------------------
    def _tick(self) -> None:
        """Run rounds of batched hops, then answer every message that is complete.

        Input already sits in the sessions' slots of each model's bank (``cs.put`` writes
        it there), so a round is ``bank.ready()`` and one ``bank.step(collect=True)`` (at
        most ``max_batch`` rows a call): array operations, no Python work per session. A
        session with a backlog beyond its input ring is topped up first. Rounds repeat
        while hops are ready, at most ``hops_per_tick``, so one client sending a long chunk
        cannot starve the others."""
        # Sessions with input queued, answers owed or closing: the ones a message touched
        # since they were last idle (kept up to date instead of scanning every session).
        active = [s for s in self._active.values() if self.sessions.get(s.ident) is s]
        backlogged = [s for s in active if s.cs.backlog]
        for served in self.models.values():
            bank = served.bank
            for _ in range(self.config.hops_per_tick):
                for s in backlogged:
                    s.cs.fill()
                slots = bank.ready()
                k = slots.shape[0]
                if not k:
                    break
                t0 = time.perf_counter()
                calls = bank.calls
                try:
                    bank.step(slots, collect=True)
                except Exception:  # a bug must cost these sessions, never the daemon
                    name = served.model.name
                    log.exception("inference failed", extra={"fields": {"model": name}})
                    owners = {id(o): o for o in map(served.owner.get, slots.tolist()) if o}
                    for g in owners.values():
                        self._fail(g)
                    break
                took = time.perf_counter() - t0
                self.counters["infer_calls"] += bank.calls - calls
                self.counters["blocks"] += k
                self.metrics.hops.inc(k)
                self.capacity.work(0.0, k)
                self.metrics.rows.observe(k)
                self.infer_ms.append(took * 1e3)
                self.metrics.inference.observe(took)
                self.rows_per_tick.append(k)
                self.counters["ticks"] += 1
        now = time.monotonic()
        for s in active:
            try:
                self._answer(s, now)
            except Exception:
                log.exception("answer failed", extra={"fields": {"session": s.sid}})
                self._fail(s)
        self._pending.flush(self.metrics)
        self._active = {
            s.ident: s
            for s in active
            if self.sessions.get(s.ident) is s and (s.queued or s.ledger.owed or s.closing)
        }

    def _release(self, sess: Session) -> None:
        """Give the session's stream slots back and its peer's count (once)."""
        if sess.released:
            return
        sess.released = True
        self.open_streams -= sess.cs.channels
        for slot in sess.cs.slots.tolist():
            sess.served.owner.pop(slot, None)
        sess.cs.close()
        self.metrics.sessions_open.set(len(self.sessions))
        if self._watch is not None:
            self._watch.forget(sess.ident)
        self.per_peer[sess.peer] -= 1
        if self.per_peer[sess.peer] <= 0:
            del self.per_peer[sess.peer]

    def _peer(self, ident: bytes) -> str:
        """The client whose message is being handled (its CurveZMQ key, else its
        connection); a relay worker gets it from the supervisor."""
        if self.config.relay:
            return self._relay_peer
        return client_key(self._peer_frame, ident)

    def _reap(self) -> None:
        """End the sessions whose connection has gone (the socket monitor says so)."""
        if self._watch is not None:
            for ident in self._watch.gone():
                self._vanished(ident)

    def _fail(self, s: Session) -> None:
        """End a session that hit a server bug: a fatal ``internal`` error, no tail."""
        self.dropped["internal"] += 1
        self.metrics.errors.labels("internal").inc()
        self._end(s, "error", send=False)
        msg = "the server failed processing this session; it has been ended"
        self._send(s.ident, P.Error(code="internal", message=msg, fatal=True))

    def _answer(self, s: Session, now: float) -> None:
        """Send every answer of ``s`` that is due (``now``: this tick's time.monotonic)."""
        if self.sessions.get(s.ident) is not s:
            return  # ended during this tick (its client vanished)
        cs, ledger = s.cs, s.ledger
        hop_waiting = cs.hop_ready
        cs.collect()  # keep the bank's output buffers drained (they hold 32 hops)
        queued = cs.queued  # nothing below changes it, nor what has been fed
        pending = self._pending
        for seq, _, arrived in ledger.due(queued, hop_waiting):
            y = cs.take()
            if s.closing is not None:
                y = y[: max(s.owed, 0)]  # never past input + latency
            n = y.shape[0]
            ledger.sent += n
            pending.audio_out += n / cs.rate
            waited = now - arrived
            pending.waits.append(waited)
            if waited > LATE_S:
                self.capacity.late()
            self._send_raw(s.ident, [P.encode_audio_out(seq, n, queued), P.encode_pcm(y, s.fmt)])
        if s.closing and not queued and not hop_waiting and not ledger.owed:
            self._end(s, s.closing)

    # -- sending --------------------------------------------------------------------------
    def _send(self, ident: bytes, msg: BaseModel) -> None:
        self._send_raw(ident, [P.encode(msg)])

    def _send_raw(self, ident: bytes, frames: list[bytes]) -> None:
        zmq = self._zmq
        send = self.sock.send
        try:
            # Part by part with plain int flags (send_multipart builds flag enums per part,
            # three times the cost). The first part decides: once it is accepted, the rest
            # of the message is too (high-water marks count whole messages).
            send(ident, _MORE_NOBLOCK)
            for f in frames[:-1]:
                send(f, _MORE_NOBLOCK)
            send(frames[-1], _NOBLOCK)
        except zmq.Again:  # the client does not read: its queue is at the high-water mark
            self.dropped["send_hwm"] += 1
            self.metrics.errors.labels("send_hwm").inc()
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # The client is gone (ROUTER_MANDATORY tells us): end its session quietly.
            self.dropped["send_unreachable"] += 1
            self.metrics.errors.labels("send_unreachable").inc()
            self._vanished(ident)

    def _vanished(self, ident: bytes) -> None:
        """End the session of a client whose connection is gone, without answering."""
        sess = self.sessions.pop(ident, None)
        if sess is not None:
            self._release(sess)
            self._active.pop(ident, None)
            self.counters["closed_vanished"] += 1
            log_event("vanished", session=sess.sid)

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The ``stats`` reply: counters, drops, queue depths, tick timing percentiles."""
        ms = np.asarray(self.infer_ms, dtype=np.float64)
        rows = np.asarray(self.rows_per_tick, dtype=np.float64)

        def pct(a: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(a, q)), 4) if a.size else None

        return {
            "type": "stats",
            "uptime_s": round(time.monotonic() - self.started, 3),
            #: CPU seconds of the server process since the counters were (re)set.
            "cpu_s": round(time.process_time() - self._cpu0, 4),
            "sessions": len(self.sessions),
            "capacity": self.capacity.stats(self.open_streams),
            "models": {
                n: {"batched": s.batched, "why": s.why, "latency": s.model.latency}
                for n, s in self.models.items()
            },
            "counters": dict(self.counters),
            "dropped": dict(self.dropped),
            "overruns": int(self.counters["overruns"]),
            "blocks_processed": int(self.counters["blocks"]),
            "queue_depths": {s.sid: s.queued for s in self.sessions.values()},
            "tick_infer_ms": {
                "n": int(ms.size),
                "p50": pct(ms, 50),
                "p90": pct(ms, 90),
                "p99": pct(ms, 99),
                "max": round(float(ms.max()), 4) if ms.size else None,
            },
            "rows_per_tick": {
                "mean": round(float(rows.mean()), 3) if rows.size else None,
                "max": int(rows.max()) if rows.size else None,
            },
        }
