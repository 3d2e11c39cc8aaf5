"""The host connection as the USB device controller (UDC) reports it, found with pyudev.

The kernel keeps the device-side USB state in the UDC's `state` attribute
(`/sys/class/udc/<name>/state`: "not attached", "powered", "default", "addressed",
"configured", "suspended", ...).  It signals a change with sysfs_notify on that
attribute, not with a uevent, so a udev monitor never hears of it: the watcher polls
the attribute (every half second by default) and logs each change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..control.status import HostConnection

log = logging.getLogger("mirrorunit.gadget")

#: What the host connection is, from the kernel's usb_state_string().
CONNECTION = {
    "not attached": "not-attached",
    "attached": "powered", "powered": "powered", "reconnecting": "powered",
    "unauthenticated": "powered", "default": "powered", "addressed": "powered",
    "configured": "configured",
    "suspended": "suspended",
}


def connection_of(state: str | None) -> str:
    """The four states the unit reports: not-attached, powered (the host sees the
    device but has not configured it yet), configured, suspended; "unknown" without
    a UDC to read."""
    if state is None:
        return "unknown"
    return CONNECTION.get(state.strip(), "unknown")


def read_udc_state(name: str) -> str | None:
    """The `state` attribute of the UDC called `name`, through libudev; None when there
    is no such UDC (unbound, the driver gone) or no libudev on this system."""
    try:
        import pyudev
    except ImportError:  # pragma: no cover - pyudev is a dependency
        return None
    try:
        device = pyudev.Devices.from_name(pyudev.Context(), "udc", name)
        return str(device.attributes.asstring("state"))
    except (pyudev.DeviceNotFoundError, KeyError, OSError, ImportError):
        return None


class UdcWatcher:
    """Polls one UDC's state; `changed(old, new)` is called (and a line logged) on
    every change of the host connection."""

    def __init__(self, udc: Callable[[], str | None], *, interval: float = 0.5,
                 changed: Callable[[str, str], None] | None = None,
                 read: Callable[[str], str | None] = read_udc_state) -> None:
        self._udc, self._interval, self._changed, self._read = udc, interval, changed, read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state: str | None = None
        self.connection = "unknown"
        self.changes = 0

    def poll(self) -> str:
        name = self._udc()
        # Unbound, no host can see the gadget, whatever the UDC's attribute still says
        # (dummy_hcd leaves "configured" there after an unbind).
        state = self._read(name) if name else None
        connection = connection_of(state) if name else "not-attached"
        old, self.state = self.connection, state
        if connection != old:
            self.connection = connection
            self.changes += 1
            log.info("host connection: %s (UDC %s state %r)", connection, name, state)
            if self._changed is not None:
                self._changed(old, connection)
        return connection

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="udc-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def status(self) -> HostConnection:
        return {"connection": self.connection, "udc_state": self.state,
                "changes": self.changes}
