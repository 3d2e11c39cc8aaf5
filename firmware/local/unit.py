"""Assembly of the local unit's process: storage, CBQ, volume, front end, control socket."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import __version__
from ..blockdev import DeviceState
from ..cbq import CbqFormatError, CircularBufferQueue, create
from ..cbq.format import SUPERBLOCK_SLOT
from ..control import ControlServer
from ..storage import FileStorage
from ..volume import CacheMode, Volume

log = logging.getLogger("mirrorunit.local")


class LocalUnitError(Exception):
    """The unit cannot start as configured; the message says why and what to do."""


@dataclass
class LocalSettings:
    disk: Path
    buffer: Path
    control: Path
    size: int | None = None
    buffer_size: int | None = None
    block_size: int = 512
    chunk_size: int = 65536
    nbd: str | None = "127.0.0.1:10809"
    export_name: str = "mirrorunit"
    cache_mode: CacheMode = CacheMode.WRITE_BACK
    cache_limit: int = 32 << 20
    flush_interval: float = 1.0
    high_water: float = 0.8
    peers: list[str] = field(default_factory=lambda: ["remote"])
    standby: bool = False
    #: The parsed command line, for services that added their own options.
    args: Any = None


class Service(Protocol):
    """Something the local unit runs beside its front end (a link to a peer, a USB
    front end, the UPS policy...).  `status()` is merged into the unit's status
    under `name`; `handlers()` adds control operations."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def handlers(self) -> dict[str, Any]: ...


#: Factories called with the unit once its volume is open; each returns a Service or
#: None when its options were not given.  Extension modules append to this list.
SERVICE_FACTORIES: list[Callable[[LocalUnit], Service | None]] = []


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


class LocalUnit:
    def __init__(self, settings: LocalSettings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self._stop = threading.Event()
        self.nbd: Any = None
        self.control: ControlServer | None = None
        self.services: list[Service] = []
        s = settings
        if s.block_size not in (512, 4096):
            raise LocalUnitError(f"block size {s.block_size} must be 512 or 4096")
        size = _prepare_file(s.disk, s.size, "disk")
        if size % s.block_size:
            raise LocalUnitError(f"disk size {size} is not a multiple of {s.block_size}")
        bsize = _prepare_file(s.buffer, s.buffer_size, "buffer")
        self.mirror = FileStorage(s.disk)
        self.cbq_storage = FileStorage(s.buffer)
        volume_blocks = size // s.block_size
        try:
            self.cbq = CircularBufferQueue(self.cbq_storage)
        except CbqFormatError as e:
            head = self.cbq_storage.pread(0, 2 * SUPERBLOCK_SLOT)
            if any(head):
                raise LocalUnitError(f"buffer {s.buffer} is not a usable CBQ ({e}); "
                                     "refusing to overwrite it") from e
            log.info("formatting buffer %s as a CBQ (%d bytes)", s.buffer, bsize)
            create(self.cbq_storage, volume_blocks=volume_blocks, block_size=s.block_size,
                   chunk_size=s.chunk_size, consumers=tuple(s.peers), high_water=s.high_water)
            self.cbq = CircularBufferQueue(self.cbq_storage)
        g = self.cbq.geo
        if (g.volume_blocks, g.block_size) != (volume_blocks, s.block_size):
            raise LocalUnitError(
                f"buffer {s.buffer} belongs to a volume of {g.volume_blocks} x {g.block_size}-"
                f"byte blocks, the disk has {volume_blocks} x {s.block_size}")
        for name in s.peers:
            if name not in self.cbq.consumers:
                self.cbq.add_consumer(name)
        self.volume = Volume(
            self.mirror, self.cbq, cache_mode=s.cache_mode, cache_limit=s.cache_limit,
            flush_interval=s.flush_interval,
            state=DeviceState.STANDBY if s.standby else DeviceState.READY)
        if self.volume.redone_records:
            log.warning("recovery: %d writes redone onto the local mirror",
                        self.volume.redone_records)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        s = self.settings
        self.volume.start()
        from ..cli import _extensions

        _extensions()  # lets extension modules register their service factories
        for factory in SERVICE_FACTORIES:
            service = factory(self)
            if service is not None:
                service.start()
                self.services.append(service)
                log.info("started %s", service.name)
        if s.nbd:
            from ..nbd.server import NbdServer, parse_hostport

            host, port = parse_hostport(s.nbd)
            self.nbd = NbdServer(self.volume, host, port, export_name=s.export_name)
            self.nbd.start()
            threading.Thread(target=self.nbd.serve_forever, name="nbd", daemon=True).start()
            log.info("NBD export %r on %s:%d", s.export_name, host, self.nbd.port)
        self.control = ControlServer(s.control, self.handlers())
        self.control.start()
        log.info("control socket %s", s.control)

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT.  A service that must own the main thread (one that
        relies on signals, like the USB front end) provides `run_main(stop_event)`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        main = next((s for s in self.services if hasattr(s, "run_main")), None)
        try:
            if main is not None:
                main.run_main(self._stop)  # type: ignore[attr-defined]
            else:
                self._stop.wait()
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception:  # stopping the rest matters more than this one's failure
                log.exception("stopping %s failed", service.name)
        if self.nbd is not None:
            self.nbd.stop()
        if self.control is not None:
            self.control.stop()
        self.volume.close()
        self.mirror.close()
        self.cbq_storage.close()
        log.info("stopped cleanly")

    # ---------------------------------------------------------------- control

    def handlers(self) -> dict[str, Any]:
        cbq, vol = self.cbq, self.volume

        def pause(side: str) -> dict[str, Any]:
            if side not in ("enqueue", "dequeue"):
                raise ValueError("side must be 'enqueue' or 'dequeue'")
            cbq.set_paused(**{side: True})
            return cbq.stats()

        def resume(side: str) -> dict[str, Any]:
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

    def status(self) -> dict[str, Any]:
        nbd = None
        if self.nbd is not None:
            host, port = self.nbd.address
            nbd = {"address": f"{host}:{port}", "export": self.settings.export_name,
                   "connections": self.nbd.connection_count}
        return {
            "role": "local",
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "disk": str(self.settings.disk),
            "buffer": str(self.settings.buffer),
            "nbd": nbd,
            "volume": self.volume.status(),
            "cbq": self.cbq.stats(),
            **{svc.name: svc.status() for svc in self.services},
        }
