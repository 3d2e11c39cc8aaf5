"""Partition layout of the card: what the build writes and what the first boot adds.

MBR (the Pi boot ROM reads only MBR), everything 4 MiB aligned:

    p1 boot   vfat      firmware, kernel, initrd, DTBs, config.txt, cmdline.txt
    p2 rootA  squashfs  the running root
    p3 rootB  (empty)   reserved for the next root (A/B updates)
    p4 extended         holds the logical partitions, grown to the card's end at first boot
    p5 config ext4      mounted read-only except while the config is written
    p6 buffer raw       the CBQ                          } created at first boot when the
    p7 data   raw       the local mirror (the volume)    } profile's layout is "sd"

Stdlib only: this module is also installed into the root, where the first boot uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

SECTOR = 512
ALIGN = 4 << 20
MIB = 1 << 20
#: the MBR's 32-bit sector fields stop here
MBR_LIMIT = (1 << 32) * SECTOR

BOOT_SIZE = 256 * MIB
CONFIG_SIZE = 16 * MIB
#: below this a data partition is no use as a volume
MIN_DATA = 64 * MIB
DISK_ID = 0x4D550001  # "MU" + layout generation 1; the root's PARTUUID derives from it


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Part:
    number: int
    name: str
    start: int  # bytes
    size: int  # bytes
    type: str  # MBR type byte as sfdisk writes it
    bootable: bool = False
    #: GPT: the partition's unique GUID (its PARTUUID), chosen here so it can be recorded
    uuid: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.size


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def align_down(n: int, a: int = ALIGN) -> int:
    return n // a * a


def partuuid(number: int, disk_id: int = DISK_ID) -> str:
    return f"{disk_id:08x}-{number:02d}"


def build_layout(root_slot: int) -> list[Part]:
    """The table the build writes; the image ends where the config partition ends."""
    root_slot = align_up(root_slot)
    boot = Part(1, "boot", ALIGN, BOOT_SIZE, "c", bootable=True)
    root_a = Part(2, "rootA", boot.end, root_slot, "83")
    root_b = Part(3, "rootB", root_a.end, root_slot, "83")
    # The extended partition's first 4 MiB hold the EBR of the first logical partition.
    config = Part(5, "config", root_b.end + ALIGN, CONFIG_SIZE, "83")
    ext = Part(4, "extended", root_b.end, config.end - root_b.end, "5")
    return [boot, root_a, root_b, ext, config]


def image_size(parts: list[Part]) -> int:
    return max(p.end for p in parts)


def grow_layout(parts: list[Part], disk_size: int, buffer_fraction: float,
                buffer_min: int, buffer_max: int, max_volume: int) -> list[Part]:
    """The first boot's table: the extended partition grown to the card's end (or the MBR
    limit) with buffer and data behind the config partition.  Idempotent: a table that
    already has both is returned unchanged."""
    by_num = {p.number: p for p in parts}
    if 6 in by_num and 7 in by_num:
        return parts
    if set(by_num) != {1, 2, 3, 4, 5}:
        raise LayoutError(f"unexpected partitions {sorted(by_num)}; expected 1-5")
    ext, config = by_num[4], by_num[5]
    end = align_down(min(disk_size, MBR_LIMIT))
    free = end - config.end - 2 * ALIGN  # one EBR gap before each new logical partition
    buffer = align_down(min(max(int(free * buffer_fraction), buffer_min), buffer_max))
    data = align_down(min(free - buffer, max_volume))
    if buffer < buffer_min or data < MIN_DATA:
        raise LayoutError(f"card of {disk_size} bytes leaves {free} bytes: too small for "
                          f"a buffer of at least {buffer_min} bytes and {MIN_DATA} of data")
    buf = Part(6, "buffer", config.end + ALIGN, buffer, "da")
    dat = Part(7, "data", buf.end + ALIGN, data, "da")
    grown_ext = Part(4, "extended", ext.start, dat.end - ext.start, ext.type)
    return [by_num[1], by_num[2], by_num[3], grown_ext, config, buf, dat]


def external_layout(disk_size: int, buffer_fraction: float, buffer_min: int,
                    buffer_max: int, max_volume: int) -> list[Part]:
    """Buffer and data on an external SSD (GPT: such disks may exceed the MBR limit)."""
    # GPT keeps a backup table in the last 33 sectors.
    free = align_down(disk_size - ALIGN - 34 * SECTOR)
    buffer = align_down(min(max(int(free * buffer_fraction), buffer_min), buffer_max))
    data = align_down(min(free - buffer, max_volume))
    if buffer < buffer_min or data < MIN_DATA:
        raise LayoutError(f"disk of {disk_size} bytes is too small")
    buf = Part(1, "buffer", ALIGN, buffer, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")
    return [buf, Part(2, "data", buf.end, data, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")]


def sfdisk_script(parts: list[Part], label: str = "dos", disk_id: int = DISK_ID) -> str:
    lines = [f"label: {label}"]
    if label == "dos":
        lines.append(f"label-id: 0x{disk_id:08x}")
    lines += ["unit: sectors", "sector-size: 512", ""]
    for p in sorted(parts, key=lambda p: p.number):
        if p.start % SECTOR or p.size % SECTOR:
            raise LayoutError(f"partition {p.number} is not sector aligned")
        line = f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={p.type}"
        if label == "gpt":
            line += f", name=mirrorunit-{p.name}"
            if p.uuid:
                line += f", uuid={p.uuid}"
        if p.bootable:
            line += ", bootable"
        lines.append(line)
    return "\n".join(lines) + "\n"


def parts_from_sfdisk_json(doc: dict[str, object]) -> list[Part]:
    """Parse `sfdisk --json` output back into parts (numbers from the node names' tails)."""
    table = doc["partitiontable"]
    assert isinstance(table, dict)
    unit = int(table.get("sectorsize", SECTOR))
    out = []
    names = {1: "boot", 2: "rootA", 3: "rootB", 4: "extended", 5: "config", 6: "buffer",
             7: "data"}
    for p in table["partitions"]:
        node = str(p["node"])
        digits = ""
        while node and node[-1].isdigit():
            digits = node[-1] + digits
            node = node[:-1]
        n = int(digits)
        out.append(Part(n, names.get(n, f"p{n}"), int(p["start"]) * unit, int(p["size"]) * unit,
                        str(p["type"]), bool(p.get("bootable", False))))
    return out
