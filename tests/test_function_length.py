"""No function in rtns/ runs over 80 lines (shared/STYLE.md): a newcomer reads one on a
screen. Counted from the ``def`` line to the last line of the body, docstring included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function under ``root`` longer than ``limit``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_in_rtns_over_80_lines():
    assert long_functions(REPO / "rtns") == []


def test_the_count_sees_a_long_function(tmp_path):
    """The check itself: an 81-line function is found, an 80-line one is not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    (tmp_path / "m.py").write_text(f"def ok():\n{body}\n\n\ndef long():\n{body}\n    y = 0\n")
    assert long_functions(tmp_path) == ["m.py:83 long (81 lines)"]
