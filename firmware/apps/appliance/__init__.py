"""The appliance: a role run from the unit's own configuration."""

from ..remote import DEFAULT_LINK_PORT
from .cli import command_line, main, register, role_settings
from .prepare import (
    DEFAULT_RUN_DIR,
    DEFAULT_STORAGE_ENV,
    ApplianceError,
    PinKeeper,
    Storage,
    is_blank,
    link_dir_of,
    load_config,
    mount_store,
    pin_configured_peers,
    read_storage_env,
    role_of,
    working_state_dir,
)

__all__ = ["DEFAULT_LINK_PORT", "DEFAULT_RUN_DIR", "DEFAULT_STORAGE_ENV", "ApplianceError",
           "PinKeeper", "Storage", "command_line", "is_blank", "link_dir_of", "load_config",
           "main", "mount_store", "pin_configured_peers", "read_storage_env", "register",
           "role_of", "role_settings", "working_state_dir"]
