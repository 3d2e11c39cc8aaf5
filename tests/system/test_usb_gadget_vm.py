"""Linux's own usb-storage (over dummy_hcd, in a QEMU guest) against our gadget.

One guest boots per module.  The first test runs the kernel's f_mass_storage as
a baseline; then our gadget (tests/support/vm/guest_gadget.py: FileBlockDevice ->
ScsiTarget -> BOT -> FunctionFS) serves a 64 MiB image for the rest.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import pytest

from tests.support import REPO
from tests.support.vm import GuestVM

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

PYTHON = sys.executable
SIZE = 64 * 1024 * 1024
SERIAL = "MUVM0001"
IMAGE = "/tmp/mu-disk.img"
CONTROL = "/tmp/mu-ctl"

#: Shell helpers: find our disk by its INQUIRY vendor, as there is no udev in the guest.
PRELUDE = r"""
set -u
find_disk() {
    for b in /sys/block/sd*; do
        [ -e "$b/device/vendor" ] || continue
        [ "$(tr -d ' ' < "$b/device/vendor")" = "$1" ] || continue
        [ "$(cat "$b/size")" -gt 0 ] 2>/dev/null || continue
        echo "/dev/${b##*/}"; return 0
    done
    return 1
}
wait_disk() {
    i=0
    while ! find_disk "$1" >/dev/null; do
        i=$((i+1)); [ $i -gt 600 ] && { echo "no disk from $1" >&2; return 1; }
        sleep 0.1
    done
    find_disk "$1"
}
sg_of() { echo "/dev/$(ls "/sys/block/${1#/dev/}/device/scsi_generic/")"; }
"""


def run(vm: GuestVM, script: str, timeout: float = 120) -> str:
    return vm.run(PRELUDE + script, timeout=timeout).check().output


def mb_per_s(dd_output: str) -> float:
    match = re.search(r"copied, ([0-9.]+) s", dd_output)
    assert match, dd_output
    return SIZE / float(match.group(1)) / 1e6


def test_kernel_mass_storage_baseline(guest_vm: GuestVM) -> None:
    """The kernel's own f_mass_storage over the same UDC: the harness works end to end."""
    out = run(
        guest_vm,
        f"""
truncate -s {SIZE} /tmp/base.img
G=/sys/kernel/config/usb_gadget/baseline
mkdir $G && cd $G
echo 0x1d6b > idVendor; echo 0x0104 > idProduct
mkdir functions/mass_storage.0 configs/c.1
echo /tmp/base.img > functions/mass_storage.0/lun.0/file
ln -s functions/mass_storage.0 configs/c.1/
echo dummy_udc.0 > UDC
DEV=$(wait_disk Linux)
echo "size=$(blockdev --getsize64 $DEV)"
dd if=$DEV of=/dev/null bs=1M iflag=direct 2>&1 | tail -1
echo "" > UDC
rm configs/c.1/mass_storage.0; rmdir configs/c.1 functions/mass_storage.0; cd /; rmdir $G
rm /tmp/base.img
""",
    )
    assert f"size={SIZE}" in out
    print(f"kernel f_mass_storage read: {mb_per_s(out):.1f} MB/s")


@pytest.fixture(scope="module")
def disk(guest_vm: GuestVM) -> Iterator[str]:
    """Our gadget serving a 64 MiB image; yields the guest's /dev/sdX for it."""
    out = run(
        guest_vm,
        f"""
cd {REPO}
{PYTHON} tests/support/vm/guest_gadget.py {IMAGE} {SIZE} --control {CONTROL} --serial {SERIAL} \
    > /tmp/mu-gadget.log 2>&1 &
echo $! > /tmp/mu-gadget.pid
wait_disk MirrorUn
""",
    )
    yield out.strip().splitlines()[-1]
    guest_vm.run("kill -TERM $(cat /tmp/mu-gadget.pid) 2>/dev/null; true")


def test_usb_storage_binds_and_sd_reports_size(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
blockdev --getsize64 {disk}
cat /sys/block/{disk[5:]}/device/model
dd if={disk} of=/dev/null bs=1M iflag=direct 2>&1 | tail -1
""",
    )
    lines = out.splitlines()
    assert lines[0] == str(SIZE)
    assert lines[1].strip() == "MirrorUnit Disk"
    print(f"our gadget read: {mb_per_s(out):.1f} MB/s")


def test_sg3_utils_answers(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
SG=$(sg_of {disk})
echo "== inq"; sg_inq $SG
echo "== readcap"; sg_readcap -l $SG
echo "== turs"; sg_turs $SG && echo "turs-ok"
echo "== sn"; sg_vpd -p sn $SG
echo "== di"; sg_vpd -p di $SG
echo "== modes"; sg_modes -p 8 $SG
echo "== sync"; sg_sync $SG && echo "sync-ok"
echo "== verify"; sg_verify --lba=0 --count=64 $SG && echo "verify-ok"
""",
    )
    assert "Vendor identification: MirrorUn" in out
    assert "Product identification: MirrorUnit Disk" in out
    assert f"Number of logical blocks={SIZE // 512}" in out
    assert "Logical block length=512 bytes" in out
    assert "turs-ok" in out
    assert f"Unit serial number: {SERIAL}" in out
    # VPD 0x83 must carry at least one designator (EUI-64 from the serial)
    di = out.split("== di", 1)[1].split("== modes", 1)[0]
    assert "designator" in di.lower() or "EUI-64" in di, di
    modes = out.split("== modes", 1)[1].split("== sync", 1)[0]
    assert "Caching" in modes or "caching" in modes, modes
    assert "sync-ok" in out
    assert "verify-ok" in out


def test_ext4_round_trip_with_digests(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
set -e
mkfs.ext4 -q -F {disk}
mkdir -p /mnt/mu
mount {disk} /mnt/mu
mkdir -p /mnt/mu/a/b /mnt/mu/c
head -c 3000000 /dev/urandom > /mnt/mu/a/big.bin
head -c 4097 /dev/urandom > /mnt/mu/a/b/odd.bin
for i in $(seq 1 40); do head -c $((i * 517)) /dev/urandom > /mnt/mu/c/f$i; done
(cd /mnt/mu && find . -type f ! -path './lost+found/*' -print0 | sort -z \
    | xargs -0 sha256sum) > /tmp/mu-manifest
sync
umount /mnt/mu
echo 3 > /proc/sys/vm/drop_caches
e2fsck -fn {disk} && echo "fsck-clean"
# the backing file itself holds the same filesystem
e2fsck -fn {IMAGE} && echo "image-clean"
mount {disk} /mnt/mu
(cd /mnt/mu && sha256sum -c --quiet /tmp/mu-manifest) && echo "digests-ok"
wc -l < /tmp/mu-manifest
umount /mnt/mu
""",
        timeout=300,
    )
    assert "fsck-clean" in out
    assert "image-clean" in out
    assert "digests-ok" in out
    assert out.strip().splitlines()[-1] == "42"


def test_standby_refuses_reads_until_promoted(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        f"""
SG=$(sg_of {disk})
echo standby > {CONTROL}
sg_turs -v $SG 2>&1; echo "turs-standby=$?"
dd if={disk} of=/dev/null bs=4096 count=1 iflag=direct 2>&1; echo "dd-standby=$?"
sg_readcap $SG | grep -i "number of logical blocks"
echo ready > {CONTROL}
sg_turs $SG 2>&1; echo "turs-first=$?"
sg_turs $SG; echo "turs-ready=$?"
dd if={disk} of=/dev/null bs=4096 count=16 iflag=direct 2>&1; echo "dd-ready=$?"
""",
    )
    assert "turs-standby=2" in out, out
    assert re.search(r"standby", out, re.I), out  # 02/04/0B decoded by sg3_utils
    assert "dd-standby=0" not in out
    assert f"Number of logical blocks={SIZE // 512}" in out
    assert "turs-ready=0" in out
    assert "dd-ready=0" in out


def test_bad_cdbs_and_resets_leave_unit_serving(guest_vm: GuestVM, disk: str) -> None:
    blocks = SIZE // 512
    out = run(
        guest_vm,
        f"""
SG=$(sg_of {disk})
head -c 16777216 /dev/urandom > /tmp/mu-pattern
want=$(sha256sum < /tmp/mu-pattern)
# unknown opcode, READ(10) past the end, INQUIRY with a host length far above the
# allocation length, INQUIRY asking for a page without EVPD
sg_raw $SG ff 00 00 00 00 00 2>&1; echo "raw-unknown=$?"
sg_raw -r 512 $SG 28 00 $(printf '%02x %02x %02x %02x' $(({blocks} >> 24)) \
    $(({blocks} >> 16 & 255)) $(({blocks} >> 8 & 255)) $(({blocks} & 255))) 00 00 01 00 2>&1
echo "raw-range=$?"
sg_raw -r 4096 $SG 12 00 00 00 24 00 > /dev/null 2>&1; echo "raw-inq=$?"
sg_raw -r 512 $SG 12 00 80 00 24 00 2>&1; echo "raw-field=$?"
sg_turs $SG; echo "turs-after-raw=$?"
# a big write with device and bus (USB port) resets in the middle
dd if=/tmp/mu-pattern of={disk} bs=1M seek=8 oflag=direct 2>/tmp/mu-dd.err &
ddpid=$!
sleep 0.3
kill -0 $ddpid && echo "dd-running-at-reset"
resets0=$(grep -c "bRequestType=33, bRequest=255" /tmp/mu-gadget.log)
enables0=$(grep -c "superseded (enable)" /tmp/mu-gadget.log)
sg_reset -d $SG; echo "reset-dev=$?"
sleep 0.3
sg_reset -b $SG; echo "reset-bus=$?"
wait $ddpid; echo "dd-write=$?"
echo "bot-resets=$(( $(grep -c "bRequestType=33, bRequest=255" /tmp/mu-gadget.log) - resets0 ))"
echo "re-enables=$(( $(grep -c "superseded (enable)" /tmp/mu-gadget.log) - enables0 ))"
SG=$(sg_of $(wait_disk MirrorUn))
got=$(dd if={disk} bs=1M skip=8 count=16 iflag=direct 2>/dev/null | sha256sum)
[ "$got" = "$want" ] && echo "device-data-ok"
back=$(dd if={IMAGE} bs=1M skip=8 count=16 2>/dev/null | sha256sum)
[ "$back" = "$want" ] && echo "image-data-ok"
sg_turs $SG; echo "turs-end=$?"
""",
        timeout=300,
    )
    assert "raw-unknown=0" not in out
    assert re.search(r"Illegal Request", out, re.I), out
    assert "raw-range=0" not in out
    assert "Logical block address out of range" in out
    assert "raw-field=0" not in out
    assert "Invalid field in cdb" in out
    assert "turs-after-raw=0" in out
    assert "dd-running-at-reset" in out, out
    assert "reset-dev=0" in out, out
    assert "reset-bus=0" in out, out
    assert "dd-write=0" in out, out
    # the gadget saw a Bulk-Only Mass Storage Reset and a USB reset (re-enable)
    assert re.search(r"bot-resets=[1-9]", out), out
    assert re.search(r"re-enables=[1-9]", out), out
    assert "device-data-ok" in out, out
    assert "image-data-ok" in out, out
    assert "turs-end=0" in out, out


def test_reset_in_a_pipelined_write_keeps_data_intact(guest_vm: GuestVM, disk: str) -> None:
    """1 MiB WRITEs (host max_sectors 2048) are received through AIO in pipelined
    pieces.  The medium hangs on one of them past the host's command timeout, so
    usb-storage aborts the command and resets (here the port: the Bulk-Only
    reset request waits behind the hung command): whatever is still posted is
    cancelled, nothing of the aborted command may complete into the next one,
    and the retried writes must leave exactly the host's data."""
    dev = disk[5:]
    out = run(
        guest_vm,
        f"""
SG=$(sg_of {disk})
grep -q "bulk endpoints through native AIO" /tmp/mu-gadget.log && echo "aio-on"
echo 2048 > /sys/block/{dev}/device/max_sectors
echo 3 > /sys/block/{dev}/device/timeout
head -c 33554432 /dev/urandom > /tmp/mu-pattern2
want=$(sha256sum < /tmp/mu-pattern2)
C="cancelling .* bulk transfers in flight"
cancels0=$(grep -c "$C" /tmp/mu-gadget.log)
resets0=$(grep -c "bulk side superseded" /tmp/mu-gadget.log)
dd if=/tmp/mu-pattern2 of={disk} bs=1M seek=32 count=8 oflag=direct 2>/tmp/mu-dd2.err
echo "hang 6" > {CONTROL}
dd if=/tmp/mu-pattern2 of={disk} bs=1M seek=40 skip=8 count=24 oflag=direct 2>>/tmp/mu-dd2.err
echo "dd-write=$?"
grep -c "medium write hangs" /tmp/mu-gadget.log | sed 's/^/hangs=/'
echo "cancels=$(( $(grep -c "$C" /tmp/mu-gadget.log) - cancels0 ))"
echo "resets=$(( $(grep -c "bulk side superseded" /tmp/mu-gadget.log) - resets0 ))"
echo 30 > /sys/block/{dev}/device/timeout 2>/dev/null
DEV=$(wait_disk MirrorUn)
got=$(dd if=$DEV bs=1M skip=32 count=32 iflag=direct 2>/dev/null | sha256sum)
[ "$got" = "$want" ] && echo "device-data-ok"
back=$(dd if={IMAGE} bs=1M skip=32 count=32 2>/dev/null | sha256sum)
[ "$back" = "$want" ] && echo "image-data-ok"
sg_turs $(sg_of $DEV); echo "turs-end=$?"
tail -25 /tmp/mu-gadget.log
""",
        timeout=300,
    )
    assert "aio-on" in out, out
    assert "dd-write=0" in out, out
    assert "hangs=1" in out, out
    # the host gave up on the hung command and reset (usb-storage picks a Bulk-Only
    # or a port reset).  Whether data-out reads were still posted then depends on
    # timing (dummy_hcd often fills all four in one pass before the hang), so the
    # cancel count is reported, not asserted; test_frontend_threads.py cancels them
    # deterministically over a fake AIO context.
    assert re.search(r"resets=[1-9]", out), out
    cancels = re.search(r"cancels=(\d+)", out)
    print(f"transfers cancelled by the reset: {cancels.group(1) if cancels else '?'}")
    assert "device-data-ok" in out, out
    assert "image-data-ok" in out, out
    assert "turs-end=0" in out, out


def test_restart_after_sigkill_serves_the_same_data(guest_vm: GuestVM, disk: str) -> None:
    """A crashed server leaves configfs and a FunctionFS mount behind; `gadget down`
    clears them and a new server serves the same data."""
    out = run(
        guest_vm,
        f"""
kill -KILL $(cat /tmp/mu-gadget.pid)
i=0; while find_disk MirrorUn > /dev/null; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.1; done
[ -e /sys/kernel/config/usb_gadget/mirrorunit ] && echo "stale-gadget"
grep -q functionfs /proc/mounts && echo "stale-mount"
cd {REPO}
{PYTHON} -c "from firmware.usb_gadget.configfs import GadgetSettings, gadget_down
gadget_down(GadgetSettings())" && echo "down-ok"
[ -e /sys/kernel/config/usb_gadget/mirrorunit ] && echo "gadget-left"
grep -q functionfs /proc/mounts && echo "mount-left"
{PYTHON} tests/support/vm/guest_gadget.py {IMAGE} {SIZE} --control {CONTROL} --serial {SERIAL} \
    >> /tmp/mu-gadget.log 2>&1 &
echo $! > /tmp/mu-gadget.pid
DEV=$(wait_disk MirrorUn) || exit 1
echo "disk=$DEV"
want=$(sha256sum < /tmp/mu-pattern)
got=$(dd if=$DEV bs=1M skip=8 count=16 iflag=direct 2>/dev/null | sha256sum)
[ "$got" = "$want" ] && echo "data-ok"
""",
    )
    assert "stale-gadget" in out and "stale-mount" in out  # the crash left state behind
    assert "down-ok" in out
    assert "gadget-left" not in out and "mount-left" not in out
    assert "data-ok" in out, out


def test_stop_takes_the_gadget_down(guest_vm: GuestVM, disk: str) -> None:
    out = run(
        guest_vm,
        """
pid=$(cat /tmp/mu-gadget.pid)
kill -TERM $pid
i=0; while kill -0 $pid 2>/dev/null; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05; done
kill -0 $pid 2>/dev/null && echo "still-running"
[ -e /sys/kernel/config/usb_gadget/mirrorunit ] && echo "gadget-left"
grep -q functionfs /proc/mounts && echo "ffs-left"
i=0; while find_disk MirrorUn > /dev/null; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done
find_disk MirrorUn > /dev/null && echo "disk-left"
tail -3 /tmp/mu-gadget.log
echo done
""",
    )
    for leftover in ("still-running", "gadget-left", "ffs-left", "disk-left"):
        assert leftover not in out, out
    assert "gadget mirrorunit down" in out
