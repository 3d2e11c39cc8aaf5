"""First boot and every-boot tasks of the unit, run by systemd from the read-only root.

    firstboot.py firstboot --board board.json --config-dir /config
        grow the card's partitions (or partition a blank external SSD), create the unit's
        identity and TLS key on the config partition, record where buffer and data live
    firstboot.py hostname
        set the hostname from the board's serial number (/etc is read-only)

Stdlib only, plus the firmware package when it is importable (for the link identity).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # installed beside this file in the root
    import layout  # type: ignore[import-not-found,no-redef]
except ImportError:  # in the source tree
    from image import layout  # type: ignore[no-redef]

log = logging.getLogger("mirrorunit.firstboot")

Runner = Callable[[Sequence[str]], str]


def run(argv: Sequence[str]) -> str:
    log.info("run: %s", " ".join(argv))
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Paths:
    """Every system path the first boot touches, so tests can point it at fakes."""

    sys_block: Path = Path("/sys/class/block")
    mountinfo: Path = Path("/proc/self/mountinfo")
    dt_serial: Path = Path("/sys/firmware/devicetree/base/serial-number")
    machine_id: Path = Path("/etc/machine-id")
    dev: Path = Path("/dev")


SYSTEM = Paths()


def board_serial(paths: Paths = SYSTEM) -> str:
    """The SoC serial on a Pi; the (transient) machine id elsewhere, e.g. in QEMU."""
    for p in (paths.dt_serial, paths.machine_id):
        try:
            text = p.read_bytes().rstrip(b"\0\n").decode("ascii", "replace").strip().lower()
        except OSError:
            continue
        if re.fullmatch(r"[0-9a-f]{8,}", text):
            return text
    return secrets.token_hex(8)


def stored_serial(config_dir: Path) -> str | None:
    """The serial first boot named this card's unit after (`firstboot.done`).  It wins over
    the board's: the identity on the card was made from it, and a board without a SoC
    serial (QEMU) would otherwise get a new transient machine id, and name, every boot."""
    try:
        text = (config_dir / "firstboot.done").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.search(r"^serial ([0-9a-f]{8,})$", text, re.M)
    return m[1] if m else None


def hostname_for(serial: str) -> str:
    return f"mirrorunit-{serial[-8:]}"


def mount_source(mount_point: str, paths: Paths = SYSTEM) -> str | None:
    """The device mounted at `mount_point` (mountinfo field after the ' - ' separator)."""
    for line in paths.mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and fields[4] == mount_point:
            return right.split()[1]
    return None


def parent_disk(partition: str, paths: Paths = SYSTEM) -> str:
    """/dev/mmcblk0p5 -> /dev/mmcblk0, /dev/vda5 -> /dev/vda (through sysfs, not by name)."""
    name = Path(partition).name
    part_dir = (paths.sys_block / name).resolve()
    if not (part_dir / "partition").exists():
        raise RuntimeError(f"{partition} is not a partition")
    return str(paths.dev / part_dir.parent.name)


def find_external(bus: str, boot_disk: str, runner: Runner, paths: Paths = SYSTEM) -> str | None:
    """The first whole disk on `bus` with no partition table: never touch a disk in use."""
    for entry in sorted(paths.sys_block.iterdir()):
        if (entry / "partition").exists() or entry.name.startswith(("loop", "ram", "zram")):
            continue
        dev = str(paths.dev / entry.name)
        if dev == boot_disk:
            continue
        real = str(entry.resolve())
        on_bus = "/usb" in real if bus == "usb" else entry.name.startswith("nvme")
        if not on_bus:
            continue
        try:
            probe = runner(["blkid", "-p", "-o", "export", dev])
        except subprocess.CalledProcessError:
            probe = ""  # blkid exits 2 when it finds nothing: a blank disk
        if "TYPE=" in probe:
            log.info("external disk %s carries data (%s); leaving it alone", dev,
                     probe.replace("\n", " ").strip())
            continue
        return dev
    return None


def disk_size(disk: str, paths: Paths = SYSTEM) -> int:
    return int((paths.sys_block / Path(disk).name / "size").read_text()) * 512


def plan_storage(board: dict[str, Any], boot_disk: str, runner: Runner,
                 paths: Paths = SYSTEM, sleep: Callable[[float], None] = time.sleep,
                 ) -> tuple[str, dict[str, str], str | None]:
    """(sfdisk target, storage.env contents, sfdisk script or None when nothing to do)."""
    st = board["storage"]
    sizes = dict(buffer_fraction=float(st["buffer_fraction"]),
                 buffer_min=_size(st["buffer_min"]), buffer_max=_size(st["buffer_max"]),
                 max_volume=_size(st["max_volume"]))
    if st["layout"] == "external":
        # USB and NVMe disks can enumerate seconds after this runs; falling back to the
        # card too early would be permanent.
        deadline = time.monotonic() + float(st.get("external_wait_s", 0))
        ext = find_external(st["external_bus"], boot_disk, runner, paths)
        while ext is None and time.monotonic() < deadline:
            sleep(1)
            ext = find_external(st["external_bus"], boot_disk, runner, paths)
        if ext is not None:
            # Fresh partition GUIDs, recorded: the unit names buffer and data by them, so it
            # waits for this disk at boot and never takes another MirrorUnit disk plugged in.
            buf, dat = (dataclasses.replace(p, uuid=str(uuid.uuid4()))
                        for p in layout.external_layout(disk_size(ext, paths), **sizes))
            parts = [buf, dat]
            env = {"MIRRORUNIT_BUFFER": f"/dev/disk/by-partuuid/{buf.uuid}",
                   "MIRRORUNIT_DATA": f"/dev/disk/by-partuuid/{dat.uuid}",
                   "MIRRORUNIT_BUFFER_ID": f"partuuid:{buf.uuid}",
                   "MIRRORUNIT_DATA_ID": f"partuuid:{dat.uuid}",
                   "MIRRORUNIT_STORAGE": f"external:{ext}"}
            return ext, env, layout.sfdisk_script(parts, label="gpt")
        if st.get("fallback") != "sd":
            raise RuntimeError(f"no blank {st['external_bus']} disk for buffer and data")
        log.warning("no blank %s disk found: buffer and data go on the card",
                    st["external_bus"])
    current = layout.parts_from_sfdisk_json(json.loads(runner(["sfdisk", "--json", boot_disk])))
    grown = layout.grow_layout(current, disk_size(boot_disk, paths), **sizes)
    env = {"MIRRORUNIT_BUFFER": f"/dev/disk/by-partuuid/{layout.partuuid(6)}",
           "MIRRORUNIT_DATA": f"/dev/disk/by-partuuid/{layout.partuuid(7)}",
           "MIRRORUNIT_STORAGE": f"sd:{boot_disk}"}
    return boot_disk, env, None if grown == current else layout.sfdisk_script(grown)


def _size(v: str | int) -> int:
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"(\d+)([KMGT]?)", v.strip().upper())
    if not m:
        raise ValueError(f"not a size: {v!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def create_identity(config_dir: Path, unit_id: str) -> str:
    """The link's key and self-signed certificate, created by the firmware's own code."""
    from firmware.link.tls import unit_identity

    identity, name = unit_identity(config_dir / "link", unit_id)
    return f"{name} {identity.fingerprint}"


def firstboot(board: dict[str, Any], config_dir: Path, runner: Runner = run,
              paths: Paths = SYSTEM) -> None:
    source = mount_source(str(config_dir), paths)
    if source is None:
        raise RuntimeError(f"{config_dir} is not mounted: the config partition is missing")
    boot_disk = parent_disk(source, paths)
    target, env, script = plan_storage(board, boot_disk, runner, paths)
    if script is not None:
        log.info("partitioning %s:\n%s", target, script)
        subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", target],
                       input=script, text=True, check=True)
        if target == boot_disk:
            # The disk is in use (root, config): add the new partitions one by one.
            runner(["partx", "--add", "--nr", "6:7", target])
        else:
            runner(["partx", "--update", target])
        runner(["udevadm", "settle", "--timeout=30"])
    serial = board_serial(paths)
    runner(["mount", "-o", "remount,rw", str(config_dir)])
    try:
        try:
            ident = create_identity(config_dir, hostname_for(serial))
            log.info("unit identity: %s", ident)
        except ImportError as e:
            log.error("no link identity created: the firmware has no link module (%s)", e)
        (config_dir / "storage.env").write_text(
            "".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        (config_dir / "firstboot.done").write_text(f"serial {serial}\n")
        os.sync()
    finally:
        runner(["mount", "-o", "remount,ro", str(config_dir)])
    print(f"mirrorunit first boot: buffer {env['MIRRORUNIT_BUFFER']}, "
          f"data {env['MIRRORUNIT_DATA']} ({env['MIRRORUNIT_STORAGE']})", flush=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="firstboot.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    fb = sub.add_parser("firstboot")
    fb.add_argument("--board", type=Path, required=True)
    fb.add_argument("--config-dir", type=Path, required=True)
    hn = sub.add_parser("hostname")
    hn.add_argument("--config-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cmd == "hostname":
        serial = stored_serial(args.config_dir) if args.config_dir else None
        name = hostname_for(serial or board_serial())
        socket.sethostname(name)
        print(f"hostname {name}")
        return 0
    try:
        firstboot(json.loads(args.board.read_text()), args.config_dir)
    except (RuntimeError, OSError, subprocess.CalledProcessError, layout.LayoutError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"mirrorunit first boot failed: {e} {detail}".strip(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
