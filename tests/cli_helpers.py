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
