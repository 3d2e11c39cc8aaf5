"""Run inside the test guest (one interpreter, since each start costs seconds under TCG):
a paired local and remote unit on loopback, an ext4 image written through the local's NBD
front end and replicated, then the local killed (the site lost).  Prints `UNIT <id>` and
`replicated` on success.  Usage: python -m tests.support.vm.standby_guest WORKDIR IMAGE"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from firmware.control import ControlError, call
from firmware.demo import pair_both_ways
from firmware.nbd.client import NbdClient


def _wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():  # type: ignore[operator]
                return
        except ControlError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    work, image = Path(sys.argv[1]), Path(sys.argv[2])
    unit, _ = pair_both_ways(work / "local" / "link", work / "remote" / "store" / ".link-state")
    print(f"UNIT {unit}", flush=True)
    py = sys.executable
    remote = subprocess.Popen(
        [py, "-m", "firmware", "remote", "--listen", "127.0.0.1:7788", "--store",
         str(work / "remote" / "store"), "--control", str(work / "remote.sock")],
        stdout=open(work / "remote.log", "ab"), stderr=subprocess.STDOUT)
    local = subprocess.Popen(
        [py, "-m", "firmware", "local", "--disk", str(work / "local" / "disk.img"), "--size",
         "48M", "--buffer", str(work / "local" / "cbq.img"), "--buffer-size", "32M", "--nbd",
         "127.0.0.1:10809", "--control", str(work / "local.sock"), "--peer", "remote",
         "--remote", "remote=127.0.0.1:7788", "--state-dir", str(work / "local" / "link")],
        stdout=open(work / "local.log", "ab"), stderr=subprocess.STDOUT)
    (work / "remote.pid").write_text(str(remote.pid))
    _wait(lambda: call(work / "local.sock", "status"), 120, "the local unit")
    data = image.read_bytes()
    with NbdClient("127.0.0.1", 10809, "mirrorunit") as c:
        for off in range(0, len(data), 1 << 20):
            piece = data[off:off + (1 << 20)]
            if piece.count(0) != len(piece):
                c.write(off, piece)
        c.flush()

    def caught_up() -> bool:
        p = call(work / "local.sock", "link.status")["peers"]["remote"]
        return bool(p["last_seq"]) and p["acked_seq"] == p["last_seq"]

    _wait(caught_up, 240, "the remote to take every write")
    print("replicated", flush=True)
    os.kill(local.pid, signal.SIGKILL)  # the local site is lost
    local.wait()


if __name__ == "__main__":
    main()
