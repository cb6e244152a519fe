"""``rtns web``: an aiohttp server with the page (``/``), its WebSocket (``/ws``, the
protocol of :mod:`rtns.web.protocol`), file enhancement (``POST /api/enhance``) and
``/api/info`` and ``/api/stats``.

Each WebSocket is one session of a backend (:mod:`rtns.web.sessions`). The handler reads
one message, awaits its processing in a thread pool and answers before it reads the next,
so a session holds at most one message in flight; a peer that sends faster than the engine
runs is held back by TCP (aiohttp stops reading its socket), one that does not read is held
back the same way on the send side: memory stays bounded per session, and no session waits
for another one's work. Every bad input is answered with one ``error`` line or dropped
(see docs/protocol.md); nothing a peer sends reaches another session.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import WSMsgType, web

from rtns.atten import AttenLimit
from rtns.daemon.protocol import ProtocolError, decode_pcm, encode_pcm
from rtns.errors import RtnsError
from rtns.web import protocol as W
from rtns.web.sessions import UpstreamError

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 16
    #: Seconds to wait for the hello, and for any message of an open session.
    hello_timeout: float = 10.0
    idle_timeout: float = 30.0
    #: Threads running sessions and files (default: the CPU count).
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_upload_bytes: int = 64 << 20
    max_file_seconds: float = 600.0


def _log(text: str) -> None:
    print(f"rtns web: {text}", file=sys.stderr, flush=True)


class WebServer:
    def __init__(self, backend, config: WebConfig) -> None:
        self.backend = backend
        self.cfg = config
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="rtns-web")
        self.sessions: dict[str, Connection] = {}
        self.ids = itertools.count(1)
        self.stats: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.file_lock = asyncio.Lock()

    async def run_in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_upload_bytes)
        app.router.add_get("/", self.index)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/api/info", self.info)
        app.router.add_get("/api/stats", self.get_stats)
        app.router.add_post("/api/enhance", self.enhance_file)
        app.router.add_static("/static/", STATIC)
        app.on_shutdown.append(self._shutdown)
        return app

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    def info_dict(self) -> dict:
        return {
            "version": W.PROTOCOL_VERSION,
            "model": self.backend.model_name,
            "backend": self.backend.name,
            "max_frame_bytes": W.MAX_FRAME_BYTES,
            "max_upload_bytes": self.cfg.max_upload_bytes,
            "max_file_seconds": self.cfg.max_file_seconds,
            "max_atten_db": 60,
        }

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info_dict())

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "sessions_open": len(self.sessions),
                **dict(self.stats),
                "errors": dict(self.errors),
            }
        )

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=W.MAX_FRAME_BYTES, compress=False)
        await ws.prepare(request)
        conn = Connection(self, ws, request.remote or "?")
        try:
            await conn.run()
        finally:
            await conn.release()
        return ws

    async def _shutdown(self, app: web.Application) -> None:
        for conn in list(self.sessions.values()):
            conn.reason = "shutdown"
            await conn.ws.close(code=W.CLOSE_GOING_AWAY, message=b"server shutdown")

    # -- files ----------------------------------------------------------------------------
    async def enhance_file(self, request: web.Request) -> web.Response:
        name = Path(request.query.get("name", "upload.wav")).name[:200] or "upload.wav"
        if self.file_lock.locked():
            self.count_error("file_busy")
            return _fail(503, "another file is being enhanced; try again when it is done")
        async with self.file_lock:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                self.count_error("file_too_large")
                mb = self.cfg.max_upload_bytes / 2**20
                return _fail(413, f"{name}: the file is larger than {mb:g} MiB")
            try:
                result = await self.run_in_pool(self._enhance_bytes, name, body)
            except RtnsError as e:
                self.count_error("file_refused")
                return _fail(400 if not isinstance(e, UpstreamError) else 502, str(e))
        self.stats["files"] += 1
        return web.json_response(result)

    def _enhance_bytes(self, name: str, body: bytes) -> dict:
        """Decode, enhance, encode and draw one uploaded file (in the pool)."""
        import soundfile as sf

        from rtns.audio_io import read_audio
        from rtns.errors import UserInputError

        with tempfile.TemporaryDirectory(prefix="rtns-web-") as tmp:
            src = Path(tmp) / f"upload{Path(name).suffix[:10]}"
            src.write_bytes(body)
            try:
                audio = read_audio(src)
            except UserInputError as e:
                raise UserInputError(str(e).replace(str(src), name)) from None
            if audio.duration > self.cfg.max_file_seconds:
                raise UserInputError(
                    f"{name}: {audio.duration:.1f} s is longer than this server takes "
                    f"({self.cfg.max_file_seconds:g} s)"
                )
            y = self.backend.enhance(audio.samples, audio.sample_rate)
            out = Path(tmp) / "enhanced.wav"
            sf.write(out, np.clip(y, -1.0, 1.0), audio.sample_rate, subtype="PCM_16")
            png, note = None, None
            try:
                from rtns.plot import plot_enhancement

                pic = plot_enhancement(
                    audio.samples.mean(axis=1),
                    y.mean(axis=1),
                    audio.sample_rate,
                    Path(tmp) / "plot.png",
                    title=f"{name}: {self.backend.model_name}",
                )
                png = base64.b64encode(pic.read_bytes()).decode()
            except RtnsError as e:  # matplotlib missing: said, not hidden
                note = str(e)
                _log(f"{name}: no picture: {note}")
            return {
                "name": name,
                "model": self.backend.model_name,
                "sample_rate": audio.sample_rate,
                "channels": audio.channels,
                "duration": round(audio.duration, 3),
                "wav": base64.b64encode(out.read_bytes()).decode(),
                "png": png,
                "note": note,
            }


def _fail(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Connection:
    """One WebSocket: the hello, then its session until close, timeout or error."""

    def __init__(self, server: WebServer, ws: web.WebSocketResponse, peer: str) -> None:
        self.server = server
        self.ws = ws
        self.peer = peer
        self.id = ""
        self.session = None
        self.hello: W.Hello | None = None
        self.errors = 0
        self.samples_in = 0
        self.samples_out = 0
        self.reason = "close"

    async def send_error(self, code: str, message: str, fatal: bool = False) -> None:
        self.server.count_error(code)
        if not self.ws.closed:
            await self.ws.send_str(W.error(code, message, fatal))
        if fatal:
            if self.reason == "close":
                self.reason = "error"
            _log(f"{self.id or self.peer}: {code}: {message}")
            code_ws = W.CLOSE_TRY_AGAIN if code == "server_full" else W.CLOSE_POLICY
            if code in ("internal", "upstream"):
                code_ws = W.CLOSE_INTERNAL
            await self.ws.close(code=code_ws, message=code.encode())
            return
        self.errors += 1
        if self.errors >= W.MAX_ERRORS:
            await self.send_error(
                "too_many_errors", f"{self.errors} errors in this session", fatal=True
            )

    async def receive(self, timeout: float):
        try:
            return await self.ws.receive(timeout=timeout)
        except TimeoutError:
            what = "a hello" if self.session is None else "a message"
            self.reason = "timeout"
            await self.send_error("timeout", f"no {what} within {timeout:g} s", fatal=True)
            return None

    async def run(self) -> None:
        if not await self._open():
            return
        cfg = self.server.cfg
        while not self.ws.closed:
            msg = await self.receive(cfg.idle_timeout)
            if msg is None:
                return
            if msg.type == WSMsgType.BINARY:
                await self._audio(msg.data)
            elif msg.type == WSMsgType.TEXT:
                if await self._text(msg.data):
                    return
            elif msg.type == WSMsgType.ERROR:
                self.server.count_error("too_large" if self.ws.close_code == 1009 else "ws")
                _log(f"{self.id}: dropped ({msg.data})")
                return
            else:  # the peer closed
                return

    async def _open(self) -> bool:
        """The hello (the first message, within the hello timeout) and the session."""
        msg = await self.receive(self.server.cfg.hello_timeout)
        if msg is None or msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return False
        if msg.type == WSMsgType.ERROR:
            self.server.count_error("too_large" if self.ws.close_code == 1009 else "ws")
            return False
        if msg.type != WSMsgType.TEXT:
            await self.send_error("no_session", "binary audio before the hello", fatal=True)
            return False
        try:
            hello = W.parse_client(msg.data)
        except ProtocolError as e:
            await self.send_error(e.code, e.message, fatal=True)
            return False
        if not isinstance(hello, W.Hello):
            await self.send_error("no_session", f"{hello.type} before the hello", fatal=True)
            return False
        if len(self.server.sessions) >= self.server.cfg.max_sessions:
            n = self.server.cfg.max_sessions
            await self.send_error("server_full", f"the server has {n} sessions", fatal=True)
            return False
        return await self._start(hello)

    async def _start(self, hello: W.Hello) -> bool:
        srv = self.server
        self.id = f"s{next(srv.ids)}"
        srv.sessions[self.id] = self  # counted at once: a burst of hellos cannot pass max
        atten = None if hello.atten_lim_db is None else AttenLimit.parse(hello.atten_lim_db)
        try:
            self.session = await srv.run_in_pool(
                srv.backend.open, hello.sample_rate, hello.channels, atten
            )
            if hello.bypass:
                await srv.run_in_pool(self.session.control, True, None)
        except UpstreamError as e:
            await self.send_error("upstream", str(e), fatal=True)
            return False
        self.hello = hello
        s = self.session
        ready = W.Ready(
            session=self.id,
            model=srv.backend.model_name,
            backend=srv.backend.name,
            latency=s.latency,
            sample_rate=hello.sample_rate,
            format=hello.format,
            channels=hello.channels,
            max_frame_bytes=W.MAX_FRAME_BYTES,
            idle_timeout=srv.cfg.idle_timeout,
            atten_lim_db=s.atten_lim.optional(),
            bypass=s.bypass,
        )
        await self.ws.send_str(W.encode(ready))
        srv.stats["sessions_total"] += 1
        _log(
            f"{self.id}: opened from {self.peer} ({hello.sample_rate} Hz, {hello.channels} ch, "
            f"{hello.format}, {len(srv.sessions)} open)"
        )
        return True

    async def _audio(self, data: bytes) -> None:
        h = self.hello
        try:
            x = decode_pcm(data, h.format, h.channels)
        except ProtocolError as e:
            await self.send_error(e.code, e.message)
            return
        try:
            y = await self.server.run_in_pool(self.session.process, x)
        except UpstreamError as e:
            await self.send_error("upstream", str(e), fatal=True)
            return
        except Exception as e:  # a bug: this session ends, the others go on
            await self.send_error("internal", f"{type(e).__name__}: {e}", fatal=True)
            return
        self.samples_in += x.shape[0]
        self.samples_out += y.shape[0]
        self.server.stats["frames_in"] += 1
        await self.ws.send_bytes(encode_pcm(y, h.format))

    async def _text(self, data: str) -> bool:
        """A control, close or stray hello; True when the session has ended."""
        try:
            msg = W.parse_client(data)
        except ProtocolError as e:
            await self.send_error(e.code, e.message)
            return False
        if isinstance(msg, W.Hello):
            await self.send_error("already_open", f"session {self.id} is open")
            return False
        if isinstance(msg, W.Control):
            atten = None if msg.atten_lim_db is None else AttenLimit.parse(msg.atten_lim_db)
            try:
                await self.server.run_in_pool(self.session.control, msg.bypass, atten)
            except UpstreamError as e:
                await self.send_error("upstream", str(e), fatal=True)
                return True
            s = self.session
            state = W.ControlState(bypass=s.bypass, atten_lim_db=s.atten_lim.optional())
            await self.ws.send_str(W.encode(state))
            return False
        await self._close_session("close")
        await self.ws.close(code=W.CLOSE_NORMAL)
        return True

    async def _close_session(self, reason: str) -> None:
        """End the session: the tail as one binary message, then ``closed``."""
        session, self.session = self.session, None
        try:
            tail = await self.server.run_in_pool(session.close)
        except UpstreamError as e:
            await self.send_error("upstream", str(e), fatal=True)
            return
        self.samples_out += tail.shape[0]
        if not self.ws.closed:
            await self.ws.send_bytes(encode_pcm(tail, self.hello.format))
            closed = W.Closed(
                reason=reason, samples_in=self.samples_in, samples_out=self.samples_out
            )
            await self.ws.send_str(W.encode(closed))

    async def release(self) -> None:
        """After the handler: drop the session (whatever ended it) and log one line."""
        if self.session is not None:
            session, self.session = self.session, None
            try:
                await self.server.run_in_pool(session.close)
            except RtnsError:
                pass  # the peer is gone; the upstream error was logged when it happened
        if self.id:
            self.server.sessions.pop(self.id, None)
            _log(
                f"{self.id}: ended ({self.reason}): {self.samples_in} samples in, "
                f"{self.samples_out} out, {self.errors} errors"
            )
        if not self.ws.closed:
            await self.ws.close()


async def serve(backend, config: WebConfig, ready=None) -> None:
    """Serve until SIGINT/SIGTERM; prints the address once listening (``ready``: called
    with the bound port, for tests)."""
    import signal

    server = WebServer(backend, config)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise RtnsError(
            f"cannot listen on {config.host}:{config.port} ({e.strerror or e})"
        ) from None
    port = runner.addresses[0][1]
    host = f"[{config.host}]" if ":" in config.host else config.host
    _log(
        f"serving http://{host}:{port}/ (model {backend.model_name}, {backend.name}, "
        f"{config.workers} threads, at most {config.max_sessions} sessions)"
    )
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        _log("stopping")
        await runner.cleanup()
        server.pool.shutdown(wait=True)
        _log(f"stopped: {server.stats['sessions_total']} sessions, {server.stats['files']} files")
