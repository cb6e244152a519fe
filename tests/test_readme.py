"""The README opens with the install-and-run and install-and-test commands; CI runs the
test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    head = text[: text.index("\n## ")]
    return re.findall(r"```(?:sh|bash)\n(.+?)\n```", head, flags=re.S)


def test_readme_opens_with_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    run_cmd, test_cmd = cmds
    assert "pip install ." in run_cmd and "rtns enhance" in run_cmd
    assert "pytest" in test_cmd


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _readme_commands()[1]
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_cmd in ci_lines
