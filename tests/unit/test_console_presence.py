"""The one-time erase code of the console (firmware/console/presence.py)."""

from __future__ import annotations

from pathlib import Path

from firmware.console.presence import MAX_WRONG, TTL_S, PresenceCode


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _code(path: Path) -> str:
    return next(line.split(": ", 1)[1] for line in path.read_text().splitlines()
                if line.startswith("code: "))


def test_the_code_survives_a_restart_is_used_once_and_expires(tmp_path: Path) -> None:
    path, clock = tmp_path / "code.txt", Clock()
    remounts: list[bool] = []
    p = PresenceCode(path, remount=remounts.append, clock=clock)
    assert p.issue() and remounts == [True, False]
    code = _code(path)
    assert len(code) == 11 and path.stat().st_mode & 0o777 == 0o600
    # Another console process (after a power cycle) reads the same code.
    again = PresenceCode(path, clock=clock)
    assert not again.issue() and _code(path) == code
    assert again.check(code.replace("-", " ").lower())
    assert not path.exists() and not again.check(code)  # once
    assert p.issue() and _code(path) != code
    clock.now += TTL_S
    assert not p.check(_code(path))  # expired
    assert p.issue()


def test_wrong_entries_replace_the_code(tmp_path: Path) -> None:
    path, clock = tmp_path / "code.txt", Clock()
    p = PresenceCode(path, clock=clock)
    p.issue()
    code = _code(path)
    for _ in range(MAX_WRONG - 1):
        assert not p.check("22222-22222")
    assert _code(path) == code
    assert not p.check("22222-22222")
    assert _code(path) != code and not p.check(code)


def test_a_file_that_is_not_a_code_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "code.txt"
    path.write_text("code: \nissued: x\n")
    p = PresenceCode(path, clock=Clock())
    assert not p.check("") and not p.check("anything")
    assert p.issue()
