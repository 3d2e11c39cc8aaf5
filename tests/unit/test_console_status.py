"""The console's status screen line for a running verify or checksum resync."""

from __future__ import annotations

from firmware.console.screens.status import resync_line
from firmware.control.status import ResyncProgress


def _progress(done: int, eta: float | None, differing: int = 0) -> ResyncProgress:
    return ResyncProgress(kind="verify", chunks=3276800, chunk_bytes=65536, seq=41,
                          started_ns=1, chunks_done=done, chunks_differing=differing,
                          chunks_per_s=250000.0, mib_per_s=15625.0, eta_s=eta)


def test_a_running_verify_shows_how_far_how_fast_and_how_long_to_go() -> None:
    line = resync_line(_progress(819200, 9.8))
    assert line == ("  verify   819200/3276800 chunks (25.0%), 250000/s 15625 MiB/s, "
                    "ETA 10 s")
    assert len(line) <= 78
    assert resync_line(_progress(0, None)).endswith("ETA -")
    assert resync_line(_progress(1000, 3.0, differing=2)).endswith("ETA 3 s, 2 differ")
