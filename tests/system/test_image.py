"""The built card image (`make image BOARD=...`): partitions, boot files, root contents.

These inspect build/image/<board>/.  `make test` builds the image first and sets
MIRRORUNIT_IMAGE_REQUIRED=1, so a missing image fails them; run by hand without an image
they skip.  The root is taken out of the image's own squashfs partition, not from the
build tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from image import build, layout, profile
from tests.support import REPO

BOARD = os.environ.get("MIRRORUNIT_IMAGE_BOARD", "pi4")
OUT = REPO / "build/image" / BOARD
IMG = OUT / f"mirrorunit-{BOARD}.img"

REQUIRED = os.environ.get("MIRRORUNIT_IMAGE_REQUIRED") == "1"

pytestmark = [
    pytest.mark.skipif(not IMG.exists() and not REQUIRED,
                       reason=f"no image built: make image BOARD={BOARD}"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("sfdisk", "unsquashfs", "mcopy"))
                       and not REQUIRED, reason="image tools missing: image/setup.sh"),
]
PARTS = {p.name: p for p in layout.build_layout(build.ROOT_SLOT)}


def _extract(part: layout.Part, dest: Path) -> Path:
    with IMG.open("rb") as src, dest.open("wb") as dst:
        src.seek(part.start)
        left = part.size
        while left:
            chunk = src.read(min(left, 4 << 20))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)
    return dest


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("root")
    sq = _extract(PARTS["rootA"], d / "root.squashfs")
    subprocess.run(["nice", "-n", "10", "unsquashfs", "-q", "-n", "-processors", "2",
                    "-d", str(d / "root"), str(sq)], check=True, stdout=subprocess.DEVNULL)
    sq.unlink()
    return d / "root"


@pytest.fixture(scope="module")
def bootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("boot")
    vfat = _extract(PARTS["boot"], d / "boot.vfat")
    (d / "files").mkdir()
    subprocess.run(["mcopy", "-s", "-n", "-i", str(vfat), "::/*", str(d / "files")], check=True)
    return d / "files"


def test_image_was_built() -> None:
    assert IMG.exists(), f"no image at {IMG.relative_to(REPO)}: make image BOARD={BOARD}"


def test_partition_table() -> None:
    doc = json.loads(subprocess.run(["sfdisk", "--json", str(IMG)], capture_output=True,
                                    text=True, check=True).stdout)
    table = doc["partitiontable"]
    assert table["label"] == "dos" and table["id"] == "0x4d550001"
    got = layout.parts_from_sfdisk_json(doc)
    assert got == list(PARTS.values())
    for p in got:
        assert p.start % (4 << 20) == 0, f"partition {p.number} not 4 MiB aligned"
    assert IMG.stat().st_size == layout.image_size(got)
    assert [p.bootable for p in got] == [True, False, False, False, False]
    kinds = {}
    for name in ("boot", "rootA", "config"):
        probe = subprocess.run(["blkid", "-p", "-o", "export", "-O", str(PARTS[name].start),
                                str(IMG)], capture_output=True, text=True, check=True).stdout
        kinds[name] = dict(line.split("=", 1) for line in probe.split())
    assert kinds["boot"]["TYPE"] == "vfat" and kinds["boot"]["LABEL"] == "MU-BOOT"
    assert kinds["rootA"]["TYPE"] == "squashfs"
    assert kinds["config"]["TYPE"] == "ext4" and kinds["config"]["LABEL"] == "MU-CONFIG"
    with IMG.open("rb") as f:  # slot B is reserved, still blank
        f.seek(PARTS["rootB"].start)
        assert f.read(1 << 20) == bytes(1 << 20)


def test_cmdline_is_read_only_and_points_at_slot_a(bootfs: Path) -> None:
    words = (bootfs / "cmdline.txt").read_text().split()
    assert "ro" in words and "rw" not in words
    assert f"root=PARTUUID={layout.partuuid(2)}" in words
    assert "rootfstype=squashfs" in words
    assert "panic=10" in words  # the initramfs reboots instead of opening a shell


def test_boot_partition_has_firmware_kernel_and_device_mode_dtb(bootfs: Path) -> None:
    board = profile.load(BOARD)
    for name in [*board.firmware, "vmlinuz", "initrd.img", "config.txt"]:
        assert (bootfs / name).stat().st_size > 0, name
    cfg = (bootfs / "config.txt").read_text().splitlines()
    for dtb in [board.dtb, *board.variant_dtbs.values()]:
        patched = profile.patched_dtb_name(board, dtb)
        assert f"device_tree={patched}" in cfg
        node = board.usb_device.dt_node
        get = ["fdtget", "-t", "s"]
        if shutil.which("fdtget"):
            assert subprocess.run([*get, str(bootfs / patched), node, "dr_mode"],
                                  capture_output=True, text=True,
                                  check=True).stdout.strip() == "peripheral"
            # Debian's DTB beside it (Pi 4: peripheral already; CM4: host; Zero 2 W: otg)
            # differs from our copy only in the properties the profile sets
            ours, theirs = _node_props(bootfs / patched, node), _node_props(bootfs / dtb, node)
            changed = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
            assert changed <= set(board.usb_device.dt_properties)


def _node_props(path: Path, node: str) -> dict[str, str]:
    names = subprocess.run(["fdtget", "-p", str(path), node], capture_output=True, text=True,
                           check=True).stdout.split()
    return {n: subprocess.run(["fdtget", "-t", "bx", str(path), node, n], capture_output=True,
                              text=True).stdout for n in names}


def _cpio_names(data: bytes) -> list[str]:
    """Member names of concatenated newc cpio archives."""
    names, off = [], 0
    while off + 110 <= len(data):
        if data[off:off + 6] not in (b"070701", b"070702"):
            nxt = data.find(b"07070", off + 1)
            if nxt < 0:
                break
            off = nxt
            continue
        size = int(data[off + 54:off + 62], 16)
        namesize = int(data[off + 94:off + 102], 16)
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        off = (off + size + 3) & ~3
        if name == "TRAILER!!!":
            continue
        names.append(name)
    return names


def test_initrd_can_mount_the_squashfs_root(bootfs: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    raw = (bootfs / "initrd.img").read_bytes()
    start = raw.find(b"\x28\xb5\x2f\xfd")  # zstd frame after any uncompressed early cpio
    assert start >= 0, "initrd is not zstd-compressed"
    out = io.BytesIO()
    zstandard.ZstdDecompressor().copy_stream(io.BytesIO(raw[start:]), out)
    names = _cpio_names(out.getvalue())
    assert any(n.endswith("/squashfs.ko") for n in names)
    assert any(n.endswith("/overlay.ko") for n in names)
    assert any(n.endswith("/virtio_blk.ko") for n in names)  # the boot test's disk


def test_version_stamp(bootfs: Path, rootfs: Path) -> None:
    stamp = (rootfs / "usr/share/mirrorunit/version").read_text().strip()
    pkg = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert stamp.startswith(pkg + "+g") or stamp == pkg
    assert (bootfs / "mirrorunit-version.txt").read_text().strip() == stamp
    assert stamp in (bootfs / "config.txt").read_text()


needs_qemu_user = pytest.mark.skipif(
    not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists() or os.geteuid() != 0,
    reason="needs root (chroot) and qemu-user-static's aarch64 binfmt (image/setup.sh)")


@needs_qemu_user
def test_package_and_pinned_dependencies_import_on_aarch64(rootfs: Path) -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps)
    code = ("import json, platform, importlib.metadata as md, firmware, firmware.cli, cbor2, "
            "crc32c, zstandard, smbus2, cryptography\n"
            "from cryptography.hazmat.primitives.asymmetric import ec\n"
            "ec.generate_private_key(ec.SECP256R1())\n"
            "zstandard.ZstdCompressor().compress(b'x'); crc32c.crc32c(b'x')\n"
            "firmware.cli.build_parser()\n"
            f"print(json.dumps({{'machine': platform.machine(), 'firmware': firmware.__version__,"
            f" 'pins': {{n: md.version(n) for n in {sorted(pins)!r}}}}}))")
    r = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c", code],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["machine"] == "aarch64"
    assert got["pins"] == pins
    r = subprocess.run(["chroot", str(rootfs), "/usr/bin/mirrorunit", "--version"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[-1] == got["firmware"]
    assert "Copyright" in r.stdout
    # what the unit reports is the image's stamp, not only the package version
    assert got["firmware"] == (rootfs / "usr/share/mirrorunit/version").read_text().strip()


@needs_qemu_user
def test_role_units_pass_options_the_firmware_accepts(rootfs: Path) -> None:
    """Each unit's `mirrorunit ...` command line parses with the image's own parser (units
    whose role code is absent from the build are skipped by their condition at boot)."""
    units = rootfs / "usr/lib/systemd/system"
    argvs = {}
    for unit in sorted(units.glob("mirrorunit-*.service")):
        text = unit.read_text()
        module = re.search(r"^ConditionPathExists=(/\S+/firmware/\S+\.py)$", text, re.M)
        if module and not (rootfs / module.group(1).lstrip("/")).exists():
            continue
        for cmd in re.findall(r"^Exec(?:Start|Stop)=(/usr/bin/mirrorunit .*)$", text, re.M):
            cmd = cmd.replace("${MIRRORUNIT_DATA}", "/dev/null").replace(
                "${MIRRORUNIT_BUFFER}", "/dev/null")
            argvs[f"{unit.name}: {cmd}"] = shlex.split(cmd)[1:]
    assert any("mirrorunit-local.service" in k for k in argvs)
    code = ("import json, sys, firmware.cli as c\nbad = {}\n"
            "for name, argv in json.loads(sys.stdin.read()).items():\n"
            "    try:\n        c.build_parser().parse_args(argv)\n"
            "    except SystemExit as e:\n        bad[name] = e.code\n"
            "print(json.dumps(bad))")
    r = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c", code],
                       input=json.dumps(argvs), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {}, r.stderr


def _wanted_by(unit_file: Path) -> list[str]:
    if not unit_file.exists():
        return []
    return [t for line in re.findall(r"^WantedBy=(.+)$", unit_file.read_text(), re.M)
            for t in line.split()]


def test_units_enabled_and_masked(rootfs: Path) -> None:
    etc = rootfs / "etc/systemd/system"
    units = rootfs / "usr/lib/systemd/system"
    for unit in build.ENABLED_UNITS:
        template = re.sub(r"@[^.]+\.", "@.", unit)
        targets = _wanted_by(units / unit) or _wanted_by(units / template)
        assert targets, unit
        for t in targets:
            assert (etc / f"{t}.wants" / unit).is_symlink(), f"{unit} not enabled in {t}"
    for unit in build.MASKED_UNITS:
        assert os.readlink(etc / unit) == "/dev/null", unit
    for unit in build.DISABLED_UNITS:
        assert not list(etc.glob(f"*.wants/{unit}")), unit


def _effective_execstart(rootfs: Path, unit: str) -> list[str]:
    """ExecStart after drop-ins, in systemd's order (template dir, then instance dir)."""
    template = re.sub(r"@[^.]*\.", "@.", unit)
    base = rootfs / "usr/lib/systemd/system" / template
    files = [base]
    for d in (template, unit):
        for root in ("usr/lib/systemd/system", "etc/systemd/system"):
            dd = rootfs / root / f"{d}.d"
            if dd.is_dir():
                files += sorted(dd.glob("*.conf"))
    exec_start: list[str] = []
    for f in files:
        for line in f.read_text().splitlines():
            if line.startswith("ExecStart="):
                v = line.removeprefix("ExecStart=")
                exec_start = [] if v == "" else [*exec_start, v]
    return exec_start


def test_no_login_getty_on_tty1_or_serial(rootfs: Path) -> None:
    board = profile.load(BOARD)
    for unit in ("getty@tty1.service", f"serial-getty@{board.serial_console}.service",
                 "serial-getty@ttyAMA0.service"):
        start = _effective_execstart(rootfs, unit)
        assert start and all("agetty" not in s and "login" not in s for s in start), unit
        assert any("console-launch" in s or "mirrorunit console" in s for s in start), unit
    etc = rootfs / "etc/systemd/system"
    assert os.readlink(etc / "console-getty.service") == "/dev/null"
    assert os.readlink(etc / "autovt@.service") == "/dev/null"  # no login on other VTs
    logind = "".join(p.read_text() for p in (rootfs / "etc/systemd/logind.conf.d").glob("*"))
    assert re.search(r"^NAutoVTs=0$", logind, re.M)
    shadow = (rootfs / "etc/shadow").read_text().splitlines()
    hashed = [ln.split(":")[0] for ln in shadow if ln.split(":")[1].startswith("$")]
    assert hashed == [], f"accounts with a password: {hashed}"


def _mount_entries(rootfs: Path) -> list[tuple[str, str, str, set[str]]]:
    """(what, where, type, options) from fstab and every .mount unit in the root."""
    out = []
    for line in (rootfs / "etc/fstab").read_text().splitlines():
        f = line.split()
        if f and not f[0].startswith("#"):
            out.append((f[0], f[1], f[2], set(f[3].split(","))))
    for d in ("usr/lib/systemd/system", "etc/systemd/system"):
        for unit in sorted((rootfs / d).glob("*.mount")):
            if unit.is_symlink() and os.readlink(unit) == "/dev/null":
                continue
            kv = dict(re.findall(r"^(What|Where|Type|Options)=(.*)$", unit.read_text(), re.M))
            if "Where" in kv:
                out.append((kv.get("What", ""), kv["Where"], kv.get("Type", ""),
                            set(kv.get("Options", "").split(","))))
    return out


API_MOUNTS = {"/dev/hugepages", "/dev/mqueue", "/sys/kernel/debug", "/sys/kernel/tracing",
              "/sys/kernel/config", "/sys/fs/fuse/connections", "/proc/sys/fs/binfmt_misc",
              "/run/lock", "/tmp"}


def test_read_only_root_writes_only_to_ram_and_config(rootfs: Path, bootfs: Path) -> None:
    assert "ro" in (bootfs / "cmdline.txt").read_text().split()
    writable = {}
    for what, where, fstype, opts in _mount_entries(rootfs):
        if "ro" in opts:
            continue
        if fstype in ("tmpfs", "proc", "sysfs", "devtmpfs", "configfs", "debugfs", "tracefs",
                      "hugetlbfs", "mqueue", "fusectl", "binfmt_misc", "autofs"):
            assert where in API_MOUNTS or fstype == "tmpfs", (what, where, fstype)
            writable[where] = fstype
            continue
        assert fstype == "overlay", f"{where} ({fstype}) is writable and not in RAM"
        upper = dict(o.split("=", 1) for o in opts if "=" in o)
        assert upper["upperdir"].startswith("/run/"), where
        writable[where] = "overlay"
    assert writable.get("/var") == "overlay" and writable.get("/tmp") == "tmpfs"
    persistent = {where: opts for _, where, fstype, opts in _mount_entries(rootfs)
                  if fstype in ("ext4", "vfat")}
    assert set(persistent) == {"/config", "/boot/firmware"}
    assert all("ro" in o for o in persistent.values())
    # nothing in the root leads writes onto the config partition except what belongs there
    into_config = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*")
                         if p.is_symlink() and os.readlink(p).startswith("/config"))
    assert into_config == ["etc/mirrorunit/config.slots",
                           "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"]
    journald = "".join(p.read_text() for p in
                       (rootfs / "etc/systemd/journald.conf.d").glob("*.conf"))
    assert re.search(r"^Storage=volatile$", journald, re.M)
    assert re.search(r"^RuntimeMaxUse=\d+M$", journald, re.M)


def test_release_files() -> None:
    xz = Path(str(IMG) + ".xz")
    if not xz.exists():
        pytest.skip("image built with --no-xz")
    bmap = ET.parse(str(IMG) + ".bmap").getroot()
    assert int(bmap.findtext("ImageSize") or 0) == IMG.stat().st_size
    mapped = int(bmap.findtext("MappedBlocksCount") or 0)
    assert 0 < mapped < int(bmap.findtext("BlocksCount") or 0)  # the empty slot B is skipped
    digest, name = Path(str(xz) + ".sha256").read_text().split()
    assert name == xz.name and digest == hashlib.sha256(xz.read_bytes()).hexdigest()


def test_root_is_locked_and_no_account_is_open(rootfs: Path) -> None:
    entries = [ln.split(":") for ln in (rootfs / "etc/shadow").read_text().splitlines() if ln]
    fields = {f[0]: f[1] for f in entries}
    assert fields["root"][:1] in ("!", "*"), "root's password is not locked"
    # an empty field is no password at all to PAM and sulogin
    assert [n for n, f in fields.items() if f[:1] not in ("!", "*")] == []


def test_no_shell_behind_a_failed_boot(rootfs: Path) -> None:
    """emergency/rescue (sulogin) are masked, nothing else runs sulogin, and a failed
    /config mount does not fail local-fs.target (whose OnFailure= is emergency.target)."""
    etc = rootfs / "etc/systemd/system"
    for unit in ("emergency.service", "rescue.service", "debug-shell.service"):
        assert os.readlink(etc / unit) == "/dev/null", unit
    units = rootfs / "usr/lib/systemd/system"
    sulogin = {u.name for u in units.glob("*.service") if not u.is_symlink()
               and re.search(r"^Exec\w+=.*sulogin", u.read_text(), re.M)}
    assert sulogin and sulogin <= set(build.MASKED_UNITS), sulogin
    config = [e for e in _mount_entries(rootfs) if e[1] == "/config"]
    assert len(config) == 1 and "nofail" in config[0][3]
    # what needs /config does not start without it, and its failure does nothing more
    for unit in units.glob("mirrorunit-*.service"):
        text = unit.read_text()
        assert not re.search(r"^(OnFailure|FailureAction|SuccessAction)=", text, re.M), unit
    assert "emergency.target" in (units / "local-fs.target").read_text()


#: `systemd-analyze security` exposure of each sandboxed unit, at most (0 safe .. 10 unsafe);
#: before the sandboxing every one scored 9.6 ("UNSAFE")
EXPOSURE_AT_MOST = {
    "mirrorunit-local.service": 3.5,
    "mirrorunit-remote.service": 3.5,
    "mirrorunit-notify.service": 2.5,
    "mirrorunit-ups.service": 2.0,
}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None and not REQUIRED,
                    reason="systemd-analyze missing")
def test_sandboxed_units_exposure(rootfs: Path) -> None:
    scores = {}
    for unit in sorted(EXPOSURE_AT_MOST):
        r = subprocess.run(["systemd-analyze", "security", "--offline=true",
                            f"--root={rootfs}", "--no-pager", unit],
                           capture_output=True, text=True, timeout=60)
        m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+) (\w+)",
                      r.stdout)
        assert m, r.stdout[-2000:] + r.stderr
        scores[unit] = (float(m[1]), m[2])
    print("systemd-analyze security:", ", ".join(f"{u} {s} {lvl}"
                                                 for u, (s, lvl) in scores.items()))
    for unit, (score, _) in scores.items():
        assert score <= EXPOSURE_AT_MOST[unit], (unit, score)


@needs_qemu_user
def test_rpi_gpio_is_rpi_lgpio_on_aarch64(rootfs: Path) -> None:
    code = ("import json, importlib.metadata as md, RPi.GPIO, lgpio\n"
            "from firmware.ups.drivers import import_rpi_gpio\n"
            "assert import_rpi_gpio() is RPi.GPIO\n"
            "print(json.dumps({'file': RPi.GPIO.__file__,"
            " 'dists': md.packages_distributions()['RPi'],"
            " 'version': md.version('rpi-lgpio'), 'board': RPi.GPIO.RPI_INFO['TYPE']}))")
    env = {**os.environ, **build.GPIO_IMPORT_ENV}
    r = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c", code],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["file"] == f"{build.PYLIB}/RPi/GPIO/__init__.py"
    assert got["dists"] == ["rpi-lgpio"]  # not the original RPi.GPIO, which needs sysfs GPIO
    assert got["version"] == dict(p.split("==") for p in build.image_packages())["rpi-lgpio"]
    assert got["board"] == "Pi 4 Model B"
