"""The local unit: the volume and its CBQ behind a front end, plus the control socket."""

from .unit import LocalSettings, LocalUnit, LocalUnitError

__all__ = ["LocalSettings", "LocalUnit", "LocalUnitError"]
