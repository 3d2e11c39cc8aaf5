"""`make run`: a local unit on file-backed storage under ./var, served over NBD."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .control import ControlError, call

VAR = Path(os.environ.get("MIRRORUNIT_VAR", "var"))
NBD = os.environ.get("MIRRORUNIT_NBD", "127.0.0.1:10809")


def _wait_ready(control: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the unit exited with status {proc.returncode}")
        try:
            call(control, "status")
            return
        except ControlError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> int:
    VAR.mkdir(parents=True, exist_ok=True)
    control = VAR / "local.sock"
    args = [sys.executable, "-m", "firmware", "local",
            "--disk", str(VAR / "local-disk.img"), "--buffer", str(VAR / "local-cbq.img"),
            "--nbd", NBD, "--control", str(control)]
    if not (VAR / "local-disk.img").exists():
        args += ["--size", "1G"]
    if not (VAR / "local-cbq.img").exists():
        args += ["--buffer-size", "256M"]
    proc = subprocess.Popen(args)
    try:
        _wait_ready(control, proc)
        mu = os.path.relpath(Path(sys.executable).parent / "mirrorunit")
        print(f"""
MirrorUnit local unit is running (files under {VAR}/).

  Connect a client to its disk (NBD):
      nbdinfo nbd://{NBD}/mirrorunit
      qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://{NBD}/mirrorunit
      sudo nbd-client {NBD.split(':')[0]} {NBD.split(':')[1]} /dev/nbd0 -N mirrorunit
  See its status (volume, CBQ fill, mode, queued writes per peer):
      {mu} status --control {control}
  Check the queue file offline:
      {mu} cbq inspect {VAR / 'local-cbq.img'}

Press Ctrl-C to stop.
""", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
