"""The console's keyboard input: the screens' forms and line editor fed fuzzed keys on a
terminal of a fuzzed size, and what they accept saved and read back through the real
config store (in memory).

A form is one of the screens' own field lists (network, buffer and volume, cache mode,
notifications, a peer, the recovery form with and without a unit id); then the admin
password screen (typed twice, the strength policy, the hash) and the SSH key paste.
Only a refusal may come out: ConfigError / ConfigStoreError from the store,
SshSetupError from the key check (all MirrorUnitError). Anything else escaping
(curses.error from a window too small included), a screen that does not return once the
keys run out (KeysRanOut), or a value the store accepts but does not read back the same,
fails.

Each input byte is one key as curses' getch() returns it (so a seed is the text typed),
except 0x80-0x85 for the arrow, Enter, backspace, resize and timeout codes.  The form
and the terminal size come from the input's last two bytes (FuzzedDataProvider takes
integers from the end).  Password hashes use the smallest Argon2id parameters accepted
(8 KiB, one pass): the full cost would make each input take a second and say nothing
more about the input handling."""

from __future__ import annotations

import curses
import logging
from typing import Any

import atheris

# zxcvbn is the strength estimator the password policy calls, a library rather than the
# console's code; left uninstrumented it costs a third as much per password.
import zxcvbn  # noqa: F401

with atheris.instrument_imports():
    from _common import MemorySlots, main

    from firmware.config import ConfigError, ConfigStore, ConfigStoreError, StoreSettings
    from firmware.config import password as password_mod
    from firmware.config.kdf import Argon2Params
    from firmware.config.password import check_admin_password
    from firmware.config.seal import make_seal_key
    from firmware.console.app import Console
    from firmware.console.base import ConsoleSettings
    from firmware.console.forms import FormField
    from firmware.console.screens.buffer import BUFFER_FIELDS
    from firmware.console.screens.cache import CACHE_FIELDS
    from firmware.console.screens.network import NETWORK_FIELDS
    from firmware.console.screens.notify import NOTIFY_FIELDS
    from firmware.console.screens.peers import PEER_FIELDS
    from firmware.ssh_access import SshSetupError, parse_authorized_keys
    from tests.support.curses_window import FakeWindow

CHEAP = Argon2Params(memory_kib=8, time_cost=1)
password_mod.PASSWORD_PARAMS = CHEAP
make_seal_key.__defaults__ = (CHEAP, None)
SLOT_SIZE = 16 << 10
SIZES = ((24, 80), (25, 80), (50, 132), (12, 40), (6, 20))
SPECIAL = {0x80: curses.KEY_UP, 0x81: curses.KEY_DOWN, 0x82: curses.KEY_ENTER,
           0x83: curses.KEY_BACKSPACE, 0x84: curses.KEY_RESIZE, 0x85: -1}
FORMS: tuple[tuple[list[FormField], bool], ...] = (
    (NETWORK_FIELDS, False), (BUFFER_FIELDS, False), (CACHE_FIELDS, False),
    (NOTIFY_FIELDS, False), (PEER_FIELDS, True))
MODES = len(FORMS) + 4  # the forms, recovery without / with unit id, password, SSH key
logging.disable(logging.CRITICAL)


def _store(slots: MemorySlots) -> ConfigStore:
    return ConfigStore(StoreSettings("console-cfg", slot_size=SLOT_SIZE), opener=slots.opener)


def _saved_reads_back(store: ConfigStore, changes: dict[str, Any]) -> None:
    try:
        result = store.update(changes)
    except (ConfigError, ConfigStoreError):
        return
    assert store.load().config == result.config, changes


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, MODES - 1)
    h, w = SIZES[fdp.ConsumeIntInRange(0, len(SIZES) - 1)]
    keys = [SPECIAL.get(b, b) for b in fdp.ConsumeBytes(fdp.remaining_bytes())]
    scr = FakeWindow(h, w, keys)
    slots = MemorySlots()
    store = _store(slots)
    con = Console(scr, ConsoleSettings(store=store, control="unit.sock"))
    if mode < len(FORMS):
        fields, raw = FORMS[mode]
        if raw:
            values: dict[str, Any] = {"name": "", "address": "", "fingerprint": ""}
        else:
            cfg = store.load().config or store._editable()[0]
            values = {f.key: cfg[f.key] for f in fields}
        changes = con.edit_form("fuzz", fields, values,
                                raw_keys={f.key for f in fields} if raw else None)
        if changes is None:
            return
        _saved_reads_back(store, {"peers": [{**values, **changes}]} if raw else changes)
    elif mode - len(FORMS) < 2:
        form = con._recovery_form(with_unit=mode - len(FORMS) == 1)
        if form is not None:
            draft, peer = form
            assert set(peer) >= {"address", "fingerprint"}
            store.save(draft)
            assert store.load().config == draft
    elif mode - len(FORMS) == 2:
        typed: list[str] = []
        setter = store.set_admin_password

        def recorded(clear: str) -> Any:
            result = setter(clear)
            typed.append(clear)
            return result
        store.set_admin_password = recorded  # type: ignore[method-assign]
        if con.set_password():
            loaded = store.load().config
            assert loaded is not None and check_admin_password(loaded, typed[-1])
            assert not check_admin_password(loaded, typed[-1] + "x")
    else:
        text = con.edit_line(4, 2, width=min(76, w - 3))
        if text is not None:
            try:
                parse_authorized_keys(text)
            except SshSetupError:
                pass


if __name__ == "__main__":
    main("console_forms", one_input)
