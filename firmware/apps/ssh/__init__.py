"""`mirrorunit ssh`: turn SSH access on or off."""

from .cli import main, register

__all__ = ["main", "register"]
