"""``rtns serve --workers N``: one batching worker process per core behind one address.

The supervisor (this module, in the main process) owns the public ROUTER socket with every
option of a single server (CURVE, message size, output cap, IPv6) and relays messages:

    client --ROUTER--> supervisor --PAIR (ipc)--> worker k: Server(relay=True)
                                  <--------------

* A session is pinned to one worker for its life: a hello goes to the worker with the
  fewest open sessions, and the route is kept from its ``ready`` to its ``closed``. Other
  messages of a connection without a session go to a worker chosen by its id (they only get
  errors). Frames travel as ``[client id, client key, frames...]`` (the key: its CurveZMQ
  key or its connection, see rtns.daemon.clients) so each worker answers exactly as a
  single server would.
* The daemon's limits are kept here, where every session is seen: ``--max-sessions`` and
  the per-client limit are checked before a hello is relayed (``server_full`` names the
  daemon's limits, not a worker's share), and a client's sessions end as soon as the socket
  monitor reports its connection gone.
* ``stats`` asks every worker and answers with the sum (counters, sessions, CPU seconds,
  blocks) and, per figure, the worst worker's percentiles.
* A worker that dies ends only its sessions: each of their clients gets ``closed`` with
  reason ``error`` (totals 0: the worker took them with it), the supervisor logs it and
  starts a new worker in its place.
* SIGTERM: every worker flushes its sessions (``closed`` reason ``shutdown``); the
  supervisor relays until they have exited.

Workers are separate processes (no GIL between them); each runs onnxruntime at one thread.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rtns.daemon import protocol as P
from rtns.daemon.clients import ConnectionWatch, client_key, describe
from rtns.daemon.lifecycle import Lifecycle
from rtns.daemon.logs import log, log_event
from rtns.daemon.server import (
    VANISHED,
    Server,
    ServerConfig,
    check_bind,
    open_front_socket,
)
from rtns.errors import RtnsError

#: Prefix of the relay id under which the supervisor collects a worker's stats reply.
_STATS = b"\x01stats:"


def _worker_main(config_json: str, log_format: str, log_level: str) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter)."""
    from rtns.daemon.logs import setup_logging

    setup_logging(log_format, log_level)
    server = Server(ServerConfig.model_validate_json(config_json))
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    _stop_with_parent(server)
    server.run()


def _stop_with_parent(server: Server) -> None:
    """A worker must not outlive its supervisor (even one killed with SIGKILL): the kernel
    sends SIGTERM when the parent dies (Linux), and a watcher thread checks as well."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # died before prctl took effect
        server.stop()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        server.stop()

    threading.Thread(target=watch, name="rtns-parent-watch", daemon=True).start()


class Supervisor(Lifecycle):
    """The relay in front of ``workers`` worker processes. ``run()`` until ``stop()``."""

    def __init__(
        self,
        config: ServerConfig,
        workers: int,
        log_format: str = "json",
        log_level: str = "info",
    ) -> None:
        import zmq

        if not 2 <= workers <= 64:
            raise ValueError(f"a supervisor runs 2..64 workers, not {workers}")
        from rtns.engine import Model

        check_bind(config)
        for spec in config.models:  # a bad pack is one line here, not a crash loop later
            Model(spec, config.engine)
        self.config = config
        self.n = workers
        self._zmq = zmq
        # Not io_context(): with the workers on the same cores, a SCHED_BATCH relay thread
        # waits behind them at every wake-up and the relay falls behind.
        self.ctx = zmq.Context()
        self._dir = Path(tempfile.mkdtemp(prefix="rtns-workers-"))
        if config.metrics:
            # Every worker records into files here; the supervisor serves their sum.
            from rtns.daemon.metrics import MULTIPROC_ENV

            metrics_dir = self._dir / "metrics"
            metrics_dir.mkdir()
            os.environ[MULTIPROC_ENV] = str(metrics_dir)
        self._log = (log_format, log_level)
        self._mp = mp.get_context("spawn")
        self.procs: list[Any] = [None] * workers
        self.backs: list[Any] = [None] * workers
        self.route: dict[bytes, int] = {}  # client id -> worker, while a session is open
        self.sid: dict[bytes, str] = {}
        self.load = [0] * workers  # open sessions per worker
        #: Client key of every connection with a session or a hello on its way, and the
        #: number of those per key (the per-client limit).
        self.key_of: dict[bytes, str] = {}
        self.per_client: collections.Counter[str] = collections.Counter()
        self.peer_limit = config.max_sessions_per_peer or max(1, config.max_sessions // 2)
        self.refused: collections.Counter[str] = collections.Counter()
        self._watch: ConnectionWatch | None = None
        self._stats_wait: dict[bytes, list[tuple[int, dict]]] = {}
        Lifecycle.__init__(self)  # stop/drain events, bound, heartbeat (/healthz, /readyz)
        self.drain_until: float | None = None
        self.endpoint: str | None = None
        self.restarts = 0
        self._started = [0.0] * workers
        self._quick_deaths = 0
        self.dropped = 0

    # -- workers ------------------------------------------------------------------------------
    def _endpoint(self, k: int) -> str:
        return f"ipc://{self._dir}/worker{k}.sock"

    def _start_worker(self, k: int) -> None:
        c = self.config
        cfg = c.model_copy(
            update={
                "bind": self._endpoint(k),
                "relay": True,
                "workers_total": self.n,
                # The limits are the whole daemon's, checked here; a worker's share of the
                # sessions only bounds its bank.
                "max_sessions": -(-c.max_sessions // self.n),
                "max_sessions_per_peer": self.peer_limit,
                # A fixed capacity is the daemon's: each worker holds its share.
                "capacity": c.capacity if isinstance(c.capacity, str) else -(-c.capacity // self.n),
            }
        )
        proc = self._mp.Process(
            target=_worker_main,
            args=(cfg.model_dump_json(), *self._log),
            name=f"rtns-worker-{k}",
            daemon=True,
        )
        proc.start()
        if self.backs[k] is None:
            back = self.ctx.socket(self._zmq.PAIR)
            back.setsockopt(self._zmq.LINGER, 0)
            back.setsockopt(self._zmq.SNDHWM, 0)
            back.setsockopt(self._zmq.RCVHWM, 0)
            back.connect(self._endpoint(k))
            self.backs[k] = back
        self.procs[k] = proc
        self._started[k] = time.monotonic()
        log_event("worker", index=k, pid=proc.pid)

    def _worker_died(self, k: int) -> None:
        code = self.procs[k].exitcode
        if self.config.metrics:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(self.procs[k].pid)
        ended = [ident for ident, w in self.route.items() if w == k]
        log.error(
            "worker died",
            extra={"fields": {"index": k, "exitcode": code, "sessions_ended": len(ended)}},
        )
        for ident in ended:
            closed = P.Closed(
                session=self.sid.pop(ident, "?"),
                reason="error",
                samples=0,
                samples_in=0,
                samples_out=0,
            )
            self._to_client([ident, P.encode(closed), b""])
            del self.route[ident]
            self._uncount(ident)
        self.load[k] = 0
        # A fresh socket: the old pair may still hold the dead worker's unread messages.
        self.backs[k].close(linger=0)
        self.backs[k] = None
        self.restarts += 1
        if time.monotonic() - self._started[k] < 5.0:
            self._quick_deaths += 1
            if self._quick_deaths >= 3:
                raise RtnsError(
                    f"worker processes keep dying at start (last exit code {code}); "
                    "run with --workers 1 to see why"
                )
        else:
            self._quick_deaths = 0
        self._start_worker(k)

    # -- relaying -----------------------------------------------------------------------------
    def _to_client(self, frames: list[bytes]) -> None:
        zmq = self._zmq
        try:
            self.front.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1  # the client does not read (the front's output cap)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._client_gone(frames[0])

    def _client_gone(self, ident: bytes) -> None:
        """The connection of ``ident`` is gone: tell its worker, forget its session."""
        k = self.route.pop(ident, None)
        if k is not None:
            self.sid.pop(ident, None)
            self.load[k] -= 1
            self.backs[k].send_multipart([ident, b"", VANISHED])
        self._uncount(ident)

    def _reap(self) -> None:
        if self._watch is not None:
            for ident in self._watch.gone():
                self._client_gone(ident)

    def _uncount(self, ident: bytes) -> None:
        key = self.key_of.pop(ident, None)
        if key is not None:
            self.per_client[key] -= 1
            if self.per_client[key] <= 0:
                del self.per_client[key]
        if self._watch is not None:
            self._watch.forget(ident)

    def _admit(self, ident: bytes, key: str, first: Any) -> bool:
        """Count a hello of a connection without a session against the daemon's limits;
        False (and ``server_full`` sent) when it would exceed one."""
        if ident in self.key_of:
            return True  # already counted (a second hello gets already_open from its worker)
        self._reap()
        if self._draining.is_set():
            self.refused["refused_draining"] += 1
            msg = "this server is shutting down and takes no new sessions; use another"
            self._to_client([ident, P.encode(P.Error(code="draining", message=msg))])
            return False
        if len(self.key_of) >= self.config.max_sessions:
            why = f"the server is at its limit of {self.config.max_sessions} sessions"
            self.refused["refused_full"] += 1
        elif self.per_client[key] >= self.peer_limit:
            why = (
                f"{describe(key)} already holds {self.per_client[key]} sessions, the most one "
                f"client may (--max-sessions-per-peer {self.peer_limit})"
            )
            self.refused["refused_peer"] += 1
        else:
            self.key_of[ident] = key
            self.per_client[key] += 1
            if self._watch is not None:
                self._watch.tie(ident, first)
            return True
        self._to_client([ident, P.encode(P.Error(code="server_full", message=why))])
        return False

    def _from_client(self) -> None:
        zmq = self._zmq
        first = self.front.recv(zmq.NOBLOCK, copy=False)
        body = []
        while self.front.getsockopt(zmq.RCVMORE):
            body.append(self.front.recv())
        ident = first.bytes
        key = client_key(first, ident)
        peer = key.encode()
        k = self.route.get(ident)
        if k is None:
            kind = _message_type(body)
            if kind == "stats":
                self._stats_wait[ident] = []
                for back in self.backs:
                    back.send_multipart([_STATS + ident, peer, *body])
                return
            if kind == "hello":
                if not self._admit(ident, key, first):
                    return
                k = min(range(self.n), key=lambda w: self.load[w])
            else:
                k = int.from_bytes(ident[-2:] or b"\0", "big") % self.n
        self.backs[k].send_multipart([ident, peer, *body])

    def _from_worker(self, k: int) -> None:
        frames = self.backs[k].recv_multipart()
        ident = frames[0]
        if ident.startswith(_STATS):
            client = ident[len(_STATS) :]
            got = self._stats_wait.get(client)
            if got is None:
                return
            try:
                got.append((k, json.loads(frames[1])))
            except ValueError:
                got.append((k, {}))
            if len(got) == self.n:
                del self._stats_wait[client]
                got = [g for _, g in sorted(got, key=lambda kg: kg[0])]
                if all(g.get("type") == "stats" for g in got):
                    reply = P.encode_dict(merge_stats(got, self))
                else:  # an error (e.g. not_allowed): the first worker's answer
                    reply = frames[1]
                self._to_client([client, reply])
            return
        head = frames[1] if len(frames) > 1 else b""
        if head.startswith(b'{"type":"ready"'):
            self.route[ident] = k
            self.load[k] += 1
            try:
                self.sid[ident] = json.loads(head)["session"]
            except (ValueError, KeyError):
                self.sid[ident] = "?"
        elif head.startswith(b'{"type":"closed"') or (
            head.startswith(b'{"type":"error"') and b'"fatal":true' in head
        ):
            if self.route.pop(ident, None) is not None:
                self.load[k] -= 1
                self.sid.pop(ident, None)
            self._uncount(ident)
        elif head.startswith(b'{"type":"error"') and ident not in self.route:
            if _error_code(head) in HELLO_REFUSALS:
                self._uncount(ident)  # its hello was refused: it holds nothing
        self._to_client(frames)

    # -- life cycle ---------------------------------------------------------------------------
    def _drained(self, now: float) -> None:
        """While draining: stop once no session is open or the deadline has passed."""
        if self.drain_until is None:
            self.drain_until = now + self.config.drain_seconds
            log_event("drain", sessions=len(self.route), seconds=self.config.drain_seconds)
        if not self.route or now >= self.drain_until:
            self._stop.set()

    def remove_files(self) -> None:
        """Remove the folder of the workers' sockets and metrics files (at the end of
        :meth:`run`, or by the caller when run() never comes)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def run(self) -> None:
        zmq = self._zmq
        try:
            self.front, auth, self.endpoint = open_front_socket(self.ctx, self.config)
        except BaseException:
            self.ctx.term()
            self.remove_files()
            raise
        self._watch = ConnectionWatch(self.front)
        try:
            for k in range(self.n):
                self._start_worker(k)
            log_event("listening", endpoint=self.endpoint, workers=self.n)
            self.bound.set()
            next_check = time.monotonic() + 0.2
            stopping_since: float | None = None
            while True:
                self.heartbeat = time.monotonic()
                if self._draining.is_set() and stopping_since is None:
                    self._drained(self.heartbeat)
                if self._stop.is_set() and stopping_since is None:
                    stopping_since = time.monotonic()
                    for p in self.procs:
                        if p.is_alive():
                            os.kill(p.pid, signal.SIGTERM)
                if stopping_since is not None:
                    alive = [p for p in self.procs if p.is_alive()]
                    if not alive or time.monotonic() - stopping_since > 15:
                        for p in alive:
                            p.kill()
                        # relay what the workers sent while flushing
                        self._drain_workers()
                        break
                poller = zmq.Poller()
                poller.register(self.front, zmq.POLLIN)
                poller.register(self._watch.monitor, zmq.POLLIN)
                for back in self.backs:
                    poller.register(back, zmq.POLLIN)
                events = dict(poller.poll(50))
                if self._watch.monitor in events:
                    self._reap()
                if self.front in events and stopping_since is None:
                    for _ in range(512):
                        try:
                            self._from_client()
                        except zmq.Again:
                            break
                for k, back in enumerate(self.backs):
                    if back in events:
                        for _ in range(512):
                            if not back.poll(0):
                                break
                            self._from_worker(k)
                now = time.monotonic()
                if now >= next_check and stopping_since is None:
                    next_check = now + 0.2
                    for k, p in enumerate(self.procs):
                        if not p.is_alive():
                            self._worker_died(k)
        finally:
            self._watch.close()
            self.front.close(linger=1000)
            for back in self.backs:
                if back is not None:
                    back.close(linger=0)
            if auth is not None:
                auth.stop()
            self.ctx.term()
            self.remove_files()
            log_event("stopped", workers=self.n, restarts=self.restarts)

    def _drain_workers(self) -> None:
        for k, back in enumerate(self.backs):
            while back is not None and back.poll(0):
                self._from_worker(k)


#: Error codes that answer a hello: the connection got no session. (Other errors of a
#: connection without a session may answer something it sent before its hello's answer;
#: it stays counted until its session ends or its connection goes.)
HELLO_REFUSALS = frozenset(
    {
        "bad_version",
        "bad_rate",
        "bad_channels",
        "bad_format",
        "bad_atten",
        "unknown_model",
        "server_full",
        "busy",
        "draining",
    }
)


def _error_code(head: bytes) -> str | None:
    try:
        code = json.loads(head).get("code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def _message_type(body: list[bytes]) -> str | None:
    if not body or len(body[0]) > P.MAX_HEADER_BYTES:
        return None
    try:
        obj = json.loads(body[0])
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj.get("type") if isinstance(obj, dict) and isinstance(obj.get("type"), str) else None


def merge_stats(parts: list[dict], sup: Supervisor) -> dict:
    """One ``stats`` reply from every worker's: sums, and the worst worker's percentiles."""
    out: dict[str, Any] = {"type": "stats", "workers": len(parts), "restarts": sup.restarts}
    for key in ("sessions", "overruns", "blocks_processed", "cpu_s"):
        out[key] = sum(p.get(key, 0) or 0 for p in parts)
    out["uptime_s"] = max(p.get("uptime_s", 0) for p in parts)
    for key in ("counters", "dropped"):
        total: dict[str, int] = {}
        for p in parts:
            for k, v in p.get(key, {}).items():
                total[k] = total.get(k, 0) + v
        out[key] = total
    out["dropped"]["supervisor_send_hwm"] = sup.dropped
    for k, v in sup.refused.items():  # hellos the supervisor refused for the daemon's limits
        out["counters"][k] = out["counters"].get(k, 0) + v
    refused = sum(sup.refused.values())
    if refused:
        out["dropped"]["server_full"] = out["dropped"].get("server_full", 0) + refused
    out["models"] = parts[0].get("models", {})
    caps = [p.get("capacity") or {} for p in parts]
    out["capacity"] = {
        "streams": None
        if any(c.get("streams") is None for c in caps)
        else sum(c["streams"] for c in caps),
        "open_streams": sum(c.get("open_streams", 0) for c in caps),
        "per_worker": caps,
    }
    out["queue_depths"] = {k: v for p in parts for k, v in p.get("queue_depths", {}).items()}
    ticks = [p["tick_infer_ms"] for p in parts if p.get("tick_infer_ms", {}).get("n")]
    out["tick_infer_ms"] = {
        "n": sum(t["n"] for t in ticks),
        **{q: max((t[q] for t in ticks), default=None) for q in ("p50", "p90", "p99", "max")},
    }
    rows = [p["rows_per_tick"] for p in parts if p.get("rows_per_tick", {}).get("mean")]
    out["rows_per_tick"] = {
        "mean": round(sum(r["mean"] for r in rows) / len(rows), 3) if rows else None,
        "max": max((r["max"] for r in rows), default=None),
    }
    out["per_worker"] = [
        {k: p.get(k) for k in ("sessions", "blocks_processed", "cpu_s")} for p in parts
    ]
    return out
