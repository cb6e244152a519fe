"""``rtns web`` as a subprocess for tests: started on a free port (``--port 0``), its stderr
lines collected (tests/pulse_harness.py's ``Rtns``), stopped with SIGINT."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pulse_harness import Rtns

START_TIMEOUT_S = 120.0  # model load on a busy 2-core machine


class WebProc(Rtns):
    def __init__(self, cwd: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        super().__init__(["--port", "0", *args], env, cwd, command="web")
        m = self.wait_for(r"serving http://127\.0\.0\.1:(\d+)/", timeout=START_TIMEOUT_S)
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGINT and the exit status (killed after 30 s)."""
        if self.proc.poll() is not None:
            self.kill()
            return self.proc.returncode
        try:
            return self.interrupt(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode
