"""Many virtual remote units in one process, each in its own directory under a root."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from firmware.remote.errors import InvalidUnitId, UnitBusy
from firmware.remote.fileio import FileOps, OsFileOps
from firmware.remote.stateblocks import SketchSettings
from firmware.remote.unit import (
    DEFAULT_SEGMENT_BYTES,
    STATE_NAME,
    Retention,
    UnitStatus,
    UnitStore,
    validate_unit_id,
)


class RemoteStore:
    """The remote side's units: `root_dir/<unit id>/`.

    A unit is open at most once at a time: an in-process registry refuses a second
    open here, and the unit's flock refuses other processes, so two connections can
    never write one unit."""

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        *,
        clock: Callable[[], int] | None = None,
        ops: FileOps | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        state_blocks: SketchSettings | None = None,
    ) -> None:
        self.root_dir = os.fspath(root_dir)
        self._state_blocks = state_blocks
        self._clock = clock
        self._ops: FileOps = ops if ops is not None else OsFileOps()
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._open: dict[str, UnitStore] = {}
        self._ops.makedirs(self.root_dir)

    def unit_dir(self, unit_id: str) -> str:
        return os.path.join(self.root_dir, validate_unit_id(unit_id))

    def open_unit(
        self,
        unit_id: str,
        volume_size: int,
        block_size: int = 512,
        *,
        retention: Retention | None = None,
        commit_delay_s: float | None = None,
    ) -> UnitStore:
        """Open (creating on first use) a unit for writing.  Raises InvalidUnitId,
        UnitBusy (already open, here or in another process) or GeometryMismatch
        (the unit exists with another size or block size)."""
        path = self.unit_dir(unit_id)
        with self._lock:
            if unit_id in self._open:
                raise UnitBusy(
                    f"unit {unit_id!r} is already open in this process; "
                    "a unit accepts one writer at a time"
                )
            unit = UnitStore(
                path, unit_id, volume_size, block_size,
                retention=retention, commit_delay_s=commit_delay_s, clock=self._clock,
                ops=self._ops, segment_bytes=self._segment_bytes, on_close=self._closed,
                state_blocks=self._state_blocks,
            )
            self._open[unit_id] = unit
            return unit

    def _closed(self, unit: UnitStore) -> None:
        with self._lock:
            if self._open.get(unit.unit_id) is unit:
                del self._open[unit.unit_id]

    def get(self, unit_id: str) -> UnitStore | None:
        """The open unit with this id, if any."""
        with self._lock:
            return self._open.get(unit_id)

    def unit_ids(self) -> list[str]:
        """Every unit stored under the root (open or not)."""
        out = []
        for name in self._ops.listdir(self.root_dir):
            try:
                validate_unit_id(name)
            except InvalidUnitId:
                continue
            if self._ops.exists(os.path.join(self.root_dir, name, STATE_NAME)):
                out.append(name)
        return sorted(out)

    def status(self) -> dict[str, UnitStatus]:
        """Status of every unit open in this process."""
        with self._lock:
            units = list(self._open.values())
        return {u.unit_id: u.status() for u in units}

    def close(self) -> None:
        """Close every open unit."""
        with self._lock:
            units = list(self._open.values())
        for u in units:
            u.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
