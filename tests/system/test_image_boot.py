"""`make image-test`: boot the built card image in qemu-system-aarch64 (virt, TCG).

The kernel, initrd and command line come from the image's boot partition (the Pi firmware
is not emulated; only the console device is changed to the virt machine's PL011).  The
disk is a copy of the image grown to 3 GiB, so the first boot also grows the partitions.
Assertions are on the serial console only.

Runs in `make test`, which builds the image first (about a minute under TCG); `make test`
and `make image-test` set MIRRORUNIT_IMAGE_REQUIRED=1 / MIRRORUNIT_IMAGE_BOOT=1, so it fails
instead of skipping when no image or no qemu-system-aarch64 is there.  Run by hand without
an image it skips; MIRRORUNIT_IMAGE_BOOT=0 skips it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from image import build, layout, profile
from tests.support import REPO

BOARD = os.environ.get("MIRRORUNIT_IMAGE_BOARD", "pi4")
OUT = REPO / "build/image" / BOARD
IMG = OUT / f"mirrorunit-{BOARD}.img"
BOOT_TIMEOUT = float(os.environ.get("MIRRORUNIT_IMAGE_BOOT_TIMEOUT", "900"))

REQUIRED = (os.environ.get("MIRRORUNIT_IMAGE_BOOT") == "1"
            or os.environ.get("MIRRORUNIT_IMAGE_REQUIRED") == "1"
            and os.environ.get("MIRRORUNIT_IMAGE_BOOT") != "0")
MISSING = ("MIRRORUNIT_IMAGE_BOOT=0" if os.environ.get("MIRRORUNIT_IMAGE_BOOT") == "0"
           else f"no image built: make image BOARD={BOARD}" if not IMG.exists()
           else "qemu-system-aarch64 missing: image/setup.sh"
           if shutil.which("qemu-system-aarch64") is None else "")

pytestmark = [
    pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=MISSING),
    pytest.mark.timeout(2 * BOOT_TIMEOUT + 120),
]


class Guest:
    def __init__(self, disk: Path, kernel: Path, initrd: Path, cmdline: str, log: Path):
        self.log = log
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            ["nice", "-n", "10", "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72",
             "-smp", "2", "-m", "1024", "-display", "none", "-monitor", "none",
             "-nic", "none", "-no-reboot", "-serial", f"file:{log}",
             "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
             "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def text(self) -> str:
        try:
            return self.log.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds since the guest started when `pattern` appeared on the console."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while time.monotonic() < end:
            if rx.search(self.text()):
                return time.monotonic() - self.t0
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        raise AssertionError(f"{pattern!r} not on the console; last output:\n"
                             + self.text()[-4000:])


def _boot_files(tmp: Path) -> tuple[Path, Path, str]:
    boot = next(p for p in layout.build_layout(build.ROOT_SLOT) if p.name == "boot")
    spec = f"{IMG}@@{boot.start}"
    for name in ("vmlinuz", "initrd.img", "cmdline.txt", "mirrorunit-version.txt"):
        subprocess.run(["mcopy", "-n", "-i", spec, f"::/{name}", str(tmp / name)], check=True)
    board = profile.load(BOARD)
    cmdline = (tmp / "cmdline.txt").read_text().strip()
    serial = f"console={board.serial_console},{board.serial_baud}"
    assert serial in cmdline.split()
    # the virt machine's UART is a PL011; the report unit runs only with this flag
    cmdline = cmdline.replace(serial, "console=ttyAMA0,115200") + " mirrorunit.boot_report"
    return tmp / "vmlinuz", tmp / "initrd.img", cmdline


def _report(text: str) -> str:
    m = re.search(r"MIRRORUNIT-REPORT-BEGIN\n(.*?)MIRRORUNIT-REPORT-END", text, re.S)
    assert m, "no boot report"
    return m.group(1)


def _units(report: str) -> dict[str, dict[str, str]]:
    rx = r"unit (\S+) active=(\S*) result=(\S*) restarts=(\S*) condition=(\S*)$"
    return {m[1]: {"active": m[2], "result": m[3], "restarts": m[4], "condition": m[5]}
            for m in re.finditer(rx, report, re.M)}


def _mounts(report: str) -> dict[str, tuple[str, str, set[str]]]:
    section = report.split("--- mounts\n", 1)[1].split("--- ", 1)[0]
    out = {}
    for line in section.splitlines():
        dev, where, fstype, opts, *_ = line.split()
        out[where] = (dev, fstype, set(opts.split(",")))
    return out


RAM_TYPES = {"tmpfs", "proc", "sysfs", "devtmpfs", "devpts", "cgroup2", "securityfs",
             "pstore", "bpf", "mqueue", "hugetlbfs", "debugfs", "tracefs", "configfs",
             "fusectl", "binfmt_misc", "autofs", "efivarfs", "ramfs"}


def _boot(disk: Path, boot: tuple[Path, Path, str], log: Path) -> tuple[str, float]:
    """Boot `disk` with (kernel, initrd, cmdline) until the boot report is out; returns the
    console text and the seconds to the console.  The guest is then killed, not shut down:
    a power cut."""
    guest = Guest(disk, *boot, log)
    try:
        # the setup utility's title bar, or the launcher's banner where a build has none
        t_console = guest.wait_for(r"MirrorUnit setup - |^MirrorUnit \S+ on mirrorunit-\S+ "
                                   r"\(ttyAMA0\)", BOOT_TIMEOUT)
        guest.wait_for(r"^MIRRORUNIT-REPORT-END", BOOT_TIMEOUT)
        time.sleep(5)  # let a crash-looping unit show itself, were there one
        return guest.text(), t_console
    finally:
        if guest.proc.poll() is None:
            guest.proc.kill()
            guest.proc.wait()


def _check_boot(text: str, version: str) -> dict[str, dict[str, str]]:
    """What every boot must show; returns the unit states."""
    assert not re.search(r"^\S*login: ", text, re.M), "a login prompt appeared"
    if "MirrorUnit setup - " not in text:
        assert f"MirrorUnit {version} on " in text
    report = _report(text)
    assert f"version {version}\n" in report
    mounts = _mounts(report)
    assert mounts["/"][1] == "squashfs" and "ro" in mounts["/"][2]
    assert mounts["/config"][1] == "ext4" and "ro" in mounts["/config"][2]
    for where, (dev, fstype, opts) in mounts.items():
        if "rw" in opts:
            assert fstype in RAM_TYPES or (fstype == "overlay" and where == "/var"), \
                f"{where} ({fstype} on {dev}) is writable"
    units = _units(report)
    gadget = units["mirrorunit-gadget"]
    assert gadget["active"] == "inactive" and gadget["restarts"] == "0", gadget
    gadget_log = report.split("--- gadget\n", 1)[1].split("--- ", 1)[0]
    assert "no USB device controller (UDC)" in gadget_log
    for name, u in units.items():
        assert u["active"] != "failed", f"{name}: {u}"
        assert u["restarts"] in ("", "0"), f"{name} restarted: {u}"
    assert units["var.mount"]["active"] == "active"
    assert units["serial-getty@ttyAMA0"]["active"] == "active"
    procs = [ln for ln in report.splitlines() if ln.startswith("proc ")]
    assert not any("agetty" in p or "/bin/login" in p for p in procs), procs
    return units


def _section(report: str, name: str) -> str:
    return report.split(f"--- {name}\n", 1)[1].split("--- ", 1)[0]


def test_boot_to_console(tmp_path: Path) -> None:
    """First boot, a power cut, and a second boot of the same card."""
    assert not MISSING, MISSING
    disk = tmp_path / "card.img"
    subprocess.run(["cp", "--sparse=always", str(IMG), str(disk)], check=True)
    with disk.open("r+b") as f:
        f.truncate(3 << 30)
    boot = _boot_files(tmp_path)
    version = (tmp_path / "mirrorunit-version.txt").read_text().strip()

    text, t_console = _boot(disk, boot, tmp_path / "first.log")
    (OUT / "boot-test-console.log").write_text(text)
    print(f"boot to console: {t_console:.0f} s (TCG)")
    units = _check_boot(text, version)
    report = _report(text)
    assert units["mirrorunit-firstboot"]["result"] == "success"
    # first boot grew the card: buffer and data partitions now exist
    parts = _section(report, "partitions")
    assert re.search(r"\bvda6$", parts, re.M) and re.search(r"\bvda7$", parts, re.M)
    assert "firstboot.done" in report and "storage.env" in report
    host = re.search(r"^hostname (mirrorunit-[0-9a-f]{8})$", report, re.M)
    assert host
    # the network settings reached systemd-networkd before it started (blank config: DHCP)
    assert units["mirrorunit-network"]["result"] == "success"
    assert re.search(r"^DHCP=yes$", _section(report, "network"), re.M)
    # the local role's service starts from the config and the storage map first boot wrote
    local = _section(report, "local role")
    assert re.search(r"^local --frontend usb .*--disk /dev/disk/by-partuuid/\S+-07 "
                     r"--buffer /dev/disk/by-partuuid/\S+-06 .*--state-dir "
                     r"/run/mirrorunit/local-link ", local, re.M), local
    cert = re.search(r"^([0-9a-f]{64})  /config/link/link-cert.pem$",
                     _section(report, "identity"), re.M)
    assert cert, "first boot made no link identity"
    # no shell behind a failed boot, and root locked (docs/image.md, "Locked down")
    locked = _section(report, "locked")
    for unit in ("emergency.service", "rescue.service", "debug-shell.service"):
        assert f"load {unit} masked" in locked, locked
    assert re.search(r"^root root L ", locked, re.M), locked
    # the UPS power-loss driver through RPi.GPIO (rpi-lgpio) on the virt machine's PL061
    gpio = _section(report, "ups gpio")
    print(gpio)
    assert f"gpio module {build.PYLIB}/RPi/GPIO/__init__.py" in gpio, gpio
    assert re.search(r"^ups: power-loss input on BCM 6 \(active low", gpio, re.M), gpio

    # Power cut (the guest was killed), then the same card again: first boot is not redone,
    # the identity and the partitions it made are kept, and the root came back untouched.
    text2, t_console2 = _boot(disk, boot, tmp_path / "second.log")
    (OUT / "boot-test-console-2.log").write_text(text2)
    print(f"second boot to console: {t_console2:.0f} s (TCG)")
    units2 = _check_boot(text2, version)
    report2 = _report(text2)
    assert units2["mirrorunit-firstboot"]["condition"] == "no", units2["mirrorunit-firstboot"]
    assert f"hostname {host[1]}\n" in report2
    assert f"{cert[1]}  /config/link/link-cert.pem" in _section(report2, "identity")
    assert _section(report2, "partitions") == parts
    (OUT / "boot-test.json").write_text(
        f'{{"boot_to_console_s": {t_console:.1f}, "second_boot_to_console_s": {t_console2:.1f}}}\n')
