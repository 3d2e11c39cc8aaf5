"""The local role as the card image starts it (`mirrorunit appliance local`), seen by
Linux's usb-storage in a QEMU guest: what the config says is what the host gets.

The config is written with `mirrorunit config set` (as the console does), the storage
map names two files as first boot names the partitions, and the unit's identity is in
`link/` beside the config slots.  The host must see the configured SCSI strings and
serial, the configured cache mode in the caching mode page, data written through it
must land in the mirror and in the CBQ, and `role-is` must keep it from starting as a
remote.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.support import REPO
from tests.support.vm import GuestVM
from tests.support.vm.prelude import PRELUDE  # mu, find_disk, sg_of

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

PYTHON = sys.executable
WORK = "/tmp/mu-appliance"
PART = f"{WORK}/config"
RUN = f"{WORK}/run"
SIZE_MIB = 48


def _script(body: str) -> str:
    return PRELUDE + body


def test_configured_local_role_is_the_usb_disk_the_host_sees(guest_vm: GuestVM) -> None:
    out = guest_vm.run(_script(f"""
mkdir -p {PART} {RUN}
export MIRRORUNIT_CONFIG={PART}/config.slots
mu config set scsi.vendor ACMEDISK >/dev/null
mu config set scsi.product "Vault 9" >/dev/null
mu config set unit.serial SN0042 >/dev/null
mu config set cache.mode write-back >/dev/null
mu pair show --state-dir {PART}/link >/dev/null
truncate -s {SIZE_MIB}M {WORK}/data.img
truncate -s 32M {WORK}/buffer.img
echo "MIRRORUNIT_BUFFER={WORK}/buffer.img" > {PART}/storage.env
echo "MIRRORUNIT_DATA={WORK}/data.img" >> {PART}/storage.env
mu appliance role-is remote 2>&1; echo "remote-role=$?"
mu appliance role-is local; echo "local-role=$?"
cd {REPO}
{PYTHON} -m firmware appliance local --storage-env {PART}/storage.env --run-dir {RUN} \
    > {WORK}/unit.log 2>&1 &
echo $! > {WORK}/unit.pid
i=0
while ! find_disk ACMEDISK >/dev/null; do
    i=$((i+1)); [ $i -gt 900 ] && {{ echo "no disk"; tail -20 {WORK}/unit.log; exit 1; }}
    sleep 0.1
done
dev=$(find_disk ACMEDISK)
sg=$(sg_of "$dev")
echo "product=$(cat /sys/block/${{dev#/dev/}}/device/model)"
echo "sectors=$(cat /sys/block/${{dev#/dev/}}/size)"
sg_vpd -p sn "$sg" | sed -n 's/.*Unit serial number: */serial=/p'
echo "== modes"; sg_modes -p 8 "$sg"
head -c 1048576 /dev/urandom > {WORK}/pattern
dd if={WORK}/pattern of="$dev" bs=1M seek=8 oflag=direct conv=fsync status=none; echo "dd=$?"
sync
want=$(sha256sum < {WORK}/pattern | cut -d' ' -f1)
dd if="$dev" bs=1M skip=8 count=1 iflag=direct status=none | sha256sum | sed "s/ .*//;s/^/dev=/"
echo "want=$want"
mu status --control {RUN}/local.sock --json > {WORK}/status.json; echo "status=$?"
cat {WORK}/status.json
pid=$(cat {WORK}/unit.pid)
kill -TERM $pid
i=0; while kill -0 $pid 2>/dev/null; do i=$((i+1)); [ $i -gt 600 ] && break; sleep 0.05; done
kill -0 $pid 2>/dev/null && echo "still-running"
tail -1 {WORK}/unit.log
dd if={WORK}/data.img bs=1M skip=8 count=1 status=none | sha256sum | sed "s/ .*//;s/^/mirror=/"
"""), timeout=300).check().output
    assert "remote-role=1" in out and "role is 'local', not 'remote'" in out, out
    assert "local-role=0" in out, out
    assert "product=Vault 9" in out, out
    assert f"sectors={SIZE_MIB * 2048}" in out, out
    assert "serial=SN0042" in out, out
    # caching page: code 08, length 0x12, then WCE (0x04) set: write-back, as configured
    assert re.search(r"00\s+08 12 04", out.split("== modes", 1)[1]), out
    assert "dd=0" in out, out
    want = out.split("want=", 1)[1].split()[0]
    assert f"dev={want}" in out and f"mirror={want}" in out, out
    status = json.loads(out[out.index("{", out.index("status=0")):out.rindex("}") + 1])
    assert status["cbq"]["queued_bytes"] >= 1 << 20, status
    assert "still-running" not in out and "stopped cleanly" in out, out
