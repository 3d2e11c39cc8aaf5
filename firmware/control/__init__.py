"""The control socket every tool talks to: a unix socket carrying CBOR requests."""

from .socket import ControlError, ControlServer, call

__all__ = ["ControlError", "ControlServer", "call"]
