"""The ``rtns web`` page in a real browser: Debian's Chromium, headless, driven by Playwright
for Python, its microphone a WAV file (Chromium's fake capture device, which loops it).

The page captures the fake microphone with an AudioWorklet at the browser's own rate,
streams it over the WebSocket, and keeps what it sent and what came back (``?record=S``).
Checked: what came back is ``rtns enhance`` of the same file (correlation after alignment,
past the capture's first seconds, in which Chromium's fake device skips a block), and it is
exactly what a ``ChannelStream`` makes of what the page sent (nothing lost or reordered on
the way); the bypass switch reaches the server; a file given to the page comes back
enhanced with its picture. ``RTNS_WEB_SCREENSHOT=PATH`` also saves the page's screenshot
there (docs/web-page.png was made so).

CI installs chromium (.ci/run); skipped only where it or Playwright is absent.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("aiohttp")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)

from cli_helpers import run_rtns  # noqa: E402
from pulse_harness import best_lag  # noqa: E402
from web_harness import WebProc  # noqa: E402

RECORD_S = 6.0
#: Chromium's fake capture skips a 10 ms block within its first ~1.5 s; compare after it.
SETTLE_S = 2.0
FILE_RATE = 48_000
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]  # fmt: skip


@pytest.fixture(scope="module")
def speech(shared_dir: Path, tmp_path_factory) -> Path:
    """Two noisy utterances at 48 kHz, 16-bit, 0.3 s of silence around them (8.9 s)."""
    from rtns.resample import resample_signal

    parts = []
    for name in ("p232_001.flac", "p232_005.flac"):
        x, rate = sf.read(shared_dir / "data/test/vbdemand36/noisy" / name, dtype="float32")
        parts.append(resample_signal(x[:, None], rate, FILE_RATE)[:, 0])
    gap = np.zeros(int(0.3 * FILE_RATE), np.float32)
    path = tmp_path_factory.mktemp("speech") / "speech48k.wav"
    sf.write(path, np.concatenate([gap, parts[0], gap, parts[1], gap]), FILE_RATE, "PCM_16")
    return path


def _floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4")


def _drive(url: str, wav: Path, drop: Path, shot: Path) -> dict:
    """Open the page, start the microphone, record, toggle bypass, drop a file."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=[*ARGS, f"--use-file-for-fake-audio-capture={wav}"]
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1300})
            page.goto(f"{url}/?record={RECORD_S}")
            page.click("#start")
            page.wait_for_function("window.rtnsPage.state === 'ready'", timeout=60_000)
            page.wait_for_function(
                "window.rtnsPage.rec.outN >= window.rtnsPage.rec.limit", timeout=120_000
            )
            rec = page.evaluate("window.rtnsPage.recorded()")
            page.click("#bypass")
            page.wait_for_function(
                "window.rtnsPage.control && window.rtnsPage.control.bypass", timeout=30_000
            )
            page.click("#bypass")
            page.wait_for_function("!window.rtnsPage.control.bypass", timeout=30_000)
            page.set_input_files("#file-input", str(drop))
            page.wait_for_function("window.rtnsPage.fileResult !== null", timeout=120_000)
            result = page.evaluate("window.rtnsPage.fileResult")
            plot_shown = page.evaluate(
                "document.getElementById('file-plot').naturalWidth > 0 && "
                "!document.getElementById('file-result').hidden"
            )
            page.screenshot(path=str(shot), full_page=True)
            errors = page.evaluate("window.rtnsPage.errors")
            player = page.evaluate("window.rtnsPage.playerStats()")
        finally:
            browser.close()
    return {
        "rate": rec["rate"],
        "input": _floats(rec["input"]),
        "output": _floats(rec["output"]),
        "file": result,
        "plot_shown": plot_shown,
        "errors": errors,
        "player": player,
    }


def test_page_in_chromium(speech, shared_dir, tmp_path):
    from rtns.cli.files import load_model
    from rtns.resample import resample_signal
    from rtns.streams import ChannelStream

    r = run_rtns("enhance", str(speech), str(tmp_path / "ref.wav"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref, _ = sf.read(tmp_path / "ref.wav", dtype="float32")
    drop = shared_dir / "data/test/vbdemand36/noisy/p232_001.flac"
    web = WebProc(tmp_path)
    try:
        got = _drive(web.url, speech, drop, tmp_path / "page.png")
    finally:
        assert web.stop() == 0, web.output
    rate, x, y = got["rate"], got["input"], got["output"]
    assert got["errors"] == [], got["errors"]
    assert len(x) == len(y) == round(RECORD_S * rate), (len(x), len(y), rate)

    # What came back is rtns enhance of the file (looped by the fake device): the
    # reference at the page's rate, three times over, against the output past the settling.
    ref_r = resample_signal(ref[:, None], FILE_RATE, rate)[:, 0]
    looped = np.tile(ref_r, 3)
    seg = y[int(SETTLE_S * rate) :]
    lag, corr = best_lag(looped, seg, 2 * len(ref_r))
    x_file = resample_signal(sf.read(speech, dtype="float32")[0][:, None], FILE_RATE, rate)[:, 0]
    _, corr_noisy = best_lag(np.tile(x_file, 3), seg, 2 * len(ref_r))
    print(
        f"\nbrowser ({rate} Hz): correlation with rtns enhance of the file {corr:.4f} "
        f"(with the noisy file {corr_noisy:.4f}), over {len(seg) / rate:.1f} s; "
        f"player {got['player']}"
    )
    assert corr >= 0.9, (corr, corr_noisy)
    assert 1 - corr**2 < 0.5 * (1 - corr_noisy**2), (corr, corr_noisy)

    # And exactly what one ChannelStream makes of what the page sent, from its first sample.
    cs = ChannelStream(load_model(None), 1, rate)
    want = cs.push(x)[:, 0]
    n = min(len(want), len(y))
    assert n > len(y) - 2 * rate // 100
    np.testing.assert_allclose(y[:n], want[:n], atol=2e-6)

    assert got["file"] == {"name": drop.name, "duration": 1.741, "png": True}, got["file"]
    assert got["plot_shown"]
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("RTNS_WEB_SCREENSHOT"):
        shutil.copyfile(tmp_path / "page.png", os.environ["RTNS_WEB_SCREENSHOT"])
