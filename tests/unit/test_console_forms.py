"""The console's forms on a terminal smaller than the form (found by
fuzz/console_forms.py): editing a field below the last row moved the cursor outside
the window, and curses.error ended the console."""

from __future__ import annotations

import curses
from pathlib import Path

from firmware.config import ConfigStore, StoreSettings
from firmware.console.app import Console
from firmware.console.base import ConsoleSettings
from firmware.console.screens.network import NETWORK_FIELDS
from tests.support.curses_window import FakeWindow

UP, ENTER = curses.KEY_UP, curses.KEY_ENTER


def _console(tmp_path: Path, h: int, w: int, keys: list[int]) -> tuple[Console, FakeWindow]:
    win = FakeWindow(h, w, keys)
    store = ConfigStore(StoreSettings(str(tmp_path / "cfg")))
    return Console(win, ConsoleSettings(store=store, control=str(tmp_path / "none.sock"))), win


def test_the_fuzzer_s_input_edits_a_field_below_a_6x20_terminal(tmp_path: Path) -> None:
    # The crashing input: Up (to the last field, the peer fingerprint on row 8), then
    # Enter to edit it, Enter, Enter, and the keys 2 1 1 # {.
    keys = [UP, ENTER, ENTER, ENTER, 0x02, 0x01, 0x01, ord("#"), ord("{")]
    con, win = _console(tmp_path, 6, 20, keys)
    assert con._recovery_form(with_unit=False) is None  # left with Esc, nothing raised
    assert win.pos == len(keys)


def test_a_value_typed_into_a_field_off_the_screen_is_taken(tmp_path: Path) -> None:
    # Down to DNS (row 6 of a 5-row terminal), type a server, Enter, save.
    keys = [curses.KEY_DOWN] * 4 + [ENTER, 21, *b"192.0.2.53", ENTER, ord("s")]
    con, _ = _console(tmp_path, 5, 40, keys)
    cfg = con.config()
    assert cfg is not None
    changes = con.edit_form("network", NETWORK_FIELDS, {f.key: cfg[f.key] for f in NETWORK_FIELDS})
    assert changes == {"network.dns": ["192.0.2.53"]}
