"""Circular buffer queue: the crash-safe, ordered log of every write of the volume."""

from .errors import CbqCorruption, CbqError, CbqFormatError, CbqUsageError
from .format import Mode, RecordKind
from .queue import (
    MIRROR_CONSUMER,
    CircularBufferQueue,
    Enqueued,
    NeedsReclaim,
    QueuedWrite,
    create,
    read_superblock,
)

__all__ = [
    "MIRROR_CONSUMER", "CbqCorruption", "CbqError", "CbqFormatError", "CbqUsageError",
    "CircularBufferQueue", "Enqueued", "Mode", "NeedsReclaim", "QueuedWrite", "RecordKind",
    "create", "read_superblock",
]
