"""Errors of the circular buffer queue."""

from __future__ import annotations

from ..errors import MirrorUnitError
from ..record import IntegrityError


class CbqError(MirrorUnitError):
    """Base of every CBQ error."""


class CbqCorruption(CbqError, IntegrityError):
    """On-disk structure failed a check; carries where (an offset in the queue's storage)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        IntegrityError.__init__(self, None, offset, message)


class CbqFormatError(CbqError):
    """Not a CBQ, or a CBQ of an unsupported format or geometry."""


class CbqUsageError(CbqError):
    """A caller asked for something the queue cannot do (unknown consumer, bad range...)."""
