"""Errors of the remote store: one tree, rooted at `RemoteError`."""

from __future__ import annotations

from ..errors import MirrorUnitError
from ..record import IntegrityError


class RemoteError(MirrorUnitError):
    """Base of every remote-store error."""


class InvalidUnitId(RemoteError):
    """A unit id that is not safe as a directory name."""


class UnitBusy(RemoteError):
    """The unit is already open for writing (in this process or another one)."""


class GeometryMismatch(RemoteError):
    """The unit exists with another volume size or block size."""


class SeqGap(RemoteError):
    """A record's seq does not follow the last durable seq by exactly one."""


class InvalidRecord(RemoteError):
    """A record outside the volume or not a whole number of blocks."""


class JournalCorruption(RemoteError, IntegrityError):
    """An on-disk record failed a check somewhere a torn tail cannot explain."""

    def __init__(self, message: str, path: str | None = None, offset: int | None = None) -> None:
        IntegrityError.__init__(self, path, offset, message)


class OutsideRetention(RemoteError):
    """A point in time older than the oldest restorable one, or not reconstructible."""

    def __init__(self, message: str, oldest_seq: int, oldest_ns: int) -> None:
        super().__init__(message)
        self.oldest_seq = oldest_seq
        self.oldest_ns = oldest_ns


class NotRestorable(RemoteError):
    """A seq whose image cannot be rebuilt: undone by a rollback, inside a resync,
    or not applied to the mirror yet."""


class AlreadyApplied(RemoteError):
    """drop_range() was asked to drop writes that already reached the mirror."""


class StoreUsageError(RemoteError):
    """A caller asked for something the store cannot do in its current state."""


class Promoted(RemoteError):
    """The unit was promoted: it is a primary of its own and takes no replication."""


class PromoteRefused(RemoteError):
    """A promotion that would override a live primary without `force`, or one the unit
    cannot make (a resync running, a point the history does not hold)."""
