"""The README opens with the install-and-run and install-and-test commands; CI runs the
test command verbatim and installs the same system packages; the tests run against this tree.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_head() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text[: text.index("\n## ")]


def _readme_commands() -> list[str]:
    return re.findall(r"```(?:sh|bash)\n(.+?)\n```", _readme_head(), flags=re.S)


def _apt_packages(text: str) -> set[str]:
    """The packages of the one ``apt-get install`` in ``text`` (options and line breaks
    dropped)."""
    m = re.findall(r"apt-get install ((?:\\\n|[^`\n>])+)", text)
    assert len(m) == 1, m
    words = m[0].replace("\\\n", " ").split()
    return {w for w in words if not w.startswith("-")}


def test_readme_opens_with_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    run_cmd, test_cmd = cmds
    assert "pip install ." in run_cmd and "rtns enhance" in run_cmd
    assert "pytest" in test_cmd
    # Editable: a non-editable install copies export/ and models/ into site-packages as
    # rtns_export and rtns_models, and the tests would run against that stale copy.
    assert "pip install -q -e '.[train,test]'" in test_cmd


def test_readme_shows_the_browser_in_one_command():
    """Right after the install, one command opens rtns in a browser; its extra exists."""
    head = _readme_head()
    after_install = head[head.index("```", head.index("```sh") + 5) :]
    assert "`pip install '.[web]' && rtns web`" in after_install.split("\n\n")[1]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "aiohttp" in " ".join(extras["optional-dependencies"]["web"])


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _readme_commands()[1]
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_cmd in ci_lines


def test_readme_system_packages_work_as_root_and_match_ci():
    """Root on a bare Debian has no sudo: the line is plain apt-get, updates first, never
    prompts, and installs what CI installs."""
    head = _readme_head()
    assert "sudo apt-get" not in head
    line = next(ln for ln in head.splitlines() if "apt-get install" in ln and "jackd2" in ln)
    assert line.strip("`").startswith("apt-get update && ")
    assert "DEBIAN_FRONTEND=noninteractive" in line and " -y " in line
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    want = {"build-essential", "python3-dev", "python3-venv", "libportaudio2", "jackd2"}
    assert want <= _apt_packages(line) == _apt_packages(ci)


def test_tests_import_this_tree():
    """What the tests import is this checkout's code, not an installed copy."""
    import rtns
    import rtns_export
    import rtns_models

    for mod, folder in ((rtns, "rtns"), (rtns_export, "export"), (rtns_models, "models")):
        assert Path(mod.__file__).resolve().parent == REPO / folder, mod.__file__


def test_every_python_package_is_installed():
    """pyproject lists its packages by hand (export/ and models/ are installed under other
    names): every folder with an __init__.py under rtns/ and export/ must be listed, or a
    non-editable `pip install .` leaves it out."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    listed = set(setup["setuptools"]["packages"])
    dirs = {"rtns": "rtns"} | setup["setuptools"]["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join((name, *rel.parts)))
    assert found == listed, (sorted(found - listed), sorted(listed - found))
