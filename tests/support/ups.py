"""Fakes of the UPS hardware: a settable clock and register-level I2C chips (INA219,
MAX17040/17048) behind SMBus word transfers."""

from __future__ import annotations


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


# ------------------------------------------------------------------ register-level fakes


class FakeI2CChip:
    """A chip's big-endian 16-bit registers behind SMBus word transfers.

    The chip sends the register's MSB first and SMBus puts the first byte in the
    low half of the word, so read_word_data returns the byte-swapped register.
    """

    def __init__(self, address: int) -> None:
        self.address = address
        self.regs: dict[int, int] = {}
        self.writes: list[tuple[int, int]] = []
        self.fail: OSError | None = None
        self.closed = False

    def register(self, reg: int) -> int:
        return self.regs.get(reg, 0)

    def read_word_data(self, i2c_addr: int, register: int) -> int:
        if self.fail is not None:
            raise self.fail
        if i2c_addr != self.address:
            raise OSError(121, "Remote I/O error")
        value = self.register(register) & 0xFFFF
        msb_first = value.to_bytes(2, "big")
        return int.from_bytes(msb_first, "little")

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None:
        if i2c_addr != self.address:
            raise OSError(121, "Remote I/O error")
        wire = value.to_bytes(2, "little")  # low byte goes on the wire first
        self.regs[register] = int.from_bytes(wire, "big")
        self.writes.append((register, self.regs[register]))

    def close(self) -> None:
        self.closed = True


class FakeIna219(FakeI2CChip):
    """INA219 semantics: Current = ShuntVoltage x Cal / 4096; Cal = 0 after reset."""

    POWER_ON_CONFIG = 0x399F

    def __init__(self, address: int = 0x42, shunt_ohms: float = 0.01) -> None:
        super().__init__(address)
        self.shunt_ohms = shunt_ohms
        self.bus_voltage = 8.2
        self.current = 0.0  # amperes into the battery
        self.reset()

    def reset(self) -> None:
        self.regs = {0x00: self.POWER_ON_CONFIG, 0x05: 0}

    def _shunt_raw(self) -> int:
        return round(self.current * self.shunt_ohms / 10e-6)  # 10 uV per LSB

    def register(self, reg: int) -> int:
        if reg == 0x01:
            return self._shunt_raw() & 0xFFFF
        if reg == 0x02:
            return (round(self.bus_voltage / 0.004) << 3) | 0b10  # CNVR set
        if reg == 0x04:
            return int(self._shunt_raw() * self.regs[0x05] / 4096) & 0xFFFF
        return self.regs.get(reg, 0)

    def charging(self, volts: float = 7.9, amps: float = 0.8) -> None:
        self.bus_voltage, self.current = volts, amps

    def mains_lost(self, volts: float = 7.6, amps: float = -1.2) -> None:
        self.bus_voltage, self.current = volts, amps


class FakeMax1704x(FakeI2CChip):
    def __init__(self, chip: str = "max17048", address: int = 0x36) -> None:
        super().__init__(address)
        self.chip = chip
        self.regs[0x08] = 0x0012 if chip == "max17048" else 0x0002
        self.regs[0x06] = 0
        self.set(volts=4.1, soc=90.0, rate=5.0)

    def set(self, *, volts: float, soc: float, rate: float = 0.0) -> None:
        if self.chip == "max17048":
            self.regs[0x02] = round(volts / 78.125e-6)
            self.regs[0x16] = round(rate / 0.208) & 0xFFFF
        else:
            self.regs[0x02] = round(volts / 1.25e-3) << 4  # 12 bits, left-justified
        self.regs[0x04] = round(soc * 256)

    def register(self, reg: int) -> int:
        if reg == 0x16 and self.chip != "max17048":
            raise OSError(121, "Remote I/O error")
        return self.regs.get(reg, 0)
