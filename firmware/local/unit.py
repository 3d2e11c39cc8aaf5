"""The local unit's process: the data path (disk, CBQ, volume), the services given to it
(front ends, replication, UPS), and the control socket.

The unit does not choose its services: whoever builds it (firmware/apps/local) opens the
data path, constructs each service over it and hands them in."""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from firmware.errors import MirrorUnitError

from .. import COPYRIGHT, LICENSE, __version__
from ..blockdev import DeviceState
from ..cbq import CbqFormatError, CircularBufferQueue, create
from ..cbq.format import SUPERBLOCK_SLOT
from ..control import ControlServer
from ..control.status import CbqStats, LocalStatus, NbdStatus
from ..storage import FileStorage
from ..volume import CacheMode, Volume
from .external_disk import (
    DiskIdentity,
    DiskIdentityError,
    UdevContext,
    UdevDevice,
    check_node,
    default_context,
    wait_for,
)

log = logging.getLogger("mirrorunit.local")


#: Write-through, at every entry point (the CLI, the config, the appliance, the demo):
#: write-back acknowledges from RAM and is only safe with a working UPS.
DEFAULT_CACHE_MODE = CacheMode.WRITE_THROUGH


class LocalUnitError(MirrorUnitError):
    """The unit cannot start as configured; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class LocalSettings:
    """The data path and the control socket; each service has settings of its own."""

    disk: Path
    buffer: Path
    control: Path
    size: int | None = None
    buffer_size: int | None = None
    block_size: int = 512
    chunk_size: int = 65536
    cache_mode: CacheMode = DEFAULT_CACHE_MODE
    cache_limit: int = 32 << 20
    flush_interval: float = 1.0
    high_water: float = 0.8
    #: The CBQ consumers a new queue is created with (and that an old one gains).
    peers: tuple[str, ...] = ("remote",)
    standby: bool = False
    #: The model of a UPS that a separate `mirrorunit ups` process watches for this unit
    #: (the appliance's); None: no such process.  Said at start and in status.
    external_ups: str | None = None
    #: The stable identity (serial:..., partuuid:..., uuid:..., wwn:...) of the disk that
    #: `disk` and `buffer` must be: the unit waits up to `device_wait` seconds for each at
    #: start and refuses a path that is another disk.  With `disk_id` the data disk is
    #: also watched: OFFLINE while it is unplugged, back ONLINE when it returns.
    disk_id: str | None = None
    buffer_id: str | None = None
    device_wait: float = 45.0


class Service(Protocol):
    """Something the local unit runs beside its front end (a link to a peer, a USB
    front end, the UPS policy...).  `status()` is merged into the unit's status
    under `name`; `handlers()` adds control operations."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> Mapping[str, Any]: ...

    def handlers(self) -> dict[str, Any]: ...


def _prepare_file(path: Path, size: int | None, what: str) -> int:
    """Create `path` with `size` bytes reserved, or check an existing one; returns its size."""
    if path.exists():
        actual = path.stat().st_size if path.is_file() else _device_size(path)
        if size is not None and size != actual:
            raise LocalUnitError(
                f"{what} {path} holds {actual} bytes but {size} were asked for; "
                "resizing is not done implicitly")
        if actual == 0:
            raise LocalUnitError(f"{what} {path} is empty; give its size to create it")
        return actual
    if size is None:
        raise LocalUnitError(f"{what} {path} does not exist; give its size to create it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            # Reserve the space now: a full disk is refused here, not on a later write.
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            fd = -1
            path.unlink()
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise LocalUnitError(f"not enough space for a {size}-byte {what} at {path}: "
                                     f"{e.strerror}") from e
            raise
    finally:
        if fd >= 0:
            os.close(fd)
    log.info("created %s %s (%d bytes)", what, path, size)
    return size


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class DataPath:
    """The disk and the CBQ, opened and checked against each other, and the volume over
    them.  Services are built over it before the unit runs them."""

    mirror: FileStorage
    cbq_storage: FileStorage
    cbq: CircularBufferQueue
    volume: Volume
    #: the data disk's identity and the udev context it was found in, when named by one
    disk_identity: DiskIdentity | None = None
    udev: UdevContext | None = None
    #: the buffer disk's identity, when named by one
    buffer_identity: DiskIdentity | None = None

    @classmethod
    def open(cls, s: LocalSettings, udev: UdevContext | None = None) -> DataPath:
        """`udev`: where disks named by identity are looked up (pyudev's by default)."""
        if s.block_size not in (512, 4096):
            raise LocalUnitError(f"block size {s.block_size} must be 512 or 4096")
        named: dict[str, tuple[DiskIdentity, UdevDevice]] = {}
        for text, path, what in ((s.disk_id, s.disk, "data disk"),
                                 (s.buffer_id, s.buffer, "buffer disk")):
            if text is not None:
                if udev is None:
                    udev = default_context()
                named[what] = _wait_for_disk(text, path, what, s.device_wait, udev)
        size = _prepare_file(s.disk, s.size, "disk")
        if size % s.block_size:
            raise LocalUnitError(f"disk size {size} is not a multiple of {s.block_size}")
        bsize = _prepare_file(s.buffer, s.buffer_size, "buffer")
        mirror = FileStorage(s.disk)
        cbq_storage = FileStorage(s.buffer)
        try:
            # Checked on the open descriptors, before anything is read or formatted:
            # the node could have become another disk since it was looked up.
            for what, storage in (("data disk", mirror), ("buffer disk", cbq_storage)):
                if what in named:
                    _check_open(*named[what], storage)
            cbq = _open_cbq(s, cbq_storage, size // s.block_size, bsize)
            volume = Volume(
                mirror, cbq, cache_mode=s.cache_mode, cache_limit=s.cache_limit,
                flush_interval=s.flush_interval,
                state=DeviceState.STANDBY if s.standby else DeviceState.READY)
        except BaseException:
            mirror.close()
            cbq_storage.close()
            raise
        if volume.redone_records:
            log.warning("recovery: %d writes redone onto the local mirror",
                        volume.redone_records)
        disk, buffer = named.get("data disk"), named.get("buffer disk")
        return cls(mirror, cbq_storage, cbq, volume, disk[0] if disk else None, udev,
                   buffer[0] if buffer else None)

    def close(self) -> None:
        self.volume.close()
        self.mirror.close()
        # The disk's storage since it came back, if it went away meanwhile.
        self.volume.mirror.close()
        self.cbq_storage.close()


def _wait_for_disk(text: str, path: Path, what: str, timeout: float,
                   udev: UdevContext) -> tuple[DiskIdentity, UdevDevice]:
    try:
        identity = DiskIdentity.parse(text)
        wait_for(identity, udev, timeout=timeout, what=what)
        return identity, check_node(identity, str(path), udev)
    except DiskIdentityError as e:
        raise LocalUnitError(str(e)) from e


def _check_open(identity: DiskIdentity, device: UdevDevice, storage: FileStorage) -> None:
    st = os.fstat(storage.fileno())
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != device.device_number:
        raise LocalUnitError(f"{storage.path} is not the disk with {identity}; refusing to "
                             "use it")


def _open_cbq(s: LocalSettings, storage: FileStorage, volume_blocks: int,
              bsize: int) -> CircularBufferQueue:
    try:
        cbq = CircularBufferQueue(storage)
    except CbqFormatError as e:
        head = storage.pread(0, 2 * SUPERBLOCK_SLOT)
        if any(head):
            raise LocalUnitError(f"buffer {s.buffer} is not a usable CBQ ({e}); "
                                 "refusing to overwrite it") from e
        log.info("formatting buffer %s as a CBQ (%d bytes)", s.buffer, bsize)
        create(storage, volume_blocks=volume_blocks, block_size=s.block_size,
               chunk_size=s.chunk_size, consumers=tuple(s.peers), high_water=s.high_water)
        cbq = CircularBufferQueue(storage)
    g = cbq.geo
    if (g.volume_blocks, g.block_size) != (volume_blocks, s.block_size):
        raise LocalUnitError(
            f"buffer {s.buffer} belongs to a volume of {g.volume_blocks} x {g.block_size}-"
            f"byte blocks, the disk has {volume_blocks} x {s.block_size}")
    for name in s.peers:
        if name not in cbq.consumers:
            cbq.add_consumer(name)
    return cbq


class NbdFrontEnd:
    """The volume as an NBD export (status under "nbd")."""

    name = "nbd"

    def __init__(self, volume: Volume, address: str, export_name: str = "mirrorunit") -> None:
        from ..nbd.server import NbdServer, parse_hostport

        self.export_name = export_name
        host, port = parse_hostport(address)
        self.server = NbdServer(volume, host, port, export_name=export_name)

    def start(self) -> None:
        self.server.start()
        threading.Thread(target=self.server.serve_forever, name="nbd", daemon=True).start()
        host, port = self.server.address
        log.info("NBD export %r on %s:%d", self.export_name, host, port)

    def stop(self) -> None:
        self.server.stop()

    def status(self) -> NbdStatus:
        host, port = self.server.address
        return {"address": f"{host}:{port}", "export": self.export_name,
                "connections": self.server.connection_count}

    def handlers(self) -> dict[str, Any]:
        return {}


class LocalUnit:
    def __init__(self, settings: LocalSettings, services: Sequence[Service] = (), *,
                 data: DataPath | None = None) -> None:
        """`data` is the data path the services were built over; without it (a unit with
        no services) the unit opens its own."""
        self.settings = settings
        self.started_at = time.time()
        self._stop = threading.Event()
        self.control: ControlServer | None = None
        self.data = data if data is not None else DataPath.open(settings)
        self.mirror = self.data.mirror
        self.cbq_storage = self.data.cbq_storage
        self.cbq = self.data.cbq
        self.volume = self.data.volume
        #: what the unit runs, in start order (stopped in reverse)
        self.services: list[Service] = list(services)
        #: the ones started so far
        self._running: list[Service] = []
        #: why the unit asked to be restarted (run_forever then returns), or None
        self.restart_reason: str | None = None
        for service in self.services:
            if hasattr(service, "on_restart"):
                service.on_restart = self.request_restart  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        s = self.settings
        self.volume.start()
        for service in self.services:
            service.start()
            self._running.append(service)
            log.info("started %s", service.name)
        self.control = ControlServer(s.control, self.handlers())
        self.control.start()
        log.info("control socket %s", s.control)
        self._log_power()

    def ups_backing(self) -> str | None:
        """What backs this unit against a power cut, or None."""
        if any(svc.name == "ups" for svc in self.services):
            return "UPS monitor in this unit"
        if self.settings.external_ups:
            return f"{self.settings.external_ups} UPS watched by `mirrorunit ups`"
        return None

    def _log_power(self) -> None:
        mode, ups = self.volume.cache_mode, self.ups_backing()
        if mode is CacheMode.WRITE_BACK and ups is None:
            log.warning("cache mode write-back with no UPS: writes acknowledged from RAM "
                        "are lost on a power cut until flushed")
        elif mode is CacheMode.WRITE_BACK:
            log.info("cache mode write-back, backed by %s (write-through on battery)", ups)
        else:
            log.info("cache mode write-through: a write is acknowledged once on the mirror "
                     "and in the CBQ; UPS: %s", ups or "none")

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT.  A service that must own the main thread (one that
        relies on signals, like the USB front end) provides `run_main(stop_event)`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        main = next((s for s in self._running if hasattr(s, "run_main")), None)
        try:
            if main is not None:
                main.run_main(self._stop)  # type: ignore[attr-defined]
            else:
                self._stop.wait()
        finally:
            self.stop()

    @property
    def stopping(self) -> threading.Event:
        """Set once the unit is asked to stop (or restart)."""
        return self._stop

    def request_restart(self, reason: str) -> None:
        """Stop, and have the caller of run_forever start the unit again (its buffer
        disk came back: the queue is opened anew from the disk)."""
        self.restart_reason = reason
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        while self._running:
            service = self._running.pop()
            try:
                service.stop()
            except Exception:  # stopping the rest matters more than this one's failure
                log.exception("stopping %s failed", service.name)
        if self.control is not None:
            self.control.stop()
        try:
            self.data.close()
        except OSError as e:
            if self.restart_reason is None:
                raise
            # The buffer disk went: what the queue held in memory is not written back
            # (the restart opens it from the disk).
            log.warning("closing the data path of the lost disk: %s", e)
        log.info("stopped cleanly")

    # ---------------------------------------------------------------- control

    def handlers(self) -> dict[str, Any]:
        cbq, vol = self.cbq, self.volume

        def pause(side: str) -> CbqStats:
            if side not in ("enqueue", "dequeue"):
                raise ValueError("side must be 'enqueue' or 'dequeue'")
            cbq.set_paused(**{side: True})
            return cbq.stats()

        def resume(side: str) -> CbqStats:
            if side not in ("enqueue", "dequeue"):
                raise ValueError("side must be 'enqueue' or 'dequeue'")
            cbq.set_paused(**{side: False})
            return cbq.stats()

        def discard(first: int, last: int) -> dict[str, Any]:
            return {"discarded": cbq.discard(int(first), int(last))}

        def set_state(state: str) -> str:
            vol.set_state(DeviceState(state))
            return vol.state.value

        def set_cache_mode(mode: str) -> str:
            vol.flush()
            vol.cache_mode = CacheMode(mode)
            return vol.cache_mode.value

        def read(consumer: str, max_records: int = 64) -> list[dict[str, Any]]:
            return [{"seq": w.seq, "lbn": w.lbn, "nblocks": w.nblocks, "data": w.data,
                     "compact": w.compact, "timestamp_ns": w.timestamp_ns}
                    for w in cbq.read(consumer, max_records=max_records)]

        extra: dict[str, Any] = {}
        for service in self.services:
            extra.update(service.handlers())
        return {
            **extra,
            "status": self.status,
            "cbq.pause": pause,
            "cbq.resume": resume,
            "cbq.discard": discard,
            "cbq.checkpoint": lambda: cbq.checkpoint(),
            "cbq.read": read,
            "cbq.ack": lambda consumer, seq: cbq.ack(consumer, int(seq)),
            "cbq.rewind": lambda consumer: cbq.rewind(consumer),
            "cbq.consumer_add": lambda name: cbq.add_consumer(name),
            "cbq.consumer_remove": lambda name: cbq.remove_consumer(name),
            "cbq.dirty_chunks": lambda: cbq.dirty_chunks(),
            "cbq.verify": lambda: cbq.verify(),
            "volume.flush": lambda: vol.flush_cache(),
            "volume.set_state": set_state,
            "volume.set_cache_mode": set_cache_mode,
        }

    def status(self) -> LocalStatus:
        out: LocalStatus = {
            "role": "local",
            "version": __version__,
            # what the panel's about screen shows beside the version
            "copyright": COPYRIGHT,
            "license": LICENSE,
            "uptime_s": round(time.time() - self.started_at, 1),
            "disk": str(self.settings.disk),
            "buffer": str(self.settings.buffer),
            # Always present, None without the NBD front end; its service fills it in
            # place (readers of `status --json` find the keys in the order they know).
            "nbd": None,
            "volume": self.volume.status(),
            # the durability the host gets: the cache mode and what backs it
            "power": {"cache_mode": self.volume.cache_mode.value, "ups": self.ups_backing()},
            "cbq": self.cbq.stats(),
        }
        # Each service's part under its name ("link", "usb", "ups", "nbd"): the names and
        # shapes are the NotRequired keys of LocalStatus; the integration tests read a
        # running unit's answer through read_local_status to hold them to it.
        parts = cast(dict[str, Any], out)
        for svc in self._running:
            parts[svc.name] = svc.status()
        return out
