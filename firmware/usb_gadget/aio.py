"""Linux native AIO (io_setup/io_submit/io_getevents/io_cancel) for FunctionFS endpoints.

Why: synchronous FunctionFS I/O keeps one request per endpoint in flight, so
every stage of a Bulk-Only command waits for our process to react.  With AIO a
READ's data and CSW and the next CBW read are queued in one `io_submit`, and a
WRITE's data-out is received in several outstanding requests while the medium
write of the previous piece runs.

Kernel interface (include/uapi/linux/aio_abi.h, fs/aio.c,
drivers/usb/gadget/function/f_fs.c), and the points that shape this module:

* f_fs's read_iter/write_iter see a non-sync kiocb, queue a usb_request and
  return -EIOCBQUEUED.  A write copies the user data into a kernel buffer during
  io_submit, so the caller's buffer may be reused once io_submit returned; a
  read copies into the user buffer when the request completes (a worker), so a
  read buffer belongs to the kernel until its event has been reaped.
* Every submitted iocb produces exactly one io_event, also when cancelled:
  io_cancel calls f_fs's cancel hook (usb_ep_dequeue), returns EINPROGRESS, and
  the event (res -ECONNRESET, or the normal result if it had already finished)
  arrives through the ring like any other.  io_cancel finds the request by the
  address of the user's iocb, so iocbs live at fixed addresses (ctypes objects
  owned by their `Transfer`).
* IOCB_FLAG_RESFD makes each completion add 1 to an eventfd, which is what a
  thread waits on (poll) together with its own wake-ups.
* f_fs waits (in io_submit) for a disabled endpoint to be enabled unless the
  file is O_NONBLOCK, so the endpoint files are switched to non-blocking: a
  submit on a disabled endpoint fails at once with EAGAIN.

No libaio: five syscalls through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import select
from dataclasses import dataclass, field

from firmware.usb_gadget.functionfs import FunctionFsError

# -- syscall numbers (asm/unistd.h of each architecture we run on) ---------------------

_SYSCALLS = {
    # io_setup, io_destroy, io_getevents, io_submit, io_cancel
    "x86_64": (206, 207, 208, 209, 210),
    "aarch64": (0, 1, 4, 2, 3),
    "armv7l": (243, 244, 245, 246, 247),
    "armv6l": (243, 244, 245, 246, 247),
}

# -- include/uapi/linux/aio_abi.h ------------------------------------------------------

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_FLAG_RESFD = 1 << 0


class Iocb(ctypes.Structure):
    """struct iocb (little-endian layout: aio_key precedes aio_rw_flags)."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_uint32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


assert ctypes.sizeof(Iocb) == 64


class IoEvent(ctypes.Structure):
    """struct io_event: data (our aio_data), obj (the iocb's address), res, res2."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


assert ctypes.sizeof(IoEvent) == 32


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class AioUnavailable(FunctionFsError):
    """Native AIO cannot be used here (unknown architecture, ENOSYS, limits)."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(rc: int) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


@dataclass(eq=False)
class Transfer:
    """One request on an endpoint file, from submission to its event.

    `result` is None while in flight, then the byte count or -errno."""

    fd: int
    is_read: bool
    #: read: the buffer the kernel fills (owned by the kernel until completion);
    #: write: the data (only needed until io_submit returns)
    buffer: bytes | bytearray | memoryview
    length: int
    #: what the owner wants to remember (kind of stage, generation)
    tag: object = None
    #: file offset (regular files; endpoint files ignore it)
    offset: int = 0
    result: int | None = None
    iocb: Iocb = field(default_factory=Iocb, repr=False)
    #: keeps the ctypes view exporting `buffer` alive while the kernel may use it
    _pin: object = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.result is not None

    def data(self) -> memoryview:
        """A completed read's bytes (a view of `buffer`)."""
        assert self.is_read and self.result is not None and self.result >= 0
        return memoryview(self.buffer)[: self.result]


def _address(transfer: Transfer) -> int:
    """Address of the transfer's bytes, never a copy of them: a read needs a
    writable buffer; a write takes bytes, or any buffer through the buffer
    protocol (a read-only view of a mapped medium among them)."""
    buf = transfer.buffer
    if transfer.length == 0:
        return 0
    if transfer.is_read or not (isinstance(buf, bytes) or (
            isinstance(buf, memoryview) and buf.readonly)):
        pin = (ctypes.c_char * transfer.length).from_buffer(memoryview(buf).cast("B"))
        transfer._pin = pin
        return ctypes.addressof(pin)
    if isinstance(buf, bytes):
        ptr = ctypes.c_char_p(buf)
        transfer._pin = ptr
        return ctypes.cast(ptr, ctypes.c_void_p).value or 0
    export = _BufferExport(buf)
    transfer._pin = export
    return export.address


class _PyBuffer(ctypes.Structure):
    """Py_buffer (Include/pybuffer.h)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PYBUF_SIMPLE = 0


class _BufferExport:
    """A read-only buffer held through the buffer protocol (ctypes' from_buffer
    wants a writable one), released when the transfer drops it."""

    def __init__(self, obj: memoryview) -> None:
        self._view = _PyBuffer()
        if _get_buffer(obj, ctypes.byref(self._view), _PYBUF_SIMPLE) != 0:
            raise BufferError("buffer refused")  # pragma: no cover (raised by the call)
        self._held = True
        self.address = self._view.buf or 0

    def __del__(self) -> None:
        if self._held:
            self._held = False
            _release_buffer(ctypes.byref(self._view))


class AioContext:
    """One kernel AIO context plus the eventfd its completions signal.

    Single consumer: one thread submits, reaps and cancels; any thread may
    `wake()` it out of `wait()`."""

    def __init__(self, max_events: int = 64) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise AioUnavailable(f"no AIO syscall numbers for {platform.machine()}")
        (self._nr_setup, self._nr_destroy, self._nr_getevents,
         self._nr_submit, self._nr_cancel) = numbers
        self._ctx = ctypes.c_ulong(0)
        if _syscall(ctypes.c_long(self._nr_setup), ctypes.c_long(max_events),
                    ctypes.byref(self._ctx)) < 0:
            err = ctypes.get_errno()
            raise AioUnavailable(f"io_setup: {os.strerror(err)}")
        self.max_events = max_events
        self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self.eventfd, select.POLLIN)
        self._events = (IoEvent * max_events)()
        self._zero = _Timespec(0, 0)
        self._in_flight: dict[int, Transfer] = {}
        self._next_key = 1

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def transfers(self) -> list[Transfer]:
        return list(self._in_flight.values())

    def submit(self, transfers: list[Transfer]) -> int:
        """Queue `transfers` in order (one io_submit); returns how many were queued.

        The first one failing raises OSError (nothing of the batch queued then);
        a later one failing leaves it and the rest unqueued (count < len)."""
        if not transfers:
            return 0
        ptrs = (ctypes.POINTER(Iocb) * len(transfers))()
        for i, t in enumerate(transfers):
            key = self._next_key
            self._next_key += 1
            cb = t.iocb
            ctypes.memset(ctypes.byref(cb), 0, ctypes.sizeof(cb))
            cb.aio_data = key
            cb.aio_lio_opcode = IOCB_CMD_PREAD if t.is_read else IOCB_CMD_PWRITE
            cb.aio_fildes = t.fd
            cb.aio_buf = _address(t)
            cb.aio_nbytes = t.length
            cb.aio_offset = t.offset
            cb.aio_flags = IOCB_FLAG_RESFD
            cb.aio_resfd = self.eventfd
            t.result = None
            ptrs[i] = ctypes.pointer(cb)
            self._in_flight[key] = t
        n = _syscall(ctypes.c_long(self._nr_submit), self._ctx, ctypes.c_long(len(transfers)), ptrs)
        queued = max(n, 0)
        for t in transfers[queued:]:
            del self._in_flight[t.iocb.aio_data]
            t._pin = None
        for t in transfers[:queued]:
            if not t.is_read:
                t._pin = None  # f_fs copied the data during io_submit
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return queued

    def reap(self) -> list[Transfer]:
        """Transfers completed since the last reap (results set), without waiting."""
        done: list[Transfer] = []
        while self._in_flight:
            n = _check(_syscall(ctypes.c_long(self._nr_getevents), self._ctx, ctypes.c_long(0),
                                ctypes.c_long(self.max_events), self._events,
                                ctypes.byref(self._zero)))
            for ev in self._events[:n]:
                t = self._in_flight.pop(ev.data, None)
                if t is None:
                    continue
                t.result = ev.res
                t._pin = None
                done.append(t)
            if n < self.max_events:
                break
        return done

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a completion or wake() (True), or until `timeout` s (False)."""
        ms = None if timeout is None else max(int(timeout * 1000), 0)
        if not self._poll.poll(ms):
            return False
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        return True

    def wake(self) -> None:
        """Make a wait() in another thread return (thread-safe; no-op once closed)."""
        fd = self.eventfd
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:
                if exc.errno != errno.EBADF:  # closed meanwhile
                    raise

    def cancel(self, transfer: Transfer) -> bool:
        """Ask the driver to dequeue `transfer`; its event still comes through reap().

        False when the request can no longer be cancelled (already finished, or
        the file does not support cancelling): its normal event comes instead."""
        if transfer.iocb.aio_data not in self._in_flight:
            return False
        result = IoEvent()
        rc = _syscall(ctypes.c_long(self._nr_cancel), self._ctx, ctypes.byref(transfer.iocb),
                      ctypes.byref(result))
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EINPROGRESS:
            return True
        if err in (errno.EINVAL, errno.EAGAIN):
            return False
        raise OSError(err, os.strerror(err))

    def close(self) -> None:
        """Destroy the context (the kernel cancels and waits for what is in flight)."""
        if self._ctx.value:
            _syscall(ctypes.c_long(self._nr_destroy), self._ctx)
            self._ctx = ctypes.c_ulong(0)
            for t in self._in_flight.values():
                t._pin = None
            self._in_flight.clear()
        if self.eventfd >= 0:
            self._poll.unregister(self.eventfd)
            os.close(self.eventfd)
            self.eventfd = -1


__all__ = ["AioContext", "AioUnavailable", "IoEvent", "Iocb", "Transfer"]
