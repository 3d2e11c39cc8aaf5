# A character LCD as the bytes on its I2C bus drive it (tests only; runs on the
# MicroPython Unix port and on CPython): an HD44780 behind a PCF8574 expander, wired as
# the common backpacks are (P0 RS, P1 R/W, P2 E, P3 backlight, P4-P7 D4-D7).
#
# The controller is modelled from its datasheet, not from the driver under test: it
# powers up in 8-bit mode, where only D4-D7 being wired means every latched nibble is a
# whole instruction with a zero low nibble; a function set with DL=0 switches it to
# 4-bit mode, where instructions and data come high nibble first.  Data is latched on
# the falling edge of E.  DDRAM in 2-line mode is 0x00-0x27 (line 1) and 0x40-0x67
# (line 2); 20x4 modules put lines 3 and 4 at 0x14 and 0x54.

ROW_STARTS = (0x00, 0x40, 0x14, 0x54)


class Hd44780:
    def __init__(self, addr=0x27, cols=16, rows=2):
        self.addr = addr
        self.cols = cols
        self.rows = rows
        self.ddram = bytearray(b" " * 0x80)
        self.ac = 0
        self.increment = True
        self.eight_bit = True
        self.two_line = False
        self.display_on = False
        self.backlight = False
        self.cgram = False
        self.half = None
        self.port = 0
        #: protocol errors seen: a read cycle, data before the display was set up, a
        #: write to another address
        self.errors = []
        self.writes = 0

    # ------------------------------------------------------------ the bus

    def writeto(self, addr, buf):
        if addr != self.addr:
            self.errors.append(f"write to 0x{addr:02x}")
            raise OSError(19)  # ENODEV: nobody acknowledges, as machine.I2C reports it
        for v in bytes(buf):
            self.writes += 1
            if self.port & 0x04 and not v & 0x04:
                self._latch(self.port)
            self.port = v
            self.backlight = bool(v & 0x08)
        return len(buf)

    def _latch(self, v):
        if v & 0x02:
            self.errors.append("read cycle (R/W high)")
            return
        rs = v & 0x01
        nibble = v >> 4
        if self.eight_bit:
            self._execute(rs, nibble << 4)
        elif self.half is None:
            self.half = (rs, nibble)
        else:
            rs0, high = self.half
            self.half = None
            if rs0 != rs:
                self.errors.append("RS changed between the two nibbles")
            self._execute(rs, high << 4 | nibble)

    def _execute(self, rs, b):
        if rs:
            if self.cgram:
                return  # a custom glyph: not shown by text()
            if self.eight_bit:
                self.errors.append("data in 8-bit mode")
            self.ddram[self.ac & 0x7F] = b
            self._advance()
        elif b & 0x80:
            self.ac = b & 0x7F
            self.cgram = False
        elif b & 0x40:
            self.cgram = True
        elif b & 0x20:
            self.eight_bit = bool(b & 0x10)
            self.two_line = bool(b & 0x08)
        elif b & 0x10:
            pass  # cursor or display shift: the driver under test does not use it
        elif b & 0x08:
            self.display_on = bool(b & 0x04)
        elif b & 0x04:
            self.increment = bool(b & 0x02)
        elif b & 0x02:
            self.ac = 0
        elif b & 0x01:
            for i in range(len(self.ddram)):
                self.ddram[i] = 0x20
            self.ac = 0
            self.increment = True

    def _advance(self):
        a = self.ac + (1 if self.increment else -1)
        if self.two_line:  # line 1 runs on into line 2 and back
            if a == 0x28:
                a = 0x40
            elif a == 0x68:
                a = 0x00
            elif a == 0x3F:
                a = 0x27
            elif a == -1:
                a = 0x67
        self.ac = a & 0x7F

    # ------------------------------------------------------------ what a person sees

    def text(self):
        """The rows as shown: blank while the display is off or not in 2-line mode (a
        one-line setup shows only half the characters on a 16x2)."""
        if not self.display_on or (self.rows > 1 and not self.two_line):
            return [""] * self.rows
        out = []
        for row in range(self.rows):
            start = ROW_STARTS[row]
            out.append("".join(chr(c) for c in self.ddram[start:start + self.cols]))
        return out
