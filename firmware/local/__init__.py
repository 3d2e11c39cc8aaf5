"""The local unit: the volume and its CBQ behind the front ends, plus the control socket."""

from .unit import DataPath, LocalSettings, LocalUnit, LocalUnitError

__all__ = ["DataPath", "LocalSettings", "LocalUnit", "LocalUnitError"]
