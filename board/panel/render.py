# MirrorUnit front panel: lines of text onto the display.  Two kinds of display, one
# interface (`cols`, `rows`, `invert`, `draw(lines, highlight)`), chosen by hw.Display():
#   Pixels: a framebuf.FrameBuffer-like display (the SSD1306 driver is one; so is the
#           test's fake); 8x8 font, one text row per 8 pixels, the highlighted row inverted.
#   Chars:  a character LCD (HD44780 through the lcd_i2c driver, 16x2 or 20x4); it cannot
#           invert a row, so the menus mark the selected line themselves (ui.Panel).


class Pixels:
    invert = True

    def __init__(self, fb):
        self.fb = fb
        self.cols = fb.width // 8
        self.rows = fb.height // 8

    def draw(self, lines, highlight=-1):
        fb = self.fb
        fb.fill(0)
        for i, line in enumerate(lines):
            y = i * 8
            if i == highlight:
                fb.fill_rect(0, y, fb.width, 8, 1)
                fb.text(line, 0, y, 0)
            else:
                fb.text(line, 0, y, 1)
        fb.show()


def lcd_text(line, cols):
    """`line` as the HD44780's character ROM (A00) can show it, padded to `cols`: ASCII
    from space to '}' except the backslash (a yen sign there); anything else is '?'."""
    out = ""
    for c in line[:cols]:
        out += c if " " <= c <= "}" and c != "\\" else "?"
    return out + " " * (cols - len(out))


class Chars:
    invert = False

    def __init__(self, lcd):
        self.lcd = lcd
        self.cols = lcd.cols
        self.rows = lcd.rows
        # what each row holds now: a redraw rewrites only the rows that changed (every
        # character is six I2C writes through the expander)
        self.shown = [None] * self.rows

    def draw(self, lines, highlight=-1):
        for row in range(self.rows):
            text = lcd_text(lines[row] if row < len(lines) else "", self.cols)
            if text != self.shown[row]:
                self.lcd.set_cursor(0, row)
                self.lcd.print(text)
                self.shown[row] = text
