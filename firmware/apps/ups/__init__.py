"""`mirrorunit ups`: the UPS monitor as a process of its own."""

from .cli import UpsSettings, main, register, run, settings_from_args

__all__ = ["UpsSettings", "main", "register", "run", "settings_from_args"]
