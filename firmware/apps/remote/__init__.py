"""The remote role: `mirrorunit remote` (the daemon) and its operator commands."""

from .cli import (
    DEFAULT_LINK_PORT,
    RemoteSettings,
    command_line,
    main,
    register,
    serve,
    settings_from_args,
    settings_from_config,
)

__all__ = ["DEFAULT_LINK_PORT", "RemoteSettings", "command_line", "main", "register", "serve",
           "settings_from_args", "settings_from_config"]
