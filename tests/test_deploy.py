"""deploy/: the Kubernetes manifests and the Containerfile. Containers cannot run on these
machines, so: every manifest Kubernetes knows is validated offline against the API schemas
bundled in kubernetes-validate (strict: unknown fields fail); the PodMonitor (a Prometheus
Operator CRD, which it has no schema for) is checked field by field here; the pieces are
checked against each other and against the daemon (probes, drain and grace period, the
HPA's metric exists and is what the adapter serves); and the container's command line is
parsed by rtns's own parser and run as a real daemon here, with its probes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

from cli_helpers import free_port  # noqa: E402

from rtns.cli import build_parser  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / f"{name}.yaml").read_text())


def container() -> dict:
    return manifest("deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", ["deployment", "service", "hpa", "prometheus-adapter-rules"])
def test_manifests_validate_offline(name):
    kv.validate(manifest(name), kv.latest_version(), strict=True)


def test_podmonitor_structure():
    """No schema for the CRD: its fields by hand (monitoring.coreos.com/v1 PodMonitor)."""
    pm = manifest("podmonitor")
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert set(pm) == {"apiVersion", "kind", "metadata", "spec"} and pm["metadata"]["name"]
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"}
    labels = manifest("deployment")["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert ep["path"] == "/metrics" and re.fullmatch(r"\d+s", ep["interval"])
    assert ep["port"] in {p["name"] for p in container()["ports"]}


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_pieces_agree():
    dep, svc, hpa = manifest("deployment"), manifest("service"), manifest("hpa")
    pod, c = dep["spec"]["template"]["spec"], container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = build_parser().parse_args(["serve", *c["args"]])
    assert args.metrics_port == ports["metrics"] and args.metrics_addr == "0.0.0.0"
    assert args.bind == f"tcp://0.0.0.0:{ports['zmq']}" and args.curve_secret
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > args.drain_seconds + stop + 10
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(manifest("prometheus-adapter-rules")["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == metric and metric in r["seriesQuery"] for r in rules)
    from rtns.daemon.metrics import DaemonMetrics

    assert metric in {m.name for m in DaemonMetrics().registry.collect()}
    # The Containerfile's command is the Deployment's (which adds only defaults).
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entry == ["rtns", "serve"]
    assert vars(build_parser().parse_args(["serve", *cmd])) == vars(args)


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_container_command_runs_with_its_probes(tmp_path: Path):
    """The container's arguments, with free ports and this test's keys, as a real daemon:
    the probes' paths answer on the metrics port; SIGTERM turns readiness to 503; exit 0."""
    from rtns.cli.serve import write_keypair

    write_keypair(tmp_path / "keys", "server")
    write_keypair(tmp_path / "clients", "alice")
    c = container()
    zmq_port, metrics_port = free_port(), free_port()
    args = [
        a.replace("5555", str(zmq_port))
        .replace("/etc/rtns/keys", str(tmp_path / "keys"))
        .replace("/etc/rtns/clients", str(tmp_path / "clients"))
        for a in c["args"]
    ]
    args[args.index("--metrics-port") + 1] = str(metrics_port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtns", "serve", *args], stderr=subprocess.DEVNULL
    )
    live, ready = c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(metrics_port, ready) == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert _get(metrics_port, live) == 200
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop
        deadline = time.monotonic() + 20
        while True:
            try:
                if _get(metrics_port, ready) == 503:
                    break
            except OSError:  # no session open: the daemon may be gone already
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
