"""The mirror's disk unplugged and plugged back: OFFLINE with MEDIUM NOT PRESENT, no
acknowledged write lost, the CBQ redone onto the returned disk, one unit attention."""

from __future__ import annotations

import errno
import threading

import pytest

from firmware.blockdev import DeviceState, MediumError, MediumNotPresent
from firmware.cbq import MIRROR_CONSUMER, CircularBufferQueue, create
from firmware.nbd.protocol import NBD_CMD_WRITE, NBD_EIO
from firmware.nbd.server import nbd_errno
from firmware.scsi import LogicalUnit, ScsiTarget, Status
from firmware.scsi import sense as S
from firmware.scsi import target as T
from firmware.storage import CrashSimStorage
from firmware.volume import CacheMode, Volume
from firmware.volume.volume import VolumeError

BS = 512
BLOCKS = 256


class Unpluggable:
    """A Storage whose disk can be pulled: every call fails with EIO from then on."""

    def __init__(self, inner: CrashSimStorage) -> None:
        self.inner = inner
        self.pulled = False
        self.closed = False

    @property
    def size(self) -> int:
        return self.inner.size

    def _gone(self) -> None:
        if self.pulled:
            raise OSError(errno.EIO, "Input/output error")

    def pread(self, offset: int, length: int) -> bytes:
        self._gone()
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._gone()
        self.inner.pwrite(offset, data)

    def sync(self) -> None:
        self._gone()
        self.inner.sync()

    def close(self) -> None:
        self.closed = True


def _volume(mode: CacheMode) -> tuple[Unpluggable, Volume]:
    cbq_st = CrashSimStorage(3 * 4096 + 512 * 1024)
    create(cbq_st, volume_blocks=BLOCKS, block_size=BS, chunk_size=4096, align=512)
    mirror = Unpluggable(CrashSimStorage(BLOCKS * BS))
    vol = Volume(mirror, CircularBufferQueue(cbq_st), cache_mode=mode, flush_interval=3600.0,
                 mirror_checkpoint_bytes=1 << 30)
    return mirror, vol


def _block(tag: int) -> bytes:
    return bytes([tag]) * BS


def _pull(mirror: Unpluggable) -> CrashSimStorage:
    """The disk is unplugged: what it kept is only what it had synced (its cache is lost)."""
    mirror.pulled = True
    return CrashSimStorage.from_image(bytes(mirror.inner.crash_image()))


@pytest.mark.parametrize("mode", list(CacheMode))
def test_unplugged_disk_goes_offline_and_returns_with_every_acknowledged_write(
        mode: CacheMode) -> None:
    mirror, vol = _volume(mode)
    acked = {}
    for lbn in range(40):
        vol.pwrite(lbn * BS, _block(lbn + 1))
        acked[lbn] = _block(lbn + 1)
    vol.flush()  # a barrier: the first 40 are durable in the CBQ (the mirror is synced lazily)
    for lbn in range(40, 60):
        vol.pwrite(lbn * BS, _block(lbn + 1))  # write-back: these are acknowledged from RAM
        acked[lbn] = _block(lbn + 1)
    kept = _pull(mirror)
    vol.medium_lost("data disk serial:T1 disappeared (udev remove)")
    assert mirror.closed and vol.state is DeviceState.OFFLINE and not vol.medium_present
    with pytest.raises(MediumNotPresent):
        vol.pread(0, BS)
    with pytest.raises(MediumNotPresent):
        vol.pwrite(100 * BS, _block(0xEE))
    with pytest.raises(MediumNotPresent):
        vol.flush()
    st = vol.status()
    assert st["state"] == "offline" and st["medium_present"] is False
    assert st["medium_lost"] == "data disk serial:T1 disappeared (udev remove)"
    # The disk lost what it had not synced: the CBQ has it.
    assert any(kept.pread(lbn * BS, BS) != data for lbn, data in acked.items())

    returned = Unpluggable(kept)
    vol.medium_returned(returned)
    assert vol.state is DeviceState.READY and vol.medium_present
    assert vol.status()["medium_losses"] == 1
    for lbn, data in acked.items():
        assert vol.pread(lbn * BS, BS) == data, lbn
    assert vol.pread(100 * BS, BS) == bytes(BS)  # the refused write is nowhere
    vol.flush_cache()
    for lbn, data in acked.items():
        assert returned.inner.durable[lbn * BS:(lbn + 1) * BS] == data, lbn
    assert vol.cbq.consumers[MIRROR_CONSUMER].acked_seq == vol.cbq.durable_seq
    vol.pwrite(100 * BS, _block(0xEE))
    assert vol.pread(100 * BS, BS) == _block(0xEE)
    vol.close()


def test_an_io_error_that_the_check_confirms_takes_the_volume_offline() -> None:
    """A write-through write meets the pulled disk: the host gets an error for it (it was
    not acknowledged), the volume is offline, and the write lands once the disk is back."""
    mirror, vol = _volume(CacheMode.WRITE_THROUGH)
    vol.pwrite(0, _block(1))
    checks = []

    def check() -> bool:
        checks.append(1)
        vol.medium_lost("data disk serial:T1 disappeared")
        return False

    vol.medium_check = check
    kept = _pull(mirror)
    with pytest.raises(MediumNotPresent):
        vol.pwrite(BS, _block(2))
    assert checks == [1] and vol.state is DeviceState.OFFLINE
    # Not a failure of the data path: the write cache is not turned off for it.
    assert vol.commit_failure is None
    vol.medium_returned(Unpluggable(kept))
    assert vol.pread(0, BS) == _block(1)
    vol.close()


def test_a_commit_that_fails_while_the_watcher_reports_the_loss_is_no_medium_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """udev's remove event and the failed write race: the watcher's thread has seen the
    disk go and waits for the commit lock to take the volume offline while the writer's
    commit, holding it, fails (a removed virtio disk answers ENOSPC).  The check says
    "gone" without reporting it again: the write fails as MEDIUM NOT PRESENT, the cache
    stays on, and the loss is reported once the lock is free."""
    mirror, vol = _volume(CacheMode.WRITE_THROUGH)
    vol.pwrite(0, _block(1))
    kept = _pull(mirror)
    mirror.pulled = False
    seen = threading.Event()

    def watcher() -> None:
        seen.wait(5)
        vol.medium_lost("data disk serial:T1 disappeared (udev remove)")

    reporter = threading.Thread(target=watcher)
    reporter.start()

    def fail(offset: int, data: bytes | bytearray | memoryview) -> None:
        seen.set()  # the watcher now waits for the commit lock this thread holds
        raise OSError(errno.ENOSPC, "No space left on device")

    mirror.pwrite = fail  # type: ignore[method-assign]
    vol.medium_check = lambda: False  # the watcher already marked the disk absent
    with caplog.at_level("CRITICAL", logger="mirrorunit.volume"):
        with pytest.raises(MediumNotPresent, match="being reported"):
            vol.pwrite(BS, _block(2))
    reporter.join(5)
    assert not reporter.is_alive()
    assert vol.state is DeviceState.OFFLINE and vol.commit_failure is None
    assert not [r for r in caplog.records if r.levelname == "CRITICAL"], caplog.text
    vol.medium_returned(Unpluggable(kept))
    assert vol.pread(0, BS) == _block(1) and vol.commit_failure is None
    vol.close()


def test_an_io_error_on_a_present_disk_stays_a_medium_error() -> None:
    mirror, vol = _volume(CacheMode.WRITE_THROUGH)
    vol.medium_check = lambda: True  # the disk is still there
    mirror.pulled = True
    with pytest.raises(MediumError) as err:
        vol.pwrite(0, _block(1))
    assert not isinstance(err.value, MediumNotPresent)
    assert vol.state is DeviceState.READY and vol.commit_failure is not None


def test_a_standby_volume_returns_to_standby_and_state_changes_wait_for_the_disk() -> None:
    mirror, vol = _volume(CacheMode.WRITE_THROUGH)
    vol.set_state(DeviceState.STANDBY)
    kept = _pull(mirror)
    vol.medium_lost("gone")
    vol.set_state(DeviceState.READY)  # a promotion while unplugged: applied on return
    assert vol.state is DeviceState.OFFLINE
    vol.medium_returned(Unpluggable(kept))
    assert vol.state is DeviceState.READY
    vol.close()


def test_a_smaller_disk_in_its_place_is_refused() -> None:
    mirror, vol = _volume(CacheMode.WRITE_THROUGH)
    _pull(mirror)
    vol.medium_lost("gone")
    with pytest.raises(VolumeError, match="staying offline"):
        vol.medium_returned(Unpluggable(CrashSimStorage(BLOCKS * BS // 2)))
    assert vol.state is DeviceState.OFFLINE


def test_close_while_unplugged_keeps_the_writes_in_the_cbq() -> None:
    mirror, vol = _volume(CacheMode.WRITE_BACK)
    vol.pwrite(0, _block(7))
    kept = _pull(mirror)
    vol.medium_lost("gone")
    vol.close()  # no crash; the next start redoes the CBQ onto the disk
    again = Volume(kept, CircularBufferQueue(vol.cbq.storage))
    assert again.pread(0, BS) == _block(7)


def test_scsi_and_nbd_report_the_missing_disk() -> None:
    mirror, vol = _volume(CacheMode.WRITE_THROUGH)
    target = ScsiTarget([LogicalUnit(vol, serial="MU0001")], power_on_unit_attention=False)
    tur = bytes([T.TEST_UNIT_READY, 0, 0, 0, 0, 0])
    read10 = bytes([T.READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    assert target.execute(0, tur).status is Status.GOOD
    kept = _pull(mirror)
    vol.medium_lost("gone")
    for cdb in (tur, read10):
        r = target.execute(0, cdb)
        assert r.status is Status.CHECK_CONDITION and r.sense == S.MEDIUM_NOT_PRESENT, r
    assert (S.MEDIUM_NOT_PRESENT.key, S.MEDIUM_NOT_PRESENT.asc) == (0x2, 0x3A)
    assert nbd_errno(MediumNotPresent("gone"), NBD_CMD_WRITE) == NBD_EIO
    vol.medium_returned(Unpluggable(kept))
    r = target.execute(0, tur)  # once: not ready to ready
    assert r.status is Status.CHECK_CONDITION and r.sense == S.NOT_READY_TO_READY_CHANGE, r
    assert target.execute(0, tur).status is Status.GOOD
    assert target.execute(0, read10).status is Status.GOOD
    vol.close()


def test_a_failed_read_looks_at_the_disk_from_another_thread() -> None:
    """A reader may hold the CBQ's lock (current data for a compact record): the check
    that takes the volume offline runs beside it, and the read fails as a medium error."""
    mirror, vol = _volume(CacheMode.WRITE_THROUGH)
    checked = threading.Event()

    def check() -> bool:
        assert threading.current_thread() is not reader
        vol.medium_lost("gone")
        checked.set()
        return False

    vol.medium_check = check
    _pull(mirror)
    reader = threading.current_thread()
    with pytest.raises(MediumError):
        vol.pread(0, BS)
    assert checked.wait(5)
    assert vol.state is DeviceState.OFFLINE
    with pytest.raises(MediumNotPresent):
        vol.pread(0, BS)
