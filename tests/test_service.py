"""The systemd units: ``rtns service install --virtual-mic`` / ``uninstall`` (user unit) and
the shipped system unit of ``rtns serve``; both checked by ``systemd-analyze verify`` where
it exists. No test runs systemctl."""

from __future__ import annotations

import os
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


# A sounddevice module with a fixed device list, for the install's --mic check.
STUB_SD = """
class _Default:
    device = [1, 1]
default = _Default()
def query_devices():
    return [
        {"name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "hostapi": 0,
         "max_input_channels": 2, "max_output_channels": 2, "default_samplerate": 48000.0},
        {"name": "pulse", "hostapi": 0, "max_input_channels": 32,
         "max_output_channels": 32, "default_samplerate": 44100.0},
        {"name": "USB Mic", "hostapi": 0, "max_input_channels": 1,
         "max_output_channels": 0, "default_samplerate": 48000.0},
        {"name": "HDMI out", "hostapi": 0, "max_input_channels": 0,
         "max_output_channels": 2, "default_samplerate": 48000.0},
    ]
def query_hostapis():
    return ({"name": "ALSA"},)
"""


def install_env(tmp_path: Path) -> dict[str, str]:
    """XDG_CONFIG_HOME in tmp_path, and the stub sounddevice first on the path."""
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "sounddevice.py").write_text(STUB_SD)
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "PYTHONPATH": os.pathsep.join([str(stub), str(REPO)]),
    }


def test_install_writes_a_unit_that_runs_the_virtual_mic(tmp_path):
    env = install_env(tmp_path)
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


def test_install_checks_the_model_and_writes_an_absolute_folder(passthrough_pack, tmp_path):
    """Issue 31 (8): `rtns service install --model nonexist` (or a corrupt pack, or a
    relative path) exited 0 and wrote a unit that failed and restarted every 3 s at each
    login. The pack is loaded as `rtns run` loads it, and a folder is written absolute."""
    env = install_env(tmp_path)
    unit = tmp_path / "cfg" / "systemd" / "user" / UNIT_NAME

    def install(*args):
        return run_rtns(
            "service",
            "install",
            "--virtual-mic",
            "--force",
            *args,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )

    r = install("--model", "nonexist")
    assert r.returncode == 1 and "nonexist: no model pack of that name" in r.stderr, r.stderr
    assert not unit.exists()
    broken = Path(shutil.copytree(passthrough_pack, tmp_path / "broken"))
    (broken / "mask.onnx").write_bytes(b"not a graph")
    r = install("--model", "broken")
    assert r.returncode == 1 and str(Path("broken") / "mask.onnx") in r.stderr, r.stderr
    assert "sha256" in r.stderr and not unit.exists()
    shutil.copytree(passthrough_pack, tmp_path / "good")
    r = install("--model", "./good")
    assert r.returncode == 0, r.stderr
    argv = _exec_start(unit.read_text())
    assert argv[argv.index("--model") + 1] == str((tmp_path / "good").resolve())
    r = install("--model", "rtns-dtln")  # a shipped pack keeps its name
    assert r.returncode == 0, r.stderr
    argv = _exec_start(unit.read_text())
    assert argv[argv.index("--model") + 1] == "rtns-dtln"


def test_install_checks_the_mic_and_writes_its_name(tmp_path):
    """Issue 31 (8): `--mic 99` was written as it was. Now it is resolved against this
    machine's input devices as `rtns run -i` does; an index is written as the device name."""
    env = install_env(tmp_path)
    unit = tmp_path / "cfg" / "systemd" / "user" / UNIT_NAME
    for bad, says in (
        ("99", "no audio device with index 99"),
        ("3", "has no input"),
        ("webcam", "no input device matches 'webcam'"),
    ):
        r = run_rtns(
            "service", "install", "--virtual-mic", "--mic", bad, cwd=tmp_path, env=env, timeout=120
        )
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not unit.exists()
    r = run_rtns(
        "service", "install", "--virtual-mic", "--mic", "2", cwd=tmp_path, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    argv = _exec_start(unit.read_text())
    assert argv[argv.index("-i") + 1] == "USB Mic"


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
