"""Run inside the test guest: a paired local unit (USB front end, the default
write-through cache mode: the unit still reports WCE, so Linux's sd sends SYNCHRONIZE
CACHE at its flushes) and a remote unit on loopback.

    python -m tests.support.vm.points_guest start WORKDIR SIZE SERIAL
    python -m tests.support.vm.points_guest drain WORKDIR

`start` pairs the two, starts both in the background and returns once the local answers
on its control socket; `drain` waits until the remote acknowledged every write, then
stops both units cleanly (SIGTERM) so the remote's store can be read offline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from firmware.control import ControlError, call
from firmware.demo import pair_both_ways

LINK = "127.0.0.1:7789"


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except ControlError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def start(work: Path, size: str, serial: str) -> None:
    (work / "local").mkdir(parents=True, exist_ok=True)
    store = work / "remote" / "store"
    unit, _ = pair_both_ways(work / "local" / "link", store / ".link-state")
    print(f"UNIT {unit}", flush=True)
    py = sys.executable
    remote = subprocess.Popen(
        [py, "-m", "firmware", "remote", "--listen", LINK, "--store", str(store),
         "--control", str(work / "remote.sock")],
        stdout=open(work / "remote.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True)
    local = subprocess.Popen(
        [py, "-m", "firmware", "local", "--disk", str(work / "local" / "disk.img"),
         "--size", size, "--buffer", str(work / "local" / "cbq.img"), "--buffer-size", "96M",
         "--nbd", "", "--frontend", "usb", "--usb-udc", "dummy_udc.0", "--usb-serial", serial,
         "--control", str(work / "local.sock"),
         "--peer", "remote", "--remote", f"remote={LINK}",
         "--state-dir", str(work / "local" / "link")],
        stdout=open(work / "local.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True)
    (work / "remote.pid").write_text(str(remote.pid))
    (work / "local.pid").write_text(str(local.pid))
    _wait(lambda: bool(call(work / "local.sock", "status")), 120, "the local unit")
    print("started", flush=True)


def _stop(pidfile: Path, timeout: float) -> None:
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # An orphan that exited stays a zombie until PID 1 reaps it: gone too.
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise SystemExit(f"{pidfile.stem} unit did not stop within {timeout:.0f} s")


def drain(work: Path) -> None:
    def caught_up() -> bool:
        p = call(work / "local.sock", "link.status")["peers"]["remote"]
        return bool(p["last_seq"]) and p["acked_seq"] == p["last_seq"]

    _wait(caught_up, 240, "the remote to take every write")
    print("replicated", flush=True)
    _stop(work / "local.pid", 60)
    _stop(work / "remote.pid", 60)
    print("stopped", flush=True)


def main() -> None:
    cmd, work = sys.argv[1], Path(sys.argv[2])
    if cmd == "start":
        start(work, sys.argv[3], sys.argv[4])
    elif cmd == "drain":
        drain(work)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
