"""What a role needs before it runs from the unit's own configuration (the card image's
services start `mirrorunit appliance local|remote`, firmware/apps/appliance/cli.py).

The console writes one config (firmware/config); the services must not repeat it in
their command lines.  The appliance reads the config slots and the storage map first boot
wrote (`storage.env`), prepares what the role needs, and runs the role with settings built
from the config:

* the link identity stays on the config partition (read-only); the unit gets a working
  copy of its state directory in RAM (key and certificate linked, pinned peers copied),
  because the link also keeps files there at run time (peers' sealed backups, which peers
  send again on every session);
* a configured peer whose certificate is not pinned yet is fetched from its address and
  pinned only if its SHA-256 matches the fingerprint typed at the console; the pin is
  saved on the config partition (remounted read-write just for that), so later boots do
  not need the peer to be up;
* the remote role keeps its per-unit mirrors and journals in a filesystem on the data
  partition: a blank partition is formatted (ext4) on first start; one that holds
  anything else is never formatted.

The role comes from the config (`role`); a unit never configured is a local unit.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.errors import MirrorUnitError

from ...fsutil import write_atomic

log = logging.getLogger("mirrorunit.appliance")

#: Where first boot records which devices hold the buffer and the data.
DEFAULT_STORAGE_ENV = "/config/storage.env"
DEFAULT_RUN_DIR = "/run/mirrorunit"
#: Only this much of a data partition is looked at to call it blank.
BLANK_PROBE_BYTES = 1 << 20

Runner = Callable[[Sequence[str]], None]


class ApplianceError(MirrorUnitError):
    """A role cannot start from this configuration; the message says why."""


@dataclass(frozen=True)
class Storage:
    buffer: str
    data: str
    where: str
    #: stable identities (partuuid:...) of an external disk's partitions, when recorded
    buffer_id: str | None = None
    data_id: str | None = None


def read_storage_env(path: str | os.PathLike[str]) -> Storage:
    """The `KEY=value` file first boot writes on the config partition."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ApplianceError(f"no storage map ({path}): {e.strerror}; has first boot run?") \
            from None
    env: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ApplianceError(f"{path} line {n}: not KEY=value")
        env[key.strip()] = value.strip()
    missing = [k for k in ("MIRRORUNIT_BUFFER", "MIRRORUNIT_DATA") if not env.get(k)]
    if missing:
        raise ApplianceError(f"{path}: {', '.join(missing)} not set")
    return Storage(env["MIRRORUNIT_BUFFER"], env["MIRRORUNIT_DATA"],
                   env.get("MIRRORUNIT_STORAGE", ""), env.get("MIRRORUNIT_BUFFER_ID") or None,
                   env.get("MIRRORUNIT_DATA_ID") or None)


def load_config(store_path: str) -> Any:
    """The stored config, or the defaults when the slots are blank or unreadable (the unit
    must keep serving its disk; the console shows the recovery screen meanwhile)."""
    from ...config.schema import Config
    from ...config.store import StoreState, open_store

    loaded = open_store(store_path).load()
    if loaded.state is StoreState.OK and loaded.config is not None:
        return loaded.config
    log.warning("config: %s; running with the defaults until it is set at the console",
                loaded.describe())
    return Config.defaults()


def role_of(store_path: str) -> str:
    return str(load_config(store_path)["role"])


# --------------------------------------------------------------------------- link state


def link_dir_of(store_path: str) -> Path:
    """The identity lives beside the config slots (what first boot and the console use)."""
    return Path(store_path).resolve().parent / "link"


def working_state_dir(persistent: Path, work: Path) -> Path:
    """A writable copy of the link state directory: key and certificate linked (never
    copied off the config partition), pinned peers copied."""
    from ...link.tls import CERT_FILE, KEY_FILE, PEERS_FILE

    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (KEY_FILE, CERT_FILE):
        src, dst = persistent / name, work / name
        if not src.exists():
            raise ApplianceError(f"no link identity in {persistent} ({name} missing); "
                                 "first boot creates it")
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)
    peers = persistent / PEERS_FILE
    if peers.exists():
        shutil.copyfile(peers, work / PEERS_FILE)
    return work


def pin_configured_peers(cfg: Any, work: Path, persistent: Path, *,
                         remount: Callable[[bool], None] | None = None,
                         fetch: Callable[[str, int], bytes] | None = None) -> list[str]:
    """Pin every configured peer whose certificate is not pinned under its fingerprint
    yet, fetching it from the peer's address.  Returns the names of the peers that are
    pinned now (the others are logged and left out of the link until the next start)."""
    from ...config.schema import split_host_port
    from ...link.errors import LinkError
    from ...link.tls import PEERS_FILE, PeerStore, TlsIdentityError, fetch_certificate, fingerprint

    fetch = fetch or (lambda host, port: fetch_certificate(host, port, timeout=10.0))
    store = PeerStore.in_dir(work)
    ready, added = [], False
    def plain(fp: str) -> str:
        return fp.replace(":", "").lower()

    for peer in cfg["peers"]:
        name, want = peer["name"], plain(peer["fingerprint"])
        have = store.get(name)
        if have is not None and plain(have.fingerprint) == want:
            ready.append(name)
            continue
        host, port = split_host_port("peers.address", peer["address"])
        try:
            der = fetch(host, port)
        except (OSError, LinkError) as e:
            log.warning("peer %s: cannot fetch its certificate from %s (%s); "
                        "its link starts once it is reachable and the unit restarts",
                        name, peer["address"], e)
            continue
        if plain(fingerprint(der)) != want:
            log.error("peer %s at %s presents fingerprint %s, not the configured %s: "
                      "not pinned", name, peer["address"], plain(fingerprint(der)), want)
            continue
        try:
            if have is not None:
                store.unpin(name)
            store.pin(name, der, fingerprint(der))
        except TlsIdentityError as e:
            log.error("peer %s: %s", name, e)
            continue
        ready.append(name)
        added = True
    if added:
        _persist(work / PEERS_FILE, persistent / PEERS_FILE, remount)
    return ready


def _persist(src: Path, dst: Path, remount: Callable[[bool], None] | None) -> None:
    if remount is not None:
        remount(True)
    try:
        write_atomic(dst, src.read_bytes(), 0o600)
    except OSError as e:
        log.error("cannot save the pinned peers on the config partition: %s", e)
    finally:
        if remount is not None:
            remount(False)


class PinKeeper:
    """Saves pins the running unit adds to its working state directory (a remote pins a
    local whose fingerprint its config lists when the local offers its certificate) onto
    the config partition, so they survive a reboot.  Polls: the unit writes the file
    atomically, and a pin every few seconds at most is not worth inotify."""

    def __init__(self, work: Path, persistent: Path,
                 remount: Callable[[bool], None] | None, interval: float = 2.0) -> None:
        from ...link.tls import PEERS_FILE

        self.src, self.dst = work / PEERS_FILE, persistent / PEERS_FILE
        self.remount, self.interval = remount, interval
        self._seen = self._stamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.src.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def poll(self) -> bool:
        """Save the working pins if they changed since the last look; True if saved."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            if self.dst.exists() and self.dst.read_bytes() == self.src.read_bytes():
                return False
        except OSError:
            pass
        _persist(self.src, self.dst, self.remount)
        log.info("pinned peers saved to %s", self.dst.parent)
        return True

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.poll()
        self._thread = threading.Thread(target=loop, name="pin-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()


# --------------------------------------------------------------------------- data partition


def _run(argv: Sequence[str]) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        raise ApplianceError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


def _signature(device: str) -> str:
    """The filesystem type blkid finds on `device`, '' for none."""
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def is_blank(device: str) -> bool:
    with open(device, "rb") as f:
        head = f.read(BLANK_PROBE_BYTES)
    return not head.strip(b"\0")


def mount_store(device: str, mount_point: Path, *, runner: Runner = _run) -> Path:
    """Mount the remote's store filesystem, formatting the partition only when blank."""
    fstype = _signature(device)
    if not fstype:
        if not is_blank(device):
            raise ApplianceError(
                f"{device} holds data but no filesystem (a local unit's mirror?); it is "
                "not formatted for the remote role: wipe it at the console first")
        log.warning("formatting the blank data partition %s for the remote role", device)
        runner(["mkfs.ext4", "-q", "-L", "mirrorunit-store", device])
        fstype = "ext4"
    if fstype != "ext4":
        raise ApplianceError(f"{device} holds a {fstype} filesystem, not the remote's ext4")
    mount_point.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(mount_point):
        runner(["mount", "-t", "ext4", "-o", "noatime", device, str(mount_point)])
    return mount_point
