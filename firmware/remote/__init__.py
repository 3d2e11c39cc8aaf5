"""Remote unit: per-unit store (receive journal -> mirror), point-in-time history,
undo before commit, resync support, many virtual units per process."""

from .errors import (
    AlreadyApplied,
    GeometryMismatch,
    InvalidRecord,
    InvalidUnitId,
    JournalCorruption,
    NotRestorable,
    OutsideRetention,
    RemoteError,
    SeqGap,
    StoreUsageError,
    UnitBusy,
)
from .fileio import FileHandle, FileOps, OsFileOps
from .format import CHUNK_SIZE
from .store import RemoteStore
from .unit import (
    DropReport,
    PointInTime,
    PointInTimeDevice,
    Retention,
    RollbackReport,
    UnitStatus,
    UnitStore,
    validate_unit_id,
)

__all__ = [
    "CHUNK_SIZE", "AlreadyApplied", "DropReport", "FileHandle", "FileOps", "GeometryMismatch",
    "InvalidRecord", "InvalidUnitId", "JournalCorruption", "NotRestorable", "OsFileOps",
    "OutsideRetention", "PointInTime", "PointInTimeDevice", "RemoteError", "RemoteStore",
    "Retention", "RollbackReport", "SeqGap", "StoreUsageError", "UnitBusy", "UnitStatus",
    "UnitStore", "validate_unit_id",
]
