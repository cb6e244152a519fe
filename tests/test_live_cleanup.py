"""``rtns run`` cleans up by construction: an exception raised while the stream runs leaves
no virtual microphone published, no rtns signal handler installed, no stream open and no
worker thread running. In-process, with a scripted sounddevice and a scripted sound server
(no PortAudio, no PulseAudio)."""

from __future__ import annotations

import os
import signal
import threading
import types
from pathlib import Path

import numpy as np
import pytest

import rtns.audio
import rtns.vmic
from rtns.cli import build_parser

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
MODULE_INDEX = 42


class Injected(Exception):
    """The fault raised inside the running stream path."""


class FakeStream:
    """An input or duplex stream: ``start`` delivers one block (so the worker primes) and
    reading ``latency`` once primed raises :class:`Injected`."""

    opened: list[FakeStream] = []

    def __init__(self, callback, duplex: bool, **kw) -> None:
        self.callback, self.duplex, self.kw = callback, duplex, kw
        self.active = self.closed = False
        FakeStream.opened.append(self)

    def start(self) -> None:
        self.active = True
        frames = 480
        x = np.zeros((frames, 1), np.float32)
        if self.duplex:
            self.callback(x, np.zeros_like(x), frames, None, None)
        else:
            self.callback(x, frames, None, None)

    @property
    def latency(self):
        raise Injected("the stream's latency")

    def stop(self) -> None:
        self.active = False

    abort = stop

    def close(self) -> None:
        self.closed = True


def fake_sounddevice() -> types.SimpleNamespace:
    device = {
        "name": "fake",
        "hostapi": 0,
        "max_input_channels": 1,
        "max_output_channels": 1,
        "default_samplerate": 48000.0,
    }
    return types.SimpleNamespace(
        default=types.SimpleNamespace(device=[0, 0]),
        query_devices=lambda: [device],
        query_hostapis=lambda: ({"name": "Fake"},),
        check_input_settings=lambda **kw: None,
        check_output_settings=lambda **kw: None,
        InputStream=lambda callback, **kw: FakeStream(callback, False, **kw),
        Stream=lambda callback, **kw: FakeStream(callback, True, **kw),
    )


@pytest.fixture
def sound_server(monkeypatch, tmp_path: Path) -> dict[str, list]:
    """A scripted PulseAudio: records what was loaded and unloaded; the FIFO is a pipe."""
    log: dict[str, list] = {"loaded": [], "unloaded": [], "pipes": []}

    def load_pipe_source(cfg, fifo) -> int:
        log["loaded"].append(MODULE_INDEX)
        return MODULE_INDEX

    def open_fifo(path):
        r, w = os.pipe()
        log["pipes"].append((r, w))
        return w, None

    info = rtns.vmic.ServerInfo(name="fake", version="0", local=True, default_source="")
    monkeypatch.setattr(rtns.vmic, "server_info", lambda: info)
    monkeypatch.setattr(rtns.vmic, "remove_leftover", lambda name: None)
    monkeypatch.setattr(rtns.vmic, "fifo_path", lambda name: tmp_path / f"{name}.fifo")
    monkeypatch.setattr(rtns.vmic, "load_pipe_source", load_pipe_source)
    monkeypatch.setattr(rtns.vmic, "open_fifo", open_fifo)
    monkeypatch.setattr(
        rtns.vmic, "unload_module", lambda index, timeout=0: log["unloaded"].append(index)
    )
    monkeypatch.setattr(rtns.audio, "import_sounddevice", fake_sounddevice)
    yield log
    for r, _ in log["pipes"]:
        os.close(r)


@pytest.fixture
def sentinel_handlers():
    """Known handlers before the run, so the test can see that they are back after it."""

    def sentinel(signum, frame) -> None:
        raise AssertionError(f"signal {signum} reached the sentinel")

    old = {s: signal.signal(s, sentinel) for s in SIGNALS}
    yield sentinel
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("vmic", [True, False], ids=["virtual-mic", "duplex"])
def test_an_exception_in_the_running_stream_undoes_everything(
    vmic: bool, sound_server, sentinel_handlers, passthrough_pack: Path
) -> None:
    FakeStream.opened.clear()
    argv = ["run", "-m", str(passthrough_pack), "-i", "0", "-q", "--rt-priority", "0"]
    argv += ["--virtual-mic", "cleanup-test"] if vmic else ["-o", "0"]
    args = build_parser().parse_args(argv)
    with pytest.raises(Injected):
        args.func(args)

    for s in SIGNALS:
        assert signal.getsignal(s) is sentinel_handlers, signal.Signals(s).name
    [stream] = FakeStream.opened
    assert stream.closed and not stream.active
    alive = [t.name for t in threading.enumerate() if t.name.startswith("rtns-")]
    assert alive == [] or set(alive) <= {"rtns-portaudio"}, alive
    if vmic:
        assert sound_server["loaded"] == [MODULE_INDEX]
        assert sound_server["unloaded"] == [MODULE_INDEX]  # unpublished
        [(_, w)] = sound_server["pipes"]
        with pytest.raises(OSError):  # the FIFO's write end is closed
            os.fstat(w)
    else:
        assert sound_server["loaded"] == []
