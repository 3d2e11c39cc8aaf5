"""The whole local unit (`mirrorunit local --frontend usb`) as a USB disk of Linux's usb-storage.

One guest boots for the module; in it the unit runs with its disk and CBQ on the
guest's tmpfs, started as a hot standby.  The tests run in order against that one
unit: standby and promotion, sg3_utils, an ext4 tree with digests, the CBQ's view
of those writes, malformed traffic and resets, and finally a clean stop after which
the CBQ verifies clean offline and the mirror file holds the data.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support import REPO
from tests.support.vm import GuestVM
from tests.support.vm.prelude import PRELUDE

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

PYTHON = sys.executable
SIZE = 96 << 20
#: the filesystem takes the first 64 MiB; raw pattern writes go above it
FS_KIB = 64 << 10
PATTERN_MIB = 72
SERIAL = "MULOCAL001"
WORK = "/tmp/mu-local"
CTL = f"{WORK}/control.sock"
MU = f"cd {REPO} && {PYTHON} -m firmware"


def run(vm: GuestVM, script: str, timeout: float = 180) -> str:
    return vm.run(PRELUDE + script, timeout=timeout).check().output


def test_gadget_commands_in_the_guest(guest_vm: GuestVM) -> None:
    """`mirrorunit gadget up|status|down` against the guest's real configfs."""
    out = run(
        guest_vm,
        f"""
mu gadget up --udc dummy_udc.0 --serial GADGET01; echo "up=$?"
mu gadget up --udc dummy_udc.0 --serial GADGET01; echo "up-again=$?"
mu gadget status --json
cd {REPO} && {PYTHON} -c "from firmware.usb_gadget.udc import read_udc_state as r; \
print('udc-unbound=' + repr(r('dummy_udc.0')))"
cat /sys/kernel/config/usb_gadget/mirrorunit/strings/0x409/serialnumber
mu gadget down; echo "down=$?"
mu gadget down; echo "down-again=$?"
[ -e /sys/kernel/config/usb_gadget/mirrorunit ] && echo "gadget-left"
grep -q functionfs /proc/mounts && echo "ffs-left"
true
""",
    )
    assert "up=0" in out and "up-again=0" in out, out
    status = json.loads(out[out.index("{"):out.index("}") + 1])
    assert status["exists"] and status["functionfs_mounted"] and status["udc"] is None, out
    assert "GADGET01" in out
    # Nothing bound yet: the UDC, read through pyudev, has no host attached.
    assert "udc-unbound='not attached'" in out, out
    assert "down=0" in out and "down-again=0" in out, out
    assert "gadget-left" not in out and "ffs-left" not in out, out


@pytest.fixture(scope="module")
def disk(guest_vm: GuestVM) -> Iterator[str]:
    """The unit started as a standby; yields the guest's /dev/sdX for it."""
    out = run(
        guest_vm,
        f"""
mkdir -p {WORK}
cd {REPO}
{PYTHON} -m firmware local --disk {WORK}/disk.img --size {SIZE} \
    --buffer {WORK}/cbq.img --buffer-size 192M --control {CTL} --nbd '' \
    --frontend usb --usb-udc dummy_udc.0 --usb-serial {SERIAL} --standby \
    > {WORK}/unit.log 2>&1 &
echo $! > {WORK}/unit.pid
wait_disk MirrorUn
""",
    )
    yield out.strip().splitlines()[-1]
    guest_vm.run(f"kill -TERM $(cat {WORK}/unit.pid) 2>/dev/null; true")


def test_standby_shows_size_refuses_reads_until_promoted(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
SG=$(sg_of {disk})
echo "size=$(blockdev --getsize64 {disk})"
sg_readcap $SG | grep -i "number of logical blocks"
sg_turs -v $SG 2>&1; echo "turs-standby=$?"
sg_dd if=$SG of=/dev/null bs=512 count=8 2>&1; echo "read-standby=$?"
dd if={disk} of=/dev/null bs=4096 count=1 iflag=direct 2>&1; echo "dd-standby=$?"
mu status --control {CTL} --json > /tmp/st.json; grep -o '"state": "[a-z]*"' /tmp/st.json
grep -o '"connection": "[a-z-]*"' /tmp/st.json
mu promote --control {CTL}
sg_turs -v $SG 2>&1; echo "turs-first=$?"
sg_turs $SG; echo "turs-ready=$?"
dd if={disk} of=/dev/null bs=64k count=16 iflag=direct 2>&1; echo "dd-ready=$?"
""",
    )
    assert f"size={SIZE}" in out, out
    assert f"Number of logical blocks={SIZE // 512}" in out, out
    assert "turs-standby=2" in out, out  # sg3_utils: 2 = not ready
    assert re.search(r"standby", out, re.I), out  # 02/04/0B decoded by sg3_utils
    assert "read-standby=0" not in out and "dd-standby=0" not in out, out
    assert '"state": "standby"' in out, out
    # The host's usb-storage configured the device: the UDC says so, read through pyudev.
    assert '"connection": "configured"' in out, out
    assert "volume is ready" in out, out
    # promotion is announced once with a unit attention (sg3_utils exit 6), then access
    assert "turs-first=6" in out, out
    assert re.search(r"unit attention", out, re.I), out
    assert "turs-ready=0" in out, out
    assert "dd-ready=0" in out, out


def test_sg3_utils_answers(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
SG=$(sg_of {disk})
sg_inq $SG
sg_vpd -p sn $SG
sg_modes -p 8 $SG
sg_sync $SG && echo "sync-ok"
sg_verify --lba=0 --count=64 $SG && echo "verify-ok"
""",
    )
    assert "Vendor identification: MirrorUn" in out
    assert f"Unit serial number: {SERIAL}" in out
    # caching page: code 08, length 0x12, then WCE (0x04) set even in the default
    # write-through mode: the host's flushes are the consistent points the unit records
    assert re.search(r"00\s+08 12 04", out), out
    assert "sync-ok" in out and "verify-ok" in out


MANIFEST = "/tmp/mu-local-manifest"


def test_ext4_tree_round_trip(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
set -e
mkfs.ext4 -q -F {disk} {FS_KIB}
mkdir -p /mnt/mu
mount {disk} /mnt/mu
mkdir -p /mnt/mu/a/b /mnt/mu/c
head -c 3000000 /dev/urandom > /mnt/mu/a/big.bin
head -c 4097 /dev/urandom > /mnt/mu/a/b/odd.bin
for i in $(seq 1 40); do head -c $((i * 517)) /dev/urandom > /mnt/mu/c/f$i; done
(cd /mnt/mu && find . -type f ! -path './lost+found/*' -print0 | sort -z \
    | xargs -0 sha256sum) > {MANIFEST}
sync
umount /mnt/mu
echo 3 > /proc/sys/vm/drop_caches
e2fsck -fn {disk} && echo "fsck-clean"
mount -o ro {disk} /mnt/mu
(cd /mnt/mu && sha256sum -c --quiet {MANIFEST}) && echo "digests-ok"
wc -l < {MANIFEST}
umount /mnt/mu
""",
        timeout=300,
    )
    assert "fsck-clean" in out, out
    assert "digests-ok" in out, out
    assert out.strip().splitlines()[-1] == "42"


def test_cbq_holds_the_writes(guest_vm: GuestVM, disk: str) -> None:
    out = run(guest_vm, f"mu status --control {CTL} --json")
    status = json.loads(out)
    q, v, usb = status["cbq"], status["volume"], status["usb"]
    assert v["state"] == "ready"
    # mkfs + 3 MB of files, none acknowledged by a remote peer yet
    assert q["mode"] == "normal", q
    assert q["last_seq"] >= 10, q
    assert q["queued_bytes"] >= 3_000_000, q
    assert q["consumers"]["remote"]["pending_records"] >= 10, q
    assert v["bytes_written"] >= 3_000_000, v
    assert usb["serving"] and usb["udc"] == "dummy_udc.0", usb
    assert usb["commands"] > 100 and usb["bytes_out"] >= 3_000_000, usb


def test_malformed_traffic_and_resets_leave_unit_serving(guest_vm: GuestVM, disk: str) -> None:
    blocks = SIZE // 512
    out = run(
        guest_vm,
        f"""
SG=$(sg_of {disk})
head -c 16777216 /dev/urandom > /tmp/mu-pattern
want=$(sha256sum < /tmp/mu-pattern)
# unknown opcode, READ(10) past the end, INQUIRY with a page but no EVPD,
# WRITE(10) whose data-out the host declares shorter than the CDB asks for
sg_raw $SG ff 00 00 00 00 00 2>&1; echo "raw-unknown=$?"
sg_raw -r 512 $SG 28 00 $(printf '%02x %02x %02x %02x' $(({blocks} >> 24)) \
    $(({blocks} >> 16 & 255)) $(({blocks} >> 8 & 255)) $(({blocks} & 255))) 00 00 01 00 2>&1
echo "raw-range=$?"
sg_raw -r 512 $SG 12 00 80 00 24 00 2>&1; echo "raw-field=$?"
head -c 512 /dev/zero > /tmp/mu-one
sg_raw -s 512 -i /tmp/mu-one $SG 2a 00 00 00 00 00 00 00 08 00 2>&1; echo "raw-short=$?"
# the phase error of the last one makes usb-storage reset the device: one unit attention
sg_turs $SG 2>&1; echo "turs-ua=$?"
sg_turs $SG; echo "turs-after-raw=$?"
# a big write with device and bus resets in the middle
dd if=/tmp/mu-pattern of={disk} bs=1M seek={PATTERN_MIB} oflag=direct 2>/tmp/mu-dd.err &
ddpid=$!
sleep 0.3
kill -0 $ddpid && echo "dd-running-at-reset"
sg_reset -d $SG; echo "reset-dev=$?"
sleep 0.3
sg_reset -b $SG; echo "reset-bus=$?"
wait $ddpid; echo "dd-write=$?"
DEV=$(wait_disk MirrorUn)
SG=$(sg_of $DEV)
got=$(dd if=$DEV bs=1M skip={PATTERN_MIB} count=16 iflag=direct 2>/dev/null | sha256sum)
[ "$got" = "$want" ] && echo "pattern-ok"
e2fsck -fn $DEV > /dev/null 2>&1 && echo "fsck-clean"
mount -o ro $DEV /mnt/mu && (cd /mnt/mu && sha256sum -c --quiet {MANIFEST}) && echo "digests-ok"
umount /mnt/mu
sg_turs $SG; echo "turs-end=$?"
kill -0 $(cat {WORK}/unit.pid) && echo "unit-alive"
echo "bot-resets=$(grep -c "bRequestType=33, bRequest=255" {WORK}/unit.log)"
echo "re-enables=$(grep -c "superseded (enable)" {WORK}/unit.log)"
""",
        timeout=300,
    )
    assert "raw-unknown=0" not in out and re.search(r"Illegal Request", out, re.I), out
    assert "raw-range=0" not in out and "Logical block address out of range" in out, out
    assert "raw-field=0" not in out and "Invalid field in cdb" in out, out
    assert "raw-short=0" not in out, out
    assert "turs-ua=6" in out and "Power on, reset" in out, out
    assert "turs-after-raw=0" in out, out
    assert "dd-running-at-reset" in out, out
    assert "reset-dev=0" in out and "reset-bus=0" in out, out
    assert "dd-write=0" in out, out
    assert "pattern-ok" in out, out
    assert "fsck-clean" in out and "digests-ok" in out, out
    assert "turs-end=0" in out and "unit-alive" in out, out
    # the unit saw a Bulk-Only Mass Storage Reset and USB resets (re-enables)
    assert re.search(r"bot-resets=[1-9]", out) and re.search(r"re-enables=[2-9]", out), out


def test_stop_flushes_and_cbq_inspects_clean(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
pid=$(cat {WORK}/unit.pid)
kill -TERM $pid
i=0; while kill -0 $pid 2>/dev/null; do i=$((i+1)); [ $i -gt 300 ] && break; sleep 0.05; done
kill -0 $pid 2>/dev/null && echo "still-running"
[ -e /sys/kernel/config/usb_gadget/mirrorunit ] && echo "gadget-left"
grep -q functionfs /proc/mounts && echo "ffs-left"
mu cbq inspect {WORK}/cbq.img; echo "inspect=$?"
want=$(sha256sum < /tmp/mu-pattern)
got=$(dd if={WORK}/disk.img bs=1M skip={PATTERN_MIB} count=16 2>/dev/null | sha256sum)
[ "$got" = "$want" ] && echo "mirror-pattern-ok"
head -c {FS_KIB * 1024} {WORK}/disk.img > /tmp/mu-fs.img
e2fsck -fn /tmp/mu-fs.img > /dev/null 2>&1 && echo "mirror-fsck-clean"
grep -c Traceback {WORK}/unit.log
tail -2 {WORK}/unit.log
""",
    )
    for leftover in ("still-running", "gadget-left", "ffs-left"):
        assert leftover not in out, out
    assert "inspect=0" in out and "verified: clean" in out, out
    assert "mirror-pattern-ok" in out and "mirror-fsck-clean" in out, out
    assert "\n0\n" in out, out  # no traceback in the unit's log
    assert "stopped cleanly" in out, out
    # Boot-to-verdict time is a figure to report (make bench / the test log), not a
    # pass/fail condition: under TCG it is CPU time and moves with the host's load.
    elapsed = time.monotonic() - guest_vm.started_at
    print(f"QEMU start to verdict: {elapsed:.0f} s (host load {os.getloadavg()[0]:.1f})")
