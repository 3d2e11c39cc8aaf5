"""`make run`: a local unit (NBD front end) mirroring to a remote unit, both on this
machine under ./var, paired automatically.

Each unit makes its own identity on first start; the demo then pins each unit's
certificate at the other (what `mirrorunit pair add` does by hand).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .control import ControlError, wait_ready
from .local.unit import DEFAULT_CACHE_MODE

VAR = Path(os.environ.get("MIRRORUNIT_VAR", "var"))
NBD = os.environ.get("MIRRORUNIT_NBD", "127.0.0.1:10809")
LINK = os.environ.get("MIRRORUNIT_LINK", "127.0.0.1:10900")
REMOTE_NAME = "remote"


def _wait_ready(control: Path, proc: subprocess.Popen[bytes]) -> None:
    try:
        wait_ready(control, proc, interval=0.1)
    except ControlError as e:
        raise SystemExit(f"a unit did not come up: {e}") from e


def pair_both_ways(local_state: Path, remote_state: Path) -> tuple[str, str]:
    """Create both identities if needed and pin each at the other; returns the
    local unit id and the remote's fingerprint."""
    from .link.tls import PeerStore, unit_identity

    local_id, local_unit = unit_identity(local_state)
    remote_id, _ = unit_identity(remote_state)
    lp = PeerStore.in_dir(local_state)
    if lp.get(REMOTE_NAME) is None:
        lp.pin(REMOTE_NAME, remote_id.cert_der)
    rp = PeerStore.in_dir(remote_state)
    if rp.get(local_unit) is None:
        rp.pin(local_unit, local_id.cert_der)
    return local_unit, remote_id.fingerprint


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def local_command(control: Path, local_state: Path) -> list[str]:
    """The demo's `mirrorunit local`: the default cache mode of every entry point, said
    explicitly (no UPS backs a demo)."""
    return [sys.executable, "-m", "firmware", "local",
            "--disk", str(VAR / "local-disk.img"), "--buffer", str(VAR / "local-cbq.img"),
            "--nbd", NBD, "--control", str(control), "--peer", REMOTE_NAME,
            "--remote", f"{REMOTE_NAME}={LINK}", "--state-dir", str(local_state),
            "--cache-mode", DEFAULT_CACHE_MODE.value]


def main() -> int:
    # A SIGTERM to the demo must stop both units too, not orphan them.
    signal.signal(signal.SIGTERM, _interrupt)
    VAR.mkdir(parents=True, exist_ok=True)
    control = VAR / "local.sock"
    rcontrol = VAR / "remote.sock"
    store = VAR / "remote-store"
    local_state = VAR / "local-link"
    remote_state = store / ".link-state"
    unit_id, remote_fp = pair_both_ways(local_state, remote_state)
    rargs = [sys.executable, "-m", "firmware", "remote", "--listen", LINK, "--store",
             str(store), "--control", str(rcontrol), "--retention-age", "86400"]
    largs = local_command(control, local_state)
    if not (VAR / "local-disk.img").exists():
        largs += ["--size", "1G"]
    if not (VAR / "local-cbq.img").exists():
        largs += ["--buffer-size", "256M"]
    remote = subprocess.Popen(rargs)
    procs = [remote]
    try:
        _wait_ready(rcontrol, remote)
        local = subprocess.Popen(largs)
        procs.append(local)
        _wait_ready(control, local)
        mu = os.path.relpath(Path(sys.executable).parent / "mirrorunit")
        print(f"""
MirrorUnit demo: local unit {unit_id} mirrors to a remote unit on {LINK}
(files under {VAR}/; remote certificate {remote_fp[:23]}...).

  Write to the local disk (NBD):
      qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://{NBD}/mirrorunit
      nbdinfo nbd://{NBD}/mirrorunit
  Watch the link and the remote follow (sent/acked seq, lag, resync):
      {mu} link status --control {control}
      {mu} remote status --control {rcontrol}
  Export the remote's image as of now, or of an earlier instant / seq:
      {mu} remote export --control {rcontrol} --unit {unit_id} --output {VAR}/export.img
      {mu} remote export --control {rcontrol} --unit {unit_id} --at 2024-05-01T12:00:00Z \\
          --output {VAR}/then.img
      cmp {VAR}/export.img {VAR}/local-disk.img
  Or serve a point in time read-only over NBD:
      {mu} remote export --control {rcontrol} --unit {unit_id} --seq 1 --nbd 127.0.0.1:10910
  Compare both volumes by digest (moves no data):
      {mu} link verify {REMOTE_NAME} --control {control}

Press Ctrl-C to stop.
""", flush=True)
        return local.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
