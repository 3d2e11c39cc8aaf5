"""Run in the guest: serve a FileBlockDevice over our USB gadget.

    python -m tests.support.vm.guest_gadget IMAGE SIZE --control FIFO [--standby] [--udc NAME]

Lines written to the control FIFO change the device state ("ready",
"standby", "offline"), standing in for the control socket of a real unit;
"hang S" makes the next medium write take S seconds more, so the host times a
WRITE out in the middle of its data phase and resets.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from firmware.blockdev import DeviceState, FileBlockDevice  # noqa: E402
from firmware.scsi import LogicalUnit, ScsiTarget  # noqa: E402
from firmware.usb_gadget.configfs import GadgetSettings  # noqa: E402
from firmware.usb_gadget.server import UsbFrontEnd, serve_usb  # noqa: E402


class HangableDevice(FileBlockDevice):
    """A file device whose next write can be told to hang (a stuck medium)."""

    hang_next_write = 0.0

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        delay, self.hang_next_write = self.hang_next_write, 0.0
        if delay:
            logging.getLogger("mirrorunit.vm").info("medium write hangs %.1f s", delay)
            time.sleep(delay)
        super().pwrite(offset, data, fua)


def watch_control(path: Path, device: HangableDevice) -> None:
    while True:
        # Reopened each time: a writer closing the FIFO ends one read loop.
        with open(path) as fifo:
            for line in fifo:
                word = line.strip()
                if word.startswith("hang "):
                    device.hang_next_write = float(word.split()[1])
                elif word:
                    device.state = DeviceState(word)
                    logging.getLogger("mirrorunit.vm").info("device state -> %s", word)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("size", type=int)
    parser.add_argument("--control")
    parser.add_argument("--standby", action="store_true")
    parser.add_argument("--udc")
    parser.add_argument("--serial", default="MUVM0001")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--profile", help="write cProfile stats of the bulk loop here")
    parser.add_argument("--sync", action="store_true",
                        help="synchronous endpoint I/O instead of native AIO")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(relativeCreated)8.0f %(name)s %(message)s",
        stream=sys.stderr,
    )
    device = HangableDevice(args.image, size=args.size, create=True)
    if args.standby:
        device.state = DeviceState.STANDBY
    if args.control:
        if not os.path.exists(args.control):
            os.mkfifo(args.control)
        threading.Thread(
            target=watch_control, args=(Path(args.control), device), daemon=True
        ).start()
    target = ScsiTarget([LogicalUnit(device, serial=args.serial)])
    settings = GadgetSettings(
        udc=args.udc, ffs_mount=Path("/run/mirrorunit/ffs"), serial_number=args.serial
    )
    front = UsbFrontEnd(target, settings, use_aio=not args.sync)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        try:
            profiler.runcall(serve_usb, target, settings, front)
        finally:
            profiler.dump_stats(args.profile)
    else:
        serve_usb(target, settings, front)


if __name__ == "__main__":
    main()
