"""The local role's settings: the unit's data path and one typed part per service, built
from `mirrorunit local`'s options or from the unit's Config (what the appliance runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...local import LocalSettings
from ...local.replication import RemoteSpec
from ...ups.service import DEFAULT_POWEROFF
from ...usb_gadget.configfs import GadgetSettings
from ...volume import CacheMode
from ..options import ascii_text

DEFAULT_NBD = "127.0.0.1:10809"
DEFAULT_EXPORT = "mirrorunit"
_GADGET = GadgetSettings()


@dataclass(frozen=True, slots=True)
class NbdSettings:
    address: str = DEFAULT_NBD
    export_name: str = DEFAULT_EXPORT


@dataclass(frozen=True, slots=True)
class UsbSettings:
    """The gadget and the SCSI logical unit it presents."""

    gadget: GadgetSettings = _GADGET
    scsi_vendor: str = "MirrorUn"
    scsi_product: str = "MirrorUnit Disk"
    scsi_revision: str = "0001"
    #: VPD 0x80; None: the USB serial number
    scsi_serial: str | None = None
    read_only: bool = False


_USB = UsbSettings()


@dataclass(frozen=True, slots=True)
class ReplicationSettings:
    """The journey links; no service runs without remotes."""

    remotes: tuple[RemoteSpec, ...] = ()
    #: None: BUFFER.link next to the buffer
    state_dir: Path | None = None
    unit_id: str | None = None
    #: bytes/s of each link (None: no cap); auto, zstd, zlib or none
    bandwidth: int | None = None
    compression: str = "auto"
    signature: bool = False
    #: the config partition, sealed for the peers
    config: Path | None = None
    #: The CBQ consumers were not named (`--peer`): the default one goes when no remote
    #: of that name replicates from it, or it would pin the queue's space.
    prune_default_consumer: bool = True


@dataclass(frozen=True, slots=True)
class UpsSettings:
    """The UPS monitor inside the unit, with this config's ups.*."""

    config: str
    poweroff_command: str = DEFAULT_POWEROFF


@dataclass(frozen=True, slots=True)
class LocalAppSettings:
    unit: LocalSettings
    nbd: NbdSettings | None = field(default_factory=NbdSettings)
    usb: UsbSettings | None = None
    replication: ReplicationSettings = field(default_factory=ReplicationSettings)
    ups: UpsSettings | None = None


def _remotes(texts: Sequence[str]) -> tuple[RemoteSpec, ...]:
    specs = tuple(RemoteSpec.parse(t) for t in texts)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--remote names must be unique: {names}")
    return specs


def settings_from_args(args: argparse.Namespace) -> LocalAppSettings:
    """From `mirrorunit local`'s parsed options; ValueError names a bad --remote."""
    from ..gadget import gadget_settings

    unit = LocalSettings(
        disk=args.disk, buffer=args.buffer, control=args.control, size=args.size,
        buffer_size=args.buffer_size, block_size=args.block_size,
        cache_mode=CacheMode(args.cache_mode), cache_limit=args.cache_limit,
        high_water=args.high_water, peers=tuple(args.peers or ["remote"]),
        standby=args.standby, external_ups=args.ups_external, disk_id=args.disk_id,
        buffer_id=args.buffer_id, device_wait=args.device_wait)
    usb = None
    if args.frontend == "usb":
        usb = UsbSettings(gadget=gadget_settings(args), scsi_vendor=args.scsi_vendor,
                          scsi_product=args.scsi_product, scsi_revision=args.scsi_revision,
                          scsi_serial=args.scsi_serial, read_only=args.lun_read_only)
    replication = ReplicationSettings(
        remotes=_remotes(args.remote), state_dir=args.state_dir, unit_id=args.unit_id,
        bandwidth=args.link_bandwidth or None, compression=args.compression,
        signature=args.link_signature, config=args.config,
        prune_default_consumer=args.peers is None)
    return LocalAppSettings(
        unit=unit, nbd=NbdSettings(args.nbd, args.export_name) if args.nbd else None,
        usb=usb, replication=replication,
        ups=UpsSettings(args.ups_config, args.ups_poweroff_command) if args.ups_config
        else None)


def _check(check: Callable[[str], str], key: str, value: Any) -> str:
    try:
        return check(str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{key}: {e}") from None


def settings_from_config(cfg: Any, *, disk: str, buffer: str, store_path: str,
                         state_dir: Path, control: str, peers: Sequence[str],
                         disk_id: str | None = None,
                         buffer_id: str | None = None) -> LocalAppSettings:
    """What the appliance runs: the USB front end only (no NBD), the data and buffer
    devices first boot chose, a link to each of `peers` (the configured peers that are
    pinned).  The UPS monitor is a process of its own on the appliance (`mirrorunit
    ups`, on this unit's control socket), so it does not run inside the unit as well."""
    unit = LocalSettings(disk=Path(disk), buffer=Path(buffer), control=Path(control),
                         cache_mode=CacheMode(str(cfg["cache.mode"])),
                         high_water=float(cfg["buffer.high_water"]),
                         external_ups=None if cfg["ups.model"] == "none"
                         else str(cfg["ups.model"]), disk_id=disk_id, buffer_id=buffer_id)
    gadget = _GADGET
    if cfg["unit.serial"]:
        gadget = GadgetSettings(
            serial_number=_check(ascii_text(64), "unit.serial", cfg["unit.serial"]))
    usb = UsbSettings(gadget=gadget,
                      scsi_vendor=_check(ascii_text(8), "scsi.vendor", cfg["scsi.vendor"]),
                      scsi_product=_check(ascii_text(16), "scsi.product", cfg["scsi.product"]))
    by_name = {p["name"]: p for p in cfg["peers"]}
    remotes = _remotes([f"{name}={by_name[name]['address']}" for name in peers])
    replication = ReplicationSettings(remotes=remotes, state_dir=state_dir,
                                      bandwidth=int(cfg["link.bandwidth"]) or None,
                                      compression=str(cfg["link.compression"]),
                                      config=Path(store_path))
    return LocalAppSettings(unit=unit, nbd=None, usb=usb, replication=replication)


def _number(x: float) -> str:
    text = f"{x:g}"
    return text if float(text) == x else repr(x)


def _remote_text(r: RemoteSpec) -> str:
    host = f"[{r.host}]" if ":" in r.host else r.host
    return f"{r.name}={host}:{r.port}"


def command_line(s: LocalAppSettings) -> list[str]:
    """The `mirrorunit local` command line that runs these settings (what the appliance
    logs and `--dry-run` prints); defaults are left out."""
    u, usb, r = s.unit, s.usb, s.replication
    d = LocalSettings(u.disk, u.buffer, u.control)
    argv = ["local"]
    if usb is not None:
        argv += ["--frontend", "usb"]
    if s.nbd is None or s.nbd.address != DEFAULT_NBD:
        argv += ["--nbd", s.nbd.address if s.nbd is not None else ""]
    argv += ["--disk", str(u.disk), "--buffer", str(u.buffer), "--control", str(u.control)]
    if r.state_dir is not None:
        argv += ["--state-dir", str(r.state_dir)]
    if r.config is not None:
        argv += ["--config", str(r.config)]
    argv += ["--cache-mode", u.cache_mode.value, "--high-water", _number(u.high_water)]
    if usb is not None:
        argv += ["--scsi-vendor", usb.scsi_vendor, "--scsi-product", usb.scsi_product]
        if usb.gadget.serial_number != _GADGET.serial_number:
            argv += ["--usb-serial", usb.gadget.serial_number]
    for remote in r.remotes:
        argv += ["--remote", _remote_text(remote)]
    # the rest only when they differ from the defaults
    if s.nbd is not None and s.nbd.export_name != DEFAULT_EXPORT:
        argv += ["--export-name", s.nbd.export_name]
    for opt, value, default in (("--size", u.size, d.size),
                                ("--buffer-size", u.buffer_size, d.buffer_size),
                                ("--block-size", u.block_size, d.block_size),
                                ("--cache-limit", u.cache_limit, d.cache_limit)):
        if value != default:
            argv += [opt, str(value)]
    if u.peers != d.peers or not r.prune_default_consumer:
        for name in u.peers:
            argv += ["--peer", name]
    if u.standby:
        argv += ["--standby"]
    for opt, ident in (("--disk-id", u.disk_id), ("--buffer-id", u.buffer_id)):
        if ident is not None:
            argv += [opt, ident]
    if u.device_wait != d.device_wait:
        argv += ["--device-wait", _number(u.device_wait)]
    if usb is not None:
        g = usb.gadget
        for opt, text, default_text in (
                ("--usb-configfs", str(g.configfs_root), str(_GADGET.configfs_root)),
                ("--usb-udc-dir", str(g.udc_class_dir), str(_GADGET.udc_class_dir)),
                ("--usb-ffs-mount", str(g.ffs_mount), str(_GADGET.ffs_mount)),
                ("--usb-gadget-name", g.gadget_name, _GADGET.gadget_name),
                ("--usb-udc", g.udc or "", ""),
                ("--usb-vid", f"0x{g.id_vendor:04x}", f"0x{_GADGET.id_vendor:04x}"),
                ("--usb-pid", f"0x{g.id_product:04x}", f"0x{_GADGET.id_product:04x}"),
                ("--usb-manufacturer", g.manufacturer, _GADGET.manufacturer),
                ("--usb-product", g.product, _GADGET.product),
                ("--scsi-revision", usb.scsi_revision, _USB.scsi_revision),
                ("--scsi-serial", usb.scsi_serial or "", "")):
            if text != default_text:
                argv += [opt, text]
        if usb.read_only:
            argv += ["--lun-read-only"]
    if r.unit_id is not None:
        argv += ["--unit-id", r.unit_id]
    if r.bandwidth is not None:
        argv += ["--link-bandwidth", str(r.bandwidth)]
    if r.compression != "auto":
        argv += ["--compression", r.compression]
    if r.signature:
        argv += ["--link-signature"]
    if s.ups is not None:
        argv += ["--ups-config", s.ups.config]
        if s.ups.poweroff_command != DEFAULT_POWEROFF:
            argv += ["--ups-poweroff-command", s.ups.poweroff_command]
    if u.external_ups is not None:
        argv += ["--ups-external", u.external_ups]
    return argv
