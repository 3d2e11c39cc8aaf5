"""Board profiles, partition layout and first-boot planning: no image build needed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from image import firstboot, layout, profile
from tests.support import REPO

SUPPORTED = ["pi4", "cm4", "pi-zero-2w"]
MIB = 1 << 20


@pytest.mark.parametrize("name", SUPPORTED)
def test_profile_renders_boot_files(name: str) -> None:
    b = profile.load(name)
    cmdline = profile.render_cmdline(b, layout.partuuid(2))
    words = cmdline.split()
    assert cmdline.endswith("\n") and cmdline.count("\n") == 1
    assert "ro" in words and "rw" not in words
    assert "root=PARTUUID=4d550001-02" in words and "rootfstype=squashfs" in words
    # the serial console is last, so /dev/console (and emergency output) is the UART
    assert words[[w.startswith("console=") for w in words].index(True) + 1] == \
        f"console={b.serial_console},{b.serial_baud}"
    cfg = profile.render_config_txt(b, "9.9.9")
    assert "arm_64bit=1" in cfg.splitlines()
    assert f"device_tree={profile.patched_dtb_name(b, b.dtb)}" in cfg.splitlines()
    assert b.usb_device.dt_properties["dr_mode"] == "peripheral"
    for dtb in b.variant_dtbs.values():
        assert f"device_tree={profile.patched_dtb_name(b, dtb)}" in cfg
    assert b.storage.max_volume >= 1 << 40


def test_pi5_is_documented_unsupported() -> None:
    with pytest.raises(profile.UnsupportedBoard, match="BCM2712"):
        profile.load("pi5")


def test_every_board_file_is_known() -> None:
    names = sorted(p.stem for p in (REPO / "board").glob("*.toml"))
    assert names == sorted([*SUPPORTED, "pi5"])


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.replace('layout = "sd"', 'layout = "floppy"'), "storage.layout"),
    (lambda s: s.replace('dr_mode = "peripheral"', 'dr_mode = "host"'), "dr_mode"),
    (lambda s: s.replace('max_volume = "1T"', 'max_volume = "lots"'), "storage"),
    (lambda s: s.replace('buffer_fraction = 0.1', 'buffer_fraction = 0.9'), "buffer_fraction"),
    (lambda s: s.replace('dtb = "bcm2837-rpi-zero-2-w.dtb"\n', ''), "boot.dtb"),
])
def test_bad_profile_names_the_field(tmp_path: Path, edit: object, field: str) -> None:
    src = (REPO / "board/pi-zero-2w.toml").read_text()
    (tmp_path / "pi-zero-2w.toml").write_text(edit(src))  # type: ignore[operator]
    with pytest.raises(profile.ProfileError, match=field.replace(".", r"\.")):
        profile.load("pi-zero-2w", tmp_path)


def test_build_layout_is_aligned_and_ordered() -> None:
    parts = layout.build_layout(640 * MIB)
    assert [p.number for p in parts] == [1, 2, 3, 4, 5]
    for p in parts:
        assert p.start % (4 * MIB) == 0 and p.size % (4 * MIB) == 0, p
    by = {p.name: p for p in parts}
    assert by["rootA"].size == by["rootB"].size  # A/B slots hold the same root
    assert by["boot"].end <= by["rootA"].start < by["rootB"].start < by["config"].start
    assert by["extended"].start < by["config"].start and by["config"].end == by["extended"].end
    assert layout.image_size(parts) == by["config"].end


@pytest.mark.parametrize("disk, expect_buffer", [
    (2 << 30, 256 * MIB),          # small card: the minimum buffer
    (32 * 10**9, None),            # a tenth of what is free
    (3 << 40, 16 << 30),           # capped by buffer_max, table capped by the MBR limit
])
def test_grow_layout(disk: int, expect_buffer: int | None) -> None:
    base = layout.build_layout(640 * MIB)
    grown = layout.grow_layout(base, disk, 0.1, 256 * MIB, 16 << 30, 1 << 40)
    by = {p.number: p for p in grown}
    assert [p for p in grown if p.number <= 5 and p.number != 4] == \
        [p for p in base if p.number != 4]
    assert by[6].start >= by[5].end + 4 * MIB - 1 and by[7].start > by[6].end
    assert by[4].end == by[7].end <= min(disk, layout.MBR_LIMIT)
    assert by[7].size <= 1 << 40
    if expect_buffer is not None:
        assert by[6].size == expect_buffer
    assert layout.grow_layout(grown, disk, 0.1, 256 * MIB, 16 << 30, 1 << 40) == grown


def test_grow_layout_refuses_a_too_small_card() -> None:
    base = layout.build_layout(640 * MIB)
    with pytest.raises(layout.LayoutError, match="too small"):
        layout.grow_layout(base, layout.image_size(base) + 64 * MIB, 0.1, 256 * MIB,
                           1 << 30, 1 << 40)


needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk missing")


@needs_sfdisk
def test_sfdisk_writes_the_layout_and_first_boot_growth_keeps_config(tmp_path: Path) -> None:
    img = tmp_path / "card.img"
    base = layout.build_layout(640 * MIB)
    with img.open("wb") as f:
        f.truncate(layout.image_size(base))
    subprocess.run(["sfdisk", "-q", str(img)], input=layout.sfdisk_script(base), text=True,
                   check=True)
    got = layout.parts_from_sfdisk_json(json.loads(subprocess.run(
        ["sfdisk", "--json", str(img)], capture_output=True, text=True, check=True).stdout))
    assert got == base
    cfg = {p.name: p for p in base}["config"]
    marker = b"config partition contents" * 100
    with img.open("r+b") as f:
        f.seek(cfg.start)
        f.write(marker)
        f.truncate(4 << 30)  # the card is larger than the image
    grown = layout.grow_layout(got, 4 << 30, 0.1, 256 * MIB, 16 << 30, 1 << 40)
    subprocess.run(["sfdisk", "-q", "--no-reread", str(img)],
                   input=layout.sfdisk_script(grown), text=True, check=True)
    doc = json.loads(subprocess.run(["sfdisk", "--json", str(img)], capture_output=True,
                                    text=True, check=True).stdout)
    assert doc["partitiontable"]["id"] == "0x4d550001"
    assert layout.parts_from_sfdisk_json(doc) == grown
    with img.open("rb") as f:
        f.seek(cfg.start)
        assert f.read(len(marker)) == marker


# --- first boot planning over a fake sysfs -------------------------------------------

def _fake_system(tmp_path: Path, disks: dict[str, tuple[int, str]]) -> firstboot.Paths:
    """disks: name -> (bytes, bus path fragment); partitions 'vda5' etc. under their disk."""
    devices = tmp_path / "sys/devices"
    block = tmp_path / "sys/class/block"
    block.mkdir(parents=True)
    for name, (size, bus) in disks.items():
        d = devices / bus / "block" / name
        d.mkdir(parents=True)
        (d / "size").write_text(str(size // 512))
        (block / name).symlink_to(d)
        if name == "vda":
            p = d / "vda5"
            p.mkdir()
            (p / "partition").write_text("5")
            (block / "vda5").symlink_to(p)
    mi = tmp_path / "mountinfo"
    mi.write_text("30 1 254:2 / / ro,relatime - squashfs /dev/vda2 ro\n"
                  "41 30 254:5 / /config ro,nosuid - ext4 /dev/vda5 ro\n")
    (tmp_path / "serial").write_bytes(b"10000000abcd1234\0")
    return firstboot.Paths(sys_block=block, mountinfo=mi, dt_serial=tmp_path / "serial",
                           machine_id=tmp_path / "nope", dev=Path("/dev"))


def _runner(tables: dict[str, str], blkid: dict[str, str]) -> firstboot.Runner:
    def run(argv: object) -> str:
        a = list(argv)  # type: ignore[call-overload]
        if a[:2] == ["sfdisk", "--json"]:
            return tables[a[2]]
        if a[0] == "blkid":
            if a[-1] not in blkid:
                raise subprocess.CalledProcessError(2, a)
            return blkid[a[-1]]
        raise AssertionError(a)
    return run


def _card_json(size: int) -> str:
    script = layout.build_layout(640 * MIB)
    parts = [{"node": f"/dev/vda{p.number}", "start": p.start // 512, "size": p.size // 512,
              "type": p.type} for p in script]
    return json.dumps({"partitiontable": {"label": "dos", "id": "0x4d550001",
                                          "sectorsize": 512, "partitions": parts}})


def test_firstboot_finds_the_card_and_plans_sd_growth(tmp_path: Path) -> None:
    paths = _fake_system(tmp_path, {"vda": (8 << 30, "platform/virtio")})
    assert firstboot.mount_source("/config", paths) == "/dev/vda5"
    assert firstboot.parent_disk("/dev/vda5", paths) == "/dev/vda"
    board = profile.load("pi-zero-2w").to_json()
    target, env, script = firstboot.plan_storage(
        board, "/dev/vda", _runner({"/dev/vda": _card_json(8 << 30)}, {}), paths)
    assert target == "/dev/vda" and script is not None
    assert env["MIRRORUNIT_BUFFER"].endswith("4d550001-06")
    assert env["MIRRORUNIT_DATA"].endswith("4d550001-07")
    assert "type=da" in script and script.count("\n") > 8
    assert firstboot.hostname_for(firstboot.board_serial(paths)) == "mirrorunit-abcd1234"


def test_firstboot_uses_only_a_blank_external_disk(tmp_path: Path) -> None:
    paths = _fake_system(tmp_path, {
        "vda": (8 << 30, "platform/virtio"),
        "sda": (500 << 30, "platform/usb1/1-1/host0"),
        "sdb": (1 << 40, "platform/usb1/1-2/host1"),
    })
    board = profile.load("pi4").to_json()
    runner = _runner({"/dev/vda": _card_json(8 << 30)},
                     {"/dev/sda": "DEVNAME=/dev/sda\nPTTYPE=gpt\n"})  # sda holds data
    target, env, script = firstboot.plan_storage(board, "/dev/vda", runner, paths)
    assert target == "/dev/sdb" and script is not None and "label: gpt" in script
    assert env["MIRRORUNIT_STORAGE"] == "external:/dev/sdb"
    # no blank USB disk at all: the profile's fallback puts everything on the card
    runner = _runner({"/dev/vda": _card_json(8 << 30)},
                     {"/dev/sda": "PTTYPE=gpt\n", "/dev/sdb": "TYPE=ext4\n"})
    board["storage"]["external_wait_s"] = 0
    target, env, _ = firstboot.plan_storage(board, "/dev/vda", runner, paths)
    assert target == "/dev/vda" and env["MIRRORUNIT_STORAGE"] == "sd:/dev/vda"


def test_firstboot_waits_for_a_late_external_disk(tmp_path: Path) -> None:
    paths = _fake_system(tmp_path, {"vda": (8 << 30, "platform/virtio")})
    board = profile.load("cm4").to_json()
    assert board["storage"]["external_wait_s"] > 0
    polls = []

    def sleep(_: float) -> None:  # the NVMe disk enumerates during the second poll
        polls.append(1)
        if len(polls) == 2:
            d = tmp_path / "sys/devices/platform/pcie/block/nvme0n1"
            d.mkdir(parents=True)
            (d / "size").write_text(str((256 << 30) // 512))
            (paths.sys_block / "nvme0n1").symlink_to(d)

    runner = _runner({"/dev/vda": _card_json(8 << 30)}, {})
    target, env, script = firstboot.plan_storage(board, "/dev/vda", runner, paths, sleep)
    assert len(polls) == 2 and target == "/dev/nvme0n1"
    assert env["MIRRORUNIT_STORAGE"] == "external:/dev/nvme0n1" and "label: gpt" in (script or "")
    # Buffer and data are named by the partition GUIDs the script gives them.
    for part in ("BUFFER", "DATA"):
        kind, _, guid = env[f"MIRRORUNIT_{part}_ID"].partition(":")
        assert kind == "partuuid" and f"uuid={guid}" in (script or ""), script
        assert env[f"MIRRORUNIT_{part}"] == f"/dev/disk/by-partuuid/{guid}"
    assert env["MIRRORUNIT_BUFFER_ID"] != env["MIRRORUNIT_DATA_ID"]


def test_hostname_keeps_the_serial_first_boot_used(tmp_path: Path) -> None:
    """A board without a SoC serial gets a transient machine id each boot; the name (and the
    identity made from it) must not change with it."""
    cfg = tmp_path / "config"
    cfg.mkdir()
    assert firstboot.stored_serial(cfg) is None
    (cfg / "firstboot.done").write_text("serial 0123456789abcdef\n")
    assert firstboot.stored_serial(cfg) == "0123456789abcdef"
    assert firstboot.hostname_for(firstboot.stored_serial(cfg) or "") == "mirrorunit-89abcdef"
    (cfg / "firstboot.done").write_text("serial not-hex\n")
    assert firstboot.stored_serial(cfg) is None


def test_first_boot_creates_the_link_identity_with_the_firmware(tmp_path: Path) -> None:
    # first boot imports the firmware's identity code; a moved module must not leave the
    # card without a link identity (the roles refuse to start without one)
    line = firstboot.create_identity(tmp_path, "mirrorunit-0badcafe")
    name, fp = line.split()
    assert name == "mirrorunit-0badcafe" and len(fp.replace(":", "")) == 64
    assert (tmp_path / "link" / "link-key.pem").exists()
    assert (tmp_path / "link" / "link-cert.pem").exists()
