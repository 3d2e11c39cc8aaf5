"""`mirrorunit notify`: the notifier process, and a test message to every target."""

from .cli import NotifySettings, main, register, run, settings_from_args

__all__ = ["NotifySettings", "main", "register", "run", "settings_from_args"]
