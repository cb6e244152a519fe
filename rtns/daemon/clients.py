"""Who a client of the daemon is, and when its connection goes.

* A client is its CurveZMQ public key when CURVE is on (the authenticator puts it in every
  message's ``User-Id``), otherwise its connection (ZeroMQ's routing id): the per-client
  session limit counts sessions by that, so clients that share an address (every local
  process is 127.0.0.1) do not share a quota.
* :class:`ConnectionWatch` reads the ROUTER socket's monitor (``EVENT_DISCONNECTED``, with
  the connection's file descriptor) and tells which routing ids were on a connection that
  went, so their sessions end at once instead of counting until the idle timeout. Each
  session is tied to the descriptor its hello arrived on (``ZMQ_SRCFD`` of the message).
  A descriptor number is reused after a close; the monitor reports the disconnect before
  the descriptor is closed, so draining the monitor before tying a new hello to its
  descriptor always retires the old connection's ids first.
"""

from __future__ import annotations

from typing import Any


def client_key(frame: Any, ident: bytes) -> str:
    """'key Z85' for a CurveZMQ client (``frame``: a received zmq.Frame of its message),
    else 'connection HEX' (the routing id)."""
    try:
        user = str(frame.get("User-Id"))
    except Exception:  # zmq raises for a message without that property
        user = ""
    return f"key {user}" if user else f"connection {ident.hex()}"


def describe(key: str) -> str:
    """A client key for people: 'client key abcdefgh...' or 'this connection'."""
    kind, _, value = key.partition(" ")
    return f"client key {value[:8]}..." if kind == "key" else "this connection"


class ConnectionWatch:
    """Disconnects of a ROUTER socket's connections, as the routing ids they carried."""

    def __init__(self, sock: Any) -> None:
        import zmq

        self._zmq = zmq
        self.sock = sock
        #: Readable when a connection has gone (register it in the poller).
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_of: dict[bytes, int] = {}
        self._on_fd: dict[int, set[bytes]] = {}

    def gone(self) -> list[bytes]:
        """Routing ids (tied with :meth:`tie`) whose connection has gone since the last call."""
        from zmq.utils.monitor import parse_monitor_message

        zmq = self._zmq
        out: list[bytes] = []
        while True:
            try:
                msg = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            event = parse_monitor_message(msg)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for ident in self._on_fd.pop(int(event["value"]), ()):
                    self._fd_of.pop(ident, None)
                    out.append(ident)

    def tie(self, ident: bytes, frame: Any) -> None:
        """Remember the connection ``frame`` (a message of ``ident``) arrived on. Call
        :meth:`gone` first (see the module docstring)."""
        try:
            fd = int(frame.get(self._zmq.SRCFD))
        except Exception:  # inproc: no descriptor, and no disconnect to watch
            return
        if fd < 0:
            return
        self.forget(ident)
        self._fd_of[ident] = fd
        self._on_fd.setdefault(fd, set()).add(ident)

    def forget(self, ident: bytes) -> None:
        fd = self._fd_of.pop(ident, None)
        if fd is not None:
            ids = self._on_fd.get(fd)
            if ids is not None:
                ids.discard(ident)
                if not ids:
                    del self._on_fd[fd]

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except self._zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
