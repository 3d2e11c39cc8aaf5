"""The config slot reader: decode_slot reports bad contents and never raises."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from _common import main

    from firmware.config.store import decode_slot


def one_input(data: bytes) -> None:
    decode_slot(0, data, None)


if __name__ == "__main__":
    main("config_slot", one_input)
