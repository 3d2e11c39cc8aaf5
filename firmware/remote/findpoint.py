"""Find the newest consistent point an application accepts (docs/time-machine.md).

The user gives a check command with `{image}` in it (`e2fsck -fn {image}`, or a script
that opens a database in the image). Candidate points are the unit's consistent points
(host flushes and FUA writes) up to an instant, newest first. The newest is tried first;
if it fails, a binary search looks for the newest passing point on the assumption that
the points pass up to some instant and fail after it (a ransomware burst, a bad
upgrade), and when a try contradicts that, the search falls back to trying the points
one by one, newest first, below the last failure.

One image file serves every try: it is written in full once, from a point-in-time view,
and moved from one point to the next by rewriting only the blocks whose source differs
between the two views (the blocks written between the points), never copied again. The
check must not change the image (use a read-only check such as `e2fsck -n`): what it
wrote would be seen by the next try.

Points just after a state-block update (`preferred`: the writes since the point before
touched one of the blocks the host rewrites at its barriers, firmware/remote/
stateblocks.py) are where an application has just committed, so they are tried first
where the search has a choice: a bisection step takes the preferred point nearest the
middle of the interval still open, if one lies in its middle half (so each step still
cuts at least a quarter off and the search stays logarithmic), and the one-by-one
fallback tries the preferred points before the others.  Which points are tried changes,
never what is found: every step keeps "the lower end passes, the upper end fails", so
the answer is the same newest passing point right below a failure.
"""

from __future__ import annotations

import bisect
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from firmware.remote.errors import RemoteError

if TYPE_CHECKING:
    from firmware.remote.pit import PointInTimeDevice
    from firmware.remote.points import Point
    from firmware.remote.unit import UnitStore

#: Bytes read from a view at a time when the image is written in full.
COPY_STEP = 1 << 20


class FindPointError(RemoteError):
    pass


@dataclass
class Try:
    number: int
    seq: int
    ts: int
    passed: bool
    seconds: float
    blocks_written: int


@dataclass
class FindPointReport:
    #: the newest point found to pass, None: none does
    point: Point | None
    tries: list[Try] = field(default_factory=list)
    candidates: int = 0
    seconds: float = 0.0
    #: the search had to fall back to one point after another
    linear: bool = False
    #: how many candidates came just after a state-block update
    preferred: int = 0


class ImageCursor:
    """One image file that shows, in turn, the unit at each point asked for."""

    def __init__(self, unit: UnitStore, path: Path) -> None:
        self.unit = unit
        self.path = path
        self.view: PointInTimeDevice | None = None
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, unit.volume_size)

    def goto(self, seq: int) -> int:
        """Make the image the unit right after write `seq`; returns blocks written."""
        new = self.unit.image_at_seq(seq)
        old = self.view
        bs = self.unit.block_size
        written = 0
        if old is None:
            for off in range(0, new.size, COPY_STEP):
                data = new.pread(off, min(COPY_STEP, new.size - off))
                if data.count(0) != len(data):  # leave holes where the image is zeros
                    os.pwrite(self._fd, data, off)
                written += len(data) // bs
        else:
            # Both views are brought up to the live mirror now: a block outside both
            # indexes reads the same from either, so only the others can differ.
            a, b = old.sources(), new.sources()
            for blk in sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)):
                os.pwrite(self._fd, new.pread(blk * bs, bs), blk * bs)
                written += 1
            old.close()
        os.fsync(self._fd)
        self.view = new
        return written

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None
        os.close(self._fd)


def run_check(command: str, image: Path, timeout: float) -> bool:
    """The user's check on the image: True when it exits 0."""
    argv = [str(image) if a == "{image}" else a.replace("{image}", str(image))
            for a in shlex.split(command)]
    try:
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def bisect_step(lo: int, hi: int, preferred: Sequence[int]) -> int:
    """The index to try between `lo` (passes, or -1) and `hi` (fails): the preferred
    index nearest the middle if one lies in the interval's middle half, else the middle.
    `preferred` is sorted."""
    mid = (lo + hi) // 2
    quarter = (hi - lo) // 4
    a, b = max(lo + 1, mid - quarter), min(hi - 1, mid + quarter)
    i = bisect.bisect_left(preferred, mid)
    best: int | None = None
    for j in (i - 1, i):
        if 0 <= j < len(preferred) and a <= preferred[j] <= b:
            if best is None or abs(preferred[j] - mid) < abs(best - mid):
                best = preferred[j]
    return mid if best is None else best


def find_point(unit: UnitStore, points: Sequence[Point], image: Path,
               check: Callable[[Path], bool],
               preferred: set[int] | frozenset[int] = frozenset()) -> FindPointReport:
    """The newest of `points` (oldest first) whose image `check` accepts; the points
    numbered in `preferred` (just after a state-block update) are tried first where
    the search has a choice."""
    t0 = time.monotonic()
    report = FindPointReport(None, candidates=len(points))
    pref = [i for i, p in enumerate(points) if p.number in preferred]
    report.preferred = len(pref)
    if not points:
        report.seconds = time.monotonic() - t0
        return report
    cursor = ImageCursor(unit, image)
    results: dict[int, bool] = {}

    def attempt(i: int) -> bool:
        if i not in results:
            p = points[i]
            t = time.monotonic()
            blocks = cursor.goto(p.seq)
            ok = check(image)
            results[i] = ok
            report.tries.append(Try(p.number, p.seq, p.ts, ok, round(time.monotonic() - t, 3),
                                    blocks))
        return results[i]

    try:
        hi = len(points) - 1
        if attempt(hi):
            report.point = points[hi]
            return report
        # Binary search for the last pass below the first failure seen.
        lo = -1  # nothing known to pass yet
        while hi - lo > 1:
            mid = bisect_step(lo, hi, pref)
            if attempt(mid):
                lo = mid
            else:
                hi = mid
        if lo >= 0:
            # The newest pass right below a failure (the check taken as monotone).
            report.point = points[lo]
            return report
        # Nothing passed in the search: try every point left, newest first.
        report.linear = True
        rest = set(pref)
        order = pref[::-1] + [i for i in range(len(points) - 1, -1, -1) if i not in rest]
        for i in order:
            if attempt(i):
                report.point = points[i]
                return report
        return report
    finally:
        cursor.close()
        report.seconds = round(time.monotonic() - t0, 3)
