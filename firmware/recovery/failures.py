"""What an operator is told when a recovery fails, for the command line and the console."""

from __future__ import annotations

from firmware.config.errors import (
    ConfigError,
    ConfigStoreError,
    SealFormatError,
    SealTampered,
    WrongPassword,
)
from firmware.link.errors import LinkRefused, PeerNotPinned, TlsIdentityError
from firmware.link.recovery import (
    ERR_DAMAGED,
    ERR_NAME_UNIT,
    ERR_NO_BACKUP,
    ERR_RATE_LIMITED,
    ERR_WRONG_PASSWORD,
)


def describe_recovery_failure(exc: BaseException, address: str) -> str:
    """One sentence an operator can act on, for each way a recovery fails."""
    if isinstance(exc, LinkRefused):
        if exc.code == ERR_WRONG_PASSWORD:
            return f"Wrong admin password: {exc.text}. Nothing was written."
        if exc.code == ERR_NO_BACKUP:
            return f"The peer at {address} keeps no config backup for this unit ({exc.text})."
        if exc.code == ERR_RATE_LIMITED:
            return f"The peer refuses more attempts for now: {exc.text}."
        if exc.code == ERR_DAMAGED:
            return f"The peer's copy is damaged: {exc.text}."
        if exc.code == ERR_NAME_UNIT:
            return f"The peer keeps several units' backups: give this unit's id ({exc.text})."
        return f"The peer at {address} refused: {exc.code}: {exc.text}."
    if isinstance(exc, PeerNotPinned):
        return f"Wrong peer fingerprint, nothing fetched: {exc}."
    if isinstance(exc, WrongPassword):
        return "Wrong admin password: the backup does not open. Nothing was written."
    if isinstance(exc, SealTampered | SealFormatError):
        return f"The peer's copy of the backup is damaged ({exc}); nothing was written."
    if isinstance(exc, ConfigStoreError | ConfigError | TlsIdentityError):
        return f"Refused, nothing was written: {exc}."
    if isinstance(exc, OSError):
        why = exc.strerror or str(exc) or type(exc).__name__
        return f"Cannot reach the peer at {address}: {why}."
    return f"Recovery failed: {exc}."
