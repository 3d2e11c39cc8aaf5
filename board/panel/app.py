# MirrorUnit front panel: the main loop.  It owns the clock and moves bytes between the
# `hw` module (the only place that touches machine.*), the link decoder and the panel's
# state machine.  `run(hw)` is all main.py calls; tests pass a fake `hw` by putting its
# module first on the module path.

import os
import time

import logging
import proto
import ui

PANEL_VERSION = "1.0.0"
HEARTBEAT_MS = 1000
#: The unit counts as silent after three heartbeats without a valid frame.
SILENT_MS = 3 * HEARTBEAT_MS
FAULT_BLINK_MS = 250

log = logging.getLogger("panel")


def _boot_id():
    # A new number each start, so the appliance sees a restarted panel at once.
    b = os.urandom(4)
    return (b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24) & 0x3FFFFFFF


def run(hw, loops=-1):
    logging.basicConfig(level=getattr(hw, "LOG_LEVEL", logging.INFO))
    disp = hw.Display()
    link = hw.Link()
    buttons = hw.Buttons()
    leds = hw.Leds()
    panel = ui.Panel(disp.cols, disp.rows, PANEL_VERSION, invert=disp.invert)
    dec = proto.Decoder()
    boot = _boot_id()
    sent = 0
    errors_seen = 0
    last_rx = None
    peer_boot = None
    activity = False
    now = time.ticks_ms()
    next_heartbeat = now
    log.info("panel %s started, boot %d", PANEL_VERSION, boot)
    while loops != 0:
        loops -= 1
        now = time.ticks_ms()
        data = link.read()
        if data:
            for ftype, obj in dec.feed(data):
                last_rx = now
                activity = not activity
                if ftype == proto.HEARTBEAT:
                    b = obj.get("boot")
                    if peer_boot is not None and b != peer_boot:
                        log.info("the unit restarted")
                        panel.on_peer_restart()
                    peer_boot = b
                elif ftype == proto.STATUS:
                    panel.on_status(obj)
                elif ftype == proto.REPLY:
                    panel.on_reply(obj)
            if dec.errors != errors_seen:
                log.warning("link: %d bad frames, last: %s", dec.errors - errors_seen,
                            dec.last_error)
                errors_seen = dec.errors
        up = last_rx is not None and time.ticks_diff(now, last_rx) < SILENT_MS
        panel.on_link(up)
        for button in buttons.poll(now):
            for ftype, obj in panel.press(button, now):
                link.write(proto.encode(ftype, obj))
        panel.tick(now, time.ticks_diff)
        if time.ticks_diff(now, next_heartbeat) >= 0:
            link.write(proto.encode(proto.HEARTBEAT, {"boot": boot, "n": sent,
                                                      "bad": dec.errors}))
            sent += 1
            next_heartbeat = time.ticks_add(now, HEARTBEAT_MS)
        fault = panel.fault() and (now // FAULT_BLINK_MS) % 2 == 0
        leds.set(activity, up, fault)
        if panel.dirty:
            panel.dirty = False
            lines, hi = panel.view()
            disp.draw(lines, hi)
        hw.idle(20)
