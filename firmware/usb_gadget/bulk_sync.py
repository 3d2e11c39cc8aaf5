"""The synchronous bulk loop: blocking transfers in the thread that serves (a new
course interrupts them with a signal), and a bulk-in writer thread for CSWs and
bulk-in stalls.  See server.py for the threads and the course they follow."""

from __future__ import annotations

import collections
import errno
import logging
import signal
import threading
from typing import TYPE_CHECKING

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
    INTERRUPT_SIGNAL,
    _describe,
    _Interrupted,
)

if TYPE_CHECKING:
    from firmware.usb_gadget.server import UsbFrontEnd

log = logging.getLogger("mirrorunit.gadget")

#: Bulk-in items queued ahead of the writer: two data pieces and a CSW keep the wire
#: busy while bounding the memory held.
IN_QUEUE_DEPTH = 3


class SyncBulkLoop:
    """The bulk side with blocking transfers and a bulk-in writer thread."""

    def __init__(self, front: UsbFrontEnd) -> None:
        self._front = front
        self._out_buffer = memoryview(bytearray(front._chunk))
        self._writer = threading.Thread(target=self._in_loop, name="usb-bulk-in", daemon=True)

    def start(self) -> None:
        self._writer.start()

    def wake(self) -> None:
        """Nothing to do: the loop waits on the course's condition or in a transfer,
        which the front end's notify and interrupt signal end."""

    def join(self, timeout: float) -> None:
        if self._writer.is_alive():
            self._writer.join(timeout=timeout)

    def run(self) -> None:
        while not self._front._stopping:
            with self._front._cond:
                if self._front._seen_generation != self._front._generation:
                    # only ep0's _supersede waits for this
                    self._front._seen_generation = self._front._generation
                    self._front._cond.notify_all()
                if not self._front._pending:
                    self._front._blocked_for = self._front._generation
                    try:
                        self._front._cond.wait_for(
                            lambda: bool(self._front._pending) or self._front._stopping
                            or self._front._generation != self._front._seen_generation
                        )
                    except _Interrupted:
                        pass
                    finally:
                        self._front._blocked_for = None
                    continue
                action = self._front._pending.popleft()
                generation = self._front._generation
            try:
                self._front._blocked_for = generation
                if self._front._stopping or generation != self._front._generation:
                    self._front._blocked_for = None
                    continue
                try:
                    result = self._perform(action, generation)
                finally:
                    self._front._blocked_for = None
            except _Interrupted:
                continue
            except OSError as exc:
                if exc.errno == errno.EOVERFLOW and isinstance(action, ReceiveCBW):
                    # The host sent more than any CBW can be: hand the machine an
                    # over-long one so it stalls and waits for reset recovery.
                    log.warning("bulk-out overflow where a CBW was expected")
                    result = bytes(CBW_BUFFER + 1)
                elif exc.errno in _LINK_ERRORS or exc.errno == errno.EOVERFLOW:
                    log.info("bulk transfer ended (%s) during %s", exc.strerror, action)
                    with self._front._cond:
                        if generation == self._front._generation:
                            # ep0 will report DISABLE/ENABLE or a reset; wait for its course.
                            self._front._pending.clear()
                    continue
                else:
                    raise
            with self._front._cond:
                if generation != self._front._generation:
                    continue
                if isinstance(action, ReceiveCBW | ReceiveData):
                    assert result is not None
                    self._front._pending.extend(self._front.bot.bulk_out_received(result))
                elif isinstance(action, SendData | SendCSW):
                    self._front._pending.extend(self._front.bot.bulk_in_complete())

    def _perform(self, action: Action, generation: int) -> bytes | memoryview | None:
        assert self._front._bulk_in is not None and self._front._bulk_out is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("bulk %s", _describe(action))
        if isinstance(action, ReceiveCBW):
            n = self._front._bulk_out.read_into(self._front._cbw_buffer)
            self._front._counts["commands"] += 1
            return bytes(self._front._cbw_buffer[:n])
        if isinstance(action, ReceiveData):
            view = self._out_buffer[: action.length]
            n = self._front._bulk_out.read_into(view)
            self._front._counts["bytes_out"] += n
            return bytes(view[:n]) if n <= _COPY_LIMIT else view[:n]
        if isinstance(action, SendData):
            # Written here, not by the writer: the time from a READ's CBW to its data
            # on the wire is the one turnaround no handoff should lengthen.
            self._front._bulk_in.write_all(action.data)
            self._front._counts["bytes_in"] += len(action.data)
            return None
        if isinstance(action, SendCSW | StallIn):
            self._queue_in(action, generation)
            return None
        if isinstance(action, StallOut):
            self._front._bulk_out.halt()
        elif not isinstance(action, CancelTransfers):
            log.warning("bulk loop got an ep0 action %s; ignored", action)
        return None

    def _queue_in(self, action: Action, generation: int) -> None:
        """Hand a bulk-in item to the writer (bulk loop); blocks while the queue is full."""
        with self._front._in_cond:
            self._front._in_cond.wait_for(
                lambda: len(self._front._in_queue) < IN_QUEUE_DEPTH
                or self._front._stopping or self._front._generation != generation
            )
            if self._front._generation == generation and not self._front._stopping:
                self._front._in_queue.append((generation, action))
                self._front._in_cond.notify_all()

    def _in_loop(self) -> None:
        self._front._writer_thread = threading.get_ident()
        # Only our interrupt may reach this thread: a SIGTERM landing here would
        # break a transfer that is not to be abandoned.
        others = {s for s in signal.valid_signals() if s != INTERRUPT_SIGNAL}
        signal.pthread_sigmask(signal.SIG_BLOCK, others)
        while True:
            with self._front._in_cond:
                self._front._in_cond.wait_for(
                    lambda: bool(self._front._in_queue) or self._front._stopping
                )
                if self._front._stopping:
                    return
                generation, action = self._front._in_queue.popleft()
                self._front._in_cond.notify_all()
                if generation != self._front._generation:
                    continue
                self._front._in_busy = generation
            try:
                self._write_in(generation, action)
            except InterruptedError:
                log.info("bulk-in transfer abandoned: %s", _describe(action))
            except OSError as exc:
                if exc.errno not in _LINK_ERRORS and exc.errno != errno.EOVERFLOW:
                    log.error("bulk-in write failed: %s; stopping", exc.strerror)
                    self._front.stop()
                    return
                log.info("bulk-in transfer ended (%s) during %s", exc.strerror,
                         _describe(action))
                with self._front._in_cond:
                    # The rest of this command's bulk-in cannot follow a broken
                    # transfer; ep0 reports the reset/disable that caused it.
                    self._front._in_queue = collections.deque(
                        item for item in self._front._in_queue if item[0] != generation
                    )
            finally:
                with self._front._in_cond:
                    self._front._in_busy = None
                    self._front._in_cond.notify_all()

    def _write_in(self, generation: int, action: Action) -> None:
        assert self._front._bulk_in is not None
        if isinstance(action, StallIn):
            self._front._bulk_in.halt()
            return
        assert isinstance(action, SendData | SendCSW)

        def cancelled() -> bool:
            return self._front._stopping or self._front._generation != generation

        self._front._bulk_in.write_all(action.data, cancelled)
        if isinstance(action, SendData):
            self._front._counts["bytes_in"] += len(action.data)
