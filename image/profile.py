"""Board profiles (board/<name>.toml): loading, validation, and what is generated from them.

Profiles are data; everything board-specific the build or the first boot needs is read from
here, so adding a board means adding a file, not a code path.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BOARD_DIR = REPO / "board"

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ProfileError(ValueError):
    """A board profile is missing a field or holds a bad value; the message names both."""


class UnsupportedBoard(ProfileError):
    pass


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SUFFIX and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r}")
    return int(number) * _SUFFIX[unit]


@dataclass(frozen=True)
class UsbDevice:
    controller: str
    port: str
    dt_node: str
    dt_properties: dict[str, str]
    modules: list[str]


@dataclass(frozen=True)
class Storage:
    layout: str  # "sd" | "external"
    buffer_fraction: float
    buffer_min: int
    buffer_max: int
    max_volume: int
    external_bus: str | None = None
    fallback: str | None = None


@dataclass(frozen=True)
class Panel:
    """The front-panel controller (board/panel) on a serial port of the board."""
    device: str = "/dev/ttyACM0"
    baud: int = 115200


@dataclass(frozen=True)
class Board:
    name: str
    title: str
    soc: str
    dtb: str
    variant_dtbs: dict[str, str]
    firmware: list[str]
    config_txt: list[str]
    cmdline: list[str]
    usb_device: UsbDevice
    serial_console: str
    serial_baud: int
    i2c_bus: int
    i2c_dt_node: str
    gpio: dict[str, int]
    storage: Storage
    panel: Panel | None = None
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What the root gets as /usr/share/mirrorunit/board.json (first boot reads it)."""
        return self.raw


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ProfileError(f"{where}.{key}: missing")
    v = d[key]
    if not isinstance(v, typ):
        raise ProfileError(f"{where}.{key}: expected {typ}, got {v!r}")
    return v


def load(name: str, board_dir: Path = BOARD_DIR) -> Board:
    path = board_dir / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in board_dir.glob("*.toml")))
        raise ProfileError(f"no board profile {name!r} (known: {known})")
    raw = tomllib.loads(path.read_text())
    where = path.name
    if _get(raw, "name", str, where) != name:
        raise ProfileError(f"{where}.name: {raw['name']!r} does not match the file name")
    if not _get(raw, "supported", bool, where):
        raise UnsupportedBoard(f"{name}: not supported: {raw.get('reason', '').strip()}")
    boot = _get(raw, "boot", dict, where)
    usb = _get(raw, "usb_device", dict, where)
    serial = _get(raw, "serial", dict, where)
    i2c = _get(raw, "i2c", dict, where)
    st = _get(raw, "storage", dict, where)
    layout = _get(st, "layout", str, where + ".storage")
    if layout not in ("sd", "external"):
        raise ProfileError(f"{where}.storage.layout: {layout!r} is not 'sd' or 'external'")
    if layout == "external" and _get(st, "external_bus", str, where + ".storage") not in (
            "usb", "nvme"):
        raise ProfileError(f"{where}.storage.external_bus: must be 'usb' or 'nvme'")
    frac = float(_get(st, "buffer_fraction", (int, float), where + ".storage"))
    if not 0.01 <= frac <= 0.5:
        raise ProfileError(f"{where}.storage.buffer_fraction: {frac} not in 0.01..0.5")
    dt_props = _get(usb, "dt_properties", dict, where + ".usb_device")
    if dt_props.get("dr_mode") != "peripheral":
        raise ProfileError(f"{where}.usb_device.dt_properties.dr_mode: must be 'peripheral'")
    try:
        storage = Storage(
            layout=layout, buffer_fraction=frac,
            buffer_min=parse_size(_get(st, "buffer_min", (str, int), where + ".storage")),
            buffer_max=parse_size(_get(st, "buffer_max", (str, int), where + ".storage")),
            max_volume=parse_size(_get(st, "max_volume", (str, int), where + ".storage")),
            external_bus=st.get("external_bus"), fallback=st.get("fallback"))
    except ValueError as e:
        raise ProfileError(f"{where}.storage: {e}") from e
    return Board(
        name=name, title=_get(raw, "title", str, where), soc=_get(raw, "soc", str, where),
        dtb=_get(boot, "dtb", str, where + ".boot"),
        variant_dtbs=dict(boot.get("variant_dtbs", {})),
        firmware=list(_get(boot, "firmware", list, where + ".boot")),
        config_txt=list(_get(boot, "config_txt", list, where + ".boot")),
        cmdline=list(_get(boot, "cmdline", list, where + ".boot")),
        usb_device=UsbDevice(
            controller=_get(usb, "controller", str, where + ".usb_device"),
            port=_get(usb, "port", str, where + ".usb_device"),
            dt_node=_get(usb, "dt_node", str, where + ".usb_device"),
            dt_properties={str(k): str(v) for k, v in dt_props.items()},
            modules=list(_get(usb, "modules", list, where + ".usb_device"))),
        serial_console=_get(serial, "console", str, where + ".serial"),
        serial_baud=_get(serial, "baud", int, where + ".serial"),
        i2c_bus=_get(i2c, "bus", int, where + ".i2c"),
        i2c_dt_node=_get(i2c, "dt_node", str, where + ".i2c"),
        gpio={str(k): int(v) for k, v in _get(raw, "gpio", dict, where).items()},
        storage=storage, panel=_panel(raw, where), raw=raw)


def _panel(raw: dict[str, Any], where: str) -> Panel | None:
    if "panel" not in raw:
        return None
    p = _get(raw, "panel", dict, where)
    device = _get(p, "device", str, where + ".panel")
    if not device.startswith("/dev/"):
        raise ProfileError(f"{where}.panel.device: {device!r} is not under /dev")
    return Panel(device=device, baud=_get(p, "baud", int, where + ".panel"))


def patched_dtb_name(board: Board, dtb: str) -> str:
    """Our copy of a DTB with device mode set; the original stays beside it, untouched."""
    return dtb.removesuffix(".dtb") + "-mirrorunit.dtb"


def render_config_txt(board: Board, version: str) -> str:
    lines = [
        f"# MirrorUnit {version} for {board.title}. Generated from board/{board.name}.toml;",
        "# edits are lost at the next update.",
        *board.config_txt,
        "kernel=vmlinuz",
        "initramfs initrd.img followkernel",
        # Debian ships no overlays, so USB device mode is set in our copy of the DTB.
        f"device_tree={patched_dtb_name(board, board.dtb)}",
    ]
    for model, dtb in sorted(board.variant_dtbs.items()):
        lines += [f"[{model}]", f"device_tree={patched_dtb_name(board, dtb)}"]
    if board.variant_dtbs:
        lines.append("[all]")
    return "\n".join(lines) + "\n"


def render_cmdline(board: Board, root_partuuid: str, console: str | None = None) -> str:
    """One line; `ro` keeps the root untouched, the squashfs is mounted read-only anyway.

    `panic=10`: the initramfs reboots after 10 s where it would otherwise open a root shell
    on the console (root not found), and so does the kernel after a panic."""
    serial = console or f"{board.serial_console},{board.serial_baud}"
    args = ["console=tty1", f"console={serial}", f"root=PARTUUID={root_partuuid}",
            "rootfstype=squashfs", "ro", "panic=10", *board.cmdline]
    return " ".join(args) + "\n"
