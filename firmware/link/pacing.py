"""Pacing of the replication traffic a sender puts on the wire (sans-IO).

`TokenBucket` holds a byte rate and a clock it is given; it never sleeps.  The sender
session asks it whether the next WRITES batch or resync chunk may go now
(`delay() == 0`), spends the frame's bytes on it, and the shell waits `delay()`
seconds (while still reading the remote's acks) before pumping again.

A frame may take the bucket into debt: the next one waits until the debt is paid, so
the long-run rate holds whatever the frame sizes, and one frame larger than the
burst still goes out.  The rate can change at any time (`set_rate`), which is how a
cap set on a running unit takes effect without reconnecting.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: The smallest batch a paced sender builds: smaller frames cost more in headers
#: and compress worse than they gain in smoothness.
MIN_PACED_BATCH = 16 * 1024
#: The bucket holds this many seconds of the rate (a short burst after idle time).
BURST_SECONDS = 0.1


class TokenBucket:
    """`rate` bytes per second (None: no cap), at most `burst` bytes ahead.

    The burst defaults to a tenth of a second of the rate, at least `MIN_PACED_BATCH`.
    """

    def __init__(self, rate: float | None = None, *, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._burst_fixed = burst
        self._stamp = clock()
        self._rate: float | None = None
        self.burst = 0
        self._tokens = 0.0
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Change the cap (None or 0: no cap).  Debt already taken stays to be paid at
        the new rate; a cap set on an idle sender starts with a full burst."""
        if rate is not None and rate < 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self._refill()
        was_capped = self._rate is not None
        self._rate = float(rate) if rate else None
        if self._rate is None:
            self.burst = 0
            self._tokens = 0.0
            return
        self.burst = self._burst_fixed if self._burst_fixed is not None else \
            max(MIN_PACED_BATCH, int(self._rate * BURST_SECONDS))
        self._tokens = min(self._tokens, float(self.burst)) if was_capped \
            else float(self.burst)

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def delay(self) -> float:
        """Seconds until the next frame may go (0.0: now)."""
        if self._rate is None:
            return 0.0
        self._refill()
        # Under a byte of debt is rounding of the clock arithmetic, not a reason to wait.
        return 0.0 if self._tokens > -1.0 else -self._tokens / self._rate

    def spend(self, n: int) -> None:
        """`n` bytes went on the wire."""
        if self._rate is None:
            return
        self._refill()
        self._tokens -= n

    def batch_bytes(self, limit: int) -> int:
        """How big a batch to build: `limit`, or under a cap about one burst, so the
        frames follow the rate smoothly instead of in bursts of a whole window."""
        if self._rate is None:
            return limit
        return max(1, min(limit, max(MIN_PACED_BATCH, self.burst)))
