"""A failing commit turns the write cache off: nothing more is acknowledged from RAM."""

from __future__ import annotations

import errno
import logging
import threading

import pytest

from firmware.blockdev import MediumError
from firmware.cbq import MIRROR_CONSUMER, CircularBufferQueue, create
from firmware.storage import CrashSimStorage
from firmware.volume import CacheMode, Volume

BS = 512
BLOCKS = 64
CACHE_LIMIT = 8 * BS  # the committer is kicked at half of it


class FaultyStorage:
    """A Storage filter that fails pwrite or sync while armed (nbdkit's error filter)."""

    def __init__(self, inner: CrashSimStorage) -> None:
        self.inner = inner
        self.fail_pwrite: BaseException | None = None
        self.fail_sync: BaseException | None = None
        self.once = True
        self.fired = threading.Event()

    @property
    def size(self) -> int:
        return self.inner.size

    def _fail(self, which: str) -> None:
        exc = getattr(self, which)
        if exc is None:
            return
        if self.once:
            setattr(self, which, None)
        self.fired.set()
        raise exc

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._fail("fail_pwrite")
        self.inner.pwrite(offset, data)

    def sync(self) -> None:
        self._fail("fail_sync")
        self.inner.sync()

    def close(self) -> None:
        self.inner.close()


def _unit() -> tuple[CrashSimStorage, FaultyStorage, Volume]:
    cbq_st = CrashSimStorage(3 * 4096 + 64 * 1024)
    create(cbq_st, volume_blocks=BLOCKS, block_size=BS, chunk_size=4096, align=512)
    mirror = FaultyStorage(CrashSimStorage(BLOCKS * BS))
    # The timer never fires on its own: the committer runs when the cache kicks it.
    vol = Volume(mirror, CircularBufferQueue(cbq_st), cache_mode=CacheMode.WRITE_BACK,
                 cache_limit=CACHE_LIMIT, flush_interval=3600.0)
    vol.start()
    return cbq_st, mirror, vol


def _block(lbn: int, tag: int) -> bytes:
    return bytes([tag]) * BS


def _fill_until_kicked(vol: Volume, tag: int) -> dict[int, bytes]:
    """Write-back writes up to half the cache limit, which kicks the committer."""
    written = {}
    for lbn in range(CACHE_LIMIT // 2 // BS):
        written[lbn] = _block(lbn, tag)
        vol.pwrite(lbn * BS, written[lbn])
    return written


def _committer_failed(vol: Volume, mirror: FaultyStorage) -> None:
    assert mirror.fired.wait(10), "the committer never tried the mirror"
    with vol._commit_lock:  # the committer records its failure before it lets go
        pass


def _restart(cbq_st: CrashSimStorage, mirror: FaultyStorage) -> Volume:
    """What a power cut now leaves: only what was synced."""
    return Volume(CrashSimStorage.from_image(bytes(mirror.inner.crash_image())),
                  CircularBufferQueue(CrashSimStorage.from_image(bytes(cbq_st.crash_image()))))


@pytest.mark.parametrize("fault", [OSError(errno.EIO, "injected EIO"),
                                   RuntimeError("injected bug")],
                         ids=["mirror-eio", "committer-dies"])
def test_a_failed_background_commit_turns_the_write_cache_off(
        fault: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    cbq_st, mirror, vol = _unit()
    assert vol.write_cache_enabled
    mirror.fail_pwrite = fault
    with caplog.at_level(logging.CRITICAL, logger="mirrorunit.volume"):
        acked = _fill_until_kicked(vol, 1)
        _committer_failed(vol, mirror)
    if isinstance(fault, RuntimeError):
        assert vol._timer is not None
        vol._timer.join(10)
        assert not vol._timer.is_alive(), "a committer that hit a bug keeps going"

    st = vol.status()
    assert st["commit_failure"] and str(fault) in st["commit_failure"]
    assert not st["write_cache_enabled"] and not vol.write_cache_enabled
    assert st["cache_mode"] == "write-back"  # the setting stays; the cache is off
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any(str(fault) in r.getMessage() and "Traceback" in r.getMessage()
               for r in critical)

    # A write-back write now completes only once it is on the mirror, and takes the
    # writes acknowledged before the failure with it.
    late = _block(10, 2)
    vol.pwrite(10 * BS, late)
    assert mirror.inner.pread(10 * BS, BS) == late
    for lbn, data in acked.items():
        assert mirror.inner.pread(lbn * BS, BS) == data
    assert vol.status()["cache_bytes"] == 0

    # The host learns of the failure at its next FLUSH, once.
    with pytest.raises(MediumError, match="earlier commit"):
        vol.flush()
    vol.flush()

    acked[10] = late
    after = _restart(cbq_st, mirror)
    for lbn, data in acked.items():
        assert after.pread(lbn * BS, BS) == data


def test_writes_fail_with_a_medium_error_while_the_mirror_fails() -> None:
    cbq_st, mirror, vol = _unit()
    mirror.once = False
    mirror.fail_pwrite = OSError(errno.EIO, "injected EIO")
    acked = _fill_until_kicked(vol, 1)
    _committer_failed(vol, mirror)

    with pytest.raises(MediumError, match="injected EIO"):
        vol.pwrite(20 * BS, _block(20, 2))
    with pytest.raises(MediumError):
        vol.flush()
    with pytest.raises(MediumError):
        vol.flush()  # no success while cached writes cannot be committed
    assert "injected EIO" in (vol.commit_failure or "")

    # Nothing acknowledged is lost: it is still read from the cache, and it is in the CBQ
    # for the redo onto the mirror at the next start.
    for lbn, data in acked.items():
        assert vol.pread(lbn * BS, BS) == data
    after = _restart(cbq_st, mirror)
    assert after.redone_records
    for lbn, data in acked.items():
        assert after.pread(lbn * BS, BS) == data


def test_a_failed_mirror_sync_keeps_the_writes_in_the_cbq() -> None:
    """After a failed fsync a later one may succeed without the lost pages: the mirror
    consumer is not acknowledged again, so the CBQ keeps them for the redo."""
    cbq_st, mirror, vol = _unit()
    vol.pwrite(0, _block(0, 1))
    vol.flush_cache()
    acked_before = vol.cbq.consumers[MIRROR_CONSUMER].acked_seq
    vol.pwrite(BS, _block(1, 2))
    mirror.fail_sync = OSError(errno.EIO, "injected sync EIO")
    with pytest.raises(MediumError, match="injected sync EIO"):
        vol.flush_cache()
    assert "injected sync EIO" in (vol.commit_failure or "")
    vol.flush_cache()
    assert vol.cbq.consumers[MIRROR_CONSUMER].acked_seq == acked_before
    with pytest.raises(MediumError, match="earlier commit"):
        vol.flush()
    vol.close()
