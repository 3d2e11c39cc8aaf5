# A stand-in for MicroPython's `machine` module on the Unix port (tests only), so the
# controller's real board/panel/hw.py can be driven: pins hold a level the test sets,
# the I2C bus and the UART record what is written.


class Pin:
    IN = 0
    OUT = 1
    PULL_UP = 1
    pins = {}

    def __init__(self, n, mode=-1, pull=-1):
        self.n = n
        self.mode = mode
        self.level = 1 if pull == Pin.PULL_UP else 0
        Pin.pins[n] = self

    def value(self, v=None):
        if v is None:
            return self.level
        self.level = v


class I2C:
    last = None

    def __init__(self, bus, sda=None, scl=None, freq=0):
        self.bus = bus
        self.pins = (sda.n, scl.n)
        self.freq = freq
        self.commands = []
        self.data = []
        I2C.last = self

    def writeto(self, addr, buf):
        self.commands.append((addr, bytes(buf)))

    def writevto(self, addr, bufs):
        self.data.append((addr, b"".join(bytes(b) for b in bufs)))


class UART:
    last = None

    def __init__(self, uart_id, baudrate=0, tx=None, rx=None, rxbuf=0):
        self.args = (uart_id, baudrate, tx.n, rx.n)
        self.written = bytearray()
        self.incoming = bytearray()
        UART.last = self

    def any(self):
        return len(self.incoming)

    def read(self):
        data = bytes(self.incoming)
        self.incoming = bytearray()
        return data or None

    def write(self, data):
        self.written += data
