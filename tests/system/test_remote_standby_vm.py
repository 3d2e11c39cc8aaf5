"""The remote's mirror mounted by a standby server (docs/failover.md): in one guest a
local unit streams an ext4 file system to a remote unit over the journey link; the local
site is lost; the remote serves its mirror as a USB disk of the guest's own Linux
usb-storage, a hot standby (size visible, media commands NOT READY 02/04/0B) until
`role promote`, after which the host mounts the ext4 and every file's digest matches."""

from __future__ import annotations

import sys

import pytest

from tests.support import REPO
from tests.support.vm import GuestVM
from tests.support.vm.prelude import PRELUDE

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

PYTHON = sys.executable
W = "/tmp/mu-standby"


def test_remote_mirror_as_a_standby_usb_disk_then_promoted(guest_vm: GuestVM) -> None:
    out = guest_vm.run(PRELUDE + f"""
set -e
ip link set lo up 2>/dev/null || true
mkdir -p {W}/local {W}/remote {W}/src/docs
cd {REPO}
head -c 2000000 /dev/urandom > {W}/src/big.bin
for n in 1 2 3 4 5 6 7 8; do head -c $((n * 3001)) /dev/urandom > {W}/src/docs/f$n; done
(cd {W}/src && find . -type f -print0 | sort -z | xargs -0 sha256sum) > {W}/manifest
mke2fs -q -F -t ext4 -d {W}/src {W}/fs.img 32M
{PYTHON} -m tests.support.vm.standby_guest {W} {W}/fs.img > {W}/driver.out 2>&1
cat {W}/driver.out
UNIT=$(sed -n 's/^UNIT //p' {W}/driver.out)
set +e
mu role serve "$UNIT" --usb --usb-udc dummy_udc.0 --usb-serial MUREMOTE01 \
    --control {W}/remote.sock > {W}/serve.log 2>&1 &
DISK=$(wait_disk MirrorUn)
SG=$(sg_of $DISK)
echo "size=$(blockdev --getsize64 $DISK)"
sg_turs -v $SG 2>&1; echo "turs-standby=$?"
dd if=$DISK of=/dev/null bs=4096 count=1 iflag=direct 2>&1; echo "dd-standby=$?"
mu role promote "$UNIT" --control {W}/remote.sock
sg_turs $SG 2>&1; echo "turs-first=$?"
sg_turs $SG; echo "turs-ready=$?"
echo 1 > /sys/block/${{DISK#/dev/}}/device/rescan
mkdir -p /mnt/standby
mount -o ro $DISK /mnt/standby && echo "mounted"
(cd /mnt/standby && sha256sum -c --quiet {W}/manifest) && echo "digests-ok"
umount /mnt/standby
e2fsck -fn $DISK >/dev/null 2>&1 && echo "fsck-clean"
cat {W}/serve.log
""", timeout=300).output
    assert "replicated" in out, out
    assert f"size={48 << 20}" in out, out
    assert "turs-standby=2" in out and "standby" in out.lower(), out  # 02/04/0B
    assert "dd-standby=0" not in out, out
    assert "turs-first=6" in out and "turs-ready=0" in out, out  # unit attention, then ready
    assert "mounted" in out and "digests-ok" in out and "fsck-clean" in out, out
