"""What a WebSocket session (and a dropped file) runs on: the engine in this process, or a
running ``rtns serve`` reached through :class:`rtns.daemon.client.Client`.

Both backends give the same session interface: ``latency`` (samples at the session's rate),
``process(x)`` float32 [n, channels] -> float32 [m, channels] (output sample k estimates
input sample k - latency), ``control(bypass, atten)``, ``close()`` -> the tail. Every call
of one session runs in the server's thread pool, one at a time (the WebSocket handler
awaits each), so a session never runs on two threads at once. No aiohttp here.
"""

from __future__ import annotations

import numpy as np

from rtns.atten import AttenLimit
from rtns.errors import RtnsError


class UpstreamError(RtnsError):
    """The daemon behind ``rtns web --endpoint`` refused or did not answer."""


class LocalSession:
    """One :class:`rtns.streams.ChannelStream` of the shared in-process model."""

    def __init__(self, model, rate: int, channels: int) -> None:
        from rtns.streams import ChannelStream

        self.stream = ChannelStream(model, channels, rate)
        self.latency = self.stream.latency

    @property
    def atten_lim(self) -> AttenLimit:
        return self.stream.atten_lim

    @property
    def bypass(self) -> bool:
        return self.stream.bypass

    def control(self, bypass: bool | None, atten: AttenLimit | None) -> None:
        if bypass is not None:
            self.stream.bypass = bypass
        if atten is not None:
            self.stream.atten_lim = atten

    def process(self, x: np.ndarray) -> np.ndarray:
        return self.stream.push(x)

    def close(self) -> np.ndarray:
        return self.stream.flush()


class RemoteSession:
    """A daemon session through :class:`rtns.daemon.client.Client` (synchronous: one
    audio message is answered before the next is sent).

    The daemon's session keeps its limit for life, so a new limit ends it (its tail is
    kept for the next output) and opens another one with the new limit, whose first
    ``latency`` samples (before its input began) are dropped: the output timeline stays
    continuous and the totals are those of one session. Bypass is done here: the daemon's session keeps running (its
    state stays warm) and the output is the input delayed by the latency, as
    ``ChannelStream``'s bypass is.
    """

    def __init__(self, client, rate: int, channels: int, atten: AttenLimit | None) -> None:
        self.client = client
        self.rate, self.channels = rate, channels
        ready = self._hello(atten)
        self.latency = ready.latency
        self.bypass = False
        # The input delayed by the latency, for bypass: at most latency + one message.
        self._dry = np.zeros((self.latency, channels), np.float32)
        self._held = np.zeros((0, channels), np.float32)
        self._skip = 0

    def _hello(self, atten: AttenLimit | None):
        from rtns.daemon.client import NoReply, ServerError

        try:
            ready = self.client.hello(self.rate, "f32le", self.channels, atten_lim_db=atten)
        except (ServerError, NoReply) as e:
            raise UpstreamError(str(e)) from None
        self.atten_lim = AttenLimit.from_optional(ready.atten_lim_db)
        return ready

    def control(self, bypass: bool | None, atten: AttenLimit | None) -> None:
        if bypass is not None:
            self.bypass = bypass
        if atten is not None and atten != self.atten_lim:
            self._held = np.concatenate([self._held, self._end_session()])
            if self._hello(atten).latency != self.latency:
                raise UpstreamError("the daemon changed the session's latency")
            # The new session's first `latency` samples stand for input before its start,
            # which the old one's tail already covered.
            self._skip += self.latency

    def _answer(self, seq: int) -> np.ndarray:
        """Wait for the answer to audio ``seq``."""
        from rtns.daemon import protocol as P
        from rtns.daemon.client import NoReply

        while True:
            try:
                msg, pcm = self.client.recv()
            except NoReply as e:
                raise UpstreamError(str(e)) from None
            if isinstance(msg, P.AudioOut) and msg.seq == seq and pcm is not None:
                return pcm
            if isinstance(msg, P.Error) or isinstance(msg, P.Closed):
                text = msg.message if isinstance(msg, P.Error) else f"closed ({msg.reason})"
                raise UpstreamError(f"the daemon answered: {text}")

    def _out(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self._skip:
            k = min(self._skip, y.shape[0])
            y, self._skip = y[k:], self._skip - k
        if self._held.shape[0]:
            y, self._held = np.concatenate([self._held, y]), self._held[:0]
        self._dry = np.concatenate([self._dry, x])
        dry, self._dry = self._dry[: y.shape[0]], self._dry[y.shape[0] :]
        return dry.copy() if self.bypass else y

    def process(self, x: np.ndarray) -> np.ndarray:
        from rtns.daemon.client import ServerError

        try:
            seq = self.client.send_audio(x)
        except ServerError as e:
            raise UpstreamError(str(e)) from None
        return self._out(self._answer(seq), x)

    def _end_session(self) -> np.ndarray:
        from rtns.daemon.client import NoReply, ServerError

        try:
            before, tail = self.client.close_session()
        except (ServerError, NoReply) as e:
            raise UpstreamError(str(e)) from None
        parts = [pcm for _, pcm in before if pcm is not None] + [tail]
        return np.concatenate(parts)

    def close(self) -> np.ndarray:
        try:
            y = self._end_session()
            return self._out(y, np.zeros((0, self.channels), np.float32))
        finally:
            self.client.close()


class LocalBackend:
    """The model in this process: one shared :class:`rtns.engine.Model`, a
    :class:`LocalSession` per WebSocket."""

    def __init__(self, model) -> None:
        self.model = model
        self.name = "in-process"
        self.model_name = model.name

    def open(self, rate: int, channels: int, atten: AttenLimit | None) -> LocalSession:
        s = LocalSession(self.model, rate, channels)
        s.control(None, atten)
        return s

    def enhance(self, x: np.ndarray, rate: int) -> np.ndarray:
        """A whole signal float32 [n, channels], time-aligned (``rtns enhance``'s path)."""
        from rtns.streams import enhance_frames

        return enhance_frames(self.model, x, rate)

    def close(self) -> None:
        pass


class RemoteBackend:
    """A running ``rtns serve`` at ``endpoint``: a :class:`RemoteSession` (one DEALER
    connection) per WebSocket, all on one ZeroMQ context."""

    def __init__(
        self, endpoint: str, server_key=None, client_key=None, timeout: float = 10.0
    ) -> None:
        import zmq

        self.endpoint = endpoint
        self.name = endpoint
        self._keys = {"server_key": server_key, "client_key": client_key}
        self.timeout = timeout
        self.ctx = zmq.Context()
        # Ask once now, so a wrong endpoint is one line at start and not a broken page.
        with self._client() as c:
            s = RemoteSession(c, 16_000, 1, None)
            self.model_name = c.ready.model
            s._end_session()

    def _client(self):
        from rtns.daemon.client import Client

        return Client(self.endpoint, context=self.ctx, timeout=self.timeout, **self._keys)

    def open(self, rate: int, channels: int, atten: AttenLimit | None) -> RemoteSession:
        c = self._client()
        try:
            return RemoteSession(c, rate, channels, atten)
        except BaseException:
            c.close()
            raise

    def enhance(self, x: np.ndarray, rate: int) -> np.ndarray:
        from rtns.daemon.client import NoReply, ServerError

        with self._client() as c:
            try:
                return c.enhance(x, rate, chunk=max(1, rate // 50))
            except (ServerError, NoReply) as e:
                raise UpstreamError(str(e)) from None

    def close(self) -> None:
        self.ctx.term()
