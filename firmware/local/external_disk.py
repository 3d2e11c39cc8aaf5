"""External storage named by stable identity, found and watched through udev (pyudev).

A board that keeps the data (and maybe the buffer) on a USB or NVMe SSD cannot name it
by device node: /dev/sda today may be /dev/sdb after the next boot, or another disk
entirely.  It names it by what udev reads from the disk itself:

    serial:XYZ      ID_SERIAL or ID_SERIAL_SHORT of a whole disk (USB, NVMe, virtio)
    wwn:0x5000...   ID_WWN of a whole disk
    partuuid:UUID   ID_PART_ENTRY_UUID of a partition (GPT or MBR)
    uuid:UUID       ID_FS_UUID of whatever carries that filesystem/volume UUID

`resolve()` finds the one block device with that identity, `wait_for()` waits for it
at boot with a countdown on the console, `check_node()` refuses a configured path that
is not that disk and `open_storage()` checks on the open descriptor that it is still
that device (so nothing is ever written, let alone formatted, on a disk whose identity
is not the configured one), and `DiskWatcher`
follows udev add/remove/change events and tells the volume when its disk goes and
comes back.

The data disk comes back in place: the CBQ (on another device) is redone onto it.  The
buffer disk cannot: the queue's state in memory is ahead of what the disk kept when it
was pulled (its page cache and its own volatile cache went with it).  `BufferDiskService`
takes the volume offline when the buffer goes and, once it is back (with the data disk,
when that is external too), asks the unit to restart: the new process opens the queue
from what the disk holds, as after a power cut (records the host flushed are there, a
torn one is detected and not replayed, only durable records were ever sent to a peer)
and redoes it onto the mirror.

Only a small part of pyudev is used (Context.list_devices, Device.properties,
device_node, device_type, device_number, Monitor.poll), so tests pass a fake context.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..control.status import ExternalDiskStatus
from ..errors import MirrorUnitError
from ..storage import FileStorage, Storage
from ..volume import Volume

log = logging.getLogger("mirrorunit.disk")

#: identity kind -> (udev properties that may carry it, device types it applies to)
KINDS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "serial": (("ID_SERIAL", "ID_SERIAL_SHORT"), ("disk",)),
    "wwn": (("ID_WWN_WITH_EXTENSION", "ID_WWN"), ("disk",)),
    "partuuid": (("ID_PART_ENTRY_UUID",), ("partition",)),
    "uuid": (("ID_FS_UUID",), ("disk", "partition")),
}


class DiskIdentityError(MirrorUnitError):
    """A bad identity, a missing disk, or a device that is not the configured one."""


class UdevDevice(Protocol):
    """What is read of a pyudev.Device."""

    @property
    def properties(self) -> Mapping[str, str]: ...

    @property
    def device_node(self) -> str | None: ...

    @property
    def device_type(self) -> str | None: ...

    @property
    def device_number(self) -> int: ...


class UdevContext(Protocol):
    def list_devices(self, **match: Any) -> Iterable[Any]: ...


@dataclass(frozen=True, slots=True)
class DiskIdentity:
    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> DiskIdentity:
        kind, sep, value = text.partition(":")
        kind = kind.strip().lower()
        value = value.strip()
        if not sep or kind not in KINDS or not value:
            raise DiskIdentityError(
                f"disk identity {text!r} must be KIND:VALUE with KIND one of "
                f"{', '.join(KINDS)} (e.g. serial:S6XNNS0T123456)")
        if any(c.isspace() or not c.isprintable() for c in value):
            raise DiskIdentityError(f"disk identity {text!r}: the value has blanks or "
                                    "control characters")
        # UUIDs are compared as udev prints them, in lower case; serials are exact.
        return cls(kind, value.lower() if kind in ("partuuid", "uuid", "wwn") else value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    def matches(self, device: UdevDevice) -> bool:
        names, types = KINDS[self.kind]
        if device.device_type not in types or not device.device_node:
            return False
        props = device.properties
        for name in names:
            got = props.get(name)
            if got is None:
                continue
            if (got.lower() if self.kind != "serial" else got) == self.value:
                return True
        return False


def default_context() -> UdevContext:
    import pyudev

    return pyudev.Context()  # type: ignore[no-any-return]


def resolve(identity: DiskIdentity, context: UdevContext) -> UdevDevice | None:
    """The block device with `identity`, or None; two of them is an error (two disks
    with one serial, a cloned partition table): refusing beats guessing."""
    found = [d for d in context.list_devices(subsystem="block") if identity.matches(d)]
    if len(found) > 1:
        nodes = ", ".join(str(d.device_node) for d in found)
        raise DiskIdentityError(f"{identity} names more than one device ({nodes}); "
                                "refusing to choose")
    return found[0] if found else None


def wait_for(identity: DiskIdentity, context: UdevContext, *, timeout: float, what: str,
             say: Callable[[str], None] | None = None, interval: float = 0.5,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> UdevDevice:
    """Wait up to `timeout` seconds for the disk to appear, saying so about every 5 s
    ("waiting for data disk serial:XYZ (45 s left)"); DiskIdentityError when it does not."""
    say = say or log.warning
    deadline = clock() + timeout
    next_say = clock()
    while True:
        device = resolve(identity, context)
        if device is not None:
            log.info("%s %s is %s", what, identity, device.device_node)
            return device
        now = clock()
        left = deadline - now
        if left <= 0:
            raise DiskIdentityError(
                f"{what} {identity} did not appear within {timeout:g} s; connect it, or "
                "check the identity against `udevadm info --query=property /dev/<disk>`")
        if now >= next_say:
            say(f"waiting for {what} {identity} ({left:.0f} s left)")
            next_say = now + 5.0
        sleep(min(interval, left))


def check_node(identity: DiskIdentity, node: str, context: UdevContext) -> UdevDevice:
    """The udev device behind `node`, which must carry `identity` (a configured path
    and a configured identity that disagree are refused, whatever the disk holds)."""
    device = resolve(identity, context)
    try:
        rdev = os.stat(node).st_rdev
    except OSError as e:
        raise DiskIdentityError(f"{node}: {e.strerror}") from e
    if device is None or device.device_number != rdev:
        raise DiskIdentityError(f"{node} is not the disk with {identity}; refusing to use it")
    return device


class UdevMonitor(Protocol):
    def poll(self, timeout: float | None = None) -> Any: ...


def default_monitor(context: UdevContext) -> UdevMonitor:
    import pyudev

    monitor = pyudev.Monitor.from_netlink(context)  # udev's events: after its rules ran
    monitor.filter_by("block")
    monitor.start()
    return monitor  # type: ignore[no-any-return]


class DiskWatcher:
    """Follows one disk through udev: `lost(reason)` when it disappears, `found(device)`
    when it is back.  Every block event (and, in case one is missed, every `rescan`
    seconds) the identity is looked up again; only a change of presence is reported."""

    def __init__(self, identity: DiskIdentity, what: str, context: UdevContext, *,
                 lost: Callable[[str], None], found: Callable[[UdevDevice], None],
                 monitor: UdevMonitor | None = None, rescan: float = 2.0,
                 present: bool = True) -> None:
        self.identity, self.what = identity, what
        self._context = context
        self._monitor = monitor
        self._lost, self._found = lost, found
        self._rescan = rescan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.present = present
        self._reopen_failed = False
        self.node: str | None = None
        self.losses = 0
        self.returns = 0

    def start(self) -> None:
        if self._monitor is None:
            self._monitor = default_monitor(self._context)
        self._thread = threading.Thread(target=self._run, name="disk-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        assert self._monitor is not None
        while not self._stop.is_set():
            try:
                event = self._monitor.poll(timeout=self._rescan)
            except OSError as e:  # the netlink socket failed: fall back to rescanning
                log.error("udev monitor failed (%s); rescanning every %g s", e, self._rescan)
                self._stop.wait(self._rescan)
                event = None
            if self._stop.is_set():
                return
            action = getattr(event, "action", None) if event is not None else None
            try:
                self.check(action)
            except Exception:  # a callback failed: keep watching, the next event retries
                log.exception("handling a udev event for %s %s failed", self.what,
                              self.identity)

    def check(self, action: str | None = None) -> bool:
        """Look the disk up now and report a change of presence; returns presence."""
        try:
            device = resolve(self.identity, self._context)
        except DiskIdentityError as e:
            log.error("%s", e)
            device = None
        if device is None and self.present:
            self.present = False
            self.losses += 1
            reason = f"{self.what} {self.identity} disappeared" + (
                f" (udev {action})" if action else "")
            log.error("%s", reason)
            self._lost(reason)
        elif device is not None and not self.present and (action or not self._reopen_failed):
            log.warning("%s %s is back as %s", self.what, self.identity, device.device_node)
            try:
                self._found(device)
            except BaseException:
                # Retried at the next udev event for a block device, not at every rescan
                # (a disk that cannot take the redo would fill the log).
                self._reopen_failed = True
                raise
            # Only once the volume took it.
            self._reopen_failed = False
            self.present = True
            self.returns += 1
        if device is not None:
            self.node = device.device_node
        return self.present

    def status(self) -> ExternalDiskStatus:
        return {"identity": str(self.identity), "node": self.node if self.present else None,
                "present": self.present, "losses": self.losses, "returns": self.returns}


def open_storage(identity: DiskIdentity, device: UdevDevice) -> FileStorage:
    """The device as the volume's Storage, checked on its descriptor to be the device
    udev named for `identity`."""
    node = device.device_node
    if not node:
        raise DiskIdentityError(f"{identity}: the device has no node")
    storage = FileStorage(node)
    try:
        st = os.fstat(storage.fileno())
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != device.device_number:
            raise DiskIdentityError(f"{node} is not the device with {identity}; "
                                    "refusing to use it")
    except BaseException:
        storage.close()
        raise
    return storage


#: how long a disk that is still listed is looked at again after an I/O error: the kernel
#: fails the I/O of a disk being removed a while before the device leaves sysfs (seconds
#: on a loaded board), and that error must not count as a medium error
SETTLE_SECONDS = 3.0


def still_there(watchers: Iterable[DiskWatcher], settle: float | None = None) -> bool:
    """After an I/O error: are all these disks still there, looked at again for up to
    `settle` seconds (SETTLE_SECONDS by default)?  The watcher of one that is gone
    reports its loss."""
    watchers = list(watchers)
    deadline = time.monotonic() + (SETTLE_SECONDS if settle is None else settle)
    while all([w.check() for w in watchers]):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.1)
    return False


class _DiskService:
    """What the data and buffer disk services share: an I/O error on the volume looks
    the disk(s) up at once (`medium_check`) rather than at the next event.  The buffer
    disk's service starts after the data disk's and its check, which looks at both,
    takes the place of the data disk's."""

    volume: Volume
    watcher: DiskWatcher

    def medium_check(self, settle: float | None = None) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self.volume.medium_check = self.medium_check
        self.watcher.start()

    def stop(self) -> None:
        self.volume.medium_check = None
        self.watcher.stop()

    def status(self) -> ExternalDiskStatus:
        return self.watcher.status()

    def handlers(self) -> dict[str, Any]:
        return {}


class ExternalDiskService(_DiskService):
    """Keeps the volume's mirror on the disk with `identity`: OFFLINE when it goes, the
    CBQ redone onto it and ONLINE when the same disk is back (status "external_disk")."""

    name = "external_disk"

    def __init__(self, volume: Volume, identity: DiskIdentity, context: UdevContext, *,
                 monitor: UdevMonitor | None = None, node: str | None = None,
                 opener: Callable[[DiskIdentity, UdevDevice], Storage] = open_storage,
                 rescan: float = 2.0) -> None:
        self.volume = volume
        self.identity = identity
        self._opener = opener
        self.watcher = DiskWatcher(identity, "data disk", context, lost=volume.medium_lost,
                                   found=self._found, monitor=monitor, rescan=rescan)
        self.watcher.node = node
        #: the buffer disk's service when the buffer is external too (set by it)
        self.buffer: BufferDiskService | None = None

    def _found(self, device: UdevDevice) -> None:
        if self.buffer is not None and self.buffer.restart_pending:
            # The queue went too: nothing is redone in place, the unit restarts once
            # the buffer is back (now, if it already is).
            log.warning("data disk %s is back; the buffer disk went too, so the unit "
                        "restarts once both are here", self.identity)
            self.buffer.try_restart()
            return
        storage = self._opener(self.identity, device)
        try:
            self.volume.medium_returned(storage)
        except BaseException:
            storage.close()
            raise

    def medium_check(self, settle: float | None = None) -> bool:
        """After an I/O error: is the disk still there?"""
        return still_there([self.watcher], settle)



class BufferDiskService(_DiskService):
    """Watches the disk holding the CBQ (status "buffer_disk"): OFFLINE when it goes and,
    when it is back (with the data disk, if that is watched too), `on_restart(reason)`:
    the unit restarts and opens the queue from what the disk kept.  `on_restart` is set by
    the unit that runs the service."""

    name = "buffer_disk"

    def __init__(self, volume: Volume, identity: DiskIdentity, context: UdevContext, *,
                 data: ExternalDiskService | None = None, monitor: UdevMonitor | None = None,
                 node: str | None = None, rescan: float = 2.0) -> None:
        self.volume = volume
        self.identity = identity
        self._context = context
        self.data = data
        if data is not None:
            data.buffer = self
        self.on_restart: Callable[[str], None] | None = None
        self.restart_pending = False
        self.restart_requested: str | None = None
        self.watcher = DiskWatcher(identity, "buffer disk", context, lost=self._lost,
                                   found=self._found, monitor=monitor, rescan=rescan)
        self.watcher.node = node

    def _lost(self, reason: str) -> None:
        self.restart_pending = True
        self.volume.medium_lost(reason)

    def _found(self, device: UdevDevice) -> None:
        log.warning("buffer disk %s is back as %s", self.identity, device.device_node)
        self.try_restart(buffer_here=True)

    def try_restart(self, *, buffer_here: bool = False) -> None:
        """Restart the unit if the buffer went and everything it needs is here now."""
        if not self.restart_pending or self.restart_requested is not None:
            return
        here = buffer_here or resolve(self.identity, self._context) is not None
        data = self.data
        if data is not None and resolve(data.identity, self._context) is None:
            log.warning("buffer disk %s is back; waiting for data disk %s too",
                        self.identity, data.identity)
            return
        if not here:
            return
        reason = (f"buffer disk {self.identity} came back: the unit restarts to open its "
                  "queue from what the disk kept")
        log.critical("%s", reason)
        self.restart_requested = reason
        if self.on_restart is None:
            raise DiskIdentityError(f"{reason}, but nothing can restart it")
        self.on_restart(reason)

    def medium_check(self, settle: float | None = None) -> bool:
        """After an I/O error on the data path: are the buffer disk (and the data disk,
        when watched) still there?"""
        watchers = [self.watcher] + ([self.data.watcher] if self.data is not None else [])
        return still_there(watchers, settle)

