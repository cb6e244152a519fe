"""The daemon's messaging floor in Python: :file:`echo_server.c`'s protocol subset (hello ->
ready, audio -> an answer of the same PCM, stats -> what ``benchmarks/load.py`` reads), no
DSP, with the socket calls the daemon makes (``rtns.daemon.server``: the first part as a
Frame, the rest as bytes while RCVMORE; sends part by part with int flags).

Its CPU per hop, next to the C echo's and ``rtns serve``'s under the same load, splits the
daemon's cost into the kernel and libzmq (C echo), pyzmq's calls and the interpreter
(Python echo minus C echo), and the server's own work (rtns serve minus Python echo)::

    python benchmarks/load.py --server-cmd 'python benchmarks/echo/echo_server.py {endpoint} [TICK_MS]' ...

TICK_MS (default 4, the daemon's ``--tick-ms``): answers are held and sent together every
TICK_MS, as the daemon sends a tick's answers (0: each answer at once).

A measuring instrument for issue 28, not part of rtns.
"""

from __future__ import annotations

import math
import signal
import sys
import time

import zmq

from rtns.daemon import protocol as P
from rtns.daemon.server import io_context

HOP = 128


def main(endpoint: str, tick_ms: float = 4.0) -> int:
    ctx = io_context()  # the daemon's: its I/O thread at SCHED_BATCH
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    ready = P.encode(
        P.Ready(
            session="echo",
            model="echo",
            latency=0,
            latency_16k=0,
            block_shift=HOP,
            sample_rate=16_000,
            format="f32le",
            channels=1,
            max_message_bytes=262_144,
            queue_limit=96_000,
            idle_timeout=30.0,
            atten_lim_db=None,
        )
    )
    recv, more, send = sock.recv, sock.get, sock.send
    nb, more_nb, rcvmore = zmq.NOBLOCK, zmq.SNDMORE | zmq.NOBLOCK, zmq.RCVMORE
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    hops = messages = 0
    t0, c0 = time.monotonic(), time.process_time()
    tick_s = tick_ms / 1e3
    held: list[tuple[bytes, bytes, bytes]] = []  # answers waiting for the tick
    next_tick = time.monotonic()
    while not stopping:
        now = time.monotonic()
        if held and now >= next_tick:
            for ident, head, pcm in held:
                send(ident, more_nb)
                send(head, more_nb)
                send(pcm, nb)
            held.clear()
            next_tick = now + tick_s
        if held:
            wait_ms = max(0, math.ceil(1e3 * (next_tick - now)))
        else:
            wait_ms, next_tick = 50, now + tick_s
        if not poller.poll(wait_ms):
            continue
        for _ in range(512):  # drain what is there, as the daemon does
            try:
                first = recv(nb, copy=False)
            except zmq.Again:
                break
            body = []
            while more(rcvmore):
                body.append(recv())
            ident = first.bytes
            seq = P.audio_seq(body)
            if seq is not None:
                samples = len(body[1]) // 4
                hops += samples // HOP
                messages += 1
                head = P.encode_audio_out(seq, samples, 0)
                if tick_s > 0:
                    held.append((ident, head, body[1]))
                else:
                    send(ident, more_nb)
                    send(head, more_nb)
                    send(body[1], nb)
                continue
            head = body[0] if body else b"{}"
            send(ident, more_nb)
            if head.startswith(b'{"type":"hello"'):
                send(ready, nb)
            elif head.startswith(b'{"type":"stats"'):
                st = {
                    "type": "stats",
                    "blocks_processed": hops,
                    "uptime_s": time.monotonic() - t0,
                    "cpu_s": time.process_time() - c0,
                    "overruns": 0,
                    "messages": messages,
                }
                send(P.encode_dict(st), nb)
                if b"true" in head:
                    hops = messages = 0
                    t0, c0 = time.monotonic(), time.process_time()
            else:
                send(b"{}", nb)
    sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], *(float(a) for a in sys.argv[2:3])))
