"""Without ../shared the headline quality tests skip on a user's clone but fail in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_missing_shared_data_fails_in_ci(tmp_path, ci, outcome):
    env = {**os.environ, "CI": ci, "RTNS_TEST_SHARED": str(tmp_path / "absent")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_default_pack.py::test_default_pack_improves_dnsmos",
            "-k",
            "p257_094",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert outcome in r.stdout, r.stdout[-2000:]
    assert (r.returncode != 0) == (ci == "true")
