"""The systemd units: ``rtns service install --virtual-mic`` / ``uninstall`` (user unit) and
the shipped system unit of ``rtns serve``; both checked by ``systemd-analyze verify`` where
it exists. No test runs systemctl."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import run_rtns

from rtns.cli import build_parser
from rtns.service import UNIT_NAME, VirtualMicUnit, quote, render_user_unit, user_unit_dir

REPO = Path(__file__).resolve().parents[1]
SERVE_UNIT = REPO / "contrib" / "systemd" / "rtns-serve.service"
ANALYZE = shutil.which("systemd-analyze")
NO_ANALYZE = "systemd-analyze is not installed (Debian: package systemd)"


def _exec_start(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart=").replace("%%", "%"))


def _verify(unit: Path, tmp_path: Path, user: bool) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "xdg-run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    cmd = [ANALYZE, *(["--user"] if user else []), "verify", str(unit)]
    # --user verify needs a runtime folder, not a running user manager.
    env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(run_dir), "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_user_unit_dir_honours_xdg_config_home(tmp_path):
    assert user_unit_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "systemd" / "user"
    assert user_unit_dir({"HOME": "/home/u"}) == Path("/home/u/.config/systemd/user")


def test_quote():
    assert quote("/usr/bin/python3") == "/usr/bin/python3"
    assert quote("My Mic") == '"My Mic"'
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert quote("100%") == "100%%"


def test_install_writes_a_unit_that_runs_the_virtual_mic(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    r = run_rtns(
        "service", "install", "--virtual-mic", "--mic", "USB Mic", "--name", "clean_mic",
        "--atten-lim", "12", cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    path = tmp_path / "cfg" / "systemd" / "user" / UNIT_NAME
    assert f"wrote {path}" in r.stderr and "systemctl --user" in r.stderr
    text = path.read_text()
    argv = _exec_start(text)
    assert argv[1:3] == ["-m", "rtns"] and Path(argv[0]).exists()
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.input, args.virtual_mic, args.quiet) == (
        "run", "USB Mic", "clean_mic", True,
    )  # fmt: skip
    assert args.atten_lim.db == 12 and args.output is None
    assert "WantedBy=default.target" in text

    # A second install refuses to overwrite, --force replaces.
    again = run_rtns("service", "install", "--virtual-mic", cwd=tmp_path, env=env, timeout=120)
    assert again.returncode == 1 and "--force" in again.stderr
    forced = run_rtns(
        "service", "install", "--virtual-mic", "--force", "--source", "alsa_input.x",
        cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert "Environment=PULSE_SOURCE=alsa_input.x" in path.read_text()

    # uninstall removes the file and the link `systemctl --user enable` makes.
    wants = path.parent / "default.target.wants"
    wants.mkdir()
    (wants / UNIT_NAME).symlink_to(path)
    r = run_rtns("service", "uninstall", cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not path.exists() and not (wants / UNIT_NAME).is_symlink()
    r = run_rtns("service", "uninstall", cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 1 and "no unit to remove" in r.stderr


def test_install_refuses_bad_names(tmp_path):
    r = run_rtns(
        "service", "install", "--virtual-mic", "--name", "a b", cwd=tmp_path,
        env={"XDG_CONFIG_HOME": str(tmp_path)}, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "systemd").exists()


@pytest.mark.skipif(ANALYZE is None, reason=NO_ANALYZE)
def test_user_unit_passes_systemd_analyze_verify(tmp_path):
    folder = tmp_path / "systemd" / "user"
    folder.mkdir(parents=True)
    unit = folder / UNIT_NAME
    unit.write_text(render_user_unit(VirtualMicUnit(mic="My Mic", source="alsa_input.usb")))
    r = _verify(unit, tmp_path, user=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


@pytest.mark.skipif(ANALYZE is None, reason=NO_ANALYZE)
def test_serve_system_unit_passes_systemd_analyze_verify(tmp_path):
    """The shipped unit, with its ExecStart pointed at this install's rtns (verify checks
    that the program exists), verifies without a warning; its arguments parse."""
    text = SERVE_UNIT.read_text()
    argv = _exec_start(text)
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.metrics_port == 9100
    assert "User=rtns" in text
    rtns_bin = shutil.which("rtns")
    if rtns_bin is None:
        pytest.skip("the rtns console script is not on PATH")
    unit = tmp_path / "rtns-serve.service"
    unit.write_text(text.replace(f"ExecStart={argv[0]}", f"ExecStart={rtns_bin}"))
    r = _verify(unit, tmp_path, user=False)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    sysusers = (REPO / "contrib" / "systemd" / "rtns.sysusers.conf").read_text()
    assert any(ln.split()[:2] == ["u", "rtns"] for ln in sysusers.splitlines())
