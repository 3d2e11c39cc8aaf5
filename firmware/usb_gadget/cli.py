"""`mirrorunit gadget up|down|status` and the USB options of `mirrorunit local`.

Every configfs, sysfs and mount path comes from the options (defaults are the
real ones), so the same commands run against a scratch tree in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from firmware.usb_gadget.configfs import Gadget, GadgetError, GadgetSettings, gadget_down, gadget_up
from firmware.usb_gadget.functionfs import FunctionFsError, mount_functionfs

log = logging.getLogger("mirrorunit.gadget")

_DEFAULTS = GadgetSettings()


def _u16(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text}: not a number (e.g. 0x1d6b)") from e
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text}: must fit in 16 bits")
    return value


def _ascii(width: int) -> Any:
    def check(text: str) -> str:
        if not text.isascii() or len(text) > width or not text.isprintable():
            raise argparse.ArgumentTypeError(
                f"{text!r}: at most {width} printable ASCII characters")
        return text
    return check


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
    g.add_argument(f"--{prefix}vid", type=_u16, default=d.id_vendor, dest="usb_vid",
                   help="idVendor (default 0x%(default)04x)")
    g.add_argument(f"--{prefix}pid", type=_u16, default=d.id_product, dest="usb_pid",
                   help="idProduct (default 0x%(default)04x)")
    g.add_argument(f"--{prefix}manufacturer", default=d.manufacturer, dest="usb_manufacturer")
    g.add_argument(f"--{prefix}product", default=d.product, dest="usb_product")
    g.add_argument(f"--{prefix}serial", type=_ascii(64), default=d.serial_number, dest="usb_serial",
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


def extend_local(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frontend", choices=("nbd", "usb"), default="nbd",
                   help="'usb' also serves the volume as a USB disk through the gadget "
                        "(NBD keeps running unless --nbd '' is given)")
    add_gadget_options(p, prefix="usb-")
    s = p.add_argument_group("SCSI logical unit (USB front end)")
    s.add_argument("--scsi-vendor", type=_ascii(8), default="MirrorUn",
                   help="INQUIRY vendor, 8 ASCII max")
    s.add_argument("--scsi-product", type=_ascii(16), default="MirrorUnit Disk",
                   help="INQUIRY product, 16 ASCII max")
    s.add_argument("--scsi-revision", type=_ascii(4), default="0001",
                   help="INQUIRY revision, 4 ASCII max")
    s.add_argument("--scsi-serial", type=_ascii(64), default=None,
                   help="unit serial number (VPD 0x80; default: the USB serial)")
    s.add_argument("--lun-read-only", action="store_true",
                   help="present the volume write-protected to the USB host")


def register(sub: Any) -> None:
    gp = sub.add_parser("gadget", help="create or remove the USB gadget in configfs")
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


def _register_service() -> None:
    from firmware.local.unit import SERVICE_FACTORIES
    from firmware.usb_gadget.service import usb_service

    if usb_service not in SERVICE_FACTORIES:
        SERVICE_FACTORIES.append(usb_service)


_register_service()
