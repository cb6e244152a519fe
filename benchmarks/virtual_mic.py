"""Virtual microphone benchmark: the delay from the real microphone to the virtual one, by
cross-correlation, and the under-runs over a long run.

A private headless PulseAudio (tests/pulse_harness.py) with the null sink ``fake_mic``
stands in for the real microphone. This script plays speech into ``fake_mic`` and records
the virtual microphone ``rtns_bench`` in one process through libpulse-simple (ctypes), while
``rtns run -i pulse --virtual-mic rtns_bench`` (PULSE_SOURCE=fake_mic.monitor) runs in
another. Both streams are put on one clock: after every write, the playback stream's
latency says when the last written sample reaches fake_mic (and so its monitor, "the
mic"); after every read, the record stream's latency says when the last read sample
reached the virtual source. The recording is matched with rtns's own offline output of
the same speech (``rtns enhance``, time-aligned with its input) by cross-correlation, so

    delay = (time of recording sample d + k) - (time of played sample k)

where d is the lag of the best match. The under-runs are those rtns's summary counts.

    python benchmarks/virtual_mic.py --seconds 60
    python benchmarks/virtual_mic.py --seconds 60 --server pipewire

``--server pipewire`` runs the same against a private headless PipeWire 0.3
(pipewire + wireplumber + pipewire-pulse, tests/pulse_harness.py's ``PipeWireServer``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pulse_harness import (  # noqa: E402
    RATE,
    PipeWireServer,
    PulseServer,
    Rtns,
    best_lag,
    pipewire_skip_reason,
    skip_reason,
)

NAME = "rtns_bench"
CHUNK = 480  # 10 ms at 48 kHz per write and per read
PA_SAMPLE_FLOAT32LE = 5
PA_STREAM_PLAYBACK, PA_STREAM_RECORD = 1, 2


class SampleSpec(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8)]


class BufferAttr(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint32) for n in ("maxlength", "tlength", "prebuf", "minreq", "fragsize")
    ]


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libpulse-simple.so.0")
    lib.pa_simple_new.restype = ctypes.c_void_p
    lib.pa_simple_new.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
        ctypes.POINTER(SampleSpec), ctypes.c_void_p, ctypes.POINTER(BufferAttr),
        ctypes.POINTER(ctypes.c_int),
    ]  # fmt: skip
    for fn in ("pa_simple_write", "pa_simple_read"):
        getattr(lib, fn).argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)
        ]  # fmt: skip
    lib.pa_simple_get_latency.restype = ctypes.c_uint64
    lib.pa_simple_get_latency.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    lib.pa_simple_drain.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    lib.pa_simple_free.argtypes = [ctypes.c_void_p]
    return lib


def _open(lib: ctypes.CDLL, direction: int, device: str, server: str) -> int:
    ss = SampleSpec(PA_SAMPLE_FLOAT32LE, RATE, 1)
    none = 0xFFFFFFFF
    nbytes = CHUNK * 4
    if direction == PA_STREAM_PLAYBACK:
        # 100 ms queued: a player thread held up by the load never lets fake_mic run dry
        # (a dry sink would shift everything after it); the latency accounts for it.
        attr = BufferAttr(none, 10 * nbytes, none, nbytes, none)
    else:
        attr = BufferAttr(none, none, none, none, nbytes)
    err = ctypes.c_int(0)
    s = lib.pa_simple_new(
        server.encode(), b"rtns-bench", direction, device.encode(), b"bench",
        ctypes.byref(ss), None, ctypes.byref(attr), ctypes.byref(err),
    )  # fmt: skip
    if not s:
        raise RuntimeError(f"pa_simple_new({device}) failed: error {err.value}")
    return s


def play(lib, server: str, x: np.ndarray, t0s: list[float]) -> None:
    """Write ``x`` to fake_mic; after each write note when sample 0 plays (t_play0)."""
    s = _open(lib, PA_STREAM_PLAYBACK, "fake_mic", server)
    err = ctypes.c_int(0)
    try:
        x = np.ascontiguousarray(x, dtype="<f4")
        for start in range(0, len(x), CHUNK):
            part = x[start : start + CHUNK]
            if lib.pa_simple_write(s, part.ctypes.data, part.nbytes, ctypes.byref(err)) < 0:
                raise RuntimeError(f"pa_simple_write: error {err.value}")
            lat = lib.pa_simple_get_latency(s, ctypes.byref(err)) / 1e6
            end = start + len(part)  # sample `end` plays at now + lat
            t0s.append(time.monotonic() + lat - end / RATE)
        lib.pa_simple_drain(s, ctypes.byref(err))
    finally:
        lib.pa_simple_free(s)


def record(lib, server: str, stop: threading.Event, chunks: list, t0s: list[float]) -> None:
    """Read the virtual microphone until ``stop``; after each read note when sample 0 of
    the recording reached the source (t_rec0)."""
    s = _open(lib, PA_STREAM_RECORD, NAME, server)
    err = ctypes.c_int(0)
    total = 0
    try:
        while not stop.is_set():
            buf = np.empty(CHUNK, dtype="<f4")
            if lib.pa_simple_read(s, buf.ctypes.data, buf.nbytes, ctypes.byref(err)) < 0:
                raise RuntimeError(f"pa_simple_read: error {err.value}")
            lat = lib.pa_simple_get_latency(s, ctypes.byref(err)) / 1e6
            total += CHUNK
            chunks.append(buf)
            t0s.append(time.monotonic() - lat - total / RATE)
    finally:
        lib.pa_simple_free(s)


def speech(shared: Path, seconds: float) -> np.ndarray:
    """VoiceBank+DEMAND noisy utterances at 48 kHz, 0.2 s apart, repeated to ``seconds``."""
    sys.path.insert(0, str(REPO))
    from rtns.resample import resample_signal

    files = sorted((shared / "data/test/vbdemand36/noisy").glob("*.flac"))
    parts, n = [], 0
    gap = np.zeros(int(0.2 * RATE), np.float32)
    i = 0
    while n < seconds * RATE:
        x, rate = sf.read(files[i % len(files)], dtype="float32")
        y = resample_signal(x[:, None], rate, RATE)[:, 0]
        parts += [y, gap]
        n += len(y) + len(gap)
        i += 1
    return np.concatenate(parts)[: int(seconds * RATE)].astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="speech played (default 60)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument(
        "--server", choices=("pulseaudio", "pipewire"), default="pulseaudio",
        help="the sound server started for the run (default pulseaudio)",
    )  # fmt: skip
    ap.add_argument("rtns_args", nargs="*", help="more `rtns run` arguments (after --)")
    args = ap.parse_args()
    server_cls = PipeWireServer if args.server == "pipewire" else PulseServer
    reason = pipewire_skip_reason() if args.server == "pipewire" else skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    lib = _lib()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        x = speech(args.shared, args.seconds)
        sf.write(tmp / "in.wav", x, RATE, subtype="FLOAT")
        r = subprocess.run(
            [sys.executable, "-m", "rtns", "enhance", str(tmp / "in.wav"), str(tmp / "ref.wav")],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        ref, _ = sf.read(tmp / "ref.wav", dtype="float32")
        with server_cls(tmp / "server") as srv:
            server_name = srv.run("pactl", "info").stdout.split("Server Name: ")[-1]
            server = f"unix:{srv.runtime}/pulse/native"
            env = {**srv.env, "PULSE_SOURCE": "fake_mic.monitor"}
            proc = Rtns(["-i", "pulse", "--virtual-mic", NAME, *args.rtns_args], env, tmp)
            try:
                lat_line = proc.wait_for(r"rtns: latency .*").group(0)
                stop = threading.Event()
                chunks: list[np.ndarray] = []
                t_rec: list[float] = []
                t_play: list[float] = []
                rec = threading.Thread(target=record, args=(lib, server, stop, chunks, t_rec))
                rec.start()
                while len(chunks) < 20:  # 0.2 s recorded: the source is being read
                    time.sleep(0.01)
                play(lib, server, x, t_play)
                n_want = len(chunks) + int(0.5 * RATE / CHUNK)  # rtns's delay and more
                while len(chunks) < n_want:
                    time.sleep(0.01)
                stop.set()
                rec.join(timeout=10)
                rc = proc.interrupt()
            finally:
                proc.kill()
            summary = next((ln for ln in proc.lines if "stopped after" in ln), "")
            status = [ln for ln in proc.lines if ln.startswith("[")]
            vm_line = next((ln for ln in proc.lines if "virtual microphone" in ln), "")
    y = np.concatenate(chunks)
    d, corr = best_lag(y, ref, len(y) - len(ref) // 2)
    t_rec0, t_play0 = float(np.median(t_rec)), float(np.median(t_play))
    delay = t_rec0 - t_play0 + d / RATE
    # The same in 5-s windows: a shift of either timeline (a gap, a drift) would show here.
    win, windows = 5 * RATE, []
    for start in range(0, len(ref) - win + 1, win):
        seg = ref[start : start + win]
        lo = max(0, d + start - RATE // 2)
        dw, cw = best_lag(y[lo : lo + win + RATE], seg, RATE)
        windows.append(
            {
                "at_s": start / RATE,
                "delay_ms": round((t_rec0 - t_play0 + (lo + dw - start) / RATE) * 1e3, 2),
                "correlation": round(cw, 4),
            }
        )
    m = re.search(r"(\d+) under-runs \((\d+) frames\)", summary)
    result = {
        "server": server_name.splitlines()[0] if server_name else args.server,
        "seconds_played": args.seconds,
        "delay_ms": round(delay * 1e3, 2),
        "correlation": round(corr, 4),
        "windows": windows,
        "spread_ms": {
            "rec_clock": round(float(np.percentile(t_rec, 95) - np.percentile(t_rec, 5)) * 1e3, 2),
            "play_clock": round(
                float(np.percentile(t_play, 95) - np.percentile(t_play, 5)) * 1e3, 2
            ),
        },
        "reported": lat_line,
        "underruns": int(m.group(1)) if m else None,
        "underrun_frames": int(m.group(2)) if m else None,
        "summary": summary,
        "virtual_mic": vm_line,
        "last_status": status[-1] if status else "",
        "rtns_exit": rc,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
