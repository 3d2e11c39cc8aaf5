"""The USB front end as a service of the local unit (`mirrorunit local --frontend usb`).

The volume (mirror + write cache + CBQ) is presented as one SCSI logical unit
through the gadget.  The bulk loop must own the main thread (a reset interrupts
its blocking endpoint transfer with a signal, and Python runs signal handlers
only there), so the service provides `run_main`, which the unit calls instead
of idling.  Standby and promotion need nothing here: the volume's state is the
device state the SCSI target compares on every command, so `mirrorunit standby`
/ `promote` over the control socket turn into NOT READY 02/04/0B and UNIT
ATTENTION 06/28/00 on the host's next command.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, cast

from firmware.control.status import UsbStatus
from firmware.scsi import LogicalUnit, ScsiTarget
from firmware.usb_gadget.configfs import GadgetSettings
from firmware.usb_gadget.server import UsbFrontEnd
from firmware.usb_gadget.udc import UdcWatcher

log = logging.getLogger("mirrorunit.gadget")


class UsbService:
    name = "usb"

    def __init__(self, logical_unit: LogicalUnit, settings: GadgetSettings) -> None:
        self.settings = settings
        self.logical_unit = logical_unit
        self.target = ScsiTarget([logical_unit])
        self.front = UsbFrontEnd(self.target, settings)
        self._stopped = threading.Event()
        self.host = UdcWatcher(self._bound_udc)

    def _bound_udc(self) -> str | None:
        gadget = self.front.gadget
        return gadget.bound_udc() if gadget is not None else None

    def start(self) -> None:
        # The gadget comes up in run_main: configfs, FunctionFS and the UDC binding
        # belong to the thread that serves them, so they go down with it.
        log.info("USB front end configured: gadget %s, serial %s", self.settings.gadget_name,
                 self.logical_unit.serial.decode())
        self.host.start()

    def run_main(self, stop_event: threading.Event) -> None:
        def relay() -> None:
            stop_event.wait()
            self.front.stop()

        threading.Thread(target=relay, name="usb-stop", daemon=True).start()
        try:
            self.front.run()
        except Exception:
            log.exception("USB front end failed; stopping the unit")
            raise
        finally:
            self._stopped.set()
            stop_event.set()

    def stop(self) -> None:
        self.front.stop()
        self.host.stop()

    def status(self) -> UsbStatus:
        gadget = self.front.gadget
        out: UsbStatus = {
            "gadget": self.settings.gadget_name,
            "udc": gadget.bound_udc() if gadget is not None and not self._stopped.is_set()
            else None,
            "serving": self.front.ready.is_set() and not self._stopped.is_set(),
            "read_only": self.logical_unit.read_only,
            "bot_state": self.front.bot.state.value,
            "host": self.host.status(),
        }
        # the front end's counters beside them (commands, bytes, resets...), not checked
        cast(dict[str, Any], out).update(self.front.counters())
        return out

    def handlers(self) -> dict[str, Any]:
        return {"usb.status": self.status}
