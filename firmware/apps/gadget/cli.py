"""`mirrorunit gadget up|down|status`: the USB gadget in configfs, outside a running unit.

Every configfs, sysfs and mount path comes from the options (defaults are the
real ones), so the same commands run against a scratch tree in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...usb_gadget.configfs import Gadget, GadgetError, GadgetSettings, gadget_down, gadget_up
from ...usb_gadget.functionfs import FunctionFsError, mount_functionfs
from .. import standalone
from ..options import ascii_text, u16

log = logging.getLogger("mirrorunit.gadget")

_DEFAULTS = GadgetSettings()


def add_gadget_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The GadgetSettings fields as options; `prefix` keeps them apart among other
    roles' options on `mirrorunit local`."""
    d = _DEFAULTS
    g = p.add_argument_group("USB gadget")
    g.add_argument(f"--{prefix}configfs", type=Path, default=d.configfs_root,
                   dest="usb_configfs", help="configfs mount point (default %(default)s)")
    g.add_argument(f"--{prefix}udc-dir", type=Path, default=d.udc_class_dir,
                   dest="usb_udc_dir", help="where UDCs are listed (default %(default)s)")
    g.add_argument(f"--{prefix}ffs-mount", type=Path, default=d.ffs_mount,
                   dest="usb_ffs_mount", help="FunctionFS mount point (default %(default)s)")
    g.add_argument(f"--{prefix}gadget-name", default=d.gadget_name, dest="usb_gadget_name")
    g.add_argument(f"--{prefix}udc", default=None, dest="usb_udc",
                   help="UDC to bind to (default: the first one listed)")
    g.add_argument(f"--{prefix}vid", type=u16, default=d.id_vendor, dest="usb_vid",
                   help="idVendor (default 0x%(default)04x)")
    g.add_argument(f"--{prefix}pid", type=u16, default=d.id_product, dest="usb_pid",
                   help="idProduct (default 0x%(default)04x)")
    g.add_argument(f"--{prefix}manufacturer", default=d.manufacturer, dest="usb_manufacturer")
    g.add_argument(f"--{prefix}product", default=d.product, dest="usb_product")
    g.add_argument(f"--{prefix}serial", type=ascii_text(64), default=d.serial_number,
                   dest="usb_serial",
                   help="USB serial number string (also the SCSI serial unless "
                        "--scsi-serial is given)")


def gadget_settings(args: argparse.Namespace) -> GadgetSettings:
    return GadgetSettings(
        configfs_root=args.usb_configfs,
        udc_class_dir=args.usb_udc_dir,
        ffs_mount=args.usb_ffs_mount,
        gadget_name=args.usb_gadget_name,
        udc=args.usb_udc or None,
        id_vendor=args.usb_vid,
        id_product=args.usb_pid,
        manufacturer=args.usb_manufacturer,
        product=args.usb_product,
        serial_number=args.usb_serial,
    )


def register(sub: Any) -> None:
    configure(sub.add_parser("gadget", help="create or remove the USB gadget in configfs"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit gadget", configure, argv)


def configure(gp: argparse.ArgumentParser) -> None:
    gs = gp.add_subparsers(dest="gadget_command", required=True)
    up = gs.add_parser("up", help="create the gadget tree and mount its FunctionFS "
                                  "(binding happens when `local --frontend usb` serves)")
    add_gadget_options(up)
    up.add_argument("--no-mount", action="store_true", help="leave FunctionFS unmounted")
    up.set_defaults(func=_cmd_up)
    down = gs.add_parser("down", help="unbind and remove the gadget (safe to repeat)")
    add_gadget_options(down)
    down.set_defaults(func=_cmd_down)
    st = gs.add_parser("status", help="show the gadget's configfs state")
    add_gadget_options(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)


def gadget_status(settings: GadgetSettings) -> dict[str, Any]:
    g = Gadget(settings)
    exists = settings.gadget_dir.is_dir()
    return {
        "gadget": settings.gadget_name,
        "path": str(settings.gadget_dir),
        "exists": exists,
        "udc": g.bound_udc() if exists else None,
        "functionfs_mounted": os.path.ismount(settings.ffs_mount),
        "ffs_mount": str(settings.ffs_mount),
    }


def _cmd_up(args: argparse.Namespace) -> int:
    settings = gadget_settings(args)
    try:
        gadget_up(settings)
        if not args.no_mount:
            mount_functionfs(settings.function_name, settings.ffs_mount)
    except (GadgetError, FunctionFsError) as e:
        print(f"mirrorunit gadget up: {e}", file=sys.stderr)
        return 1
    print(f"gadget {settings.gadget_name} created at {settings.gadget_dir}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    settings = gadget_settings(args)
    try:
        gadget_down(settings)
    except (GadgetError, FunctionFsError) as e:
        print(f"mirrorunit gadget down: {e}", file=sys.stderr)
        return 1
    print(f"gadget {settings.gadget_name} removed")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = gadget_status(gadget_settings(args))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"gadget {status['gadget']}: "
              + ("absent" if not status["exists"] else
                 f"bound to {status['udc']}" if status["udc"] else "present, unbound")
              + (", FunctionFS mounted" if status["functionfs_mounted"] else ""))
    return 0
