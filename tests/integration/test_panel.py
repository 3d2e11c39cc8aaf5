"""The front-panel controller: its MicroPython firmware, compiled by mpy-cross, runs on
the Unix port against `mirrorunit panel` over a pty cable, with a fake display (pixels
read back into text) and fake buttons; the appliance side drives a real local unit."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware import COPYRIGHT, __version__
from firmware.config import ConfigStore
from firmware.panel.codec import Frame, FrameDecoder, FrameType, encode_frame
from tests.support.panelproc import (
    PANEL_SOURCE,
    ApplianceProc,
    Cable,
    PanelProc,
    micropython,
    pin_keys,
    start_rig,
    stop_rig,
    wait_for,
)
from tests.support.unitproc import LocalProc

PIN = "7302951846"
WRONG = "1111111111"
HEARTBEAT_S = 1.0
#: One heartbeat, plus the status poll that may have just missed a change, plus slack
#: for two busy cores.
ONE_BEAT = HEARTBEAT_S * 2 + 0.5
SWITCHOVER_WAIT_S = 1.5

MENU_DOWN = {"Network": 0, "Fingerprint": 1, "Standby": 2, "Promote": 3, "Switchover": 4,
             "Shutdown": 5, "About": 6}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = start_rig(tmp_path_factory.mktemp("panel"), PIN, HEARTBEAT_S, SWITCHOVER_WAIT_S)
    try:
        yield d
    finally:
        stop_rig(d)


def home(panel: PanelProc) -> None:
    """Back to the home screen from wherever the last test left the panel (back on the
    home screen shows its first page)."""
    def at_home() -> bool:
        if panel.screen and panel.screen[0] == "panel-lab":
            return True
        panel.press("b")
        return False
    wait_for("the home screen", at_home, 5.0, interval=0.2)


def open_item(panel: PanelProc, item: str) -> None:
    home(panel)
    panel.press("s")
    panel.wait_text("Menu")
    panel.press("d" * MENU_DOWN[item])
    wait_for(f"{item} highlighted", lambda: panel.screen and panel.highlighted >= 0
             and panel.screen[panel.highlighted] == item, 3.0)
    panel.press("s")


def volume_state(unit: LocalProc) -> str:
    return str(unit.call("status")["volume"]["state"])


def test_mpy_cross_compiles_every_panel_module(rig: dict[str, Any]) -> None:
    bundle: Path = rig["bundle"]
    modules = sorted(p.stem for p in PANEL_SOURCE.glob("*.py"))
    assert {"app", "hw", "proto", "ui", "render", "boardprofile", "main"} <= set(modules)
    runtime = subprocess.run([micropython(), "-c",
                              "import sys; print(sys.implementation._mpy & 0xff)"],
                             capture_output=True, text=True, timeout=10)
    for name in [*modules, "ssd1306", "logging/__init__", "lcd_i2c/__init__", "lcd_i2c/lcd_i2c",
                 "lcd_i2c/const"]:
        mpy = bundle / f"{name}.mpy"
        assert mpy.exists(), f"{name}.py gave no .mpy"
        head = mpy.read_bytes()[:4]
        # 'M', the format version the Unix port under test loads, and no native code
        # (so the armv6m build is bytecode the RP2040 and this port both run)
        assert head[:1] == b"M" and head[1] == int(runtime.stdout), (name, head)
        assert head[2] >> 2 == 0, f"{name}.mpy holds native code"
    assert (bundle / "main.py").read_text() == (PANEL_SOURCE / "main.py").read_text()
    vendored = (bundle / "VENDORED.txt").read_text()
    assert "micropython-ssd1306 0.3" in vendored and "micropython-i2c-lcd 0.1.1" in vendored


HW_SCRIPT = """
import json, machine, hw, boardprofile as P
d = hw.Display()
assert (d.cols, d.rows, d.invert) == (16, 8, True)
bus = machine.I2C.last
d.draw(["hello", "world"], 1)
addr, data = bus.data[-1]
assert data[0] == 0x40 and data[1:] == bytes(d.fb.buffer), "framebuffer not sent"
b = hw.Buttons()
sel = machine.Pin.pins[dict(P.BUTTONS)["select"]]
presses = [b.poll(100)]
sel.value(0)                      # pressed
presses += [b.poll(200), b.poll(210)]
sel.value(1)                      # bounce: released 10 ms later
presses.append(b.poll(220))
sel.value(0)
presses.append(b.poll(225))
sel.value(1)
presses.append(b.poll(300))       # released for good
sel.value(0)
presses.append(b.poll(400))       # pressed again
leds = hw.Leds()
leds.set(True, False, True)
lit = [machine.Pin.pins[n].value() for n in (P.LED_ACTIVITY, P.LED_LINK, P.LED_FAULT)]
u = hw._UartLink()
machine.UART.last.incoming += b"abc"
got = u.read()
u.write(b"xyz")
print(json.dumps({"i2c": [bus.bus, bus.pins, bus.freq, addr], "cmds": len(bus.commands),
                  "presses": presses, "lit": lit, "uart": list(machine.UART.last.args),
                  "read": got.decode(), "written": bytes(machine.UART.last.written).decode(),
                  "none": u.read()}))
"""


def test_the_real_hw_module_drives_display_buttons_leds_and_uart(
        rig: dict[str, Any]) -> None:
    """board/panel/hw.py itself (compiled), over a fake `machine` module: the SSD1306
    driver sends the framebuffer on the profile's I2C pins, buttons are debounced
    active-low, LEDs follow, the UART link passes bytes."""
    fake_machine = PANEL_SOURCE.parents[1] / "tests" / "support" / "panel_machine"
    r = subprocess.run([micropython(), "-c", HW_SCRIPT], capture_output=True, text=True,
                       timeout=20, cwd=rig["tmp"],
                       env=dict(os.environ, MICROPYPATH=f"{fake_machine}:{rig['bundle']}"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["i2c"] == [0, [4, 5], 400000, 0x3C]
    assert out["cmds"] > 20  # the init sequence and each show()'s addressing
    assert out["presses"] == [[], ["select"], [], [], [], [], ["select"]]
    assert out["lit"] == [1, 0, 1]
    assert out["uart"] == [0, 115200, 0, 1]
    assert (out["read"], out["written"], out["none"]) == ("abc", "xyz", None)


def test_both_implementations_of_the_protocol_agree() -> None:
    """board/panel/proto.py on the Unix port and firmware/panel/codec.py, each way."""
    body = {"name": "unit-\u00e9", "n": 7, "ok": True, "none": None, "fill": 0.25,
            "long": "y" * 300}
    ours = encode_frame(FrameType.STATUS, body)
    script = (
        "import binascii, json, sys, proto\n"
        "d = proto.Decoder()\n"
        f"got = d.feed(binascii.unhexlify('{(b'junk' + ours[:9] + ours).hex()}'))\n"
        "print(json.dumps([[t, o] for t, o in got]), d.errors)\n"
        f"print(binascii.hexlify(proto.encode(3, json.loads({json.dumps(json.dumps(body))})"
        ")).decode())\n")
    r = subprocess.run([micropython(), "-c", script], capture_output=True, text=True,
                       timeout=20, env=dict(os.environ, MICROPYPATH=str(PANEL_SOURCE)))
    assert r.returncode == 0, r.stderr
    decoded, theirs = r.stdout.splitlines()
    frames, errors = decoded.rsplit(" ", 1)
    assert json.loads(frames) == [[FrameType.STATUS, body]] and int(errors) == 2
    assert FrameDecoder().feed(bytes.fromhex(theirs)) == [Frame(FrameType.REQUEST, body)]


def test_status_frames_are_drawn(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    lines = panel.wait_text("panel-lab", "local ready", "cbq", timeout=15.0)
    assert lines[0] == "panel-lab" and lines[1] == "local ready"
    assert any(line.startswith("ups ") for line in lines)
    wait_for("link LED on", lambda: panel.led_state[1] == "1", 3.0)
    assert panel.led_state[2] == "0"  # no fault
    open_item(panel, "About")
    lines = panel.wait_text("MirrorUnit", f"version {__version__}", "panel ")
    drawn = [line for line in lines if line]
    assert " ".join(drawn[2:-1]) == COPYRIGHT  # wrapped at 16 columns


def test_a_fault_is_shown_and_blinks_the_fault_led(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    unit: LocalProc = rig["unit"]
    home(panel)
    unit.call("volume.set_state", state="offline")
    try:
        panel.wait_text("local offline", "FAULT", "volume offline", timeout=ONE_BEAT)
        t0 = time.monotonic()

        def blinked() -> bool:
            with panel._lock:
                seen = {state[2] for at, state in panel.leds if at >= t0}
            return seen == {"0", "1"}
        wait_for("the fault LED blinking", blinked, 2.0)
    finally:
        unit.call("volume.set_state", state="ready")
    panel.wait_text("local ready", timeout=ONE_BEAT)
    assert "FAULT" not in panel.text()


def test_wrong_pin_is_refused(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    open_item(panel, "Standby")
    panel.wait_text("Standby volume?")
    panel.press("s")
    panel.wait_text("Admin password")
    panel.press(pin_keys(WRONG))
    panel.wait_text("Refused:", "wrong password", timeout=10.0)
    assert volume_state(rig["unit"]) == "ready"
    # confirming with back cancels before any password is asked
    open_item(panel, "Standby")
    panel.wait_text("Standby volume?")
    panel.press("b")
    panel.wait_text("Cancelled:")
    assert volume_state(rig["unit"]) == "ready"


def _act(panel: PanelProc, item: str, question: str) -> None:
    open_item(panel, item)
    panel.wait_text(question)
    panel.press("s")
    panel.wait_text("Admin password")
    panel.press(pin_keys(PIN))


def test_standby_and_promote_reach_the_unit(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    unit: LocalProc = rig["unit"]
    _act(panel, "Standby", "Standby volume?")
    panel.wait_text("Volume is", "standby", timeout=10.0)
    assert volume_state(unit) == "standby"
    panel.press("s")
    panel.wait_text("local standby", timeout=ONE_BEAT + 1)
    _act(panel, "Promote", "Promote volume?")
    panel.wait_text("Volume is ready", timeout=10.0)
    assert volume_state(unit) == "ready"


def test_switchover_is_the_units_link_switchover(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    unit: LocalProc = rig["unit"]
    peers = [k for k in unit.call("status")["cbq"]["consumers"] if not k.startswith("@")]
    assert peers == ["remote"]  # the local unit's peer, no link running in this test
    # The panel asks the unit's own link.switchover (tested end to end with a remote in
    # tests/integration/test_failover.py); a unit without a link service refuses it and
    # the host is served as before.
    _act(panel, "Switchover", "Switch over?")
    panel.wait_text("Refused:", "the unit runs no", "switch over", timeout=10.0)
    assert volume_state(unit) == "ready"


def test_network_change_is_saved_and_applied(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    store: ConfigStore = rig["store"]
    open_item(panel, "Network")
    panel.wait_text("DHCP", "Static address")
    panel.press("ds")
    panel.wait_text("192.168.001.010", "prefix /24")
    # third octet 001 -> 002, the rest as shown: 12 digits of address, 2 of prefix
    panel.press("s" * 8 + "u")
    panel.wait_text("192.168.002.010", "prefix /24")
    panel.press("s" * 6)
    panel.wait_text("Use address?", "192.168.2.10/24")
    panel.press("s")
    panel.wait_text("Admin password")
    panel.press(pin_keys(PIN))
    panel.wait_text("Saved", "applied", timeout=15.0)
    cfg = store.load().config
    assert cfg is not None
    assert (cfg["network.mode"], cfg["network.address"], cfg["network.netmask"]) == \
        ("static", "192.168.2.10", "24")
    network_file = (rig["tmp"] / "10-mirrorunit.network").read_text()
    assert "192.168.2.10/24" in network_file
    assert "reload" in rig["netlog"].read_text()
    # and back to DHCP
    open_item(panel, "Network")
    panel.wait_text("DHCP")
    panel.press("s")
    panel.wait_text("Use DHCP?")
    panel.press("s")
    panel.press(pin_keys(PIN))
    panel.wait_text("Saved", timeout=15.0)
    cfg = store.load().config
    assert cfg is not None and cfg["network.mode"] == "dhcp"


def test_shutdown_flushes_then_powers_off(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    marker: Path = rig["tmp"] / "powered-off"
    assert not marker.exists()
    _act(panel, "Shutdown", "Shut down?")
    panel.wait_text("Flushed in", "powering off.", timeout=10.0)
    assert marker.exists()  # the --poweroff-command ran


def test_fingerprint_is_shown(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    fp = rig["ident"].fingerprint.replace(":", "")
    open_item(panel, "Fingerprint")
    lines = panel.wait_text("Fingerprint", fp[:16], fp[-16:], timeout=5.0)
    assert "".join(lines[1:5]) == fp


def test_garbage_and_truncated_frames_recover_within_a_heartbeat(
        rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    cable: Cable = rig["cable"]
    unit: LocalProc = rig["unit"]
    home(panel)
    panel.wait_text("local ready")
    status = encode_frame(FrameType.STATUS, {"name": "forged", "role": "x"})
    beat = encode_frame(FrameType.HEARTBEAT, {"boot": 1, "n": 0, "bad": 0})
    # noise with delimiters in it, a frame over the length limit, a frame cut short,
    # and a frame whose CRC is wrong: each side drops them all
    noise = b"\xff\xfe\x00\x13garbage\x00" + b"\x01" * 2000 + status[:-6]
    flipped = bytearray(status)
    flipped[10] ^= 0x20
    t0 = time.monotonic()
    cable.inject(to_panel=noise + bytes(flipped), to_unit=noise + beat[:-3])
    unit.call("volume.set_state", state="standby")
    try:
        panel.wait_text("local standby", timeout=ONE_BEAT)
        assert "forged" not in panel.text()

        # the panel counted the bad frames and still speaks: its next heartbeats say so
        def panel_counted() -> bool:
            return any(f.type is FrameType.HEARTBEAT and f.body.get("bad", 0) >= 3
                       for f in cable.frames(to_panel=False, since=t0))
        wait_for("panel heartbeat counting the bad frames", panel_counted, ONE_BEAT)

        def unit_counted() -> bool:
            return any(f.type is FrameType.HEARTBEAT and f.body.get("bad", 0) >= 3
                       for f in cable.frames(to_panel=True, since=t0))
        wait_for("appliance heartbeat counting the bad frames", unit_counted, ONE_BEAT)
        # a request right after the noise is answered
        open_item(panel, "Fingerprint")
        panel.wait_text("Fingerprint", timeout=ONE_BEAT)
    finally:
        unit.call("volume.set_state", state="ready")


def _silent(panel: PanelProc) -> bool:
    return "(unit silent)" in panel.text()


def test_cable_pulled_mid_frame_recovers(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    cable: Cable = rig["cable"]
    home(panel)
    cable.pull(mid_frame=True)
    try:
        wait_for("panel notices the silence", lambda: _silent(panel), 3 * HEARTBEAT_S + 2)
        assert panel.led_state[1] == "0"
    finally:
        cable.plug()
    wait_for("panel hears the unit again", lambda: not _silent(panel), ONE_BEAT)
    assert panel.led_state[1] == "1"


def test_appliance_restart_recovers(rig: dict[str, Any]) -> None:
    panel: PanelProc = rig["panel"]
    appliance: ApplianceProc = rig["appliance"]
    home(panel)
    appliance.stop()
    wait_for("panel notices the silence", lambda: _silent(panel), 3 * HEARTBEAT_S + 2)
    appliance.start()
    # the new process needs its start-up (imports) before its first heartbeat
    wait_for("panel hears the restarted unit", lambda: not _silent(panel), ONE_BEAT + 3)
    panel.wait_text("panel-lab", "local ready")


def _boots(cable: Cable, since: float = 0.0) -> list[int]:
    return [f.body["boot"] for f in cable.frames(to_panel=False, since=since)
            if f.type is FrameType.HEARTBEAT]


def test_panel_restart_recovers(rig: dict[str, Any]) -> None:
    cable: Cable = rig["cable"]
    log: Path = rig["appliance"].log
    old = _boots(cable)[-1]
    # the appliance (restarted by the test before) has met the running controller since
    # it opened the line
    wait_for("appliance meets the controller",
             lambda: f"(boot {old})" in log.read_text().rsplit(" open\n", 1)[-1], ONE_BEAT)
    rig["panel"].stop()
    panel = PanelProc(rig["bundle"], cable.panel_end, rig["tmp"])
    rig["panel"] = panel
    t0 = time.monotonic()
    panel.start()
    panel.wait_text("panel-lab", "local ready", timeout=ONE_BEAT + 2)
    new = {b for b in _boots(cable, since=t0) if b != old}
    assert len(new) == 1  # a boot id of its own
    wait_for("appliance sees the restart", lambda: f"controller restarted (boot "
             f"{next(iter(new))})" in log.read_text(), ONE_BEAT)


# ---------------------------------------------------------------- a 16x2 character LCD

LCD_HW_SCRIPT = """
import json, machine, hw
d = hw.Display()
bus = machine.I2C.last
d.draw(["MirrorUnit", "local ready"], -1)
first = len(bus.commands)
d.draw(["MirrorUnit", "local standby\u00e9"], -1)
print(json.dumps({"i2c": [bus.bus, bus.pins, bus.freq], "size": [d.cols, d.rows, d.invert],
                  "first": first, "cmds": [[a, list(b)] for a, b in bus.commands]}))
"""


def test_the_real_hw_module_drives_a_character_lcd(rig: dict[str, Any]) -> None:
    """board/panel/hw.py with a profile naming an HD44780: the vendored lcd_i2c driver
    sets the controller up and writes the text, as a simulated PCF8574 + HD44780 decodes
    the bytes on the bus; a redraw rewrites only the row that changed, and characters
    the LCD's ROM lacks become '?'."""
    from tests.support.panel_hw.hd44780_sim import Hd44780
    profile = rig["tmp"] / "lcd-profile"
    profile.mkdir(exist_ok=True)
    (profile / "boardprofile.py").write_text(
        (PANEL_SOURCE / "boardprofile.py").read_text() + '\nDISPLAY = "hd44780"\n')
    fake_machine = PANEL_SOURCE.parents[1] / "tests" / "support" / "panel_machine"
    r = subprocess.run([micropython(), "-c", LCD_HW_SCRIPT], capture_output=True, text=True,
                       timeout=20, cwd=rig["tmp"], env=dict(
                           os.environ, MICROPYPATH=f"{profile}:{fake_machine}:{rig['bundle']}"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["i2c"] == [0, [4, 5], 400000] and out["size"] == [16, 2, False]
    lcd = Hd44780(0x27, 16, 2)
    for n, (addr, data) in enumerate(out["cmds"]):
        lcd.writeto(addr, bytes(data))
        if n + 1 == out["first"]:
            assert lcd.text() == ["MirrorUnit      ", "local ready     "]
            before = lcd.writes
    assert lcd.text() == ["MirrorUnit      ", "local standby?  "]
    assert lcd.errors == [] and lcd.backlight
    # one row only: an address command, 16 characters and the address command lcd_i2c
    # sends after them to track its cursor; each byte two nibbles, each nibble three
    # writes through the expander (data, E high, E low)
    assert lcd.writes - before == 18 * 2 * 3


@pytest.fixture(scope="module")
def lcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = start_rig(tmp_path_factory.mktemp("panel-lcd"), PIN, HEARTBEAT_S, SWITCHOVER_WAIT_S,
                  display="hd44780")
    try:
        yield d
    finally:
        stop_rig(d)


#: The home screen on 16x2 turns a page every 2.5 s (board/panel/ui.py PAGE_MS): three
#: pages of status, so anything on it shows within a turn of all of them.
LCD_CYCLE = 3 * 2.5 + ONE_BEAT


def lcd_open(panel: PanelProc, item: str) -> None:
    """The menu on two rows has no title; the selected item is marked with '>'."""
    home(panel)
    panel.press("s")
    panel.wait_text(">Network")
    panel.press("d" * MENU_DOWN[item])
    panel.wait_text(">" + item)
    panel.press("s")


def test_lcd_pages_the_status_and_puts_a_fault_first(lcd: dict[str, Any]) -> None:
    panel: PanelProc = lcd["panel"]
    unit: LocalProc = lcd["unit"]
    assert panel.wait_text("panel-lab", timeout=15.0) == ["panel-lab", "local ready"]
    # every status line comes round on the two rows, none longer than 16 columns
    for wanted in ("link ", "cbq ", "ups "):
        panel.wait_text(wanted, timeout=LCD_CYCLE)
    assert all(len(line) <= 16 for _, lines, _ in panel.screens for line in lines)
    unit.call("volume.set_state", state="offline")
    try:
        home(panel)
        assert panel.wait_text("panel-lab", "FAULT", timeout=ONE_BEAT)[0] == "panel-lab"
        wait_for("the fault LED on", lambda: panel.led_state[2] == "1", 2.0)
    finally:
        unit.call("volume.set_state", state="ready")
    panel.wait_text("local ready", timeout=LCD_CYCLE)
    assert panel.display_errors == []


def test_lcd_password_entry_refuses_a_wrong_one_and_promotes_with_the_right_one(
        lcd: dict[str, Any]) -> None:
    panel: PanelProc = lcd["panel"]
    unit: LocalProc = lcd["unit"]
    lcd_open(panel, "Standby")
    assert panel.wait_text("Standby volume?") == ["Standby volume?", "sel=yes back=no"]
    panel.press("s")
    panel.wait_text("Password", "char 0")
    panel.press(pin_keys(WRONG[:7])[:-2])  # without [OK]
    panel.wait_text("Password *******", "char 0")
    panel.press(pin_keys(WRONG[7:])[:-2])  # three more do not fit: the count is shown
    panel.wait_text("Password (10)", "char 0")
    panel.press("ds")
    panel.wait_text("Refused:", timeout=10.0)
    assert volume_state(unit) == "ready"
    for item, question, state in (("Standby", "Standby volume?", "standby"),
                                  ("Promote", "Promote volume?", "ready")):
        lcd_open(panel, item)
        panel.wait_text(question)
        panel.press("s")
        panel.wait_text("Password")
        panel.press(pin_keys(PIN))
        panel.wait_text("Volume is", timeout=10.0)
        assert volume_state(unit) == state
        panel.press("s")
    assert panel.display_errors == []


def test_lcd_static_address_on_two_rows(lcd: dict[str, Any]) -> None:
    panel: PanelProc = lcd["panel"]
    store: ConfigStore = lcd["store"]
    lcd_open(panel, "Network")
    panel.wait_text(">DHCP", " Static address")
    panel.press("ds")
    assert panel.wait_text("192.168.001.010") == ["192.168.001.010", "^"]
    # the last octet 010 -> 011: the caret moves under the digit being changed
    panel.press("s" * 11)
    assert panel.wait_text(" " * 14 + "^") == ["192.168.001.010", " " * 14 + "^"]
    panel.press("u")
    panel.wait_text("192.168.001.011")
    panel.press("s")
    assert panel.wait_text("prefix /24") == ["prefix /24", " " * 8 + "^"]
    panel.press("ss")
    assert panel.wait_text("192.168.1.11") == ["192.168.1.11", "/24 sel=y back=n"]
    panel.press("s")
    panel.wait_text("Password")
    panel.press(pin_keys(PIN))
    panel.wait_text("Saved", timeout=15.0)
    cfg = store.load().config
    assert cfg is not None
    assert (cfg["network.mode"], cfg["network.address"]) == ("static", "192.168.1.11")
    assert panel.display_errors == []
