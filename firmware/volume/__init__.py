"""The local unit's data path: local mirror + CBQ behind the BlockDevice interface."""

from .volume import CacheMode, Volume, VolumeError, VolumeStatus

__all__ = ["CacheMode", "Volume", "VolumeError", "VolumeStatus"]
