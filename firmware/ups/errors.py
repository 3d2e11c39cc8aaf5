"""Errors of the UPS monitor."""

from __future__ import annotations

from ..errors import MirrorUnitError


class UpsError(MirrorUnitError):
    """Base of every UPS error."""


class UpsDriverError(UpsError):
    """The UPS hardware could not be set up or read."""
