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

That is the synchronous bulk loop (bulk_sync.py).  Where the kernel offers native
AIO the bulk side is one thread instead, with no writer and no signal for its posted
transfers (bulk_aio.py); `serve_endpoints` selects one of the two (bulk.BulkLoop).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

from firmware.scsi import ScsiTarget
from firmware.usb_gadget.aio import AioContext, AioUnavailable
from firmware.usb_gadget.bot import (
    BULK_ONLY_MASS_STORAGE_RESET,
    Action,
    BotState,
    BulkOnlyTransport,
    CancelTransfers,
    ControlReply,
    ControlStall,
    ReceiveCBW,
)
from firmware.usb_gadget.bulk import CBW_BUFFER, INTERRUPT_SIGNAL, BulkLoop, BulkPipe, _Interrupted
from firmware.usb_gadget.bulk_aio import AIO_CANCEL_TIMEOUT as AIO_CANCEL_TIMEOUT
from firmware.usb_gadget.bulk_aio import AIO_IN_DEPTH as AIO_IN_DEPTH
from firmware.usb_gadget.bulk_aio import AIO_OUT_DEPTH as AIO_OUT_DEPTH
from firmware.usb_gadget.bulk_aio import AioBulkLoop, AioEndpoints
from firmware.usb_gadget.bulk_aio import AsyncTransfers as AsyncTransfers
from firmware.usb_gadget.bulk_sync import IN_QUEUE_DEPTH as IN_QUEUE_DEPTH
from firmware.usb_gadget.bulk_sync import SyncBulkLoop
from firmware.usb_gadget.configfs import Gadget, GadgetSettings, gadget_down, gadget_up
from firmware.usb_gadget.functionfs import (
    LANG_EN_US,
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
_REQUEST_TYPE_MASK = 0x60
_REQUEST_TYPE_CLASS = 0x20
GIL_SWITCH_INTERVAL = 0.0002


class ControlEndpoint(Protocol):
    """ep0 as the front end uses it (functionfs.Ep0, or a fake in tests)."""

    def read_events(self) -> list[Ep0Event]: ...

    def reply(self, setup: SetupRequest, data: bytes) -> None: ...

    def stall(self, setup: SetupRequest) -> None: ...


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
        #: the bulk loop serve_endpoints() runs (None: not serving)
        self._bulk: BulkLoop | None = None
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
        bulk: BulkLoop = SyncBulkLoop(self) if aio is None else AioBulkLoop(self, aio)
        self._bulk = bulk
        self._bulk_thread = threading.get_ident()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(INTERRUPT_SIGNAL, self._on_interrupt_signal)
            self._can_interrupt = True
        else:
            log.warning("USB bulk loop not on the main thread: resets cannot cancel transfers")
        ep0_thread = threading.Thread(target=self._ep0_loop, name="usb-ep0", daemon=True)
        # A thread woken by a completed transfer must get the GIL within a bus frame,
        # not after the default 5 ms switch interval: every command's turnaround
        # includes a handoff between the bulk loop and the writer.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        try:
            bulk.start()
            ep0_thread.start()
            if on_started is not None:
                on_started()
            self.ready.set()
            bulk.run()
        finally:
            self._bulk_done.set()
            self._stopping = True
            self._can_interrupt = False
            with self._in_cond:
                self._in_cond.notify_all()
            self._interrupt_writer()
            if on_stopping is not None:
                on_stopping()
            bulk.join(timeout=5)
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
        if self._bulk is not None:
            self._bulk.wake()
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
