"""The local role: `mirrorunit local` and the operator commands on a running local unit."""

from .cli import main, register
from .services import build_services, build_unit, run
from .settings import (
    LocalAppSettings,
    NbdSettings,
    ReplicationSettings,
    UpsSettings,
    UsbSettings,
    command_line,
    settings_from_args,
    settings_from_config,
)

__all__ = ["LocalAppSettings", "NbdSettings", "ReplicationSettings", "UpsSettings",
           "UsbSettings", "build_services", "build_unit", "command_line", "main", "register",
           "run", "settings_from_args", "settings_from_config"]
