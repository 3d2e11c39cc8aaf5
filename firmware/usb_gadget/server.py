"""The USB front end: configfs gadget + FunctionFS endpoints driving the BOT state machine.

Three threads share one `BulkOnlyTransport` under a lock:

* the bulk loop (the thread that calls `run`, normally the main thread) performs
  the actions the machine returns: it reads CBWs and data-out, reads the medium
  and writes data-in itself (from a READ's CBW to its data on the wire there is
  no thread handoff), and hands CSWs and bulk-in stalls to
* the bulk-in writer, which writes them in order.  The machine is told a CSW
  is complete once it is queued (its payload is immutable), so the next CBW
  read is posted before the CSW has reached the host and the host's
  CSW-to-next-CBW turnaround does not wait for Python;
* the ep0 thread reads FunctionFS events and answers class requests.

When ep0 changes the course of the bulk side (Bulk-Only Mass Storage Reset,
DISABLE/ENABLE), it replaces the bulk loop's pending actions and bumps a
generation number.  A transfer still queued in the kernel at that point would
otherwise complete later against the wrong command (a stale data-in reaching
the host's next READ), so the ep0 thread interrupts the bulk loop with a
signal: f_fs then dequeues the transfer and the loop continues with the new
actions.  Python runs signal handlers only in the main thread, hence the bulk
loop's place there; the writer, which cannot run one, writes through libc so
that the signal still ends its transfer (functionfs.write_fd) and drops every
queued item of an old generation.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Protocol, cast

from firmware.scsi import ScsiTarget
from firmware.usb_gadget.aio import AioContext, AioUnavailable, Transfer
from firmware.usb_gadget.bot import (
    BULK_ONLY_MASS_STORAGE_RESET,
    Action,
    BotState,
    BulkOnlyTransport,
    CancelTransfers,
    ControlReply,
    ControlStall,
    ReceiveCBW,
    ReceiveData,
    SendCSW,
    SendData,
    StallIn,
    StallOut,
)
from firmware.usb_gadget.configfs import Gadget, GadgetSettings, gadget_down, gadget_up
from firmware.usb_gadget.functionfs import (
    LANG_EN_US,
    MAX_PACKET,
    BulkEndpoint,
    Ep0,
    Ep0Event,
    EventType,
    SetupRequest,
    mass_storage_descriptors,
    mount_functionfs,
    strings_blob,
    umount_functionfs,
)

log = logging.getLogger("mirrorunit.gadget")

#: Data-phase piece size: f_fs kmallocs a bounce buffer of the transfer size,
#: so pieces stay well below what a fragmented kernel can still allocate.
CHUNK_SIZE = 256 * 1024
#: Large enough for the biggest max packet, so an over-long CBW shows as such.
CBW_BUFFER = MAX_PACKET["ss"]
#: Bulk-out data up to this size is copied before the target sees it; larger
#: pieces go as views of the receive buffer (WRITE data, consumed at once).
_COPY_LIMIT = 4096
INTERRUPT_SIGNAL = signal.SIGRTMIN + 5
_REQUEST_TYPE_MASK = 0x60
_REQUEST_TYPE_CLASS = 0x20
#: Bulk-in items queued ahead of the writer: two data pieces and a CSW keep the wire
#: busy while bounding the memory held.
IN_QUEUE_DEPTH = 3
GIL_SWITCH_INTERVAL = 0.0002
#: AIO: data-out reads kept posted ahead (a whole 1 MiB command), so the medium write of one piece
#: overlaps the transfer of the next ones (each holds a CHUNK_SIZE buffer).
AIO_OUT_DEPTH = 4
#: AIO: data-in writes queued at once (f_fs holds a kernel copy of each).
AIO_IN_DEPTH = 4
#: How long a reset waits for cancelled transfers to report back.
AIO_CANCEL_TIMEOUT = 2.0
#: Errors of a bulk transfer that a disconnect, reset or disable causes.
_LINK_ERRORS = {errno.ESHUTDOWN, errno.ECONNRESET, errno.ENODEV, errno.EPIPE, errno.EINTR}


class ControlEndpoint(Protocol):
    """ep0 as the front end uses it (functionfs.Ep0, or a fake in tests)."""

    def read_events(self) -> list[Ep0Event]: ...

    def reply(self, setup: SetupRequest, data: bytes) -> None: ...

    def stall(self, setup: SetupRequest) -> None: ...


class BulkPipe(Protocol):
    """A bulk endpoint as the front end uses it (functionfs.BulkEndpoint, or a fake)."""

    def read_into(self, buffer: memoryview) -> int: ...

    def write_all(
        self, data: bytes | memoryview, cancelled: Callable[[], bool] | None = None
    ) -> None: ...

    def halt(self) -> None: ...


class _Interrupted(Exception):
    """Raised by the signal handler to abandon a superseded blocking transfer."""


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


class UsbFrontEnd:
    """One gadget serving `target`; `run()` blocks until `stop()`."""

    def __init__(
        self, target: ScsiTarget, settings: GadgetSettings, *, chunk_size: int = CHUNK_SIZE,
        use_aio: bool = True,
    ) -> None:
        self.target = target
        self.settings = settings
        #: run() drives the bulk endpoints with native AIO when the kernel allows
        self.use_aio = use_aio
        self._chunk = chunk_size
        self.bot = BulkOnlyTransport(target, chunk_size=chunk_size)
        self._cond = threading.Condition()
        self._pending: collections.deque[Action] = collections.deque()
        self._generation = 0
        #: generation the bulk loop works for while blocked (None: not interruptible)
        self._blocked_for: int | None = None
        self._seen_generation = 0
        self._stopping = False
        self._stopper_started = False
        self._bulk_done = threading.Event()
        self._bulk_thread: int | None = None
        self._can_interrupt = False
        self._ep0: ControlEndpoint | None = None
        self._bulk_in: BulkPipe | None = None
        self._bulk_out: BulkPipe | None = None
        self._out_buffer = memoryview(bytearray(chunk_size))
        self._cbw_buffer = memoryview(bytearray(CBW_BUFFER))
        self.gadget: Gadget | None = None
        self.ready = threading.Event()
        self._counts = {"commands": 0, "bytes_in": 0, "bytes_out": 0, "resets": 0}
        #: bulk-in work for the writer: (generation, SendData | SendCSW | StallIn)
        self._in_queue: collections.deque[tuple[int, Action]] = collections.deque()
        self._in_cond = threading.Condition()
        #: generation of the item the writer is transferring (None: idle)
        self._in_busy: int | None = None
        self._writer_thread: int | None = None
        # -- AIO bulk side (only the bulk loop touches these) --
        self._aio: AioEndpoints | None = None
        #: data-out reads posted ahead, in wire order
        self._data_reads: collections.deque[Transfer] = collections.deque()
        #: lengths of the data-out reads still to post
        self._read_plan: collections.deque[int] = collections.deque()
        #: transfers of an abandoned course still in the kernel after their cancel
        self._orphans: set[Transfer] = set()
        self._buffers: list[bytearray] = []
        #: data-in and CSW writes in the kernel (read by ep0 for a reset's decision)
        self._in_flight_in = 0

    def counters(self) -> dict[str, int]:
        """Commands and data-phase bytes seen since start; resets of any kind."""
        return dict(self._counts)

    # -- lifecycle -----------------------------------------------------------
    def run(self) -> None:
        """Bring the gadget up, serve until stop(), and always take it down."""
        s = self.settings
        endpoints: list[Ep0 | BulkEndpoint] = []
        aio: AioEndpoints | None = None
        context: AioContext | None = None
        try:
            self.gadget = gadget_up(s)
            mount_functionfs(s.function_name, s.ffs_mount)
            ep0 = Ep0(s.ffs_mount)
            endpoints.append(ep0)
            ep0.activate(
                mass_storage_descriptors(), strings_blob({LANG_EN_US: [s.configuration]})
            )
            bulk_in = BulkEndpoint(s.ffs_mount, "ep1", is_in=True)
            endpoints.append(bulk_in)
            bulk_out = BulkEndpoint(s.ffs_mount, "ep2", is_in=False)
            endpoints.append(bulk_out)
            gadget = self.gadget
            if self.use_aio:
                try:
                    context = AioContext()
                except AioUnavailable as exc:
                    log.warning("bulk endpoints without AIO (%s): synchronous transfers", exc)
                else:
                    aio = AioEndpoints(context, bulk_in.fd, bulk_out.fd)
                    # f_fs would block io_submit on a disabled endpoint until the next
                    # ENABLE; non-blocking files fail it at once instead (EAGAIN).
                    os.set_blocking(bulk_in.fd, False)
                    os.set_blocking(bulk_out.fd, False)
                    log.info("bulk endpoints through native AIO")

            def bind() -> None:
                log.info("gadget %s bound to %s", s.gadget_name, gadget.bind())

            # Unbinding makes f_fs send UNBIND, which lets the ep0 thread end.
            self.serve_endpoints(ep0, bulk_in, bulk_out, on_started=bind,
                                 on_stopping=gadget.unbind, aio=aio)
        finally:
            self._stopping = True
            if context is not None:
                context.close()
            if self.gadget is not None:
                self.gadget.unbind()
            for ep in reversed(endpoints):
                ep.close()
            umount_functionfs(s.ffs_mount)
            gadget_down(s)
            log.info("gadget %s down", s.gadget_name)

    def serve_endpoints(
        self,
        ep0: ControlEndpoint,
        bulk_in: BulkPipe,
        bulk_out: BulkPipe,
        *,
        on_started: Callable[[], None] | None = None,
        on_stopping: Callable[[], None] | None = None,
        aio: AioEndpoints | None = None,
    ) -> None:
        """Serve on open endpoints until stop(): ep0 in a thread, bulk in this one
        (through `aio` when given: no writer thread then)."""
        self._ep0, self._bulk_in, self._bulk_out = ep0, bulk_in, bulk_out
        self._aio = aio
        self._bulk_thread = threading.get_ident()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(INTERRUPT_SIGNAL, self._on_interrupt_signal)
            self._can_interrupt = True
        else:
            log.warning("USB bulk loop not on the main thread: resets cannot cancel transfers")
        ep0_thread = threading.Thread(target=self._ep0_loop, name="usb-ep0", daemon=True)
        writer = threading.Thread(target=self._in_loop, name="usb-bulk-in", daemon=True)
        # A thread woken by a completed transfer must get the GIL within a bus frame,
        # not after the default 5 ms switch interval: every command's turnaround
        # includes a handoff between the bulk loop and the writer.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        try:
            if aio is None:
                writer.start()
            ep0_thread.start()
            if on_started is not None:
                on_started()
            self.ready.set()
            if aio is None:
                self._bulk_loop()
            else:
                self._aio_bulk_loop()
        finally:
            self._bulk_done.set()
            self._stopping = True
            self._can_interrupt = False
            with self._in_cond:
                self._in_cond.notify_all()
            self._interrupt_writer()
            if on_stopping is not None:
                on_stopping()
            if writer.is_alive():
                writer.join(timeout=5)
            ep0_thread.join(timeout=5)
            sys.setswitchinterval(switch_interval)
            if previous is not None:
                signal.signal(INTERRUPT_SIGNAL, previous)

    def stop(self) -> None:
        """Ask run() to return; callable from any thread or a signal handler."""
        self._stopping = True
        self._generation += 1
        self._interrupt_bulk_loop()
        self._interrupt_writer()
        if not self._stopper_started:
            # One signal can land just before the bulk loop enters a transfer and
            # interrupt nothing; keep knocking until the loop has left.
            self._stopper_started = True
            threading.Thread(target=self._keep_stopping, name="usb-stop", daemon=True).start()

    def _keep_stopping(self) -> None:
        for _ in range(100):
            if self._bulk_done.wait(0.1):
                return
            self._interrupt_bulk_loop()
            self._interrupt_writer()

    # -- interruption ----------------------------------------------------------
    def _on_interrupt_signal(self, signum: int, frame: FrameType | None) -> None:
        blocked = self._blocked_for
        if blocked is not None and (self._stopping or blocked != self._generation):
            raise _Interrupted

    def _interrupt_bulk_loop(self) -> None:
        if self._aio is not None:
            # The AIO loop waits on the completion eventfd, or in a blocking read.
            self._aio.context.wake()
        if self._can_interrupt and self._bulk_thread is not None:
            signal.pthread_kill(self._bulk_thread, INTERRUPT_SIGNAL)

    def _interrupt_writer(self) -> None:
        if self._can_interrupt and self._writer_thread is not None and self._in_busy is not None:
            try:
                signal.pthread_kill(self._writer_thread, INTERRUPT_SIGNAL)
            except ProcessLookupError:
                pass  # the writer already ended

    def _supersede(self, actions: Sequence[Action], reason: str) -> None:
        """Replace the bulk loop's course (ep0 thread) and wait until it took the new one."""
        skip = CancelTransfers | ControlReply | ControlStall
        bulk = [a for a in actions if not isinstance(a, skip)]
        self._generation += 1
        generation = self._generation
        self._pending = collections.deque(bulk)
        self._counts["resets"] += 1
        log.info("bulk side superseded (%s): %s", reason, bulk)
        self._cond.notify_all()
        # Repeated: a signal landing between the loop's last look at the generation
        # and its entry into read()/write() interrupts nothing.
        for _ in range(40):
            self._cond.release()
            try:
                self._interrupt_bulk_loop()
            finally:
                self._cond.acquire()
            if self._cond.wait_for(
                lambda: self._seen_generation >= generation or self._stopping, timeout=0.05
            ):
                break
        self._drain_writer(generation)

    def _drain_writer(self, generation: int) -> None:
        """Wait until the writer holds nothing older than `generation` (ep0 thread,
        `_cond` held).  The signal is repeated: one that lands just before the
        writer enters write() is not seen by that write."""
        with self._in_cond:
            self._in_queue = collections.deque(
                item for item in self._in_queue if item[0] >= generation
            )
            self._in_cond.notify_all()
        for _ in range(40):
            with self._in_cond:
                busy = self._in_busy
                if busy is None or busy >= generation or self._stopping:
                    return
            self._interrupt_writer()
            with self._in_cond:
                self._in_cond.wait_for(
                    lambda: self._in_busy is None or self._in_busy >= generation, timeout=0.05
                )
        log.warning("bulk-in writer did not leave a superseded transfer")

    # -- bulk side ---------------------------------------------------------------
    def _bulk_loop(self) -> None:
        while not self._stopping:
            with self._cond:
                if self._seen_generation != self._generation:
                    # only ep0's _supersede waits for this
                    self._seen_generation = self._generation
                    self._cond.notify_all()
                if not self._pending:
                    self._blocked_for = self._generation
                    try:
                        self._cond.wait_for(
                            lambda: bool(self._pending) or self._stopping
                            or self._generation != self._seen_generation
                        )
                    except _Interrupted:
                        pass
                    finally:
                        self._blocked_for = None
                    continue
                action = self._pending.popleft()
                generation = self._generation
            try:
                self._blocked_for = generation
                if self._stopping or generation != self._generation:
                    self._blocked_for = None
                    continue
                try:
                    result = self._perform(action, generation)
                finally:
                    self._blocked_for = None
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
                    with self._cond:
                        if generation == self._generation:
                            # ep0 will report DISABLE/ENABLE or a reset; wait for its course.
                            self._pending.clear()
                    continue
                else:
                    raise
            with self._cond:
                if generation != self._generation:
                    continue
                if isinstance(action, ReceiveCBW | ReceiveData):
                    assert result is not None
                    self._pending.extend(self.bot.bulk_out_received(result))
                elif isinstance(action, SendData | SendCSW):
                    self._pending.extend(self.bot.bulk_in_complete())

    def _perform(self, action: Action, generation: int) -> bytes | memoryview | None:
        assert self._bulk_in is not None and self._bulk_out is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("bulk %s", _describe(action))
        if isinstance(action, ReceiveCBW):
            n = self._bulk_out.read_into(self._cbw_buffer)
            self._counts["commands"] += 1
            return bytes(self._cbw_buffer[:n])
        if isinstance(action, ReceiveData):
            view = self._out_buffer[: action.length]
            n = self._bulk_out.read_into(view)
            self._counts["bytes_out"] += n
            return bytes(view[:n]) if n <= _COPY_LIMIT else view[:n]
        if isinstance(action, SendData):
            # Written here, not by the writer: the time from a READ's CBW to its data
            # on the wire is the one turnaround no handoff should lengthen.
            self._bulk_in.write_all(action.data)
            self._counts["bytes_in"] += len(action.data)
            return None
        if isinstance(action, SendCSW | StallIn):
            self._queue_in(action, generation)
            return None
        if isinstance(action, StallOut):
            self._bulk_out.halt()
        elif not isinstance(action, CancelTransfers):
            log.warning("bulk loop got an ep0 action %s; ignored", action)
        return None

    def _queue_in(self, action: Action, generation: int) -> None:
        """Hand a bulk-in item to the writer (bulk loop); blocks while the queue is full."""
        with self._in_cond:
            self._in_cond.wait_for(
                lambda: len(self._in_queue) < IN_QUEUE_DEPTH
                or self._stopping or self._generation != generation
            )
            if self._generation == generation and not self._stopping:
                self._in_queue.append((generation, action))
                self._in_cond.notify_all()

    # -- bulk side through AIO ---------------------------------------------------
    # One thread, no signals: it posts transfers without waiting for them, and
    # blocks only on the completion eventfd, which ep0's wake-ups also signal.
    # Every transfer carries the generation it was posted for; a superseded
    # course is cancelled (io_cancel -> usb_ep_dequeue) and reaped before the new
    # one starts, so nothing stale completes into a new command.

    def _aio_bulk_loop(self) -> None:
        try:
            while not self._stopping:
                action: Action | None = None
                with self._cond:
                    generation = self._generation
                    superseded = self._seen_generation != generation
                    if not superseded and self._pending:
                        action = self._pending.popleft()
                if superseded:
                    self._aio_abandon(AIO_CANCEL_TIMEOUT)
                    with self._cond:
                        self._seen_generation = generation
                        self._cond.notify_all()
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
                    with self._cond:
                        if generation == self._generation:
                            # ep0 will report DISABLE/ENABLE or a reset; wait for its course.
                            self._pending.clear()
                    continue
                if outcome is _SUPERSEDED:
                    continue
                with self._cond:
                    if generation != self._generation:
                        pass
                    elif isinstance(outcome, Transfer | bytes):
                        data = outcome.data() if isinstance(outcome, Transfer) else outcome
                        self._pending.extend(self.bot.bulk_out_received(data))
                    elif isinstance(action, SendData | SendCSW):
                        self._pending.extend(self.bot.bulk_in_complete())
                if isinstance(outcome, Transfer):
                    self._release(outcome)
        finally:
            self._aio_abandon(1.0)

    def _aio_perform(self, action: Action, generation: int) -> object:
        """Post what `action` needs; a read returns its completed Transfer (or the
        bytes to hand over), _SUPERSEDED when the course changed meanwhile."""
        assert self._aio is not None and self._bulk_in is not None
        assert self._bulk_out is not None
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
            if not self._aio_until(lambda: self._in_flight_in < AIO_IN_DEPTH, generation):
                return _SUPERSEDED
            self._aio_submit([self._write(action.data, "data-in", generation)])
            self._counts["bytes_in"] += len(action.data)
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
            if not self._aio_until(lambda: self._in_flight_in == 0, generation):
                return _SUPERSEDED
            self._bulk_in.halt()
            return None
        if isinstance(action, StallOut):
            if not self._aio_drop_data_reads(generation):
                return _SUPERSEDED
            self._bulk_out.halt()
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
            n = self._blocking_read(self._cbw_buffer, generation)
        except OSError as exc:
            if exc.errno != errno.EOVERFLOW:
                raise
            # The host sent more than any CBW can be: hand the machine an
            # over-long one so it stalls and waits for reset recovery.
            log.warning("bulk-out overflow where a CBW was expected")
            return bytes(CBW_BUFFER + 1)
        if n is None:
            return _SUPERSEDED
        self._counts["commands"] += 1
        return bytes(self._cbw_buffer[:n])

    def _blocking_read(self, buffer: memoryview, generation: int) -> int | None:
        """One bulk-out transfer in this thread; None when a new course interrupted it."""
        assert self._bulk_out is not None
        try:
            self._blocked_for = generation
            if self._stopping or generation != self._generation:
                return None
            return self._bulk_out.read_into(buffer)
        except _Interrupted:
            return None
        finally:
            self._blocked_for = None

    def _aio_receive_data(self, length: int, generation: int) -> object:
        if not self._data_reads:
            with self._cond:
                plan = self.bot.data_out_plan()
            if not plan or plan[0] != length:
                plan = [length]
            if len(plan) == 1:
                # Nothing to pipeline: a blocking read (see _aio_receive_cbw).
                buffer = self._buffers.pop() if self._buffers else bytearray(self._chunk)
                view = memoryview(buffer)[:length]
                try:
                    n = self._blocking_read(view, generation)
                except OSError:
                    self._buffers.append(buffer)
                    raise
                if n is None:
                    self._buffers.append(buffer)
                    return _SUPERSEDED
                self._counts["bytes_out"] += n
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
        self._counts["bytes_out"] += t.result
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
            buffer = self._buffers.pop() if self._buffers else bytearray(self._chunk)
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
                    self._in_flight_in += 1
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
                self._in_flight_in -= 1
                assert t.result is not None
                kind, generation = cast(tuple[str, int], t.tag)
                if t.result < 0 and generation == self._generation:
                    log.info("bulk-in %s ended: %s", kind, os.strerror(-t.result))
            elif t in self._orphans:
                self._orphans.discard(t)
                self._release(t)

    def _aio_until(self, ready: Callable[[], bool], generation: int) -> bool:
        """Wait for completions until ready(); False if the course changed first."""
        while not ready():
            if self._stopping or generation != self._generation:
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
        if isinstance(buffer, bytearray) and len(buffer) == self._chunk and t.done:
            if all(b is not buffer for b in self._buffers):
                self._buffers.append(buffer)

    # -- bulk-in writer ------------------------------------------------------------------
    def _in_loop(self) -> None:
        self._writer_thread = threading.get_ident()
        # Only our interrupt may reach this thread: a SIGTERM landing here would
        # break a transfer that is not to be abandoned.
        others = {s for s in signal.valid_signals() if s != INTERRUPT_SIGNAL}
        signal.pthread_sigmask(signal.SIG_BLOCK, others)
        while True:
            with self._in_cond:
                self._in_cond.wait_for(lambda: bool(self._in_queue) or self._stopping)
                if self._stopping:
                    return
                generation, action = self._in_queue.popleft()
                self._in_cond.notify_all()
                if generation != self._generation:
                    continue
                self._in_busy = generation
            try:
                self._write_in(generation, action)
            except InterruptedError:
                log.info("bulk-in transfer abandoned: %s", _describe(action))
            except OSError as exc:
                if exc.errno not in _LINK_ERRORS and exc.errno != errno.EOVERFLOW:
                    log.error("bulk-in write failed: %s; stopping", exc.strerror)
                    self.stop()
                    return
                log.info("bulk-in transfer ended (%s) during %s", exc.strerror,
                         _describe(action))
                with self._in_cond:
                    # The rest of this command's bulk-in cannot follow a broken
                    # transfer; ep0 reports the reset/disable that caused it.
                    self._in_queue = collections.deque(
                        item for item in self._in_queue if item[0] != generation
                    )
            finally:
                with self._in_cond:
                    self._in_busy = None
                    self._in_cond.notify_all()

    def _write_in(self, generation: int, action: Action) -> None:
        assert self._bulk_in is not None
        if isinstance(action, StallIn):
            self._bulk_in.halt()
            return
        assert isinstance(action, SendData | SendCSW)

        def cancelled() -> bool:
            return self._stopping or self._generation != generation

        self._bulk_in.write_all(action.data, cancelled)
        if isinstance(action, SendData):
            self._counts["bytes_in"] += len(action.data)

    # -- ep0 side -------------------------------------------------------------------
    def _ep0_loop(self) -> None:
        assert self._ep0 is not None
        while True:
            try:
                events = self._ep0.read_events()
            except OSError as exc:
                if self._stopping:
                    return
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                log.error("ep0 read failed: %s", exc.strerror)
                self.stop()
                return
            for event in events:
                log.info("ep0 event %s %s", event.type, event.setup or "")
                if event.type == EventType.SETUP and event.setup is not None:
                    self._on_setup(event.setup)
                elif event.type == EventType.ENABLE:
                    with self._cond:
                        actions = self.bot.bus_reset() + self.bot.start()
                        self._supersede(actions, "enable")
                elif event.type == EventType.DISABLE:
                    with self._cond:
                        self.bot.bus_reset()
                        self._supersede([], "disable")
                elif event.type == EventType.UNBIND and self._stopping:
                    return

    def _on_setup(self, setup: SetupRequest) -> None:
        assert self._ep0 is not None
        if setup.bRequestType & _REQUEST_TYPE_MASK != _REQUEST_TYPE_CLASS:
            self._ep0.stall(setup)
            return
        with self._cond:
            actions = self.bot.control_request(
                setup.bRequestType, setup.bRequest, setup.wValue, setup.wIndex, setup.wLength
            )
            bulk = [a for a in actions if not isinstance(a, ControlReply | ControlStall)]
            if (
                not bulk
                and setup.bRequest == BULK_ONLY_MASS_STORAGE_RESET
                and isinstance(actions[0], ControlReply)
                and self.bot.state is BotState.EXPECT_CBW
                and (self._in_queue or self._in_busy is not None or self._in_flight_in)
            ):
                # The machine counts a queued CSW as sent and so has nothing to
                # cancel, but the host reset before taking it: it must not arrive
                # after the reset.  A fresh CBW read replaces the posted one.
                bulk = [ReceiveCBW()]
            if bulk:
                self._supersede(bulk, f"class request 0x{setup.bRequest:02x}")
        for action in actions:
            if isinstance(action, ControlReply):
                self._ep0.reply(setup, action.data)
                return
            if isinstance(action, ControlStall):
                self._ep0.stall(setup)
                return
        self._ep0.stall(setup)


def _describe(action: Action) -> str:
    if isinstance(action, SendData):
        return f"SendData({len(action.data)} bytes)"
    if isinstance(action, SendCSW):
        return repr(action.csw)
    return repr(action)


def serve_usb(
    target: ScsiTarget, settings: GadgetSettings, front: UsbFrontEnd | None = None
) -> None:
    """Serve `target` over USB until SIGTERM/SIGINT (or UsbFrontEnd.stop()); gadget down
    on exit.  `front`: a front end made for `target` with non-default options."""
    if front is None:
        front = UsbFrontEnd(target, settings)
    restore: dict[signal.Signals, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            restore[sig] = signal.signal(sig, lambda *_: front.stop())
    try:
        front.run()
    finally:
        for signum, handler in restore.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


__all__ = ["GadgetSettings", "UsbFrontEnd", "serve_usb"]
