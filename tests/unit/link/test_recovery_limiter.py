"""The password-guess limiter of the certificate-less exchanges (recovery, pairing)."""

from __future__ import annotations

import threading
import time

from firmware.link.recovery import RecoveryLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_guesses_count_per_network_not_per_address() -> None:
    limiter = RecoveryLimiter(max_failures=3, window_s=60, clock=Clock())
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert limiter.admit(host) is None
        limiter.failed(host)
    refusal = limiter.admit("10.0.0.200")
    assert refusal is not None and "10.0.0.0/24" in refusal
    assert limiter.admit("10.0.1.1") is None
    assert limiter.admit("2001:db8::1") is None
    for _ in range(3):
        limiter.failed("2001:db8::1")
    assert limiter.admit("2001:db8::ffff") is not None  # the same /64
    assert limiter.admit("2001:db8:0:1::1") is None


def test_the_unit_budget_locks_every_source_out_for_longer_each_time() -> None:
    clock = Clock()
    limiter = RecoveryLimiter(max_failures=100, window_s=60, unit_max_failures=3, clock=clock)
    for lockout, length in ((1, 60.0), (2, 120.0), (3, 240.0)):
        for i in range(4):  # one guess each from four networks: a distributed guesser
            source = f"192.0.{lockout}.{i}" if i else f"198.51.{lockout}.1"
            assert limiter.admit(source) is None
            limiter.failed(f"203.0.{lockout * 10 + i}.1")
        assert limiter.lockouts == lockout
        assert limiter.locked_until == clock.now + length
        refusal = limiter.admit("100.64.0.1")  # a network that never guessed
        assert refusal is not None and "this unit" in refusal
        clock.now += length - 1
        assert limiter.admit("100.64.0.1") is not None
        clock.now += 1
        assert limiter.locked_until == 0.0


def test_the_table_is_bounded_and_expires_from_its_oldest_end() -> None:
    clock = Clock()
    limiter = RecoveryLimiter(window_s=60, max_sources=100, clock=clock)
    for i in range(1000):
        limiter.admit(f"10.{i // 256}.{i % 256}.1")
        clock.now += 0.01
    assert len(limiter._windows) == 100
    clock.now += 61
    limiter.admit("192.0.2.1")
    assert len(limiter._windows) == 1


def _per_call(limiter: RecoveryLimiter, calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        limiter.admit(f"172.16.{i % 200}.1")
    return (time.perf_counter() - started) / calls


def test_a_call_does_not_cost_more_with_forty_thousand_sources_in_the_table() -> None:
    small = RecoveryLimiter(clock=Clock())
    large = RecoveryLimiter(clock=Clock())
    for i in range(40_000):
        large.admit(f"2001:db8:{i >> 8:x}:{i & 0xff:x}::1")
    assert len(large._windows) == 40_000
    # Side by side in one run; before the fix every call swept the whole table (~6 ms).
    ratio = min(_per_call(large, 2000) for _ in range(3)) / \
        min(_per_call(small, 2000) for _ in range(3))
    assert ratio < 10, f"a call costs {ratio:.1f}x more with 40,000 sources"


def test_concurrent_failures_are_all_counted() -> None:
    limiter = RecoveryLimiter(max_failures=10**9, unit_max_failures=10**9, clock=Clock())

    def guess(n: int) -> None:
        for _ in range(2000):
            limiter.failed(f"10.{n}.0.1")

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(w.failures for w in limiter._windows.values()) == 16_000
    assert limiter._unit_window is not None and limiter._unit_window.failures == 16_000


def test_a_lockout_records_its_length_and_the_wrong_proofs_per_network() -> None:
    clock = Clock()
    limiter = RecoveryLimiter(max_failures=100, window_s=60, unit_max_failures=3, clock=clock)
    assert limiter.last_lockout is None and limiter.snapshot()["lockouts"] == 0
    for source in ("192.0.2.1", "192.0.2.9", "198.51.100.7", "2001:db8::1"):
        limiter.failed(source)
    lockout = limiter.last_lockout
    assert lockout is not None and lockout.length_s == 60.0 and lockout.number == 1
    assert lockout.failures == 4
    assert lockout.prefixes == (("192.0.2.0/24", 2), ("198.51.100.0/24", 1),
                                ("2001:db8::/64", 1))
    snap = limiter.snapshot()
    assert snap["lockouts"] == 1 and snap["locked_for_s"] == 60.0
    assert snap["last_lockout"] == {"length_s": 60.0, "failures": 4, "number": 1,
                                    "prefixes": [["192.0.2.0/24", 2], ["198.51.100.0/24", 1],
                                                 ["2001:db8::/64", 1]]}
    # The next window counts afresh: the networks of the first do not carry over.
    clock.now += 61
    for source in ("203.0.113.1",) * 4:
        limiter.failed(source)
    second = limiter.last_lockout
    assert second is not None and second.number == 2 and second.length_s == 120.0
    assert second.prefixes == (("203.0.113.0/24", 4),)
