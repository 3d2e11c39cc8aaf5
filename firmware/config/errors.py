"""Errors of the appliance configuration."""

from __future__ import annotations

from ..errors import MirrorUnitError


class ConfigError(MirrorUnitError):
    """A value was refused; names the field and why (never echoes a secret)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ConfigStoreError(MirrorUnitError):
    """The config partition could not be read or written."""


class SealError(MirrorUnitError):
    """Base of peer-backup blob errors."""


class SealFormatError(SealError):
    """Not a sealed config blob, or one of an unsupported version."""


class WrongPassword(SealError):
    """The admin password does not open this blob."""


class SealTampered(SealError):
    """The blob was altered after sealing (authentication tag mismatch)."""


class NetworkApplyError(MirrorUnitError):
    """Saved network settings could not be handed to the system (the file could not
    be written, or networkctl failed); the message names the step."""
