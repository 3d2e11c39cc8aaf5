"""The bulk side of the USB front end: what its two bulk loops share, and the one
interface the front end drives either through.

`bulk_sync.SyncBulkLoop` moves data with blocking reads and writes and a bulk-in
writer thread; `bulk_aio.AioBulkLoop` posts transfers through native AIO from one
thread.  Both are parts of `server.UsbFrontEnd`: they perform the actions of its
BOT machine and follow the course (pending actions, generation) that its ep0
thread sets, on the state it shares between its threads.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import Callable
from typing import Protocol

from firmware.usb_gadget.bot import Action, SendCSW, SendData
from firmware.usb_gadget.functionfs import MAX_PACKET

#: Large enough for the biggest max packet, so an over-long CBW shows as such.
CBW_BUFFER = MAX_PACKET["ss"]
#: Bulk-out data up to this size is copied before the target sees it; larger
#: pieces go as views of the receive buffer (WRITE data, consumed at once).
_COPY_LIMIT = 4096
INTERRUPT_SIGNAL = signal.SIGRTMIN + 5

#: Errors of a bulk transfer that a disconnect, reset or disable causes.
_LINK_ERRORS = {errno.ESHUTDOWN, errno.ECONNRESET, errno.ENODEV, errno.EPIPE, errno.EINTR}


class BulkPipe(Protocol):
    """A bulk endpoint as the front end uses it (functionfs.BulkEndpoint, or a fake)."""

    def read_into(self, buffer: memoryview) -> int: ...

    def write_all(
        self, data: bytes | memoryview, cancelled: Callable[[], bool] | None = None
    ) -> None: ...

    def halt(self) -> None: ...


class _Interrupted(Exception):
    """Raised by the signal handler to abandon a superseded blocking transfer."""


class BulkLoop(Protocol):
    """A bulk loop as the front end runs it."""

    def start(self) -> None:
        """Start the threads the loop needs besides the one that calls run()."""
        ...

    def run(self) -> None:
        """Perform the machine's bulk actions until the front end stops."""
        ...

    def wake(self) -> None:
        """Make the loop look at the course again when it waits for something that
        neither the course's condition nor the interrupt signal ends."""
        ...

    def join(self, timeout: float) -> None:
        """Wait (up to `timeout`) for the threads start() started, once stopping."""
        ...


def _describe(action: Action) -> str:
    if isinstance(action, SendData):
        return f"SendData({len(action.data)} bytes)"
    if isinstance(action, SendCSW):
        return repr(action.csw)
    return repr(action)
