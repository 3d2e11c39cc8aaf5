# MirrorUnit front panel: the only module that touches the hardware (machine.Pin, I2C,
# UART, the USB serial port).  Everything else runs on the Unix port too.

import select
import sys
import time

import boardprofile as P
import logging
import micropython
import render
from machine import I2C, UART, Pin

# Over USB the log would share the wire with the protocol: keep it to errors there.
LOG_LEVEL = logging.ERROR if P.LINK == "usb" else logging.INFO


def Display():
    """The profile's display behind render's interface (cols, rows, invert, draw)."""
    i2c = I2C(P.I2C_ID, sda=Pin(P.I2C_SDA), scl=Pin(P.I2C_SCL), freq=P.I2C_FREQ)
    if P.DISPLAY == "hd44780":
        from lcd_i2c import LCD
        lcd = LCD(P.LCD_ADDR, P.LCD_COLS, P.LCD_ROWS, i2c=i2c)
        lcd.begin()
        return render.Chars(lcd)
    import ssd1306
    return render.Pixels(ssd1306.SSD1306_I2C(P.OLED_WIDTH, P.OLED_HEIGHT, i2c,
                                             addr=P.OLED_ADDR))


class _UartLink:
    def __init__(self):
        self.uart = UART(P.UART_ID, baudrate=P.UART_BAUD, tx=Pin(P.UART_TX),
                         rx=Pin(P.UART_RX), rxbuf=1024)

    def read(self):
        return self.uart.read() if self.uart.any() else None

    def write(self, data):
        self.uart.write(data)


class _UsbLink:
    def __init__(self):
        micropython.kbd_intr(-1)  # a 0x03 in a frame must not stop the program
        self.inp = sys.stdin.buffer
        self.out = sys.stdout.buffer
        self.poll = select.poll()
        self.poll.register(sys.stdin, select.POLLIN)

    def read(self):
        out = bytearray()
        while len(out) < 512 and self.poll.poll(0):
            out += self.inp.read(1)
        return bytes(out) if out else None

    def write(self, data):
        self.out.write(data)


def Link():
    return _UsbLink() if P.LINK == "usb" else _UartLink()


class Buttons:
    """Active-low buttons with pull-ups; a press is reported once, debounced."""

    def __init__(self):
        self.pins = [(name, Pin(n, Pin.IN, Pin.PULL_UP)) for name, n in P.BUTTONS]
        self.level = {name: 1 for name, _ in P.BUTTONS}
        self.since = {name: 0 for name, _ in P.BUTTONS}

    def poll(self, now):
        pressed = []
        for name, pin in self.pins:
            v = pin.value()
            if v != self.level[name] and time.ticks_diff(now, self.since[name]) >= P.DEBOUNCE_MS:
                self.level[name] = v
                self.since[name] = now
                if v == 0:
                    pressed.append(name)
        return pressed


class Leds:
    def __init__(self):
        self.pins = [Pin(n, Pin.OUT) for n in (P.LED_ACTIVITY, P.LED_LINK, P.LED_FAULT)]

    def set(self, activity, link, fault):
        for pin, on in zip(self.pins, (activity, link, fault)):
            pin.value(1 if on else 0)


def idle(ms):
    time.sleep_ms(ms)
