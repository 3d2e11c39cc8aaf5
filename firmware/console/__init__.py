"""The setup utility that replaces the login prompt on tty1 and the serial console."""

from .app import Console, ConsoleSettings, run_console

__all__ = ["Console", "ConsoleSettings", "run_console"]
