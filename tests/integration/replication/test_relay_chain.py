"""A relay chain A -> B -> C on loopback: B forwards what it applies for A's unit to C,
in order, with its own cursor; C converges to A.  Then B is lost: A is pointed at C
directly and C catches up by digests, only the chunks that differ crossing the link."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from firmware.demo import pair_both_ways
from firmware.link.tls import PeerStore, unit_identity
from firmware.nbd.client import NbdClient
from tests.support.replication import (
    RemoteProc,
    Writer,
    assert_same_image,
    local_link_args,
    peer_status,
    wait_caught_up,
    wait_for,
)
from tests.support.unitproc import LocalProc

SIZE = 16 << 20
CHUNK = 65536


def _relay(b: RemoteProc, unit: str) -> dict[str, Any]:
    relay: dict[str, Any] = b.call("status")["relays"][unit]
    return relay


def _c_level_with(c: RemoteProc, unit: str, seq: int) -> bool:
    u = c.unit(unit)
    return bool(u) and u.get("last_applied_seq") == seq and not u.get("resync")


def test_chain_converges_then_a_repointed_at_c_catches_up_by_digests(tmp_path: Path) -> None:
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    c = RemoteProc(tmp_path / "c")
    b_dir = tmp_path / "b"
    b = RemoteProc(b_dir)
    a_state = tmp_path / "a" / "link"
    unit, _ = pair_both_ways(a_state, b.state_dir)
    b_identity, _ = unit_identity(b.state_dir)
    c_identity, _ = unit_identity(c.state_dir)
    a_identity, _ = unit_identity(a_state)
    # C knows B as a relay of the unit, and A itself (for the day B is lost).
    c_pins = PeerStore.in_dir(c.state_dir)
    c_pins.pin("relay-b", b_identity.cert_der)
    c_pins.pin(unit, a_identity.cert_der)
    c.args += ["--relay-from", f"relay-b={unit}"]
    b.args += ["--relay", f"{unit}=offsite@127.0.0.1:{c.port}",
               "--relay-fingerprint", f"offsite={c_identity.fingerprint}"]
    a = LocalProc(tmp_path / "a", size="16M", buffer_size="8M",
                  extra=local_link_args("remote", ("127.0.0.1", b.port), a_state))
    procs = [c, b, a]
    try:
        c.start()
        b.start()
        a.start()
        writer = Writer(a, SIZE, seed=7)
        writer.start()
        wait_for(lambda: writer.writes >= 150, 60, "writes through A")
        writer.stop_event.set()
        writer.join()
        last = wait_caught_up(a, b, unit)
        wait_for(lambda: _c_level_with(c, unit, last), 60, "C to apply every seq of A")
        # C's acknowledgement of the last seq reaches B a little after C applied it.
        wait_for(lambda: _relay(b, unit)["acked_seq"] == last, 30, "B to see C's ack")
        relay = _relay(b, unit)
        assert relay["state"] == "connected" and relay["applied_seq"] == last, relay
        # C took the records as A numbered them, each once, in order (the first
        # contact with a unit that already held data is a resync by digests).
        assert_same_image(a, c, unit, tmp_path)
        c_points = [p["seq"] for p in c.call("remote.points", unit=unit)]
        b_points = {p["seq"] for p in b.call("remote.points", unit=unit)}
        assert c_points and set(c_points) <= b_points, (c_points[:5], sorted(b_points)[:5])

        # B is lost; A writes on, its writes queueing.
        b.stop(signal.SIGKILL)
        touched: set[int] = set()
        with NbdClient("127.0.0.1", a.port, "mirrorunit") as nbd:
            for i in range(12):
                off = (i * 37 % 200) * CHUNK
                nbd.write(off, bytes([0x40 + i]) * CHUNK)
                touched.add(off // CHUNK)
            nbd.flush()
        # A is pointed at C: it has never streamed there, so it compares by digests.
        a_pins = PeerStore.in_dir(a_state)
        a_pins.pin("offsite", c_identity.cert_der)
        r = a.call("link.set_peers", peers=[{
            "name": "offsite", "address": f"127.0.0.1:{c.port}",
            "fingerprint": c_identity.fingerprint}])
        assert r["added"] == ["offsite"] and r["removed"] == ["remote"], r
        wait_caught_up(a, c, unit, name="offsite")
        assert_same_image(a, c, unit, tmp_path)
        p = peer_status(a, "offsite")
        assert p["resyncs_done"] >= 1 and p["last_resync"] is not None, p
        compared = p["last_resync"]["chunks_compared"]
        differing = p["last_resync"]["differing"]
        assert compared == SIZE // CHUNK, p["last_resync"]
        # Only what B had not passed on crossed: the chunks written since.
        assert differing == len(touched), (differing, sorted(touched))
    finally:
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
