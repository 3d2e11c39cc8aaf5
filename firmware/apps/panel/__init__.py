"""`mirrorunit panel`: the front-panel controller's link on the appliance."""

from .cli import PanelSettings, main, register, run, settings_from_args

__all__ = ["PanelSettings", "main", "register", "run", "settings_from_args"]
