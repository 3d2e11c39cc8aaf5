"""The replication service's own state files survive a power cut: the skip ledger
(discarded seqs a peer has not confirmed) and the full-resync markers are replaced
atomically, the file and its directory synced."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import firmware.fsutil
from firmware.cbq import CircularBufferQueue
from firmware.cbq.queue import MIRROR_CONSUMER, create
from firmware.local.replication import (
    FULL_RESYNC_SUFFIX,
    SKIPS_SUFFIX,
    CbqSource,
    mark_full_resync,
)
from firmware.storage import FileStorage

BS = 512
VOLUME = 1 << 20


class PowerCut(Exception):
    pass


@pytest.fixture
def cbq(tmp_path: Path) -> Iterator[CircularBufferQueue]:
    storage = FileStorage(tmp_path / "cbq.img", size=4 << 20, create=True)
    create(storage, volume_blocks=VOLUME // BS, block_size=BS, consumers=("peer",))
    q = CircularBufferQueue(storage)
    yield q
    q.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def synced_dirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories whose entries were made durable."""
    calls: list[Path] = []
    real = firmware.fsutil.fsync_dir

    def fsync_dir(path: Any) -> None:
        calls.append(Path(path))
        real(path)

    monkeypatch.setattr(firmware.fsutil, "fsync_dir", fsync_dir)
    return calls


def _cut_before_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    def replace(src: Any, dst: Any) -> None:
        raise PowerCut(f"{src} -> {dst}")

    monkeypatch.setattr(os, "replace", replace)


def _write(cbq: CircularBufferQueue, count: int) -> None:
    for i in range(count):
        cbq.append_write(i, bytes([i + 1]) * BS)
    cbq.ack(MIRROR_CONSUMER, cbq.sync())


def test_the_skip_ledger_is_synced_and_a_cut_keeps_the_old_one(
        cbq: CircularBufferQueue, state: Path, synced_dirs: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _write(cbq, 8)
    cbq.discard(5, 8)
    src = CbqSource(cbq, "peer", None, state)
    batch = src.next_batch(1 << 20)
    assert batch[-1].is_skip and (batch[-1].seq, batch[-1].last_seq) == (5, 8)
    ledger = state / ("peer" + SKIPS_SUFFIX)
    assert json.loads(ledger.read_text()) == [[5, 8]]
    assert synced_dirs == [state]
    # The remote confirms the skip, but the power goes between the new ledger's
    # temporary file and its rename: the old ledger is there, whole.
    _cut_before_rename(monkeypatch)
    with pytest.raises(PowerCut):
        src.ack(8)
    monkeypatch.undo()
    assert json.loads(ledger.read_text()) == [[5, 8]]
    assert CbqSource(cbq, "peer", None, state)._skipped(5, 8)


def test_a_full_resync_marker_is_synced_and_survives_a_restart(
        cbq: CircularBufferQueue, state: Path, synced_dirs: list[Path]) -> None:
    CbqSource(cbq, "peer", None, state).require_full_resync("the remote holds another queue")
    marker = state / ("peer" + FULL_RESYNC_SUFFIX)
    assert marker.read_text() == "the remote holds another queue\n"
    assert synced_dirs == [state]
    # After a restart the marker alone says the dirty map does not cover the peer.
    plan = CbqSource(cbq, "peer", None, state).resync_plan(0)
    assert plan is not None and not plan.verify
    assert plan.chunks == tuple(range(cbq.geo.chunks))


def test_a_cut_while_marking_leaves_the_marker_as_it_was(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mark_full_resync(state, "peer", "first reason")
    _cut_before_rename(monkeypatch)
    with pytest.raises(PowerCut):
        mark_full_resync(state, "peer", "second reason")
    monkeypatch.undo()
    assert (state / ("peer" + FULL_RESYNC_SUFFIX)).read_text() == "first reason\n"
