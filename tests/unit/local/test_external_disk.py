"""External disks named by stable identity: look-up, the wait at start, the refusal of any
other disk, and the watcher that takes the volume offline and back (a fake udev)."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from firmware.local import DataPath, LocalUnitError
from firmware.local.external_disk import (
    BufferDiskService,
    DiskIdentity,
    DiskIdentityError,
    DiskWatcher,
    ExternalDiskService,
    check_node,
    resolve,
    wait_for,
)
from firmware.local.unit import LocalSettings


@dataclass
class FakeDevice:
    device_node: str | None
    device_type: str
    properties: dict[str, str]
    device_number: int = 0
    action: str | None = None


@dataclass
class FakeUdev:
    """A udev database: list_devices(subsystem="block") is all that is read."""

    devices: list[FakeDevice] = field(default_factory=list)
    listed: int = 0

    def list_devices(self, **match: Any) -> list[FakeDevice]:
        assert match == {"subsystem": "block"}
        self.listed += 1
        return list(self.devices)


class FakeMonitor:
    """pyudev.Monitor.poll: events a test puts in, None after `timeout`."""

    def __init__(self) -> None:
        self.events: queue.Queue[FakeDevice] = queue.Queue()

    def poll(self, timeout: float | None = None) -> FakeDevice | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


SSD = FakeDevice("/dev/sda", "disk", {"ID_SERIAL": "Samsung_T7_S5SXNG0R123456",
                                      "ID_SERIAL_SHORT": "S5SXNG0R123456",
                                      "ID_WWN": "0x5002538E40A1B2C3"})
SSD1 = FakeDevice("/dev/sda1", "partition", {
    "ID_SERIAL": "Samsung_T7_S5SXNG0R123456",
    "ID_PART_ENTRY_UUID": "0a1b2c3d-0001-4e5f-8a9b-0c1d2e3f4a5b",
    "ID_FS_UUID": "7F3C-11AA"})
OTHER = FakeDevice("/dev/sdb", "disk", {"ID_SERIAL": "Kingston_A400_50026B7"})


@pytest.mark.parametrize(("text", "node"), [
    ("serial:S5SXNG0R123456", "/dev/sda"),
    ("serial:Samsung_T7_S5SXNG0R123456", "/dev/sda"),  # not its partition, which shares it
    ("wwn:0x5002538e40a1b2c3", "/dev/sda"),
    ("partuuid:0A1B2C3D-0001-4E5F-8A9B-0C1D2E3F4A5B", "/dev/sda1"),
    ("uuid:7f3c-11aa", "/dev/sda1"),
    ("serial:Kingston_A400_50026B7", "/dev/sdb"),
    ("serial:s5sxng0r123456", None),  # serials are exact
    ("partuuid:0a1b2c3d-0001-4e5f-8a9b-000000000000", None),
])
def test_resolve_by_each_kind(text: str, node: str | None) -> None:
    device = resolve(DiskIdentity.parse(text), FakeUdev([SSD, SSD1, OTHER]))
    assert (device.device_node if device else None) == node


@pytest.mark.parametrize("text", ["", "S5SXNG0R123456", "label:data", "serial:",
                                  "serial:two words", "uuid:\x1b[2J"])
def test_bad_identities_are_refused_with_the_form(text: str) -> None:
    with pytest.raises(DiskIdentityError, match="KIND:VALUE|blanks"):
        DiskIdentity.parse(text)


def test_two_disks_with_one_identity_are_refused() -> None:
    clone = FakeDevice("/dev/sdc", "disk", dict(SSD.properties))
    with pytest.raises(DiskIdentityError, match="more than one device"):
        resolve(DiskIdentity.parse("serial:S5SXNG0R123456"), FakeUdev([SSD, clone]))


def test_wait_counts_down_then_finds_the_disk() -> None:
    udev = FakeUdev([OTHER])
    now = [100.0]
    said: list[str] = []

    def sleep(dt: float) -> None:
        now[0] += dt
        if now[0] >= 112.0:
            udev.devices.append(SSD)  # enumerated after 12 s

    device = wait_for(DiskIdentity.parse("serial:S5SXNG0R123456"), udev, timeout=45,
                      what="data disk", say=said.append, clock=lambda: now[0], sleep=sleep)
    assert device is SSD
    assert said[0] == "waiting for data disk serial:S5SXNG0R123456 (45 s left)"
    assert said[1:] == ["waiting for data disk serial:S5SXNG0R123456 (40 s left)",
                        "waiting for data disk serial:S5SXNG0R123456 (35 s left)"]


def test_wait_times_out_with_what_to_do() -> None:
    now = [0.0]

    def sleep(dt: float) -> None:
        now[0] += dt

    with pytest.raises(DiskIdentityError, match=r"did not appear within 3 s.*udevadm info"):
        wait_for(DiskIdentity.parse("serial:NOPE"), FakeUdev([SSD]), timeout=3,
                 what="buffer disk", say=lambda _: None, clock=lambda: now[0], sleep=sleep)


def test_a_configured_path_that_is_another_disk_is_refused(tmp_path: Path) -> None:
    node = tmp_path / "sdb"
    node.write_bytes(b"")
    stranger = FakeDevice(str(node), "disk", {"ID_SERIAL": "WANTED"},
                          device_number=os.stat(node).st_rdev + 0x801)
    with pytest.raises(DiskIdentityError, match="is not the disk with serial:WANTED"):
        check_node(DiskIdentity.parse("serial:WANTED"), str(node), FakeUdev([stranger]))
    with pytest.raises(DiskIdentityError, match="is not the disk"):
        check_node(DiskIdentity.parse("serial:WANTED"), str(node), FakeUdev([]))


def _settings(tmp_path: Path, **kw: Any) -> LocalSettings:
    return LocalSettings(disk=tmp_path / "disk.img", buffer=tmp_path / "cbq.img",
                         control=tmp_path / "ctl.sock", device_wait=0.2, **kw)


def test_never_formats_a_buffer_that_is_not_the_configured_disk(tmp_path: Path) -> None:
    """The buffer path exists and is blank (a CBQ would be formatted on it), but udev says
    it is not the disk with the configured identity: nothing is written to either file."""
    disk, buffer = tmp_path / "disk.img", tmp_path / "cbq.img"
    disk.write_bytes(b"\xa5" * (1 << 20))
    buffer.write_bytes(bytes(4 << 20))
    other = FakeDevice(str(buffer), "disk", {"ID_SERIAL": "BUF001"},
                       device_number=os.stat(buffer).st_rdev + 1)
    with pytest.raises(LocalUnitError, match="is not the disk with serial:BUF001"):
        DataPath.open(_settings(tmp_path, buffer_id="serial:BUF001"), udev=FakeUdev([other]))
    assert buffer.read_bytes() == bytes(4 << 20)
    assert disk.read_bytes() == b"\xa5" * (1 << 20)


def test_a_regular_file_is_not_the_disk_even_with_the_right_number(tmp_path: Path) -> None:
    """The check on the open descriptor wants a block device: a file at the node's path
    (a disk unplugged, a file left in its place) is refused before it is formatted."""
    buffer = tmp_path / "cbq.img"
    buffer.write_bytes(bytes(4 << 20))
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    same = FakeDevice(str(buffer), "disk", {"ID_SERIAL": "BUF001"},
                      device_number=os.stat(buffer).st_rdev)
    with pytest.raises(LocalUnitError, match="refusing to use it"):
        DataPath.open(_settings(tmp_path, buffer_id="serial:BUF001"), udev=FakeUdev([same]))
    assert buffer.read_bytes() == bytes(4 << 20)


def test_start_gives_up_after_the_wait_naming_the_disk(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(LocalUnitError, match="data disk serial:GONE did not appear"):
        DataPath.open(_settings(tmp_path, disk_id="serial:GONE", size=1 << 20,
                                buffer_size=4 << 20), udev=FakeUdev([OTHER]))
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "disk.img").exists() and not (tmp_path / "cbq.img").exists()


class FakeVolume:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail_return = False
        self.medium_check: Any = None

    def medium_lost(self, reason: str) -> None:
        self.log.append(f"lost: {reason}")

    def medium_returned(self, storage: Any) -> int:
        if self.fail_return:
            raise OSError(5, "Input/output error")
        self.log.append(f"returned: {storage}")
        return 0


class FakeStorage:
    def __init__(self, node: str) -> None:
        self.node, self.closed = node, False

    def close(self) -> None:
        self.closed = True

    def __str__(self) -> str:
        return self.node


def _wait(cond: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_service_follows_remove_and_add_events() -> None:
    udev, monitor, vol = FakeUdev([SSD, OTHER]), FakeMonitor(), FakeVolume()
    opened: list[FakeStorage] = []

    def opener(identity: DiskIdentity, device: Any) -> Any:
        opened.append(FakeStorage(device.device_node))
        return opened[-1]

    svc = ExternalDiskService(vol, DiskIdentity.parse("serial:S5SXNG0R123456"),  # type: ignore[arg-type]
                              udev, monitor=monitor, opener=opener, rescan=0.5)
    svc.start()
    try:
        assert vol.medium_check == svc.medium_check
        t0 = time.monotonic()
        assert svc.medium_check(settle=0.3) is True  # still there after the settle time
        assert time.monotonic() - t0 >= 0.3
        listed = udev.listed
        monitor.events.put(FakeDevice("/dev/sdb", "disk", {}, action="change"))
        _wait(lambda: udev.listed > listed, "the change was looked at")
        assert not vol.log  # another disk's event: nothing to report
        udev.devices.remove(SSD)
        monitor.events.put(FakeDevice("/dev/sda", "disk", {}, action="remove"))
        _wait(lambda: vol.log, "the loss was reported")
        # "(udev remove)" unless the rescan came first
        assert vol.log[0].startswith("lost: data disk serial:S5SXNG0R123456 disappeared")
        assert len(vol.log) == 1
        assert svc.status() == {"identity": "serial:S5SXNG0R123456", "node": None,
                                "present": False, "losses": 1, "returns": 0}
        # The same disk back under another name: the volume gets it, opened there.
        back = FakeDevice("/dev/sdc", "disk", dict(SSD.properties), action="add")
        udev.devices.append(back)
        vol.fail_return = True  # first the reopen fails: it is closed, and tried again
        monitor.events.put(back)
        _wait(lambda: opened, "the disk was opened")
        _wait(lambda: opened[0].closed, "the failed storage was closed")
        assert not svc.status()["present"]
        # A rescan (no event) does not try again: a disk that fails the redo would fill
        # the log every two seconds.
        assert svc.watcher.check() is False and len(opened) == 1
        vol.fail_return = False
        monitor.events.put(back)
        _wait(lambda: len(vol.log) == 2, "the return was reported")
        assert vol.log[1] == "returned: /dev/sdc" and not opened[1].closed
        assert svc.status() == {"identity": "serial:S5SXNG0R123456", "node": "/dev/sdc",
                                "present": True, "losses": 1, "returns": 1}
    finally:
        svc.stop()
    assert vol.medium_check is None


def test_watcher_rescans_when_an_event_is_missed() -> None:
    udev, gone = FakeUdev([SSD]), threading.Event()
    watcher = DiskWatcher(DiskIdentity.parse("wwn:0x5002538e40a1b2c3"), "data disk", udev,
                          lost=lambda _: gone.set(), found=lambda _: None,
                          monitor=FakeMonitor(), rescan=0.05)
    watcher.start()
    try:
        udev.devices.clear()  # no event at all
        assert gone.wait(5)
    finally:
        watcher.stop()


BUF = FakeDevice("/dev/sda2", "partition", {
    "ID_SERIAL": "Samsung_T7_S5SXNG0R123456",
    "ID_PART_ENTRY_UUID": "0a1b2c3d-0002-4e5f-8a9b-0c1d2e3f4a5b"})


def test_buffer_and_data_on_one_disk_go_offline_and_restart_the_unit_once_back() -> None:
    """One SSD, the data on partition 1 and the CBQ on partition 2: pulled, the volume
    goes offline; back, nothing is redone in place (the queue in memory is ahead of what
    the disk kept): the unit is asked to restart, once, when both partitions are here."""
    udev, vol = FakeUdev([SSD1, BUF]), FakeVolume()
    data_mon, buf_mon = FakeMonitor(), FakeMonitor()
    opened: list[str] = []
    data = ExternalDiskService(vol, DiskIdentity.parse(  # type: ignore[arg-type]
        "partuuid:0a1b2c3d-0001-4e5f-8a9b-0c1d2e3f4a5b"), udev, monitor=data_mon,
        opener=lambda _i, d: opened.append(d.device_node), rescan=0.3)  # type: ignore[func-returns-value]
    buf = BufferDiskService(vol, DiskIdentity.parse(  # type: ignore[arg-type]
        "partuuid:0a1b2c3d-0002-4e5f-8a9b-0c1d2e3f4a5b"), udev, data=data, monitor=buf_mon,
        rescan=0.3)
    restarts: list[str] = []
    buf.on_restart = restarts.append
    data.start()
    buf.start()
    try:
        # An I/O error looks at both disks; both are there: a medium error stands.
        assert vol.medium_check(settle=0.0) is True
        udev.devices.clear()
        for mon, dev in ((buf_mon, BUF), (data_mon, SSD1)):
            mon.events.put(FakeDevice(dev.device_node, "partition", {}, action="remove"))
        _wait(lambda: len(vol.log) == 2, "both losses reported")
        assert any("buffer disk partuuid:" in e for e in vol.log), vol.log
        assert buf.status()["present"] is False and data.status()["present"] is False
        # The data partition first: not redone onto (the queue went), no restart yet.
        udev.devices.append(SSD1)
        data_mon.events.put(FakeDevice("/dev/sda1", "partition", {}, action="add"))
        _wait(lambda: data.status()["present"], "the data disk seen back")
        assert not opened and not restarts
        # Then the buffer: one restart, and nothing redone in place.
        udev.devices.append(BUF)
        buf_mon.events.put(FakeDevice("/dev/sda2", "partition", {}, action="add"))
        data_mon.events.put(FakeDevice("/dev/sda2", "partition", {}, action="add"))
        _wait(lambda: restarts, "the restart asked for")
        assert "buffer disk partuuid:0a1b2c3d-0002" in restarts[0]
        buf_mon.events.put(FakeDevice("/dev/sda2", "partition", {}, action="change"))
        _wait(lambda: buf.status()["present"], "the buffer seen back")
        assert len(restarts) == 1 and not opened
        assert not any(e.startswith("returned") for e in vol.log), vol.log
    finally:
        buf.stop()
        data.stop()
    assert vol.medium_check is None


def test_buffer_back_before_the_data_disk_waits_for_it() -> None:
    udev, vol = FakeUdev([SSD, OTHER]), FakeVolume()
    data_mon, buf_mon = FakeMonitor(), FakeMonitor()
    data = ExternalDiskService(vol, DiskIdentity.parse("serial:S5SXNG0R123456"),  # type: ignore[arg-type]
                               udev, monitor=data_mon, rescan=0.3)
    buf = BufferDiskService(vol, DiskIdentity.parse("serial:Kingston_A400_50026B7"),  # type: ignore[arg-type]
                            udev, data=data, monitor=buf_mon, rescan=0.3)
    restarts: list[str] = []
    buf.on_restart = restarts.append
    data.start()
    buf.start()
    try:
        udev.devices.clear()
        buf_mon.events.put(FakeDevice("/dev/sdb", "disk", {}, action="remove"))
        data_mon.events.put(FakeDevice("/dev/sda", "disk", {}, action="remove"))
        _wait(lambda: not buf.status()["present"] and not data.status()["present"], "gone")
        udev.devices.append(OTHER)
        buf_mon.events.put(FakeDevice("/dev/sdb", "disk", {}, action="add"))
        _wait(lambda: buf.status()["present"], "the buffer seen back")
        assert not restarts  # the data disk is not here yet
        udev.devices.append(SSD)
        data_mon.events.put(FakeDevice("/dev/sda", "disk", {}, action="add"))
        _wait(lambda: restarts, "the restart once the data disk is back too")
        assert len(restarts) == 1
    finally:
        buf.stop()
        data.stop()


def test_buffer_alone_external_restarts_when_back() -> None:
    """The data on the SD card, the CBQ on a USB disk: its loss takes the volume offline
    and an I/O error looks it up at once."""
    udev, vol, mon = FakeUdev([OTHER]), FakeVolume(), FakeMonitor()
    buf = BufferDiskService(vol, DiskIdentity.parse("serial:Kingston_A400_50026B7"),  # type: ignore[arg-type]
                            udev, monitor=mon, rescan=0.3)
    restarts: list[str] = []
    buf.on_restart = restarts.append
    buf.start()
    try:
        assert vol.medium_check == buf.medium_check
        udev.devices.clear()
        assert vol.medium_check() is False  # the look-up an I/O error makes
        assert vol.log == ["lost: buffer disk serial:Kingston_A400_50026B7 disappeared"]
        udev.devices.append(OTHER)
        mon.events.put(FakeDevice("/dev/sdb", "disk", {}, action="add"))
        _wait(lambda: restarts, "the restart")
    finally:
        buf.stop()
