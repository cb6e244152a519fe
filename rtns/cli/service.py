"""``rtns service install --virtual-mic`` / ``rtns service uninstall``: the systemd user
unit that publishes the virtual microphone at login. rtns writes or removes the file and
prints the systemctl commands; it never runs systemctl itself."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rtns.cli import options
from rtns.errors import UserInputError

SERVICE_HELP = """\
Writes (install) or removes (uninstall) the systemd *user* unit rtns-virtual-mic.service
under $XDG_CONFIG_HOME/systemd/user (default ~/.config/systemd/user). The unit runs
`rtns run -i MIC --virtual-mic NAME --quiet` with this Python interpreter at login. rtns
prints the systemctl commands that enable or stop it and runs none of them. See
docs/desktop.md; a system unit for `rtns serve` is in contrib/systemd/."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "service",
        help="systemd user unit for the virtual microphone",
        description=SERVICE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.one_line_errors(p)
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    inst = ssub.add_parser(
        "install",
        help="write the user unit",
        description="Write rtns-virtual-mic.service (see `rtns service --help`).",
    )
    inst.add_argument(
        "--virtual-mic",
        action="store_true",
        required=True,
        help="the unit publishes the virtual microphone (the one kind of user unit)",
    )
    inst.add_argument(
        "--name",
        type=options.source_name,
        default=None,
        metavar="NAME",
        help="name of the virtual microphone (default: rtns_mic)",
    )
    inst.add_argument(
        "--mic",
        default="pulse",
        metavar="MIC",
        help="input device as `rtns run -i` takes it, checked against this machine's devices "
        "(an index is written as the device's name; default: pulse, the sound server's "
        "default input when the unit starts)",
    )
    inst.add_argument(
        "--source",
        type=options.source_name,
        default=None,
        metavar="SOURCE",
        help="with --mic pulse: the server source to read (PULSE_SOURCE; `pactl list short "
        "sources` lists them)",
    )
    options.add_model(inst)
    options.add_atten_lim(inst)
    inst.add_argument("--force", action="store_true", help="replace an existing unit file")
    options.one_line_errors(inst)
    inst.set_defaults(func=run_install)
    un = ssub.add_parser(
        "uninstall",
        help="remove the user unit",
        description="Remove rtns-virtual-mic.service (stop it first: systemctl --user "
        "disable --now rtns-virtual-mic.service).",
    )
    options.one_line_errors(un)
    un.set_defaults(func=run_uninstall)


def unit_model(spec: str | None) -> str | None:
    """The ``--model`` the unit gets: the pack loaded now exactly as `rtns run` loads it
    (one line if it cannot be), named so that the unit finds it from any folder and without
    this shell's environment: a folder as an absolute path; a pack name as it is when the
    unit's search path finds the same pack, else that pack's absolute folder."""
    from rtns.cli.files import load_model
    from rtns.pack import PACK_PATH_ENV, PackError, resolve_pack

    model = load_model(spec)  # None: the default pack, which the unit loads the same way
    if spec is None:
        return None
    folder = Path(model.pack_dir).resolve()
    if Path(spec).expanduser().is_dir() or os.sep in spec or spec.startswith("."):
        return str(folder)
    saved = os.environ.pop(PACK_PATH_ENV, None)  # the unit does not have this shell's value
    try:
        found = resolve_pack(spec).resolve()
    except PackError:
        found = None
    finally:
        if saved is not None:
            os.environ[PACK_PATH_ENV] = saved
    return spec if found == folder else str(folder)


def unit_mic(spec: str) -> str:
    """The ``-i`` the unit gets: ``spec`` checked against this machine's input devices as
    `rtns run -i` checks it; an index becomes the device's name (indexes change between
    boots and when devices come and go) when that name finds the same device."""
    from rtns.audio import format_devices, import_sounddevice, resolve_device

    sd = import_sounddevice()
    devices = list(sd.query_devices())
    if not devices:
        raise UserInputError(f"--mic {spec}: {format_devices([], [], [-1, -1])}")
    index = resolve_device(spec, devices, "input")
    if not spec.strip().isdigit():
        return spec
    name = str(devices[index]["name"])
    try:
        same = resolve_device(name, devices, "input") == index
    except UserInputError:
        same = False
    return name if same else spec


def run_install(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from rtns.errors import first_validation_error
    from rtns.service import (
        DEFAULT_MIC_NAME,
        UNIT_NAME,
        VirtualMicUnit,
        render_user_unit,
        user_unit_dir,
    )

    # What the unit will run is checked now, as `rtns run` checks it, so that a mistake is
    # one line here and not a unit that fails and restarts every 3 s at each login.
    model = unit_model(args.model)
    mic = unit_mic(args.mic)
    try:
        unit = VirtualMicUnit(
            name=args.name or DEFAULT_MIC_NAME,
            mic=mic,
            source=args.source,
            model=model,
            atten_lim=None if args.atten_lim is None else str(args.atten_lim.wire()),
        )
    except ValidationError as e:
        where, msg = first_validation_error(e)
        raise UserInputError(f"rtns service install: {where}: {msg}") from None
    folder = user_unit_dir()
    path = folder / UNIT_NAME
    if path.exists() and not args.force:
        raise UserInputError(f"{path} exists; pass --force to replace it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(render_user_unit(unit), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise UserInputError(f"cannot write {path}: {e.strerror}") from None
    print(f"rtns: wrote {path}", file=sys.stderr)
    print(
        "rtns: start it now and at every login with:\n"
        f"  systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}",
        file=sys.stderr,
    )
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    from rtns.service import UNIT_NAME, user_unit_dir

    folder = user_unit_dir()
    path = folder / UNIT_NAME
    # `systemctl --user enable` links the unit here; a link left behind would dangle.
    wanted = folder / "default.target.wants" / UNIT_NAME
    if not path.exists() and not wanted.is_symlink():
        raise UserInputError(f"no unit to remove ({path} does not exist)")
    try:
        for p in (wanted, path):
            if p.is_symlink() or p.exists():
                p.unlink()
                print(f"rtns: removed {p}", file=sys.stderr)
    except OSError as e:
        raise UserInputError(f"cannot remove {e.filename}: {e.strerror}") from None
    print(
        "rtns: a running one keeps running until stopped:\n"
        f"  systemctl --user stop {UNIT_NAME}; systemctl --user daemon-reload",
        file=sys.stderr,
    )
    return 0
