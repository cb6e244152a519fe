"""Prometheus metrics of the daemon (``rtns serve --metrics-port PORT``).

With one process the server exposes its own registry. With ``--workers N`` every worker
records into prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by
the supervisor before the workers start) and the supervisor serves their sum, so one scrape
covers the whole daemon. Without ``--metrics-port`` nothing is recorded (:class:`NoMetrics`).

Metric names (all prefixed ``rtns_``) are listed in docs/operations.md with what to alert on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: An answer later than this after its message arrived counts as late (the load benchmark's
#: real-time criterion).
LATE_S = 0.060
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.1, 0.25, 1.0)
_INFER_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class NoMetrics:
    """The recorder when metrics are off: any attribute, call or chain of them
    (``metrics.errors.labels(code).inc()``) does nothing."""

    def __getattr__(self, name: str) -> NoMetrics:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> NoMetrics:
        return self


@dataclass
class PendingMetrics:
    """What the hot path measured since the last flush: plain floats and a list, so a
    message costs no call into the recorder (whose counters take a lock each)."""

    audio_in: float = 0.0
    audio_out: float = 0.0
    #: Answer latencies, seconds.
    waits: list[float] = field(default_factory=list)

    def flush(self, metrics: DaemonMetrics | NoMetrics) -> None:
        """Hand everything to ``metrics`` and start again."""
        if self.audio_in:
            metrics.audio_in.inc(self.audio_in)
            self.audio_in = 0.0
        if self.audio_out:
            metrics.audio_out.inc(self.audio_out)
            self.audio_out = 0.0
        if self.waits:
            metrics.answered_many(self.waits)
            self.waits.clear()


class DaemonMetrics:
    """Counters, gauges and histograms of one server process."""

    def __init__(self) -> None:
        from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

        multiproc = bool(os.environ.get(MULTIPROC_ENV))
        # Single process: a private registry (tests may make several servers in one process).
        self.registry = REGISTRY if multiproc else CollectorRegistry()
        reg = {"registry": None if multiproc else self.registry}
        if multiproc:
            reg = {}
        live = {"multiprocess_mode": "livesum"} if multiproc else {}
        self.sessions_open = Gauge("rtns_sessions_open", "Open sessions", **reg, **live)
        self.sessions = Counter("rtns_sessions", "Sessions opened", **reg)
        self.audio_in = Counter(
            "rtns_audio_in_seconds", "Audio received, seconds of sample frames", **reg
        )
        self.audio_out = Counter(
            "rtns_audio_out_seconds", "Audio sent back, seconds of sample frames", **reg
        )
        self.hops = Counter("rtns_hops", "Hops run (128 samples at 16 kHz, per channel)", **reg)
        self.rows = Histogram(
            "rtns_rows_per_batch",
            "Rows (channel hops) per batched step",
            buckets=_ROW_BUCKETS,
            **reg,
        )
        self.inference = Histogram(
            "rtns_inference_seconds",
            "Wall time of one round of batched inference (all models)",
            buckets=_INFER_BUCKETS,
            **reg,
        )
        self.answer_latency = Histogram(
            "rtns_answer_latency_seconds",
            "From an audio message's arrival to its answer being sent",
            buckets=_LATENCY_BUCKETS,
            **reg,
        )
        self.late = Counter(
            "rtns_late_answers", f"Answers sent more than {LATE_S * 1e3:g} ms after arrival", **reg
        )
        self.errors = Counter("rtns_errors", "Error answers and drops by code", ["code"], **reg)
        self.batching = Gauge(
            "rtns_batching",
            "1 when the model runs batched, 0 when one row per call",
            ["model", "why"],
            **reg,
            **({"multiprocess_mode": "max"} if multiproc else {}),
        )
        self.workers = Gauge(
            "rtns_workers",
            "Worker processes of the daemon",
            **reg,
            **({"multiprocess_mode": "max"} if multiproc else {}),
        )
        self.draining = Gauge(
            "rtns_draining",
            "1 while the daemon drains (SIGTERM): no new sessions",
            **reg,
            **({"multiprocess_mode": "max"} if multiproc else {}),
        )
        self.streams_open = Gauge(
            "rtns_streams_open",
            "Channel streams open (a session holds one per channel)",
            **reg,
            **live,
        )
        self.capacity = Gauge(
            "rtns_capacity_streams",
            "Channel streams the daemon admits: its measured capacity with headroom",
            **reg,
            **live,
        )
        self.hop_cost = Gauge(
            "rtns_hop_cost_seconds",
            "Measured loop time per hop (one channel stream, 8 ms of audio)",
            **reg,
            **({"multiprocess_mode": "max"} if multiproc else {}),
        )

    def answered_many(self, latencies_s: list[float]) -> None:
        observe = self.answer_latency.observe
        late = 0
        for t in latencies_s:
            observe(t)
            late += t > LATE_S
        if late:
            self.late.inc(late)


def serve_metrics(
    port: int,
    addr: str,
    registry: Any = None,
    alive: Callable[[], bool] = lambda: True,
    readiness: Callable[[], tuple[bool, str]] = lambda: (True, "ready"),
    draining: Callable[[], bool] = lambda: False,
) -> Any:
    """Start the HTTP endpoint on a daemon thread; returns the server. ``GET /metrics``:
    Prometheus text; ``GET /healthz``: 200 while ``alive()`` (the loop turns), else 503;
    ``GET /readyz``: 200 while ``readiness()`` says ready (models loaded, taking
    sessions), else 503; the body is the one-word reason. ``draining``: the supervisor's
    own drain, shown in ``rtns_draining`` (its workers keep serving while it drains)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if registry is None:  # the supervisor: the sum of every worker's files
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(SupervisorCollector(draining))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            ctype = "text/plain; charset=utf-8"
            if path == "/metrics":
                code, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
            elif path == "/healthz":
                ok = alive()
                code, body = (200, b"alive\n") if ok else (503, b"stuck\n")
            elif path == "/readyz":
                ok, why = readiness()
                code, body = 200 if ok else 503, f"{why}\n".encode()
            else:
                code, body = 404, b"not found: /metrics, /healthz, /readyz\n"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # probes every few seconds must not fill the log

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    server = Server((addr, port), Handler)
    threading.Thread(target=server.serve_forever, name="rtns-metrics", daemon=True).start()
    return server


class SupervisorCollector:
    """What ``rtns serve --workers N`` shows: the workers' files summed (prometheus-client's
    multiprocess collector), with ``rtns_draining`` at 1 while the supervisor drains. (Its
    workers go on serving the open sessions and never drain themselves, so their own
    gauge stays 0.)"""

    def __init__(self, draining: Callable[[], bool]) -> None:
        from prometheus_client import multiprocess

        self._files = multiprocess.MultiProcessCollector(None)
        self._draining = draining

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        draining = 1.0 if self._draining() else 0.0
        seen = False
        for family in self._files.collect():
            if family.name == "rtns_draining":
                seen = True
                family.samples = [s._replace(value=max(s.value, draining)) for s in family.samples]
            yield family
        if not seen:
            yield GaugeMetricFamily(
                "rtns_draining", "1 while the daemon drains (SIGTERM): no new sessions", draining
            )


class LiveCollector:
    """Prometheus metrics of the live path (``rtns run --metrics-port PORT``).

    A custom collector: every value is read from the runner's counters when /metrics is
    scraped, so the audio callback and the worker record nothing extra. ``runner``: a
    :class:`rtns.audio.LiveRunner`; ``latency_s``: a callable giving the reported total
    delay (NaN until the stream has started); ``writer``: the virtual microphone's
    :class:`rtns.vmic.PipeWriter`, or None.
    """

    def __init__(self, runner: Any, latency_s: Any, writer: Any = None) -> None:
        self.runner = runner
        self.latency_s = latency_s
        self.writer = writer

    def describe(self) -> list:
        return []  # collected only on scrape (the registry must not call collect early)

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.runner.stats()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("rtns_live_audio_seconds", "Device audio through the callback", s.seconds)
        yield counter("rtns_live_callbacks", "Audio callbacks", s.callbacks)
        yield counter(
            "rtns_live_processed_seconds", "Engine audio the worker processed", s.processed_s
        )
        yield counter("rtns_live_busy_seconds", "Worker compute time", s.busy_s)
        yield gauge("rtns_live_rtf", "Worker compute time / audio time since start", s.rtf)
        yield gauge("rtns_live_max_hop_seconds", "Slowest hop since start", s.max_hop_s)
        yield counter(
            "rtns_live_underruns", "Callbacks the worker was late for (silence out)", s.underruns
        )
        yield counter(
            "rtns_live_underrun_frames", "Device frames played as silence", s.underrun_frames
        )
        xruns = CounterMetricFamily(
            "rtns_live_xruns", "PortAudio status flags by kind", labels=["kind"]
        )
        for kind, value in (
            ("input_overflow", s.pa_input_overflow),
            ("input_underflow", s.pa_input_underflow),
            ("output_underflow", s.pa_output_underflow),
            ("output_overflow", s.pa_output_overflow),
        ):
            xruns.add_metric([kind], value)
        yield xruns
        dropped = CounterMetricFamily(
            "rtns_live_dropped_frames", "Frames a full ring dropped", labels=["ring"]
        )
        dropped.add_metric(["input"], s.input_dropped)
        dropped.add_metric(["output"], s.output_dropped)
        yield dropped
        yield gauge(
            "rtns_live_latency_seconds", "Reported input-to-output delay", float(self.latency_s())
        )
        yield gauge("rtns_live_bypass", "1 while bypass is on", float(s.bypass))
        if self.writer is not None:
            w = self.writer.stats()
            yield counter(
                "rtns_live_vmic_written_seconds",
                "Audio written to the virtual microphone",
                w.written_frames / self.writer.rate,
            )
            yield counter(
                "rtns_live_vmic_overruns",
                "Times the server fell behind the virtual microphone while recording from it",
                w.overruns,
            )
            yield counter(
                "rtns_live_vmic_unread_seconds",
                "Audio discarded while no application recorded from the virtual microphone",
                w.unread_frames / self.writer.rate,
            )
            yield counter(
                "rtns_live_vmic_overrun_frames",
                "Frames dropped by those trims",
                w.overrun_frames + w.full_frames,
            )
            yield gauge("rtns_live_vmic_pipe_fill_seconds", "Audio waiting in the FIFO", w.fill_s)


def live_registry(runner: Any, latency_s: Any, writer: Any = None) -> Any:
    """A private registry holding :class:`LiveCollector` for one live stream."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(LiveCollector(runner, latency_s, writer))
    return registry
