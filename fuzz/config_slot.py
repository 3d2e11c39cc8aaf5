"""The config slot reader: decode_slot reports bad contents and never raises.  Odd first
bytes wrap the rest in a valid header and CRC so the fuzzer reaches the CBOR body and the
config schema instead of stopping at the checksum."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from _common import main

    from firmware.config.store import decode_slot, encode_slot


def one_input(data: bytes) -> None:
    if data and data[0] & 1:
        slot = encode_slot(data[0] >> 1, data[1:])
        decode_slot(0, slot + bytes(len(slot) // 2), None)
    else:
        decode_slot(0, data, None)


if __name__ == "__main__":
    main("config_slot", one_input)
