"""The one interface between front ends (USB, NBD) and the data path.

Shaped after nbdkit's plugin API: a device has a size and a logical block size,
and offers positional read/write, flush and trim.  Offsets and lengths are in
bytes; front ends translate their own addressing (LBAs, NBD offsets) and check
bounds before calling, but every implementation checks them again.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from .errors import MirrorUnitError


class DeviceState(enum.Enum):
    READY = "ready"
    #: Hot standby of a secondary unit: size is visible, data access is refused.
    STANDBY = "standby"
    OFFLINE = "offline"


class BlockDeviceError(MirrorUnitError):
    """Base of errors a BlockDevice reports to its front end."""


class OutOfRange(BlockDeviceError):
    pass


class NotReady(BlockDeviceError):
    pass


class MediumNotPresent(NotReady):
    """The device's backing disk is gone (unplugged); it may come back."""


class WriteProtected(BlockDeviceError):
    pass


class MediumError(BlockDeviceError):
    """The backing store failed (EIO, ENOSPC...). Carries the errno when known."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


@runtime_checkable
class BlockDevice(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def state(self) -> DeviceState: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def write_cache_enabled(self) -> bool:
        """True when a completed write may still be volatile until flush()."""
        ...

    @property
    def supports_trim(self) -> bool: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...


class FrontEnd(enum.IntEnum):
    """Which front end a host command came through (recorded with barriers; 4 bits)."""

    NBD = 1
    SCSI = 2


@dataclass(frozen=True, slots=True)
class HostCommand:
    """The host's command that declared its writes durable: a FLUSH, a SYNCHRONIZE
    CACHE, or a write with FUA once its data is all in.  `opcode` is the front end's
    own (an NBD command number, a SCSI operation code); `connection` tells the
    front end's connections (or initiators) apart."""

    front_end: FrontEnd
    opcode: int
    fua: bool = False
    connection: int = 0


@runtime_checkable
class RecordsBarriers(Protocol):
    """Optional for a BlockDevice: it keeps the instants the host declared its data
    durable (the local volume records them in its queue as consistent points)."""

    def flush_barrier(self, command: HostCommand) -> None:
        """flush(), recording the instant as a barrier."""
        ...

    def pwrite_barrier(self, offset: int, data: bytes | memoryview,
                       command: HostCommand) -> None:
        """pwrite(fua=True), recording its completion as a barrier."""
        ...


def flush_for(device: BlockDevice, command: HostCommand) -> None:
    """The host's FLUSH / SYNCHRONIZE CACHE: a barrier where the device keeps them."""
    if isinstance(device, RecordsBarriers):
        device.flush_barrier(command)
    else:
        device.flush()


def pwrite_for(device: BlockDevice, offset: int, data: bytes | memoryview, fua: bool,
               command: HostCommand | None) -> None:
    """A host write; with FUA and a `command`, its completion is a barrier where the
    device keeps them.  A FUA write split in pieces passes `command` with its last."""
    if fua and command is not None and isinstance(device, RecordsBarriers):
        device.pwrite_barrier(offset, data, command)
    else:
        device.pwrite(offset, data, fua)


class ReadInto(Protocol):
    """Optional for a BlockDevice: `pread_into(offset, buffer)` fills `buffer` with
    the bytes at `offset`, with the checks and errors of pread().  Lets a reader
    keep one buffer for every read instead of a fresh object per read (fresh
    memory costs page faults, with transparent huge pages a 2 MiB clear each)."""

    def pread_into(self, offset: int, buffer: memoryview) -> None: ...


def check_range(dev: BlockDevice, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > dev.size:
        raise OutOfRange(f"range {offset}+{length} outside device of {dev.size} bytes")


class ServedDevice:
    """The common part of a device served over another object's storage (a remote
    unit's mirror, a point in time of it, a clone of one): a geometry fixed when it
    is made, READY until close() and OFFLINE after, and no trim.  A subclass says
    whether it is read-only and caches writes, and gives pread/pwrite/flush."""

    read_only = False
    #: True when a completed write may sit in a page cache until flush() or FUA.
    write_cache_enabled = True
    supports_trim = False
    _closed_message: ClassVar[str] = "the device is closed"
    #: Why trim is refused (and, on a read-only device, writes).
    _write_refusal: ClassVar[str] = "this device does not support trim"

    def __init__(self, size: int, block_size: int) -> None:
        self.size = size
        self.block_size = block_size
        self._closed = False

    @property
    def state(self) -> DeviceState:
        return DeviceState.OFFLINE if self._closed else DeviceState.READY

    def _check(self) -> None:
        if self._closed:
            raise NotReady(self._closed_message)

    def trim(self, offset: int, length: int) -> None:
        raise WriteProtected(self._write_refusal)

    def close(self) -> None:
        self._closed = True


class FileBlockDevice:
    """A plain file (or block device node) as a BlockDevice; no journaling.

    Used as the backing of the local mirror, as a baseline in benchmarks, and as
    a simple device for front-end tests.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        block_size: int = 512,
        read_only: bool = False,
        create: bool = False,
    ) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        self._fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        actual = os.lseek(self._fd, 0, os.SEEK_END)
        if size is None:
            size = actual
        elif actual < size:
            if read_only:
                raise BlockDeviceError(f"{path}: {actual} bytes, expected {size}")
            os.ftruncate(self._fd, size)
        if size % block_size:
            raise BlockDeviceError(f"size {size} is not a multiple of block size {block_size}")
        self._size = size
        self._block_size = block_size
        self._read_only = read_only
        self._state = DeviceState.READY
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def state(self) -> DeviceState:
        return self._state

    @state.setter
    def state(self, value: DeviceState) -> None:
        self._state = value

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def write_cache_enabled(self) -> bool:
        return True

    @property
    def supports_trim(self) -> bool:
        return True

    def _check_ready(self) -> None:
        if self._state is not DeviceState.READY:
            raise NotReady(f"device is {self._state.value}")

    def pread(self, offset: int, length: int) -> bytes:
        self._check_ready()
        check_range(self, offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # sparse tail past EOF of a growing file
            data += bytes(length - len(data))
        return data

    def pread_into(self, offset: int, buffer: memoryview) -> None:
        """pread() into the caller's buffer (ReadInto), which may be reused across
        reads: no fresh memory on the data path."""
        self._check_ready()
        check_range(self, offset, len(buffer))
        view = buffer.cast("B") if buffer.format != "B" else buffer
        while view:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:  # sparse tail past EOF of a growing file
                view[:] = bytes(len(view))
                break
            view = view[n:]
            offset += n

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check_ready()
        if self._read_only:
            raise WriteProtected("device is read-only")
        check_range(self, offset, len(data))
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(self._fd, view, offset)
                view = view[n:]
                offset += n
            if fua:
                os.fdatasync(self._fd)
        except OSError as e:
            raise MediumError(f"write failed: {e.strerror}", e.errno) from e

    def flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise MediumError(f"flush failed: {e.strerror}", e.errno) from e

    def trim(self, offset: int, length: int) -> None:
        self._check_ready()
        if self._read_only:
            raise WriteProtected("device is read-only")
        check_range(self, offset, length)
        # Punching a hole keeps the file's size and reads back zeroes.
        try:
            _punch_hole(self._fd, offset, length)
        except OSError:
            self.pwrite(offset, bytes(length))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    rc = libc.fallocate(
        fd,
        falloc_fl_keep_size | falloc_fl_punch_hole,
        ctypes.c_int64(offset),
        ctypes.c_int64(length),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
