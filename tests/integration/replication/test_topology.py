"""Many-to-one (two local units into one remote process) and one-to-many (one local
unit into three remotes, one of them dead for a while)."""

from __future__ import annotations

import random
import signal
from pathlib import Path

from firmware.link.tls import PeerStore, unit_identity
from firmware.nbd.client import NbdClient
from tests.support.replication import (
    RemoteProc,
    assert_arrived_once_in_order,
    assert_same_image,
    local_link_args,
    peer_status,
    wait_caught_up,
    wait_for,
)
from tests.support.unitproc import LocalProc


def _write(local: LocalProc, seed: int, count: int = 60) -> None:
    rng = random.Random(seed)
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        for _ in range(count):
            c.write(rng.randrange(0, (16 << 20) - 65536, 4096), rng.randbytes(65536))
        c.flush()


def test_two_local_units_into_one_remote_process(tmp_path: Path) -> None:
    (tmp_path / "remote").mkdir()
    remote = RemoteProc(tmp_path / "remote")
    rid, _ = unit_identity(remote.state_dir)
    locals_: list[tuple[LocalProc, str]] = []
    for i in range(2):
        wd = tmp_path / f"local{i}"
        wd.mkdir()
        state = wd / "link"
        ident, unit_id = unit_identity(state, f"site-{i}")
        PeerStore.in_dir(state).pin("remote", rid.cert_der)
        PeerStore.in_dir(remote.state_dir).pin(unit_id, ident.cert_der)
        locals_.append((LocalProc(wd, size="16M", buffer_size="8M",
                                  extra=local_link_args("remote", ("127.0.0.1", remote.port),
                                                        state)), unit_id))
    remote.start()
    try:
        for lp, _ in locals_:
            lp.start()
        for i, (lp, _) in enumerate(locals_):
            _write(lp, seed=i)
        for lp, unit_id in locals_:
            last = wait_caught_up(lp, remote, unit_id)
            assert_same_image(lp, remote, unit_id, tmp_path)
            assert_arrived_once_in_order(remote, unit_id, last)
        units = remote.call("status")["units"]
        assert set(units) == {"site-0", "site-1"}
        assert all(u["connected_from"] for u in units.values())
        assert locals_[0][0].disk.read_bytes() != locals_[1][0].disk.read_bytes()
    finally:
        for lp, _ in locals_:
            if lp.proc is not None:
                lp.stop()
        remote.stop()


def test_one_local_unit_into_three_remotes_and_a_dead_one_does_not_stall(
        tmp_path: Path) -> None:
    wd = tmp_path / "local"
    wd.mkdir()
    state = wd / "link"
    ident, unit_id = unit_identity(state)
    remotes: list[RemoteProc] = []
    args: list[str] = []
    for i in range(3):
        (tmp_path / f"r{i}").mkdir()
        r = RemoteProc(tmp_path / f"r{i}")
        rid, _ = unit_identity(r.state_dir)
        PeerStore.in_dir(state).pin(f"r{i}", rid.cert_der)
        PeerStore.in_dir(r.state_dir).pin(unit_id, ident.cert_der)
        remotes.append(r)
        args += ["--peer", f"r{i}", "--remote", f"r{i}=127.0.0.1:{r.port}"]
    local = LocalProc(wd, size="16M", buffer_size="16M",
                      extra=(*args, "--state-dir", str(state)))
    try:
        for r in remotes[:2]:
            r.start()  # r2 is dead from the start
        local.start()
        _write(local, seed=1)
        for i, r in enumerate(remotes[:2]):
            last = wait_caught_up(local, r, unit_id, name=f"r{i}")
            assert_same_image(local, r, unit_id, tmp_path)
        dead = peer_status(local, "r2")
        assert dead["state"] == "retrying"
        assert dead["lag_seqs"] == last and dead["last_error"]
        # One live remote killed too: the other keeps going.
        remotes[1].stop(signal.SIGKILL)
        _write(local, seed=2)
        wait_caught_up(local, remotes[0], unit_id, name="r0")
        assert_same_image(local, remotes[0], unit_id, tmp_path)
        # Both come back and catch up on their own cursors.
        remotes[1].start()
        remotes[2].start()
        for i, r in enumerate(remotes):
            last = wait_caught_up(local, r, unit_id, name=f"r{i}")
            assert_same_image(local, r, unit_id, tmp_path)
            assert_arrived_once_in_order(r, unit_id, last)
        wait_for(lambda: all(peer_status(local, f"r{i}")["state"] == "connected"
                             for i in range(3)), 10, "all connected")
    finally:
        if local.proc is not None:
            local.stop()
        for r in remotes:
            if r.proc is not None and r.proc.poll() is None:
                r.stop()
