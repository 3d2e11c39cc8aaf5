"""FunctionFS: descriptor and string blobs, ep0 events, bulk endpoint I/O.

We write the blobs ourselves rather than use the PyPI ``functionfs`` package
(python-functionfs 0.9.2): it is GPLv3+, pulls in ``libaio`` (ctypes over the
native libaio) and ``ioctl-opt``, and moves bulk data through fixed small AIO
blocks with completion callbacks, whereas Bulk-Only needs reads of an exact
length into our own preallocated buffers, which plain blocking read/write on
the endpoint files give us with a handful of struct constants.

Kernel interface: include/uapi/linux/usb/functionfs.h and
drivers/usb/gadget/function/f_fs.c.  Points that shape this module:

* ep0: writing the descriptors then the strings activates the function and
  creates the ep<N> files, numbered in descriptor order.
* Reading ep0 returns whole 12-byte events.  After a SETUP event the next ep0
  operation answers it: for a device-to-host request a write is the data stage
  and a read stalls; for host-to-device a read is the data/status stage and a
  write stalls.  A stall returns EL2HLT.
* On a bulk endpoint the "wrong" direction halts it: reading from an IN
  endpoint or writing to an OUT endpoint calls usb_ep_set_halt() and returns
  EBADMSG.
* I/O on a disabled endpoint fails with ESHUTDOWN (or waits for the next
  ENABLE when started while disabled); a signal interrupts a queued transfer,
  which f_fs then dequeues (EINTR), so nothing stale is left on the endpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from firmware.errors import MirrorUnitError

log = logging.getLogger("mirrorunit.gadget")

# -- include/uapi/linux/usb/functionfs.h -----------------------------------------------

FUNCTIONFS_DESCRIPTORS_MAGIC_V2 = 3
FUNCTIONFS_STRINGS_MAGIC = 2
FUNCTIONFS_HAS_FS_DESC = 1
FUNCTIONFS_HAS_HS_DESC = 2
FUNCTIONFS_HAS_SS_DESC = 4

#: magic, length, flags; then one u32 count per speed present
DESCS_HEAD_V2 = struct.Struct("<III")
assert DESCS_HEAD_V2.size == 12
DESC_COUNT = struct.Struct("<I")
assert DESC_COUNT.size == 4

#: magic, length, str_count, lang_count; then per language: u16 code + NUL-terminated strings
STRINGS_HEAD = struct.Struct("<IIII")
assert STRINGS_HEAD.size == 16
LANG_CODE = struct.Struct("<H")
assert LANG_CODE.size == 2

#: struct usb_functionfs_event: struct usb_ctrlrequest (bRequestType, bRequest,
#: wValue, wIndex, wLength), u8 type, 3 pad bytes
EVENT = struct.Struct("<BBHHHB3x")
assert EVENT.size == 12


class EventType(enum.IntEnum):
    BIND = 0
    UNBIND = 1
    ENABLE = 2
    DISABLE = 3
    SETUP = 4
    SUSPEND = 5
    RESUME = 6


# -- include/uapi/linux/usb/ch9.h ------------------------------------------------------

USB_DT_INTERFACE = 0x04
USB_DT_ENDPOINT = 0x05
USB_DT_SS_ENDPOINT_COMP = 0x30
USB_DIR_IN = 0x80
USB_ENDPOINT_XFER_BULK = 0x02
USB_CLASS_MASS_STORAGE = 0x08
USB_SC_SCSI = 0x06  # SCSI transparent command set
USB_PR_BULK = 0x50  # Bulk-Only Transport
LANG_EN_US = 0x0409

#: bLength, bDescriptorType, bInterfaceNumber, bAlternateSetting, bNumEndpoints,
#: bInterfaceClass, bInterfaceSubClass, bInterfaceProtocol, iInterface
INTERFACE_DESCRIPTOR = struct.Struct("<BBBBBBBBB")
assert INTERFACE_DESCRIPTOR.size == 9
#: bLength, bDescriptorType, bEndpointAddress, bmAttributes, wMaxPacketSize, bInterval
ENDPOINT_DESCRIPTOR = struct.Struct("<BBBBHB")
assert ENDPOINT_DESCRIPTOR.size == 7
#: bLength, bDescriptorType, bMaxBurst, bmAttributes, wBytesPerInterval
SS_EP_COMP_DESCRIPTOR = struct.Struct("<BBBBH")
assert SS_EP_COMP_DESCRIPTOR.size == 6

#: Endpoint numbers in our descriptors; f_fs names the files ep1, ep2 by
#: descriptor order, and the UDC assigns the real addresses.
BULK_IN_ADDRESS = USB_DIR_IN | 1
BULK_OUT_ADDRESS = 2
MAX_PACKET = {"fs": 64, "hs": 512, "ss": 1024}
#: SuperSpeed burst: up to 16 packets per burst, f_mass_storage uses the same idea.
SS_MAX_BURST = 15


class FunctionFsError(MirrorUnitError):
    """FunctionFS refused an operation or sent something unexpected."""


def _interface(string_index: int) -> bytes:
    return INTERFACE_DESCRIPTOR.pack(
        INTERFACE_DESCRIPTOR.size, USB_DT_INTERFACE, 0, 0, 2,
        USB_CLASS_MASS_STORAGE, USB_SC_SCSI, USB_PR_BULK, string_index,
    )


def _endpoint(address: int, max_packet: int) -> bytes:
    return ENDPOINT_DESCRIPTOR.pack(
        ENDPOINT_DESCRIPTOR.size, USB_DT_ENDPOINT, address, USB_ENDPOINT_XFER_BULK, max_packet, 0
    )


def _ss_companion() -> bytes:
    return SS_EP_COMP_DESCRIPTOR.pack(
        SS_EP_COMP_DESCRIPTOR.size, USB_DT_SS_ENDPOINT_COMP, SS_MAX_BURST, 0, 0
    )


def mass_storage_descriptors() -> bytes:
    """The v2 descriptor blob: one BBB interface, bulk IN + OUT, at full, high and super speed."""
    speeds: list[list[bytes]] = []
    for speed in ("fs", "hs", "ss"):
        mps = MAX_PACKET[speed]
        descs = [_interface(1), _endpoint(BULK_IN_ADDRESS, mps)]
        if speed == "ss":
            descs.append(_ss_companion())
        descs.append(_endpoint(BULK_OUT_ADDRESS, mps))
        if speed == "ss":
            descs.append(_ss_companion())
        speeds.append(descs)
    flags = FUNCTIONFS_HAS_FS_DESC | FUNCTIONFS_HAS_HS_DESC | FUNCTIONFS_HAS_SS_DESC
    counts = b"".join(DESC_COUNT.pack(len(d)) for d in speeds)
    body = counts + b"".join(b"".join(d) for d in speeds)
    length = DESCS_HEAD_V2.size + len(body)
    return DESCS_HEAD_V2.pack(FUNCTIONFS_DESCRIPTORS_MAGIC_V2, length, flags) + body


def strings_blob(strings: dict[int, list[str]]) -> bytes:
    """Strings for every language; each language must list the same number of strings."""
    counts = {len(v) for v in strings.values()}
    if len(counts) > 1:
        raise ValueError("every language needs the same number of strings")
    str_count = counts.pop() if counts else 0
    body = b"".join(
        LANG_CODE.pack(lang) + b"".join(s.encode() + b"\0" for s in values)
        for lang, values in strings.items()
    )
    length = STRINGS_HEAD.size + len(body)
    return STRINGS_HEAD.pack(FUNCTIONFS_STRINGS_MAGIC, length, str_count, len(strings)) + body


@dataclass(frozen=True)
class SetupRequest:
    bRequestType: int
    bRequest: int
    wValue: int
    wIndex: int
    wLength: int

    @property
    def device_to_host(self) -> bool:
        return bool(self.bRequestType & USB_DIR_IN)


@dataclass(frozen=True)
class Ep0Event:
    type: EventType | int
    setup: SetupRequest | None = None


def parse_events(data: bytes) -> Iterator[Ep0Event]:
    if len(data) % EVENT.size:
        raise FunctionFsError(f"ep0 returned {len(data)} bytes, not whole events")
    for off in range(0, len(data), EVENT.size):
        rtype, req, value, index, length, etype = EVENT.unpack_from(data, off)
        try:
            kind: EventType | int = EventType(etype)
        except ValueError:
            kind = etype
        setup = SetupRequest(rtype, req, value, index, length) if kind == EventType.SETUP else None
        yield Ep0Event(kind, setup)


# -- mounting --------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2


def mount_functionfs(instance: str, mountpoint: Path) -> None:
    """Mount the FunctionFS instance `instance` (the part after "ffs.") if not mounted yet."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mountpoint):
        return
    log.info("mount -t functionfs %s %s", instance, mountpoint)
    rc = _libc.mount(instance.encode(), str(mountpoint).encode(), b"functionfs", 0, None)
    if rc != 0:
        err = ctypes.get_errno()
        raise FunctionFsError(f"mount functionfs {instance} on {mountpoint}: {os.strerror(err)}")


def umount_functionfs(mountpoint: Path) -> None:
    if not os.path.ismount(mountpoint):
        return
    log.info("umount %s", mountpoint)
    if _libc.umount2(str(mountpoint).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise FunctionFsError(f"umount {mountpoint}: {os.strerror(err)}")


# -- endpoints -------------------------------------------------------------------------


class Ep0:
    """The control endpoint of one mounted FunctionFS instance."""

    def __init__(self, mountpoint: Path) -> None:
        self.fd = os.open(mountpoint / "ep0", os.O_RDWR | os.O_CLOEXEC)

    def activate(self, descriptors: bytes, strings: bytes) -> None:
        for name, blob in (("descriptors", descriptors), ("strings", strings)):
            try:
                written = os.write(self.fd, blob)
            except OSError as exc:
                raise FunctionFsError(f"ep0 refused {name}: {exc.strerror}") from exc
            if written != len(blob):
                raise FunctionFsError(f"ep0 took {written} of {len(blob)} bytes of {name}")

    def read_events(self) -> list[Ep0Event]:
        return list(parse_events(os.read(self.fd, EVENT.size * 8)))

    def reply(self, setup: SetupRequest, data: bytes) -> None:
        """Complete `setup`: data stage for IN, status (after reading data) for OUT."""
        if setup.device_to_host:
            os.write(self.fd, data[: setup.wLength])
        else:
            # f_fs clamps the read to wLength; a zero-length read acks the status stage.
            os.read(self.fd, max(setup.wLength, 1))

    def stall(self, setup: SetupRequest) -> None:
        try:
            if setup.device_to_host:
                os.read(self.fd, 1)
            else:
                os.write(self.fd, b"\0")
        except OSError as exc:
            if exc.errno != errno.EL2HLT:
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_libc_write = _libc.write
_libc_write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_libc_write.restype = ctypes.c_ssize_t


def _c_buffer(view: memoryview) -> bytes | ctypes.Array[ctypes.c_char]:
    """Something ctypes passes as a pointer to `view`'s bytes, copying only when it must."""
    if not view.readonly:
        return (ctypes.c_char * len(view)).from_buffer(view)
    base = view.obj
    if isinstance(base, bytes) and len(base) == len(view):
        return base
    return view.tobytes()


def write_fd(fd: int, data: bytes | memoryview,
             cancelled: Callable[[], bool] | None = None) -> None:
    """Write all of `data` to `fd`.

    os.write() retries after EINTR outside the main thread (PEP 475: only the main
    thread runs signal handlers), so a writer thread could never be pulled out of
    a transfer that a reset made stale.  With `cancelled`, the write goes through
    libc directly: EINTR comes back to us, and the transfer is abandoned (f_fs has
    dequeued it) when cancelled() is true, retried otherwise.
    """
    view = memoryview(data).cast("B")
    if cancelled is None:
        while view:
            view = view[os.write(fd, view):]
        return
    while view:
        n = _libc_write(fd, _c_buffer(view), len(view))
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                if cancelled():
                    raise InterruptedError(errno.EINTR, "bulk-in transfer cancelled")
                continue
            raise OSError(err, os.strerror(err))
        view = view[n:]


class BulkEndpoint:
    """ep1 (bulk IN) or ep2 (bulk OUT) of the instance; blocking I/O."""

    def __init__(self, mountpoint: Path, name: str, is_in: bool) -> None:
        self.name = name
        self.is_in = is_in
        # Read-write even for one direction: the opposite one is how a halt is asked for.
        self.fd = os.open(mountpoint / name, os.O_RDWR | os.O_CLOEXEC)

    def read_into(self, buffer: memoryview) -> int:
        """One bulk-out transfer into `buffer`; returns its length (short = host ended it)."""
        return os.readv(self.fd, [buffer])

    def write_all(self, data: bytes | memoryview,
                  cancelled: Callable[[], bool] | None = None) -> None:
        """One bulk-in transfer of `data` (f_fs completes a write as one request).

        With `cancelled`, a signal ends a blocked write (raising InterruptedError)
        when cancelled() says so, from whichever thread writes; see write_fd."""
        write_fd(self.fd, data, cancelled)

    def halt(self, timeout: float = 5.0) -> None:
        """Stall the endpoint (cleared by the host's CLEAR_FEATURE(ENDPOINT_HALT)).

        A UDC refuses to halt an IN endpoint while data is still in its FIFO
        (EAGAIN): a short write completes as soon as the FIFO holds it, before
        the host has read it.  Like f_mass_storage, retry until the host drained it.
        """
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                if self.is_in:
                    os.read(self.fd, 1)
                else:
                    os.write(self.fd, b"\0")
            except OSError as exc:
                if exc.errno == errno.EBADMSG:
                    return
                if exc.errno != errno.EAGAIN or time.monotonic() > deadline:
                    raise
            else:
                raise FunctionFsError(f"{self.name}: halt request transferred data instead")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
