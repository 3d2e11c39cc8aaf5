"""Replay of a unit's recorded command stream onto a target (a file, or an NBD export).

The target first receives the image at the start point; then every write applied
between the two points is issued again with its original offset, in seq order, and
every barrier among them becomes a flush (fsync of a file, NBD_CMD_FLUSH), so the
target passes through each consistent point the host declared.  At `recorded` pace
the commands keep the spacing of their recorded times; at `max` they go as fast as
the target takes them.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from firmware.remote.errors import StoreUsageError
from firmware.remote.unit import CHUNK_SIZE, ReplayCommand, UnitStore

PACES = ("max", "recorded")
NS = 1_000_000_000


@dataclass(frozen=True)
class ReplayReport:
    start_seq: int
    end_seq: int
    writes: int
    barriers: int
    bytes: int
    seconds: float
    #: At recorded pace: the largest lateness of a command against its recorded time.
    max_lag_ms: float


class _FileTarget:
    def __init__(self, path: str, size: int) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, size)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class _NbdTarget:
    def __init__(self, url: str, size: int) -> None:
        from firmware.nbd.client import NbdClient

        u = urllib.parse.urlsplit(url)
        if u.hostname is None:
            raise StoreUsageError(f"replay target {url!r} names no host")
        self._client = NbdClient(u.hostname, u.port or 10809, u.path.lstrip("/"))
        if self._client.size < size:
            raise StoreUsageError(f"replay target {url} holds {self._client.size} bytes, "
                                  f"the unit {size}")

    def write(self, offset: int, data: bytes) -> None:
        self._client.write(offset, data)

    def flush(self) -> None:
        self._client.flush()

    def close(self) -> None:
        self._client.close()


def replay(unit: UnitStore, target: str, *, from_seq: int | None = None,
           to_seq: int | None = None, from_ns: int | None = None, to_ns: int | None = None,
           pace: str = "max", sleep: Callable[[float], None] = time.sleep) -> ReplayReport:
    """Replay the commands between the two points onto `target` (a path or nbd://)."""
    if pace not in PACES:
        raise StoreUsageError(f"pace {pace!r} is not one of {', '.join(PACES)}")
    if not target.startswith("nbd://"):
        inside = os.path.commonpath([os.path.realpath(target),
                                     os.path.realpath(unit.directory)])
        if inside == os.path.realpath(unit.directory):
            raise StoreUsageError(f"replay target {target} lies inside the unit's own store")
    start, end, commands = unit.replay_plan(from_seq, to_seq, from_ns=from_ns, to_ns=to_ns)
    t0 = time.monotonic()
    dev = _NbdTarget(target, unit.volume_size) if target.startswith("nbd://") \
        else _FileTarget(target, unit.volume_size)
    try:
        _write_start(unit, start.seq, dev)
        lag = _issue(commands, dev, pace, sleep)
    finally:
        dev.close()
    return ReplayReport(start.seq, end.seq, sum(1 for c in commands if not c.barrier),
                        sum(1 for c in commands if c.barrier),
                        sum(len(c.data) for c in commands), time.monotonic() - t0,
                        lag * 1000)


def _write_start(unit: UnitStore, seq: int, dev: _FileTarget | _NbdTarget) -> None:
    view = unit.image_at_seq(seq)
    step = 1 << 20
    zero = bytes(CHUNK_SIZE)
    try:
        for off in range(0, unit.volume_size, step):
            data = view.pread(off, min(step, unit.volume_size - off))
            for sub in range(0, len(data), CHUNK_SIZE):
                piece = data[sub:sub + CHUNK_SIZE]
                # A file target was created sparse: its zeros need no writing.
                if piece != zero[:len(piece)] or isinstance(dev, _NbdTarget):
                    dev.write(off + sub, piece)
        dev.flush()
    finally:
        view.close()


def _issue(commands: list[ReplayCommand], dev: _FileTarget | _NbdTarget, pace: str,
           sleep: Callable[[float], None]) -> float:
    """Issue the commands; returns the largest lateness (s) at recorded pace."""
    if not commands:
        return 0.0
    first_ts = commands[0].ts
    began = time.monotonic()
    worst = 0.0
    for c in commands:
        if pace == "recorded":
            due = began + (c.ts - first_ts) / NS
            wait = due - time.monotonic()
            if wait > 0:
                sleep(wait)
            worst = max(worst, time.monotonic() - due)
        if c.barrier:
            dev.flush()
        else:
            dev.write(c.offset, c.data)
    dev.flush()
    return worst
