"""Errors of the UPS monitor."""

from __future__ import annotations


class UpsError(Exception):
    """Base of every UPS error."""


class UpsDriverError(UpsError):
    """The UPS hardware could not be set up or read."""
