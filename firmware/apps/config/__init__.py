"""`mirrorunit config`: show and change the unit's configuration."""

from .cli import (
    add_config_option,
    add_network_options,
    main,
    network_hook,
    network_settings,
    register,
)

__all__ = ["add_config_option", "add_network_options", "main", "network_hook",
           "network_settings", "register"]
