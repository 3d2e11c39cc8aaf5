"""The control socket every tool talks to: a unix socket carrying CBOR requests."""

from .socket import ControlError, ControlServer, call, wait_ready

__all__ = ["ControlError", "ControlServer", "call", "wait_ready"]
