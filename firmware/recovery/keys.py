"""The key of a sealed backup as the recovery exchange needs it (link.recovery.BackupKey)."""

from __future__ import annotations

from firmware.config.errors import SealFormatError
from firmware.config.seal import read_header
from firmware.link.recovery import BackupKey


def backup_key(blob: bytes) -> BackupKey:
    """The key `blob` is sealed under; `ValueError` if it is not a sealed config."""
    try:
        h = read_header(blob)
    except SealFormatError as exc:
        raise ValueError(str(exc)) from None
    return BackupKey(h.params.kdf, h.params.cost, h.salt, h.check)
