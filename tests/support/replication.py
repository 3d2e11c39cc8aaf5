"""Real local and remote processes on loopback, paired both ways, and the waits and checks
the replication tests share."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware.demo import pair_both_ways
from firmware.nbd.client import NbdClient, NbdClientError
from firmware.remote.server import ARRIVALS_NAME
from firmware.units import parse_size
from tests.support.faultproxy import FaultProxy
from tests.support.unitproc import LocalProc, UnitProc, free_port


class RemoteProc(UnitProc):
    """A `mirrorunit remote` subprocess serving a store under `workdir`."""

    role = "remote"

    def __init__(self, workdir: Path, *, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        self.state_dir = self.store / ".link-state"
        self.control = workdir / "remote.sock"
        self.port = free_port()
        self.log = workdir / "remote.log"
        self.args = [sys.executable, "-m", "firmware", "remote", "--listen",
                     f"127.0.0.1:{self.port}", "--store", str(self.store), "--control",
                     str(self.control), *extra]
        self.proc = None

    def unit(self, unit_id: str) -> dict[str, Any]:
        units: dict[str, Any] = self.call("status")["units"]
        return units.get(unit_id, {})

    def arrivals(self, unit_id: str) -> list[tuple[int, int, str]]:
        out = []
        for line in (self.store / unit_id / ARRIVALS_NAME).read_text().splitlines():
            parts = line.split()
            out.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
        return out


def local_link_args(name: str, address: tuple[str, int], state_dir: Path,
                    *more: str) -> tuple[str, ...]:
    return ("--peer", name, "--remote", f"{name}={address[0]}:{address[1]}",
            "--state-dir", str(state_dir), *more)


def wait_for(pred: Any, timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)  # polling an external process for a condition


def peer_status(local: LocalProc, name: str = "remote") -> dict[str, Any]:
    result: dict[str, Any] = local.call("link.status")["peers"][name]
    return result


def wait_caught_up(local: LocalProc, remote: RemoteProc, unit_id: str, name: str = "remote",
                   timeout: float = 90.0) -> int:
    """Flush the local cache, then wait until the remote applied every local seq."""
    local.call("volume.flush")

    def done() -> int | None:
        p = peer_status(local, name)
        last = p["last_seq"]
        if p["acked_seq"] != last or p["needs_resync"] or p["resync"] is not None:
            return None
        u = remote.unit(unit_id)
        # the unit's seqs are the local queue's plus its offset (a re-queued unit)
        if u.get("last_applied_seq", 0) - u.get("seq_offset", 0) != last or u.get("resync"):
            return None
        return last or -1

    return int(wait_for(done, timeout, f"{name} to catch up"))


def assert_same_image(local: LocalProc, remote: RemoteProc, unit_id: str, tmp: Path) -> None:
    out = tmp / f"export-{unit_id}-{time.monotonic_ns()}.img"
    remote.call("remote.export", unit=unit_id, output=str(out))
    a, b = local.disk.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    if a != b:
        bad = [i // 65536 for i in range(0, len(a), 65536) if a[i:i + 65536] != b[i:i + 65536]]
        raise AssertionError(f"remote image differs from local in chunks {bad[:20]}")
    out.unlink()


def assert_arrived_once_in_order(remote: RemoteProc, unit_id: str, last: int) -> int:
    """Each seq 1..last was handed to the store exactly once, in increasing order
    (a checksum resync at seq S stands for every seq up to S).  Returns how many
    log lines there were."""
    expect = 1
    entries = remote.arrivals(unit_id)
    for first, end, note in entries:
        if note == "resync":
            assert first == end and first >= expect - 1, (first, expect)
            expect = end + 1
            continue
        assert first == expect, f"seq {first} arrived where {expect} was due ({note})"
        assert end >= first
        expect = end + 1
    assert expect == last + 1, f"last arrived seq {expect - 1}, local last seq {last}"
    return len(entries)


class Pair:
    """A paired local + remote, the local reaching the remote through a fault proxy."""

    def __init__(self, tmp: Path, *, size: str = "32M", buffer_size: str = "8M",
                 local_extra: tuple[str, ...] = (), remote_extra: tuple[str, ...] = (),
                 sparse: bool = False) -> None:
        """`sparse` gives the local a sparse disk file of `size` (as a user's own image
        can be) instead of the space it reserves when it creates one: a volume larger
        than the disk space a test may take."""
        (tmp / "local").mkdir()
        if sparse:
            with open(tmp / "local" / "disk.img", "xb") as f:
                f.truncate(parse_size(size))
        (tmp / "remote").mkdir()
        self.tmp = tmp
        self.remote = RemoteProc(tmp / "remote", extra=remote_extra)
        self.local_state = tmp / "local" / "link"
        self.unit_id, _ = pair_both_ways(self.local_state, self.remote.state_dir)
        self.remote.start()
        self.proxy = FaultProxy(("127.0.0.1", self.remote.port))
        self.local = LocalProc(tmp / "local", size=size, buffer_size=buffer_size,
                               extra=local_link_args("remote", self.proxy.address,
                                                     self.local_state, *local_extra))
        self.local.start()

    def close(self) -> None:
        """Stops both processes and the proxy; closing twice is harmless."""
        for proc in (self.local, self.remote):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
        self.proxy.close()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Writer(threading.Thread):
    """Writes random blocks through NBD until stopped, reconnecting when the local
    unit restarts."""

    def __init__(self, local: LocalProc, size: int, seed: int, interval: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.local = local
        self.size = size
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.pause = threading.Event()
        self.writes = 0
        self.errors = 0

    def run(self) -> None:
        client: NbdClient | None = None
        while not self.stop_event.is_set():
            if self.pause.is_set():
                if client is not None:
                    client.close()
                    client = None
                time.sleep(0.05)  # parked while the test restarts the unit
                continue
            try:
                if client is None:
                    client = NbdClient("127.0.0.1", self.local.port, "mirrorunit")
                n = self.rng.choice((4096, 8192, 65536, 131072))
                off = self.rng.randrange(0, self.size - n, 4096)
                client.write(off, self.rng.randbytes(n))
                self.writes += 1
                if self.writes % 50 == 0:
                    client.flush()
                if self.interval:
                    time.sleep(self.interval)  # a steady host, not a flood
            except (OSError, NbdClientError):
                self.errors += 1
                client = None
                time.sleep(0.1)  # the unit is restarting
        if client is not None:
            client.close()


#: The `make_pair` fixture: `make_pair(size=, buffer_size=, local_extra=, remote_extra=,
#: sparse=)`.
MakePair = Callable[..., Pair]
