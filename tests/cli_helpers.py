"""Running the real CLI (`python -m rtns`) in a subprocess, for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Runs the CLI as `python -m rtns` would, but with the shipped packs (the rtns_models
# package) made unimportable, as in an install that has no default model.
_WITHOUT_SHIPPED = (
    "import sys; sys.modules['rtns_models'] = None; "
    "from rtns.cli import main; sys.exit(main(sys.argv[1:]))"
)


def run_rtns(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    hide_shipped_packs: bool = False,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run the CLI with ``args``; returns the completed process (text stdout/stderr)."""
    launcher = ["-c", _WITHOUT_SHIPPED] if hide_shipped_packs else ["-m", "rtns"]
    return subprocess.run(
        [sys.executable, *launcher, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(
    tmp_path: Path,
    *args: str,
    workers: int = 1,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str, Path]:
    """`rtns serve --workers N` on a free loopback port with key=value logs in a file;
    returns once the daemon (and each worker) logged `listening`: (process, endpoint, log)."""
    import time

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rtns",
                "serve",
                "--bind",
                endpoint,
                "--workers",
                str(workers),
                "--log-format",
                "kv",
                *args,
            ],
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    want = 1 if workers == 1 else workers + 1  # the supervisor and every worker
    deadline = time.monotonic() + timeout
    while log.read_text().count("event=listening") < want:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"rtns serve did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc, endpoint, log
