"""rtns serve --metrics-port: Prometheus metrics after a streamed file (1 and 2 workers)."""

from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("prometheus_client")

from cli_helpers import free_port, start_serve  # noqa: E402

from rtns.daemon.client import Client  # noqa: E402


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_after_a_streamed_file(tmp_path: Path, workers: int):
    mport = free_port()
    proc, endpoint, _ = start_serve(tmp_path, "--metrics-port", str(mport), workers=workers)
    try:
        x = (0.1 * np.random.default_rng(0).standard_normal(32_000)).astype(np.float32)
        for _ in range(2):
            with Client(endpoint, timeout=20) as c:
                c.enhance(x, chunk=320)
        m = scrape(mport)
        assert m["rtns_sessions_total"] == 2
        assert m["rtns_sessions_open"] == 0
        assert m["rtns_audio_in_seconds_total"] == pytest.approx(4.0)
        assert m["rtns_audio_out_seconds_total"] == pytest.approx(2 * (2.0 + 384 / 16000))
        assert m["rtns_hops_total"] == 2 * ((32_000 + 384 + 127) // 128)
        assert m["rtns_answer_latency_seconds_count"] == 2 * 100  # one answer per message
        assert m["rtns_rows_per_batch_count"] > 0 and m["rtns_inference_seconds_count"] > 0
        assert m["rtns_workers"] == workers
        batching = [v for k, v in m.items() if k.startswith("rtns_batching{")]
        assert batching and all(v == 1 for v in batching)
        with Client(endpoint) as c:
            c.send_frames([b"not json"])
            c.recv(10)
        assert scrape(mport)['rtns_errors_total{code="bad_json"}'] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
