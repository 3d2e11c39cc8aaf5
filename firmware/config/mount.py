"""Keeping the config partition mounted read-only except while a slot is written.

The hook finds the mount point holding the config path in mountinfo.  Only a
separate mount that is read-only now is flipped (``mount -o remount,rw`` then
``remount,ro``); a path on the root filesystem, or on a mount that is already
writable, is left alone so a development machine is never remounted.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("mirrorunit.config")

Runner = Callable[[Sequence[str]], None]
DEFAULT_MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Mount points and their per-mount options (field 6 of proc(5)'s mountinfo)."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        entries.append(MountEntry(_unescape(parts[4]), frozenset(parts[5].split(","))))
    return entries


def mount_of(path: str, entries: list[MountEntry]) -> MountEntry | None:
    """The entry whose mount point is the longest prefix of `path` (the last one mounted
    there wins, as the kernel shows stacked mounts in order)."""
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for e in entries:
        mp = e.mount_point.rstrip("/") or "/"
        if real == mp or real.startswith(mp if mp.endswith("/") else mp + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/"):
                best = e
    return best


def _run(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, text=True)


@dataclass
class RemountHook:
    """A `ConfigStore` remount hook for the mount holding `path`; no-op when not needed."""

    path: str
    mountinfo: str = DEFAULT_MOUNTINFO
    runner: Runner = _run
    _target: str | None = None

    def _needs_remount(self) -> str | None:
        try:
            with open(self.mountinfo, encoding="utf-8") as f:
                entries = parse_mountinfo(f.read())
        except OSError as e:
            log.warning("config: cannot read %s (%s); not remounting", self.mountinfo, e)
            return None
        entry = mount_of(self.path, entries)
        if entry is None or entry.mount_point == "/" or not entry.read_only:
            return None
        return entry.mount_point

    def __call__(self, writable: bool) -> None:
        if writable:
            self._target = self._needs_remount()
            if self._target is None:
                return
            self._remount(self._target, "rw")
        elif self._target is not None:
            target, self._target = self._target, None
            self._remount(target, "ro")

    def _remount(self, mount_point: str, mode: str) -> None:
        log.info("config: mount -o remount,%s %s", mode, mount_point)
        try:
            self.runner(["mount", "-o", f"remount,{mode}", mount_point])
        except subprocess.CalledProcessError as e:
            raise OSError(f"mount -o remount,{mode} {mount_point} failed: "
                          f"{(e.stderr or '').strip() or e.returncode}") from e
