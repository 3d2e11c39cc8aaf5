"""The AIO bulk loop: one thread, no writer.

It posts transfers without waiting for them, and blocks only on the completion
eventfd, which ep0's wake-ups also signal.  Every transfer carries the generation
it was posted for; a superseded course is cancelled (io_cancel -> usb_ep_dequeue)
and reaped before the new one starts, so nothing stale completes into a new
command.  See server.py for the threads and the course they follow.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from firmware.usb_gadget.aio import Transfer
from firmware.usb_gadget.bot import (
    Action,
    CancelTransfers,
    ReceiveCBW,
    ReceiveData,
    SendCSW,
    SendData,
    StallIn,
    StallOut,
)
from firmware.usb_gadget.bulk import (
    _COPY_LIMIT,
    _LINK_ERRORS,
    CBW_BUFFER,
    _describe,
    _Interrupted,
)

if TYPE_CHECKING:
    from firmware.usb_gadget.server import UsbFrontEnd

log = logging.getLogger("mirrorunit.gadget")

#: AIO: data-out reads kept posted ahead (a whole 1 MiB command), so the medium write of one piece
#: overlaps the transfer of the next ones (each holds a CHUNK_SIZE buffer).
AIO_OUT_DEPTH = 4
#: AIO: data-in writes queued at once (f_fs holds a kernel copy of each).
AIO_IN_DEPTH = 4
#: How long a reset waits for cancelled transfers to report back.
AIO_CANCEL_TIMEOUT = 2.0


class AsyncTransfers(Protocol):
    """What the AIO bulk loop needs of aio.AioContext (a fake in tests)."""

    @property
    def in_flight(self) -> int: ...

    def transfers(self) -> list[Transfer]: ...

    def submit(self, transfers: list[Transfer]) -> int: ...

    def reap(self) -> list[Transfer]: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def wake(self) -> None: ...

    def cancel(self, transfer: Transfer) -> bool: ...


@dataclass(frozen=True)
class AioEndpoints:
    """The bulk endpoint files driven through native AIO (see aio.py)."""

    context: AsyncTransfers
    in_fd: int
    out_fd: int


#: _aio_perform: the bulk-side course changed while it waited
_SUPERSEDED = object()


class AioBulkLoop:
    """The bulk side through native AIO on the endpoint files of `aio`."""

    def __init__(self, front: UsbFrontEnd, aio: AioEndpoints) -> None:
        self._front = front
        self._aio = aio
        #: data-out reads posted ahead, in wire order
        self._data_reads: collections.deque[Transfer] = collections.deque()
        #: lengths of the data-out reads still to post
        self._read_plan: collections.deque[int] = collections.deque()
        #: transfers of an abandoned course still in the kernel after their cancel
        self._orphans: set[Transfer] = set()
        self._buffers: list[bytearray] = []

    def start(self) -> None:
        """No thread of its own: everything runs in run()."""

    def wake(self) -> None:
        # The loop waits on the completion eventfd, or in a blocking read.
        self._aio.context.wake()

    def join(self, timeout: float) -> None:
        pass

    def run(self) -> None:
        try:
            while not self._front._stopping:
                action: Action | None = None
                with self._front._cond:
                    generation = self._front._generation
                    superseded = self._front._seen_generation != generation
                    if not superseded and self._front._pending:
                        action = self._front._pending.popleft()
                if superseded:
                    self._aio_abandon(AIO_CANCEL_TIMEOUT)
                    with self._front._cond:
                        self._front._seen_generation = generation
                        self._front._cond.notify_all()
                    continue
                if action is None:
                    self._aio_wait()
                    continue
                try:
                    outcome = self._aio_perform(action, generation)
                except OSError as exc:
                    if exc.errno not in _LINK_ERRORS | {errno.EOVERFLOW, errno.EAGAIN}:
                        raise
                    log.info("bulk transfer ended (%s) during %s", exc.strerror,
                             _describe(action))
                    with self._front._cond:
                        if generation == self._front._generation:
                            # ep0 will report DISABLE/ENABLE or a reset; wait for its course.
                            self._front._pending.clear()
                    continue
                if outcome is _SUPERSEDED:
                    continue
                with self._front._cond:
                    if generation != self._front._generation:
                        pass
                    elif isinstance(outcome, Transfer | bytes):
                        data = outcome.data() if isinstance(outcome, Transfer) else outcome
                        self._front._pending.extend(self._front.bot.bulk_out_received(data))
                    elif isinstance(action, SendData | SendCSW):
                        self._front._pending.extend(self._front.bot.bulk_in_complete())
                if isinstance(outcome, Transfer):
                    self._release(outcome)
        finally:
            self._aio_abandon(1.0)

    def _aio_perform(self, action: Action, generation: int) -> object:
        """Post what `action` needs; a read returns its completed Transfer (or the
        bytes to hand over), _SUPERSEDED when the course changed meanwhile."""
        assert self._aio is not None and self._front._bulk_in is not None
        assert self._front._bulk_out is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("bulk %s", _describe(action))
        if isinstance(action, ReceiveCBW):
            return self._aio_receive_cbw(generation)
        if isinstance(action, ReceiveData):
            return self._aio_receive_data(action.length, generation)
        if isinstance(action, SendData):
            if not action.data:
                return None
            # Each queued write holds a kernel copy: bound them.
            if not self._aio_until(lambda: self._front._in_flight_in < AIO_IN_DEPTH, generation):
                return _SUPERSEDED
            self._aio_submit([self._write(action.data, "data-in", generation)])
            self._front._counts["bytes_in"] += len(action.data)
            return None
        if isinstance(action, SendCSW):
            if not self._aio_drop_data_reads(generation):
                return _SUPERSEDED
            # Queued, not waited for: the machine turns to the next CBW at once, so
            # its read is posted right behind the CSW.
            self._aio_submit([self._write(action.data, "csw", generation)])
            return None
        if isinstance(action, StallIn):
            # A UDC refuses to halt an IN endpoint with requests queued: let the
            # host take the data-in first.
            if not self._aio_until(lambda: self._front._in_flight_in == 0, generation):
                return _SUPERSEDED
            self._front._bulk_in.halt()
            return None
        if isinstance(action, StallOut):
            if not self._aio_drop_data_reads(generation):
                return _SUPERSEDED
            self._front._bulk_out.halt()
            return None
        if not isinstance(action, CancelTransfers):
            log.warning("bulk loop got an ep0 action %s; ignored", action)
        return None

    def _aio_receive_cbw(self, generation: int) -> object:
        # A read we wait for at once, alone on the endpoint, is a blocking read:
        # f_fs completes an AIO read through a workqueue and then the eventfd, two
        # wake-ups where a blocking read has one (measured: +10-25 % per command
        # under TCG).  A reset interrupts it with the signal, as in the
        # synchronous loop.
        try:
            n = self._blocking_read(self._front._cbw_buffer, generation)
        except OSError as exc:
            if exc.errno != errno.EOVERFLOW:
                raise
            # The host sent more than any CBW can be: hand the machine an
            # over-long one so it stalls and waits for reset recovery.
            log.warning("bulk-out overflow where a CBW was expected")
            return bytes(CBW_BUFFER + 1)
        if n is None:
            return _SUPERSEDED
        self._front._counts["commands"] += 1
        return bytes(self._front._cbw_buffer[:n])

    def _blocking_read(self, buffer: memoryview, generation: int) -> int | None:
        """One bulk-out transfer in this thread; None when a new course interrupted it."""
        assert self._front._bulk_out is not None
        try:
            self._front._blocked_for = generation
            if self._front._stopping or generation != self._front._generation:
                return None
            return self._front._bulk_out.read_into(buffer)
        except _Interrupted:
            return None
        finally:
            self._front._blocked_for = None

    def _aio_receive_data(self, length: int, generation: int) -> object:
        if not self._data_reads:
            with self._front._cond:
                plan = self._front.bot.data_out_plan()
            if not plan or plan[0] != length:
                plan = [length]
            if len(plan) == 1:
                # Nothing to pipeline: a blocking read (see _aio_receive_cbw).
                buffer = self._buffers.pop() if self._buffers else bytearray(self._front._chunk)
                view = memoryview(buffer)[:length]
                try:
                    n = self._blocking_read(view, generation)
                except OSError:
                    self._buffers.append(buffer)
                    raise
                if n is None:
                    self._buffers.append(buffer)
                    return _SUPERSEDED
                self._front._counts["bytes_out"] += n
                t = Transfer(self._aio.out_fd if self._aio else -1, True, view, length,
                             ("data-out", generation), result=n)
                if n <= _COPY_LIMIT:
                    self._release(t)
                    return bytes(view[:n])
                return t
            self._read_plan = collections.deque(plan)
            self._aio_post_reads(generation)
        t = self._data_reads[0]
        if t.length != length:
            raise RuntimeError(f"data-out read of {t.length} posted, machine asks {length}")
        if not self._aio_until(lambda: t.done, generation):
            return _SUPERSEDED
        self._data_reads.popleft()
        assert t.result is not None
        if t.result < 0:
            self._release(t)
            raise OSError(-t.result, os.strerror(-t.result))
        # Post the next piece before this one goes to the medium.
        self._aio_post_reads(generation)
        self._front._counts["bytes_out"] += t.result
        if t.result <= _COPY_LIMIT:
            data = bytes(t.data())
            self._release(t)
            return data
        return t

    def _aio_post_reads(self, generation: int) -> None:
        assert self._aio is not None
        batch: list[Transfer] = []
        while self._read_plan and len(self._data_reads) + len(batch) < AIO_OUT_DEPTH:
            length = self._read_plan.popleft()
            buffer = self._buffers.pop() if self._buffers else bytearray(self._front._chunk)
            batch.append(Transfer(self._aio.out_fd, True, memoryview(buffer)[:length],
                                  length, ("data-out", generation)))
        self._aio_submit(batch)

    def _aio_drop_data_reads(self, generation: int) -> bool:
        """Cancel data-out reads posted beyond a short transfer (the host sends
        nothing more before the CSW) and wait until they are back."""
        if not self._data_reads:
            return True
        assert self._aio is not None
        for t in self._data_reads:
            self._aio.context.cancel(t)
        reads = list(self._data_reads)
        if not self._aio_until(lambda: all(t.done for t in reads), generation):
            return False
        for t in reads:
            if t.result is not None and t.result > 0:
                log.warning("data-out beyond a short transfer dropped (%d bytes)", t.result)
            self._release(t)
        self._data_reads.clear()
        self._read_plan.clear()
        return True

    def _write(self, data: bytes | memoryview, kind: str, generation: int) -> Transfer:
        assert self._aio is not None
        return Transfer(self._aio.in_fd, False, data, len(data), (kind, generation))

    def _aio_submit(self, batch: list[Transfer]) -> None:
        assert self._aio is not None
        if not batch:
            return
        self._aio_collect()
        try:
            queued = self._aio.context.submit(batch)
        except OSError:
            queued = 0
            raise
        finally:
            for t in batch[queued:]:
                # never reached the kernel: the buffer is free again
                base = t.buffer.obj if isinstance(t.buffer, memoryview) else None
                if t.is_read and isinstance(base, bytearray):
                    self._buffers.append(base)
            for t in batch[:queued]:
                if t.is_read:
                    self._data_reads.append(t)
                else:
                    self._front._in_flight_in += 1
        if queued < len(batch):
            raise OSError(errno.ESHUTDOWN, "endpoint refused a queued transfer")

    def _aio_wait(self, timeout: float | None = None) -> bool:
        assert self._aio is not None
        woke = self._aio.context.wait(timeout)
        self._aio_collect()
        return woke

    def _aio_collect(self) -> None:
        """Take the events that arrived (without waiting): they must not pile up,
        the context's ring refuses new requests (EAGAIN) once full."""
        assert self._aio is not None
        for t in self._aio.context.reap():
            if not t.is_read:
                self._front._in_flight_in -= 1
                assert t.result is not None
                kind, generation = cast(tuple[str, int], t.tag)
                if t.result < 0 and generation == self._front._generation:
                    log.info("bulk-in %s ended: %s", kind, os.strerror(-t.result))
            elif t in self._orphans:
                self._orphans.discard(t)
                self._release(t)

    def _aio_until(self, ready: Callable[[], bool], generation: int) -> bool:
        """Wait for completions until ready(); False if the course changed first."""
        while not ready():
            if self._front._stopping or generation != self._front._generation:
                return False
            self._aio_wait()
        return True

    def _aio_abandon(self, timeout: float) -> None:
        """Cancel everything in flight and wait (up to `timeout`) for it to report."""
        if self._aio is None:
            return
        context = self._aio.context
        in_flight = context.transfers()
        for t in in_flight:
            context.cancel(t)
        if in_flight:
            log.info("cancelling %d bulk transfers in flight", len(in_flight))
        deadline = time.monotonic() + timeout
        while context.in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%d bulk transfers did not report back after cancel",
                            context.in_flight)
                break
            self._aio_wait(left)
        for t in self._data_reads:
            if t.done:
                self._release(t)
            else:
                self._orphans.add(t)
        self._data_reads.clear()
        self._read_plan.clear()

    def _release(self, t: Transfer) -> None:
        """Return a data-out buffer to the pool once the kernel and the machine are done."""
        buffer = t.buffer.obj if isinstance(t.buffer, memoryview) else None
        if isinstance(buffer, bytearray) and len(buffer) == self._front._chunk and t.done:
            if all(b is not buffer for b in self._buffers):
                self._buffers.append(buffer)
