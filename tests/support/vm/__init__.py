"""QEMU guest harness: Linux's own USB host stack (dummy_hcd + usb-storage) as a test client."""

from .harness import GuestVM, ScriptResult, VMConfig, VMError, VMTimeout, missing_requirements

__all__ = ["GuestVM", "ScriptResult", "VMConfig", "VMError", "VMTimeout", "missing_requirements"]
