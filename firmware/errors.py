"""The root of MirrorUnit's error trees.

Each domain keeps its own tree (`BlockDeviceError`, `CbqError`, `LinkError`, `RemoteError`,
`ConfigError`, `UpsError`, `ControlError`, ...) and roots it here, so a caller that must
outlive any refusal or failure the unit reports on purpose catches `MirrorUnitError` instead
of a tuple of domain types.  OSError from the system, and bugs, stay outside the tree.
"""

from __future__ import annotations


class MirrorUnitError(Exception):
    """Base of every error MirrorUnit raises on purpose."""
