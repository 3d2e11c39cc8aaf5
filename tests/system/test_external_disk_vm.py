"""The data disk named by its serial, unplugged and plugged back while the host writes.

The guest runs systemd-udevd (from the shared host root) and has a second virtio disk
with a serial; the unit serves it as a USB disk to the guest's own usb-storage, with
its CBQ on the guest's tmpfs.  Through QMP the disk is device_del'ed while a writer
in the guest writes numbered blocks one by one (O_DIRECT|O_DSYNC): the host gets
errors, the unit stays up and reports the volume offline; device_add brings the same
disk back, the volume comes back, and after a clean stop every block the host was
told was written is in the disk image on this side.  Then the gadget is unbound and
rebound, and the UDC state in status follows.  Before all that the unit is started with
its disk unplugged: it waits for it, saying so, and starts when it is plugged in.

Then the layout of a board with one external SSD: the data on its first partition, the
CBQ on its second, both named by PARTUUID.  Unplugged under the same writer, the volume
goes offline; plugged back, the unit restarts itself (same pid), opens the queue from
what the disk kept, serves the host again, and every block the host was told was
written is in the data partition.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vm import GuestVM, VMConfig
from tests.support.vm.prelude import PRELUDE
from tests.support.vm.qmp import Qmp

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

SERIAL = "MUDATA01"
DISK_SIZE = 32 << 20
BLOCK = 4096
WORK = "/tmp/mu-extdisk"
CTL = f"{WORK}/control.sock"
DEVICE = ("virtio-blk-pci,drive=data0,id=datadisk,serial=" + SERIAL)
#: the one-SSD layout: partition 1 data, partition 2 the CBQ (sectors of 512 bytes)
SHARED_SIZE = 64 << 20
DATA_PART = "4d550000-0000-4000-8000-00000000da7a"
BUF_PART = "4d550000-0000-4000-8000-0000000cb0b0"
DATA_START, DATA_SECTORS = 2048, 49152
BUF_START, BUF_SECTORS = 51200, 65536
WORK2 = "/tmp/mu-shareddisk"
CTL2 = f"{WORK2}/control.sock"
GADGET_UDC = "/sys/kernel/config/usb_gadget/mirrorunit/UDC"

STATUS = f"""
st() {{ mu status --control {CTL} --json; }}
wait_log() {{  # wait_log TEXT COUNT SECONDS: until the unit logged TEXT COUNT times
    end=$(( $(date +%s) + $3 ))
    while [ "$(grep -cF "$1" {WORK}/unit.log)" -lt "$2" ]; do
        [ $(date +%s) -lt $end ] && {{ sleep 0.2; continue; }}
        echo "no '$1' x$2 in the log"; tail {WORK}/unit.log; return 1
    done
}}
"""
#: status costs seconds under TCG: the waits read the unit's log, status is asked once a phase
OFFLINE = "-> offline: data disk serial:" + SERIAL
ONLINE = "offline -> ready: the disk is back"


def pattern(i: int) -> bytes:
    """Block i of what the writer writes."""
    line = f"blk{i}\n".encode()
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


def run(vm: GuestVM, script: str, timeout: float = 120) -> str:
    return vm.run(PRELUDE + STATUS + script, timeout=timeout).check().output


def start_writer(guest: GuestVM, name: str, blocks_n: int = 2000) -> tuple[Path, Path]:
    """A writer in the guest: block i of `pattern` to block i of the unit's disk, one at
    a time (O_DIRECT|O_DSYNC), "ok i" or "err i" in its log; the disk is looked up
    again once its node is gone (a unit that restarted is a new USB device).  Returns the
    log and the file that stops it."""
    log = guest.path_in_guest(f"{name}.log")
    stop = guest.path_in_guest(f"{name}.stop")
    blocks = guest.path_in_guest("blocks")
    blocks.write_bytes(b"".join(pattern(i) for i in range(blocks_n)))
    run(guest, f"""
D=$(find_disk MirrorUn)
( i=0
  while [ ! -e {stop} ] && [ $i -lt {blocks_n} ]; do
      # only to a block device: dd to a node that went away would create a regular
      # file in /dev, and the disk coming back under that name would get no node
      if [ -b "$D" ] && dd if={blocks} of=$D bs={BLOCK} skip=$i seek=$i count=1 \
              oflag=direct,dsync conv=notrunc status=none 2>/dev/null; then
          echo "ok $i"
      else
          echo "err $i"; sleep 0.2
          # Gone (not just without medium: opening that one makes the kernel look again)
          [ -b "$D" ] || D=$(find_disk MirrorUn)
      fi >> {log}
      i=$((i+1))
  done
  echo "done $i" >> {log} ) </dev/null >/dev/null 2>&1 &
""")
    return log, stop


@pytest.fixture
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GuestVM, Qmp, Path]]:
    """The guest, its QMP and the directory holding both disks' images: one guest per
    test, about 10 s each (in one guest shared by both, the second test's disk had left
    udev's view after the first test's hot-plugs; why is not yet understood)."""
    workdir = tmp_path_factory.mktemp("vm-extdisk")
    image = workdir / "data.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    shared = workdir / "shared.img"
    with shared.open("wb") as f:
        f.truncate(SHARED_SIZE)
    subprocess.run(["sfdisk", "-q", str(shared)], check=True, text=True, input=(
        "label: gpt\n"
        f"start={DATA_START}, size={DATA_SECTORS}, uuid={DATA_PART}\n"
        f"start={BUF_START}, size={BUF_SECTORS}, uuid={BUF_PART}\n"))
    config = VMConfig(qmp=True, extra_args=(
        "-blockdev", f"driver=raw,node-name=data0,file.driver=file,file.filename={image}",
        "-device", DEVICE,
        "-blockdev", f"driver=raw,node-name=shared0,file.driver=file,file.filename={shared}",
        "-device", "virtio-blk-pci,drive=shared0,id=shareddisk,serial=MUSHARED01"))
    with GuestVM(workdir, config) as guest:
        qmp = Qmp(guest.qmp_path)
        try:
            yield guest, qmp, workdir
        finally:
            qmp.close()


def _lines(path: Path, word: str) -> list[int]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(w.split()[1]) for w in text.splitlines() if w.startswith(word + " ")]


def _until(cond: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_unplugged_data_disk_goes_offline_and_returns_with_nothing_lost(
        vm: tuple[GuestVM, Qmp, Path]) -> None:
    guest, qmp, workdir = vm
    image = workdir / "data.img"
    out = run(guest, """
set -e
modprobe virtio_blk
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --action=add --subsystem-match=block
udevadm settle --timeout=60
udevadm info --query=property --name=/dev/vda | grep '^ID_SERIAL='
""")
    assert f"ID_SERIAL={SERIAL}" in out, out
    # The unit starts before its disk is there: it waits, saying so, and starts once the
    # disk appears.
    qmp.execute("device_del", id="datadisk")
    qmp.wait_event("DEVICE_DELETED", 30, device="datadisk")
    out = run(guest, f"""
mkdir -p {WORK}
mu local --disk /dev/disk/by-id/virtio-{SERIAL} --disk-id serial:{SERIAL} \
    --buffer {WORK}/cbq.img --buffer-size 64M --control {CTL} --nbd '' \
    --frontend usb --usb-udc dummy_udc.0 --usb-serial MUEXT0001 > {WORK}/unit.log 2>&1 &
echo $! > {WORK}/unit.pid
wait_log "waiting for data disk serial:{SERIAL} (" 1 60
grep -F "waiting for data disk" {WORK}/unit.log | head -1
""")
    assert re.search(rf"waiting for data disk serial:{SERIAL} \(\d+ s left\)", out), out
    qmp.execute("device_add", driver="virtio-blk-pci", drive="data0", id="datadisk",
                serial=SERIAL)
    out = run(guest, """
wait_disk MirrorUn
wait_log "host connection: configured" 1 60
st
""")
    status = json.loads(out[out.index("{"):])
    assert status["external_disk"]["identity"] == f"serial:{SERIAL}", status
    assert status["external_disk"]["present"] and status["volume"]["state"] == "ready"

    log, stop = start_writer(guest, "writer")
    _until(lambda: len(_lines(log, "ok")) >= 10, "the writer writes", 60)

    qmp.execute("device_del", id="datadisk")
    qmp.wait_event("DEVICE_DELETED", 30, device="datadisk")
    out = run(guest, f"""
wait_log "{OFFLINE}" 1 30
st
kill -0 $(cat {WORK}/unit.pid) && echo unit-alive
""")
    status = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert status["volume"]["medium_present"] is False, status
    assert "disappeared" in status["volume"]["medium_lost"], status
    assert "unit-alive" in out, out
    _until(lambda: len(_lines(log, "err")) >= 3, "the host sees errors", 60)

    qmp.execute("device_add", driver="virtio-blk-pci", drive="data0", id="datadisk",
                serial=SERIAL)
    run(guest, f'wait_log "{ONLINE}" 1 60')
    last_err = max(_lines(log, "err"))
    _until(lambda: len([i for i in _lines(log, "ok") if i > last_err]) >= 10,
           "writes succeed again", 60)
    stop.write_text("")
    _until(lambda: "done " in log.read_text(), "the writer stops", 30)
    out = run(guest, "st")
    status = json.loads(out[out.index("{"):])
    assert status["volume"]["state"] == "ready" and status["volume"]["medium_present"], status
    assert status["external_disk"]["losses"] == 1 and status["external_disk"]["returns"] == 1

    # The UDC state as status reports it, with the gadget unbound and bound again.
    out = run(guest, f"""
echo "" > {GADGET_UDC}
wait_log "host connection: not-attached" 1 30
st | grep -o '"connection": "[a-z-]*"' | sed 's/^/unbound /'
echo dummy_udc.0 > {GADGET_UDC}
wait_log "host connection: configured" 2 60
st | grep -o '"connection": "[a-z-]*"' | sed 's/^/rebound /'
""")
    assert 'unbound "connection": "not-attached"' in out, out
    assert 'rebound "connection": "configured"' in out, out

    out = run(guest, f"""
kill -TERM $(cat {WORK}/unit.pid)
i=0; while kill -0 $(cat {WORK}/unit.pid) 2>/dev/null; do
    i=$((i+1)); [ $i -gt 300 ] && {{ echo "unit did not stop"; break; }}; sleep 0.1; done
sync
grep -E "offline|is back|redid" {WORK}/unit.log
grep -q Traceback {WORK}/unit.log && cat {WORK}/unit.log
true
""")
    assert "Traceback" not in out, out
    assert "is back" in out, out

    acked = _lines(log, "ok")
    errors = _lines(log, "err")
    assert errors and len(acked) >= 20, (len(acked), len(errors))
    data = image.read_bytes()
    lost = [i for i in acked if data[i * BLOCK:(i + 1) * BLOCK] != pattern(i)]
    assert not lost, f"{len(lost)} acknowledged blocks missing from the disk: {lost[:10]}"


def test_data_and_buffer_on_one_unplugged_disk_restart_the_unit_with_nothing_lost(
        vm: tuple[GuestVM, Qmp, Path]) -> None:
    guest, qmp, workdir = vm
    out = run(guest, f"""
set -e
modprobe virtio_blk
pgrep -x systemd-udevd >/dev/null || /lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --action=add --subsystem-match=block
udevadm settle --timeout=60
ls /dev/disk/by-partuuid/
mkdir -p {WORK2}
P=/dev/disk/by-partuuid
mu local --disk $P/{DATA_PART} --disk-id partuuid:{DATA_PART} \
    --buffer $P/{BUF_PART} --buffer-id partuuid:{BUF_PART} --control {CTL2} --nbd '' \
    --frontend usb --usb-udc dummy_udc.0 --usb-serial MUEXT0002 > {WORK2}/unit.log 2>&1 &
echo $! > {WORK2}/unit.pid
wait_disk MirrorUn
""")
    assert DATA_PART in out and BUF_PART in out, out
    log, stop = start_writer(guest, "writer2")
    _until(lambda: len(_lines(log, "ok")) >= 10, "the writer writes", 60)

    qmp.execute("device_del", id="shareddisk")
    qmp.wait_event("DEVICE_DELETED", 30, device="shareddisk")
    out = run(guest, f"""
end=$(( $(date +%s) + 30 ))
until grep -q -- "-> offline:" {WORK2}/unit.log; do
    [ $(date +%s) -lt $end ] || {{ cat {WORK2}/unit.log; exit 1; }}; sleep 0.2; done
mu status --control {CTL2} --json
""")
    status = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert status["volume"]["medium_present"] is False, status
    assert status["buffer_disk"]["present"] is False, status
    _until(lambda: len(_lines(log, "err")) >= 3, "the host sees errors", 60)

    qmp.execute("device_add", driver="virtio-blk-pci", drive="shared0", id="shareddisk",
                serial="MUSHARED01")
    out = run(guest, f"""
end=$(( $(date +%s) + 90 ))
until [ "$(grep -c "host connection: configured" {WORK2}/unit.log)" -ge 2 ]; do
    [ $(date +%s) -lt $end ] || {{ tail -20 {WORK2}/unit.log; exit 1; }}; sleep 0.2; done
grep -E "restarting:|recovered|redone" {WORK2}/unit.log
""", timeout=150)
    assert "restarting: buffer disk partuuid:" + BUF_PART in out, out
    last_err = max(_lines(log, "err"))
    _until(lambda: len([i for i in _lines(log, "ok") if i > last_err]) >= 10,
           "writes succeed again", 90)
    stop.write_text("")
    _until(lambda: "done " in log.read_text(), "the writer stops", 30)
    out = run(guest, f"""
mu status --control {CTL2} --json
kill -TERM $(cat {WORK2}/unit.pid)
i=0; while kill -0 $(cat {WORK2}/unit.pid) 2>/dev/null; do
    i=$((i+1)); [ $i -gt 300 ] && {{ echo "unit did not stop"; break; }}; sleep 0.1; done
sync
grep -q Traceback {WORK2}/unit.log && cat {WORK2}/unit.log
true
""")
    status = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert status["volume"]["state"] == "ready" and status["volume"]["medium_present"], status
    assert status["buffer_disk"]["present"] is True, status
    assert "Traceback" not in out and "did not stop" not in out, out

    acked = _lines(log, "ok")
    assert _lines(log, "err") and len(acked) >= 20, len(acked)
    with open(workdir / "shared.img", "rb") as f:
        f.seek(DATA_START * 512)
        data = f.read(DATA_SECTORS * 512)
    lost = [i for i in acked if data[i * BLOCK:(i + 1) * BLOCK] != pattern(i)]
    assert not lost, f"{len(lost)} acknowledged blocks missing from the disk: {lost[:10]}"
