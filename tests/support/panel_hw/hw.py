# A stand-in for board/panel/hw.py on the MicroPython Unix port (tests only): put this
# directory first on MICROPYPATH and the panel firmware imports it instead of the real
# one.  The link is the tty named by PANEL_LINK; the buttons are bytes on stdin
# (u, d, s, b).  The display (PANEL_DISPLAY) is either a real framebuf.FrameBuffer whose
# pixels are read back into text ("ssd1306", the default), or a 16x2 character LCD: the
# vendored lcd_i2c driver writing to a simulated PCF8574 + HD44780 (hd44780_sim) whose
# DDRAM is read back ("hd44780"; lcd_i2c imports machine.I2C, so tests/support/
# panel_machine goes on the path too).  What it shows and the LEDs go to stdout:
#   SCREEN {"lines": [...], "hi": row, "errors": [...]}      LEDS <activity><link><fault>

import json
import logging
import os
import select
import sys

import framebuf
import hd44780_sim
import render

LOG_LEVEL = logging.INFO
WIDTH = 128
HEIGHT = 64
_KEYS = {"u": "up", "d": "down", "s": "select", "b": "back"}
_poll = select.poll()
_poll.register(sys.stdin, select.POLLIN)


def _font():
    """8x8 cell bitmap -> (character, drawn inverted) for every printable character."""
    cell = bytearray(8)
    fb = framebuf.FrameBuffer(cell, 8, 8, framebuf.MONO_VLSB)
    table = {}
    for code in range(32, 127):
        for inverted in (False, True):
            fb.fill(1 if inverted else 0)
            fb.text(chr(code), 0, 0, 0 if inverted else 1)
            table.setdefault(bytes(cell), (chr(code), inverted))
    return table


class _Oled(framebuf.FrameBuffer):
    def __init__(self):
        self.width = WIDTH
        self.height = HEIGHT
        self.buf = bytearray(WIDTH * HEIGHT // 8)
        super().__init__(self.buf, WIDTH, HEIGHT, framebuf.MONO_VLSB)
        self.font = _font()
        self.shown = None

    def read_text(self):
        """What the pixels say: one string per text row, and the row drawn inverted."""
        lines = []
        hi = -1
        for row in range(HEIGHT // 8):
            chars = []
            inv = 0
            for col in range(WIDTH // 8):
                at = row * WIDTH + col * 8
                ch, inverted = self.font.get(bytes(self.buf[at:at + 8]), ("?", False))
                chars.append(ch)
                inv += inverted
            if inv == WIDTH // 8:
                hi = row
            lines.append("".join(chars).rstrip())
        return lines, hi

    def show(self):
        lines, hi = self.read_text()
        if (lines, hi) != self.shown:
            self.shown = (lines, hi)
            print("SCREEN " + json.dumps({"lines": lines, "hi": hi, "errors": []}))


class _Lcd(render.Chars):
    def __init__(self):
        import lcd_i2c  # the driver the board uses, from the bundle
        self.sim = hd44780_sim.Hd44780(0x27, 16, 2)
        lcd = lcd_i2c.LCD(0x27, 16, 2, i2c=self.sim)
        lcd.begin()
        super().__init__(lcd)
        self.seen = None

    def draw(self, lines, highlight=-1):
        super().draw(lines, highlight)
        seen = ([line.rstrip() for line in self.sim.text()], list(self.sim.errors))
        if seen != self.seen:
            self.seen = seen
            print("SCREEN " + json.dumps({"lines": seen[0], "hi": -1, "errors": seen[1]}))


def Display():
    if os.getenv("PANEL_DISPLAY") == "hd44780":
        return _Lcd()
    return render.Pixels(_Oled())


class Link:
    def __init__(self):
        self.f = open(os.getenv("PANEL_LINK"), "r+b")
        self.poll = select.poll()
        self.poll.register(self.f, select.POLLIN)
        _poll.register(self.f, select.POLLIN)

    def read(self):
        out = bytearray()
        # FileIO.read(n) waits for all n bytes: take what is there one at a time
        while len(out) < 512 and self.poll.poll(0):
            out += self.f.read(1)
        return bytes(out) if out else None

    def write(self, data):
        self.f.write(data)


class Buttons:
    def poll(self, now):
        pressed = []
        while _poll_stdin():
            c = sys.stdin.read(1)
            if not c:
                raise SystemExit(0)  # the test closed stdin: stop
            if c in _KEYS:
                pressed.append(_KEYS[c])
        return pressed


def _poll_stdin():
    p = select.poll()
    p.register(sys.stdin, select.POLLIN)
    return bool(p.poll(0))


class Leds:
    def __init__(self):
        self.state = None

    def set(self, activity, link, fault):
        s = f"{int(activity)}{int(link)}{int(fault)}"
        if s != self.state:
            self.state = s
            print("LEDS " + s)


def idle(ms):
    _poll.poll(ms)
