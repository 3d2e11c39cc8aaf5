"""Loopback tests with real processes: discarded seq ranges travel as skips, a
re-created local queue is detected at HELLO and resynced, and the signature
handshake switched on from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from firmware.nbd.client import NbdClient
from tests.support.replication import (
    MakePair,
    Pair,
    Writer,
    assert_arrived_once_in_order,
    assert_same_image,
    peer_status,
    wait_caught_up,
    wait_for,
)

CHUNK = 65536


def write_each(pair: Pair, offsets: list[int], fill: int) -> list[int]:
    """One write per offset, flushed one by one so each gets its own seq; returns
    the seqs the local unit gave them."""
    seqs = []
    with NbdClient("127.0.0.1", pair.local.port, "mirrorunit") as c:
        for i, off in enumerate(offsets):
            c.write(off, bytes([fill + i & 0xFF]) * 4096)
            c.flush()
            seqs.append(peer_status(pair.local)["last_seq"])
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    return seqs


@pytest.fixture
def pair(make_pair: MakePair) -> Pair:
    return make_pair(size="8M", buffer_size="8M")


def test_discarded_range_travels_as_a_skip(pair: Pair, tmp_path: Path) -> None:
    local, remote = pair.local, pair.remote
    offsets = [i * CHUNK for i in range(20)]
    write_each(pair, offsets[:4], 0x10)
    wait_caught_up(local, remote, pair.unit_id)
    local.call("link.pause", name="remote")
    seqs = write_each(pair, offsets[4:], 0x40)
    mid, tail = seqs[3:7], seqs[-3:]
    local.call("cbq.discard", first=mid[0], last=mid[-1])
    local.call("cbq.discard", first=tail[0], last=tail[-1])
    local.call("link.resume", name="remote")
    last = wait_caught_up(local, remote, pair.unit_id)
    assert last == seqs[-1]
    u = remote.unit(pair.unit_id)
    assert u["skipped_seqs"] == len(mid) + len(tail)
    assert [mid[0], mid[-1]] in u["skipped_ranges"]
    assert [tail[0], tail[-1]] in u["skipped_ranges"]
    assert any(e["event"] == "skip" for e in u["events"])
    skips = [(a, b) for a, b, note in remote.arrivals(pair.unit_id) if note == "skip"]
    assert skips == [(mid[0], mid[-1]), (tail[0], tail[-1])]
    assert_arrived_once_in_order(remote, pair.unit_id, last)
    # The discarded writes never reached the remote mirror; all the others did.
    out = tmp_path / "remote.img"
    remote.call("remote.export", unit=pair.unit_id, output=str(out))
    image, mirror = local.disk.read_bytes(), out.read_bytes()
    discarded = {seqs.index(s) + 4 for s in mid + tail}
    for i, off in enumerate(offsets):
        want = bytes(4096) if i in discarded else image[off:off + 4096]
        assert mirror[off:off + 4096] == want, i
    # The link stays healthy: later writes stream as usual, and no resync ran.
    write_each(pair, [offsets[0]], 0x99)
    wait_caught_up(local, remote, pair.unit_id)
    status = peer_status(local)
    assert status["resyncs_done"] == 0 and status["state"] == "connected"
    assert status["last_error"] is None


def test_link_signature_from_the_command_line(make_pair: MakePair, tmp_path: Path) -> None:
    with make_pair(size="8M", buffer_size="8M", local_extra=("--link-signature",)) as p:
        local, remote = p.local, p.remote
        writer = Writer(local, 8 << 20, seed=3, interval=0.002)
        writer.start()
        wait_for(lambda: writer.writes > 150, 30, "writes")
        # A reset while batches wait in the remote's receive buffer for COMMIT: they
        # are dropped there and sent again.
        p.proxy.reset_all()
        wait_for(lambda: writer.writes > 300, 30, "more writes")
        writer.stop_event.set()
        writer.join(10)
        last = wait_caught_up(local, remote, p.unit_id)
        status = peer_status(local)
        assert status["signature"] is True
        assert status["sessions"] >= 2
        assert_same_image(local, remote, p.unit_id, tmp_path)
        assert_arrived_once_in_order(remote, p.unit_id, last)
        assert "signature=True" in remote.log.read_text()


def test_a_recreated_local_queue_gets_a_full_resync(pair: Pair, tmp_path: Path) -> None:
    local, remote = pair.local, pair.remote
    write_each(pair, [i * CHUNK for i in range(10)], 0x20)
    old_last = wait_caught_up(local, remote, pair.unit_id)
    before = remote.unit(pair.unit_id)
    assert before["queue_id"] is not None and before["seq_offset"] == 0
    old_image = local.disk.read_bytes()
    # The buffer is lost and formatted afresh: the new queue's seqs start at 1
    # again, below what the remote holds.
    local.stop()
    local.buffer.unlink()
    local.start()
    seqs = write_each(pair, [(i + 3) * CHUNK for i in range(5)], 0x70)
    assert seqs[0] <= old_last

    def followed() -> dict[str, Any] | None:
        p = peer_status(local)
        u = remote.unit(pair.unit_id)
        if (p["acked_seq"] != p["last_seq"] or p["resync"] is not None
                or u.get("resync") or not u.get("seq_offset")
                or u["last_applied_seq"] - u["seq_offset"] != p["last_seq"]):
            return None
        return u

    u = wait_for(followed, 90, "the remote to follow the new queue")
    assert u["queue_id"] != before["queue_id"]
    assert any(e["event"] == "requeue" for e in u["events"])
    assert peer_status(local)["resyncs_done"] == 1
    assert_same_image(local, remote, pair.unit_id, tmp_path)
    # The image from before the new queue is still there to restore, by its seq.
    out = tmp_path / "before.img"
    remote.call("remote.export", unit=pair.unit_id, output=str(out), seq=old_last)
    assert out.read_bytes() == old_image
    notes = [note for _, _, note in remote.arrivals(pair.unit_id)]
    assert notes.count("requeue") == 1
    assert "a full resync must come first" in remote.log.read_text()
