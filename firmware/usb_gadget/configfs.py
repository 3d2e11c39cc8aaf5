"""Composite USB gadget in configfs: create and remove it idempotently.

The gadget has one configuration holding one FunctionFS function
(``ffs.<name>``); the descriptors themselves are written later through the
FunctionFS ep0 file (see functionfs.py), and only then can the gadget be bound
to a UDC, which is why binding is a separate step (`bind_udc`).

Every path comes from `GadgetSettings`, so tests point it at a scratch tree.
Every write is logged, as an appliance operator reading the journal needs to
see what was done to the USB stack.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from firmware.errors import MirrorUnitError
from firmware.usb_gadget.functionfs import umount_functionfs

log = logging.getLogger("mirrorunit.gadget")

#: Errors that mean "already gone" or "not bound" during teardown.
_GONE = (errno.ENOENT, errno.ENODEV)
LANG_EN_US = "0x409"
CONFIG_DIR = "c.1"


class GadgetError(MirrorUnitError):
    """configfs refused a gadget operation; the message names the path."""


@dataclass(frozen=True)
class GadgetSettings:
    configfs_root: Path = Path("/sys/kernel/config")
    udc_class_dir: Path = Path("/sys/class/udc")
    #: Where the FunctionFS instance is mounted while the gadget serves.
    ffs_mount: Path = Path("/run/mirrorunit/ffs")
    gadget_name: str = "mirrorunit"
    function_name: str = "mass"
    #: UDC to bind to; None picks the first one listed in udc_class_dir.
    udc: str | None = None
    # Linux Foundation / Multifunction Composite Gadget, the conventional ids
    # of configfs gadgets without an own vendor id.
    id_vendor: int = 0x1D6B
    id_product: int = 0x0104
    bcd_device: int = 0x0100
    bcd_usb: int = 0x0200
    manufacturer: str = "MirrorUnit"
    product: str = "MirrorUnit Disk"
    serial_number: str = "000000000001"
    configuration: str = "Mass Storage"
    max_power_ma: int = 250

    @property
    def gadget_dir(self) -> Path:
        return self.configfs_root / "usb_gadget" / self.gadget_name

    @property
    def function_instance(self) -> str:
        return f"ffs.{self.function_name}"


class ConfigfsOps:
    """The filesystem primitives gadget setup uses; tests substitute a fake."""

    def mkdir(self, path: Path) -> None:
        path.mkdir(exist_ok=True)

    def write(self, path: Path, value: str) -> None:
        # One write() per attribute, as configfs parses each write whole.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, value.encode() + b"\n" if value else b"\n")
        finally:
            os.close(fd)

    def read(self, path: Path) -> str:
        return path.read_text().strip()

    def symlink(self, target: Path, link: Path) -> None:
        if not link.is_symlink():
            link.symlink_to(target)

    def unlink(self, path: Path) -> None:
        path.unlink()

    def rmdir(self, path: Path) -> None:
        path.rmdir()


class Gadget:
    """Setup and teardown of one gadget described by `settings`."""

    def __init__(self, settings: GadgetSettings, ops: ConfigfsOps | None = None) -> None:
        self.settings = settings
        self.ops = ops or ConfigfsOps()

    # -- logged primitives --------------------------------------------------
    def _mkdir(self, path: Path) -> None:
        log.info("configfs mkdir %s", path)
        try:
            self.ops.mkdir(path)
        except OSError as exc:
            raise GadgetError(f"mkdir {path}: {exc.strerror}") from exc

    def _write(self, path: Path, value: str) -> None:
        log.info("configfs write %s = %r", path, value)
        try:
            self.ops.write(path, value)
        except OSError as exc:
            raise GadgetError(f"write {value!r} to {path}: {exc.strerror}") from exc

    def _remove(self, path: Path, *, directory: bool) -> None:
        log.info("configfs %s %s", "rmdir" if directory else "unlink", path)
        try:
            (self.ops.rmdir if directory else self.ops.unlink)(path)
        except OSError as exc:
            if exc.errno in _GONE:
                return
            raise GadgetError(f"remove {path}: {exc.strerror}") from exc

    # -- setup ---------------------------------------------------------------
    def create(self) -> None:
        """Create (or complete) the gadget tree; leaves it unbound."""
        s = self.settings
        g = s.gadget_dir
        if not (s.configfs_root / "usb_gadget").is_dir():
            raise GadgetError(
                f"{s.configfs_root / 'usb_gadget'} missing (configfs not mounted or "
                "libcomposite not loaded)"
            )
        self._mkdir(g)
        self._write(g / "idVendor", f"0x{s.id_vendor:04x}")
        self._write(g / "idProduct", f"0x{s.id_product:04x}")
        self._write(g / "bcdDevice", f"0x{s.bcd_device:04x}")
        self._write(g / "bcdUSB", f"0x{s.bcd_usb:04x}")
        strings = g / "strings" / LANG_EN_US
        self._mkdir(strings.parent)
        self._mkdir(strings)
        self._write(strings / "manufacturer", s.manufacturer)
        self._write(strings / "product", s.product)
        self._write(strings / "serialnumber", s.serial_number)
        config = g / "configs" / CONFIG_DIR
        self._mkdir(config.parent)
        self._mkdir(config)
        self._write(config / "MaxPower", str(s.max_power_ma))
        self._mkdir(config / "strings")
        self._mkdir(config / "strings" / LANG_EN_US)
        self._write(config / "strings" / LANG_EN_US / "configuration", s.configuration)
        function = g / "functions" / s.function_instance
        self._mkdir(function.parent)
        self._mkdir(function)
        link = config / s.function_instance
        if not link.is_symlink():
            log.info("configfs symlink %s -> %s", link, function)
            try:
                self.ops.symlink(function, link)
            except OSError as exc:
                raise GadgetError(f"symlink {link}: {exc.strerror}") from exc

    def choose_udc(self) -> str:
        s = self.settings
        if s.udc:
            return s.udc
        try:
            names = sorted(os.listdir(s.udc_class_dir))
        except FileNotFoundError:
            names = []
        if not names:
            raise GadgetError(f"no UDC in {s.udc_class_dir} (is a UDC driver loaded?)")
        return names[0]

    def bound_udc(self) -> str | None:
        try:
            value = self.ops.read(self.settings.gadget_dir / "UDC")
        except OSError:
            return None
        return value or None

    def bind(self) -> str:
        """Bind to the UDC; a gadget already bound to it is left as it is."""
        udc = self.choose_udc()
        current = self.bound_udc()
        if current == udc:
            return udc
        if current is not None:
            self.unbind()
        self._write(self.settings.gadget_dir / "UDC", udc)
        return udc

    # -- teardown ------------------------------------------------------------
    def unbind(self) -> None:
        udc = self.settings.gadget_dir / "UDC"
        if not udc.exists() or self.bound_udc() is None:
            return
        log.info("configfs write %s = ''", udc)
        try:
            self.ops.write(udc, "")
        except OSError as exc:
            # ENODEV: nothing was bound, or the UDC vanished under us.
            if exc.errno not in _GONE:
                raise GadgetError(f"unbind {udc}: {exc.strerror}") from exc

    def remove(self) -> None:
        """Tear down whatever part of the gadget exists, in configfs' required order."""
        g = self.settings.gadget_dir
        if not g.exists():
            return
        self.unbind()
        configs = g / "configs"
        for config in sorted(configs.iterdir()) if configs.is_dir() else []:
            for entry in sorted(config.iterdir()):
                if entry.is_symlink():
                    self._remove(entry, directory=False)
            cstrings = config / "strings"
            for lang in sorted(cstrings.iterdir()) if cstrings.is_dir() else []:
                self._remove(lang, directory=True)
            self._remove(config, directory=True)
        functions = g / "functions"
        for function in sorted(functions.iterdir()) if functions.is_dir() else []:
            self._remove(function, directory=True)
        strings = g / "strings"
        for lang in sorted(strings.iterdir()) if strings.is_dir() else []:
            self._remove(lang, directory=True)
        self._remove(g, directory=True)


def gadget_up(settings: GadgetSettings, ops: ConfigfsOps | None = None) -> Gadget:
    """Create the gadget tree (unbound: FunctionFS must get its descriptors first)."""
    gadget = Gadget(settings, ops)
    gadget.create()
    return gadget


def gadget_down(settings: GadgetSettings, ops: ConfigfsOps | None = None) -> None:
    """Unbind and remove the gadget; safe to call on a missing or half-built gadget.

    A FunctionFS mount left by a server that died is unmounted too: it belongs to
    the function instance removed here, and a new instance of the same name
    would never see descriptors written through the old mount.
    """
    gadget = Gadget(settings, ops)
    gadget.unbind()
    umount_functionfs(settings.ffs_mount)
    gadget.remove()
