"""The link settings of a running local unit changed live (config `link.bandwidth`,
`link.compression`): a cap slows the replicated bytes to itself and lifting it lets them
go faster again, a codec change shows in status and in the wire bytes against the data
bytes, and the host's NBD disk stays connected and in use throughout."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

from firmware.config import Config
from firmware.config.live import apply_live
from firmware.config.schema import diff_live, set_value
from firmware.control.status import PeerLinkStatus, check_shape
from firmware.nbd.client import NbdClient
from tests.support.replication import (
    MakePair,
    assert_same_image,
    peer_status,
    wait_caught_up,
    wait_for,
)

BLOCK = 64 * 1024


def _set(local: Any, cfg: Config, key: str, text: str) -> Config:
    """Change `key` through the path `config set --control` takes."""
    new = set_value(cfg, key, text)
    report = apply_live(diff_live(cfg, new), new, local.control)
    assert [k for k, _ in report.applied] == [key], report.lines()
    return new


def _status(local: Any) -> PeerLinkStatus:
    return check_shape(peer_status(local), PeerLinkStatus, "peer")


def _wire_rate(local: Any, window: float) -> float:
    """WRITES frame bytes per second the link sent over `window` seconds."""
    t0, b0 = time.monotonic(), _status(local).get("write_wire_bytes", 0)
    deadline = t0 + window
    while time.monotonic() < deadline:  # a rate needs a window: sample until it ends
        time.sleep(0.1)
    t1, b1 = time.monotonic(), _status(local).get("write_wire_bytes", 0)
    return (b1 - b0) / (t1 - t0)


def test_a_bandwidth_cap_is_set_and_lifted_live(make_pair: MakePair, tmp_path: Path) -> None:
    pair = make_pair(size="8M", buffer_size="8M")
    local, remote, unit = pair.local, pair.remote, pair.unit_id
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as host:
        host.write(0, b"\1" * BLOCK)
        host.flush()
        wait_caught_up(local, remote, unit)
        sessions, pid = _status(local)["sessions"], local.proc.pid if local.proc else None
        cap = 256 * 1024
        cfg = _set(local, Config.defaults(), "link.bandwidth", "256K/s")
        assert _status(local)["bandwidth"] == cap
        # Incompressible, so the wire bytes are the data bytes: 3 MiB, 12 s at the cap.
        rng = random.Random(7)
        for i in range(48):
            host.write(BLOCK + i * BLOCK, rng.randbytes(BLOCK))
        host.flush()
        wait_for(lambda: _status(local)["lag_bytes"] > 0, 10, "writes to queue")
        capped = _wire_rate(local, 2.5)
        assert 0.7 * cap < capped < 1.3 * cap, (capped, cap)
        left = _status(local)["lag_bytes"]
        assert left > 1 << 20  # still plenty queued: the cap held it back
        _set(local, cfg, "link.bandwidth", "unlimited")
        assert _status(local)["bandwidth"] is None
        t0 = time.monotonic()
        wait_caught_up(local, remote, unit, timeout=30)
        lifted = left / (time.monotonic() - t0)
        assert lifted > 4 * cap, (lifted, cap)
        # Neither the link nor the unit restarted; the host's disk answers.
        assert _status(local)["sessions"] == sessions
        assert local.proc is not None and local.proc.pid == pid
        assert host.read(0, BLOCK) == b"\1" * BLOCK
    assert_same_image(local, remote, unit, tmp_path)
    print(f"cap {cap} B/s: measured {capped:.0f} B/s ({capped / cap:.2f} x); "
          f"lifted: {left} bytes at {lifted:.0f} B/s")


class Host(threading.Thread):
    """One NBD connection that keeps writing compressible blocks and reading them
    back until stopped; any error ends it and is kept."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = NbdClient("127.0.0.1", port, "mirrorunit")
        self.stop_flag = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                n = self.rounds
                data = (f"block {n:08d} of a compressible text ".encode() * 2048)[:BLOCK]
                off = (n % 96) * BLOCK
                self.client.write(off, data)
                if self.client.read(off, BLOCK) != data:
                    raise AssertionError(f"read back differs at {off}")
                if n % 8 == 7:
                    self.client.flush()
                self.rounds += 1
                time.sleep(0.01)  # a host's pace, not a race: the writes are what matter
        except BaseException as exc:  # noqa: BLE001 - kept for the test to raise
            self.error = exc

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(10)
        self.client.flush()
        self.client.close()


def _ratio_after_change(local: Any, host: Host) -> float:
    """Wire bytes over data bytes of WRITES sent from now on, over 64 more blocks."""
    s0 = _status(local)
    start = host.rounds

    def enough() -> bool:
        return host.rounds >= start + 64 and \
            _status(local).get("write_data_bytes", 0) - s0.get("write_data_bytes", 0) > 32 * BLOCK

    wait_for(enough, 30, "the host to write more")
    s1 = _status(local)
    data = s1.get("write_data_bytes", 0) - s0.get("write_data_bytes", 0)
    return (s1.get("write_wire_bytes", 0) - s0.get("write_wire_bytes", 0)) / data


def test_compression_changes_live_while_the_host_uses_its_disk(make_pair: MakePair,
                                                               tmp_path: Path) -> None:
    pair = make_pair(size="8M", buffer_size="8M")
    local, remote, unit = pair.local, pair.remote, pair.unit_id
    host = Host(local.port)
    host.start()
    try:
        wait_for(lambda: _status(local)["compression"] == "zstd", 30, "the link to come up")
        sessions = _status(local)["sessions"]
        ratios = {"auto": _ratio_after_change(local, host)}
        assert ratios["auto"] < 0.3
        cfg = _set(local, Config.defaults(), "link.compression", "none")
        wait_for(lambda: _status(local)["compression"] == "none", 10, "codec none")
        assert _status(local)["compression_offered"] == ["none"]
        ratios["none"] = _ratio_after_change(local, host)
        assert ratios["none"] > 0.99
        # zstd was negotiated at HELLO: it comes back on the same session.
        cfg = _set(local, cfg, "link.compression", "zstd")
        wait_for(lambda: _status(local)["compression"] == "zstd", 10, "codec zstd")
        ratios["zstd"] = _ratio_after_change(local, host)
        assert ratios["zstd"] < 0.3
        assert _status(local)["sessions"] == sessions
        # zlib was not: only the link reconnects to offer it.
        cfg = _set(local, cfg, "link.compression", "zlib")
        wait_for(lambda: _status(local)["compression"] == "zlib", 30, "codec zlib")
        assert _status(local)["sessions"] == sessions + 1
        ratios["zlib"] = _ratio_after_change(local, host)
        assert ratios["zlib"] < 0.3
        assert host.error is None and host.is_alive()
    finally:
        host.stop()
    if host.error is not None:
        raise host.error
    assert host.rounds > 200
    wait_caught_up(local, remote, unit)
    assert_same_image(local, remote, unit, tmp_path)
    print("wire bytes / data bytes of WRITES: " +
          ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) +
          f"; the host did {host.rounds} write+read rounds on one NBD connection")
