"""systemd units: the user unit that starts the virtual microphone at login
(``rtns service install --virtual-mic``) and where it lives.

The unit runs ``python -m rtns run -i MIC --virtual-mic NAME`` with the interpreter that ran
the install, so a virtual environment keeps working without being activated. systemd stops
it with SIGTERM, on which rtns removes the source (docs/desktop.md).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rtns.vmic import NAME_RX

UNIT_NAME = "rtns-virtual-mic.service"
DEFAULT_MIC_NAME = "rtns_mic"

# Characters a systemd command line word may hold without quotes.
_PLAIN = re.compile(r"[A-Za-z0-9_./:=+@,%-]+")


class VirtualMicUnit(BaseModel):
    """What the user unit starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(DEFAULT_MIC_NAME, pattern=f"^{NAME_RX}$")
    mic: str = Field("pulse", min_length=1)
    #: PulseAudio source the `pulse` device reads (PULSE_SOURCE), or None for the default.
    source: str | None = Field(None, pattern=f"^{NAME_RX}$")
    model: str | None = None
    atten_lim: str | None = None
    python: str = Field(default_factory=lambda: sys.executable)


def user_unit_dir(env: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user`` (``~/.config/systemd/user`` by default)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "systemd" / "user"


def quote(word: str) -> str:
    """``word`` as one word of a systemd command line (``%`` is a specifier there)."""
    word = word.replace("%", "%%")
    if _PLAIN.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_user_unit(unit: VirtualMicUnit) -> str:
    cmd = [unit.python, "-m", "rtns", "run", "-i", unit.mic, "--virtual-mic", unit.name]
    if unit.model:
        cmd += ["--model", unit.model]
    if unit.atten_lim:
        cmd += ["--atten-lim", unit.atten_lim]
    cmd.append("--quiet")
    env = f"Environment=PULSE_SOURCE={unit.source}\n" if unit.source else ""
    return f"""\
# Written by `rtns service install --virtual-mic`; `rtns service uninstall` removes it.
[Unit]
Description=rtns noise-suppressed microphone {unit.name}
# The sound server of the session (either may be absent; ordering on a missing unit is a no-op).
After=pulseaudio.service pipewire-pulse.service
Wants=sound.target

[Service]
Type=simple
{env}ExecStart={" ".join(quote(w) for w in cmd)}
# SIGTERM (systemd's stop) makes rtns remove the source; a leftover of a crash is removed
# when the next start finds it.
TimeoutStopSec=10
Restart=on-failure
RestartSec=3

[Install]
WantedBy=default.target
"""
