"""`mirrorunit appliance remote` for real: a blank data partition (a loop device) is
formatted and mounted, the remote pairs a local its config lists, the local's writes land
in the mounted store, and the pin is saved on the config partition."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.config import ConfigStore, StoreSettings
from firmware.control import call, wait_ready
from firmware.link.tls import PeerStore, unit_identity
from firmware.nbd.client import NbdClient
from tests.support import REPO
from tests.support.replication import local_link_args, wait_for
from tests.support.unitproc import LocalProc, free_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("losetup", "mkfs.ext4", "blkid")),
    reason="needs root, losetup, mkfs.ext4 and blkid (loop devices and a mount)")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "data.img"
    with backing.open("wb") as f:
        f.truncate(96 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_remote_role_formats_its_store_pairs_its_local_and_keeps_the_pin(
        tmp_path: Path, loop_device: str) -> None:
    # the remote's config partition, as first boot and the console leave it
    part = tmp_path / "remote-config"
    part.mkdir()
    remote_ident, _ = unit_identity(part / "link", "mirrorunit-0000beef")
    local_state = tmp_path / "local-link"
    local_ident, local_id = unit_identity(local_state, "mirrorunit-0000cafe")
    slots = part / "config.slots"
    ConfigStore(StoreSettings(str(slots))).update({
        "role": "remote",
        "peers": [{"name": local_id, "address": "192.0.2.7:7310",
                   "fingerprint": hashlib.sha256(local_ident.cert_der).hexdigest()}]})
    (part / "storage.env").write_text(f"MIRRORUNIT_BUFFER={loop_device}\n"
                                      f"MIRRORUNIT_DATA={loop_device}\n")
    run = tmp_path / "run"
    port = free_port()
    log = (tmp_path / "remote.log").open("w")
    remote = subprocess.Popen(
        [sys.executable, "-m", "firmware", "appliance", "remote", "--config", str(slots),
         "--storage-env", str(part / "storage.env"), "--run-dir", str(run),
         "--link-port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    store = run / "store"
    try:
        wait_ready(str(run / "remote.sock"), timeout=60)
        assert subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", loop_device],
                              capture_output=True, text=True).stdout.strip() == "ext4"
        assert os.path.ismount(store)

        PeerStore.in_dir(local_state).pin("remote", remote_ident.cert_der)
        wd = tmp_path / "local"
        wd.mkdir()
        with LocalProc(wd, size="4M", buffer_size="4M",
                       extra=local_link_args("remote", ("127.0.0.1", port),
                                             local_state)) as local:
            with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
                c.write(4096, b"\xa5" * 8192)
                c.flush()
            wait_for(lambda: call(str(run / "remote.sock"), "status")["units"]
                     .get(local_id, {}).get("last_applied_seq", 0) >= 1, 60, "applied")
            got = call(str(run / "remote.sock"), "remote.read", unit=local_id, offset=4096,
                       length=8192)
            assert got == b"\xa5" * 8192
        # the unit's mirror lives on the formatted partition
        assert (store / local_id).is_dir()
        # the pin the remote made at run time reached the config partition
        saved = wait_for(lambda: PeerStore.in_dir(part / "link").get(local_id), 30,
                         "pin saved on the config partition")
        assert saved.cert_der == local_ident.cert_der
    finally:
        remote.terminate()
        try:
            remote.wait(30)
        except subprocess.TimeoutExpired:
            remote.kill()
            remote.wait()
        log.close()
        if os.path.ismount(store):
            subprocess.run(["umount", str(store)], check=False)
