"""`mirrorunit gadget`: the USB gadget's configfs tree, set up and torn down."""

from .cli import add_gadget_options, gadget_settings, main, register

__all__ = ["add_gadget_options", "gadget_settings", "main", "register"]
