"""Errors of the circular buffer queue."""

from __future__ import annotations

from ..errors import MirrorUnitError


class CbqError(MirrorUnitError):
    """Base of every CBQ error."""


class CbqCorruption(CbqError):
    """On-disk structure failed a check; carries where."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{message}{where}")
        self.offset = offset


class CbqFormatError(CbqError):
    """Not a CBQ, or a CBQ of an unsupported format or geometry."""


class CbqUsageError(CbqError):
    """A caller asked for something the queue cannot do (unknown consumer, bad range...)."""
