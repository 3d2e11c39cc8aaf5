"""Native AIO through ctypes (firmware/usb_gadget/aio.py), over regular files.

Regular files complete AIO inside io_submit and cannot be cancelled, which is
enough to check the structures, the submit/reap/eventfd cycle, errors and the
buffer rules.  Cancelling queued requests needs a driver that queues them
(FunctionFS): tests/system/test_usb_gadget_vm.py resets the bus in the middle of pipelined
transfers in a VM for that.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.usb_gadget.aio import AioContext, Iocb, IoEvent, Transfer


@pytest.fixture
def ctx() -> Iterator[AioContext]:
    c = AioContext(max_events=8)
    yield c
    c.close()


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    f = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    yield f
    os.close(f)


def reap_all(ctx: AioContext, timeout: float = 5.0) -> list[Transfer]:
    done: list[Transfer] = []
    deadline = time.monotonic() + timeout
    while ctx.in_flight:
        assert time.monotonic() < deadline, "AIO events did not arrive"
        ctx.wait(0.5)
        done += ctx.reap()
    return done


def test_struct_layouts_match_aio_abi() -> None:
    # include/uapi/linux/aio_abi.h, little-endian
    offsets = {"aio_data": 0, "aio_key": 8, "aio_rw_flags": 12, "aio_lio_opcode": 16,
               "aio_reqprio": 18, "aio_fildes": 20, "aio_buf": 24, "aio_nbytes": 32,
               "aio_offset": 40, "aio_reserved2": 48, "aio_flags": 56, "aio_resfd": 60}
    for name, offset in offsets.items():
        assert getattr(Iocb, name).offset == offset, name
    assert ctypes.sizeof(Iocb) == 64
    assert [IoEvent.data.offset, IoEvent.obj.offset, IoEvent.res.offset,
            IoEvent.res2.offset] == [0, 8, 16, 24]


def test_batch_completes_in_order_and_signals_the_eventfd(ctx: AioContext, fd: int) -> None:
    payload = os.urandom(3000)
    buf = bytearray(4096)
    write = Transfer(fd, False, payload, len(payload), tag="w")
    read = Transfer(fd, True, memoryview(buf), len(buf), tag="r")
    assert ctx.submit([write, read]) == 2
    assert ctx.wait(5.0)
    done = reap_all(ctx)
    done += ctx.reap()
    assert {t.tag for t in done} == {"w", "r"}
    assert write.result == 3000 and read.result == 3000
    assert bytes(read.data()) == payload
    assert bytes(buf[:3000]) == payload
    assert ctx.in_flight == 0 and ctx.reap() == []


def test_wait_times_out_and_wake_releases_it(ctx: AioContext) -> None:
    t0 = time.monotonic()
    assert ctx.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(ctx.wait(10.0)))
    waiter.start()
    time.sleep(0.05)
    ctx.wake()
    waiter.join(5.0)
    assert woke == [True]
    # the wake-up was consumed: the next wait times out again
    assert ctx.wait(0.02) is False


def test_first_transfer_refused_raises_and_queues_nothing(ctx: AioContext, fd: int) -> None:
    bad = Transfer(fd + 1000, True, bytearray(16), 16)
    good = Transfer(fd, False, b"x" * 16, 16)
    with pytest.raises(OSError) as info:
        ctx.submit([bad, good])
    assert info.value.errno == errno.EBADF
    assert ctx.in_flight == 0 and not bad.done and not good.done


def test_later_transfer_refused_leaves_the_rest_unqueued(ctx: AioContext, fd: int) -> None:
    good = Transfer(fd, False, b"y" * 512, 512)
    bad = Transfer(fd + 1000, False, b"z" * 512, 512)
    after = Transfer(fd, False, b"w" * 512, 512)
    assert ctx.submit([good, bad, after]) == 1
    assert reap_all(ctx) == [good]
    assert good.result == 512 and not after.done
    assert os.pread(fd, 1024, 0) == b"y" * 512


def test_errors_come_back_as_negative_results(ctx: AioContext, tmp_path: Path) -> None:
    ro = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
    try:
        t = Transfer(ro, False, b"data", 4)
        try:
            ctx.submit([t])
        except OSError as exc:  # some kernels refuse at submit time
            assert exc.errno == errno.EBADF
        else:
            reap_all(ctx)
            assert t.result == -errno.EBADF
    finally:
        os.close(ro)


def test_write_buffers_of_every_kind(ctx: AioContext, fd: int) -> None:
    """bytes, writable views and read-only views (a slice of bytes) are all passed
    in place, without a copy; all reach the file intact."""
    base = os.urandom(4096)
    sources: list[bytes | bytearray | memoryview] = [
        base[:1024], bytearray(base[1024:2048]), memoryview(bytearray(base))[2048:3072],
        memoryview(base)[3072:4096],
    ]
    transfers = [Transfer(fd, False, s, len(s), offset=1024 * i) for i, s in enumerate(sources)]
    assert ctx.submit(transfers) == 4
    reap_all(ctx)
    assert [t.result for t in transfers] == [1024] * 4
    assert os.pread(fd, 4096, 0) == base


def test_cancel_of_a_finished_request_is_refused(ctx: AioContext, fd: int) -> None:
    t = Transfer(fd, False, b"q" * 64, 64)
    ctx.submit([t])
    # regular files finish inside io_submit and register no cancel hook
    assert ctx.cancel(t) is False
    assert reap_all(ctx) == [t] and t.result == 64
    assert ctx.cancel(t) is False  # no longer in flight at all


def test_close_is_idempotent_and_wake_after_close_is_harmless(fd: int) -> None:
    c = AioContext(max_events=4)
    c.submit([Transfer(fd, False, b"a" * 8, 8)])
    c.close()
    c.close()
    c.wake()
    assert c.in_flight == 0


def test_read_only_views_are_passed_in_place_and_released() -> None:
    """A read-only view (a READ's piece of a reused buffer, handed out read-only)
    is exported through the buffer protocol, not copied, and the export ends with
    the transfer's pin; a read into a read-only buffer is refused."""
    from firmware.usb_gadget import aio

    base = bytearray(os.urandom(8192))
    view = memoryview(base).toreadonly()[1000:5000]
    t = Transfer(-1, False, view, len(view))
    address = aio._address(t)
    assert address == ctypes.addressof(ctypes.c_char.from_buffer(base)) + 1000
    assert ctypes.string_at(address, len(view)) == bytes(view)
    t._pin = None
    view.release()
    base.extend(b"x")  # no export left: a held one would refuse the resize
    with pytest.raises(TypeError):
        aio._address(Transfer(-1, True, memoryview(bytes(16)), 16))
