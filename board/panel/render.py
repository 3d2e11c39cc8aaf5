# MirrorUnit front panel: lines of text into a framebuf.FrameBuffer-like display (the
# SSD1306 driver is one; so is the test's fake).  8x8 font, one text row per 8 pixels.


def draw(fb, lines, highlight=-1):
    fb.fill(0)
    for i, line in enumerate(lines):
        y = i * 8
        if i == highlight:
            fb.fill_rect(0, y, fb.width, 8, 1)
            fb.text(line, 0, y, 0)
        else:
            fb.text(line, 0, y, 1)
    fb.show()
