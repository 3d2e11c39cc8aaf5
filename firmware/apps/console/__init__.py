"""`mirrorunit console`: the setup utility on the front-panel console."""

from .cli import main, register, settings_from_args

__all__ = ["main", "register", "settings_from_args"]
