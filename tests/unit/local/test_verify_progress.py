"""A verify between the local volume's `CbqSource` and a real remote unit store, the
two sans-IO sessions driven step by step: the local keeps more than one DIGEST_REQ
outstanding and digests each batch as it asks for it (before the answer), and its
progress (chunks done / total, rates, ETA) moves with every answer."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from firmware.cbq import CircularBufferQueue
from firmware.cbq.superblock import create
from firmware.control.status import ResyncProgress, check_shape
from firmware.link.frames import (
    CODEC_NONE,
    ChunkDigests,
    DigestRequest,
    FrameDecoder,
    encode_frame,
)
from firmware.link.session import (
    DIGEST_WINDOW,
    ReceiverConfig,
    ReceiverSession,
    ResyncFinished,
    SenderConfig,
    SenderSession,
)
from firmware.local.replication import CbqSource
from firmware.remote.server import UnitSink
from firmware.remote.store import RemoteStore
from firmware.remote.unit import UnitStore
from firmware.storage import FileStorage
from firmware.volume.volume import Volume

CHUNK = 64 * 1024
VOLUME = 8192 * CHUNK  # 512 MiB, sparse: 8 DIGEST_REQ of a verify
UNIT = "u"


class Recording(CbqSource):
    """Notes the order of prefetches and answers."""

    log: list[str]

    def prefetch_digests(self, chunks: Sequence[int]) -> None:
        self.log.append(f"prefetch {chunks[0]}")
        super().prefetch_digests(chunks)

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        self.log.append(f"compare {chunks[0]}")
        return super().chunk_digests(chunks)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Recording, Volume, UnitStore]]:
    store = RemoteStore(tmp_path / "store")
    unit = store.open_unit(UNIT, VOLUME, 512)
    data = os.urandom(CHUNK)
    unit.write_chunk(4100, data)
    unit.resync_complete(0)
    storage = FileStorage(tmp_path / "cbq.img", size=4 << 20, create=True)
    create(storage, volume_blocks=VOLUME // 512, block_size=512, consumers=("peer",))
    q = CircularBufferQueue(storage)
    q.resync_done("peer")
    vol = Volume(FileStorage(tmp_path / "mirror.img", size=VOLUME, create=True), q)
    vol.pwrite(4100 * CHUNK, data)
    vol.flush()
    (tmp_path / "state").mkdir()
    src = Recording(q, "peer", vol, tmp_path / "state")
    src.log = []
    yield src, vol, unit
    src.close()
    vol.close()
    q.close()
    store.close()


def test_verify_pipelines_digests_and_reports_progress(
        setup: tuple[Recording, Volume, UnitStore]) -> None:
    src, vol, unit = setup
    src.request_verify()
    sender = SenderSession(SenderConfig(UNIT, VOLUME, 512, compression=(CODEC_NONE,)), src)
    receiver = ReceiverSession(ReceiverConfig(known_units={UNIT}), lambda h: UnitSink(unit))
    sender.start()
    seen: list[ResyncProgress] = []
    most_outstanding = 0
    result: ResyncFinished | None = None
    while result is None:
        sender.pump()
        out = sender.data_to_send()
        asked = [f for f in FrameDecoder().receive_data(out) if isinstance(f, DigestRequest)] \
            if out else []
        receiver.receive_data(out)
        reply = receiver.data_to_send()
        # every answer of this round is still to come: all its requests are outstanding
        most_outstanding = max(most_outstanding, len(asked))
        # the answers one at a time, the progress looked at after each
        for answer in FrameDecoder().receive_data(reply) if reply else []:
            for e in sender.receive_data(encode_frame(answer)):
                if isinstance(e, ResyncFinished):
                    result = e
            if isinstance(answer, ChunkDigests) and src.resync is not None:
                seen.append(check_shape(src.resync, ResyncProgress, "resync"))
        assert out or reply or result is not None, "verify stalled"
    assert result.verify and result.chunks_compared == VOLUME // CHUNK
    assert result.differing == ()
    assert most_outstanding == DIGEST_WINDOW > 1
    # each batch was digested locally from the moment it was asked for, before its answer
    starts = [int(x.split()[1]) for x in src.log if x.startswith("prefetch")]
    assert starts == list(range(0, VOLUME // CHUNK, 1024))
    for s in starts:
        assert src.log.index(f"prefetch {s}") < src.log.index(f"compare {s}")
    assert src.log.index(f"prefetch {1024 * (DIGEST_WINDOW - 1)}") < src.log.index("compare 0")
    # progress moved with the answers, with rates and an ETA, and ends with the verify
    done = [p["chunks_done"] for p in seen]
    assert done == sorted(done) and done[0] == 1024 and len(done) >= 4
    assert all(p["kind"] == "verify" and p["chunks"] == VOLUME // CHUNK for p in seen)
    assert all(p["chunks_per_s"] > 0 and p["mib_per_s"] > 0 for p in seen)
    assert all(p["eta_s"] is not None and p["eta_s"] >= 0 for p in seen)
    assert src.resync is None and src.last_verify is not None
