"""A re-created local queue (seqs restart) is recognised at HELLO by its queue id and
handled by a full checksum resync, after which the remote follows the new seqs."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.cbq import CircularBufferQueue
from firmware.cbq.queue import MIRROR_CONSUMER, create
from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    CODEC_NONE,
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    HelloAck,
    WriteRecord,
    Writes,
    encode_frame,
)
from firmware.link.session import (
    ReceiverConfig,
    ReceiverSession,
    SenderConfig,
    SenderSession,
)
from firmware.local.replication import CbqSource
from firmware.remote.server import ARRIVALS_NAME, UnitSink
from firmware.remote.unit import UnitStore
from firmware.storage import FileStorage
from tests.support.link import shuttle

#: the link protocol versions a HELLO of this firmware offers
VERSIONS = (PROTOCOL_VERSION,)

BS = 512
VOLUME = 1 << 20


class Volume:
    """The local volume as `CbqSource.read_chunk` reads it."""

    def __init__(self) -> None:
        self.image = bytearray(VOLUME)
        self.size = VOLUME

    def pread(self, off: int, n: int) -> bytes:
        return bytes(self.image[off:off + n])


class Local:
    """A local unit's volume and queue; `recreate()` formats a new queue."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.volume = Volume()
        self.state = tmp / "state"
        self.state.mkdir()
        self.generation = 0
        self.cbq = self._new_queue()

    def _new_queue(self) -> CircularBufferQueue:
        self.generation += 1
        storage = FileStorage(self.tmp / f"cbq{self.generation}.img", size=4 << 20, create=True)
        create(storage, volume_blocks=VOLUME // BS, block_size=BS, consumers=("peer",))
        return CircularBufferQueue(storage)

    def recreate(self) -> None:
        self.cbq.close()
        self.cbq = self._new_queue()

    def write(self, lbn: int, fill: int) -> int:
        data = bytes([fill]) * BS
        self.volume.image[lbn * BS:(lbn + 1) * BS] = data
        seq = self.cbq.append_write(lbn, data).seq
        assert seq is not None
        self.cbq.ack(MIRROR_CONSUMER, self.cbq.sync())
        return seq

    def session(self, sink: UnitSink) -> tuple[SenderSession, ReceiverSession]:
        source = CbqSource(self.cbq, "peer", self.volume, self.state)
        sender = SenderSession(SenderConfig(
            "unit-a", VOLUME, BS, resume_seq=self.cbq.consumers["peer"].acked_seq,
            queue_id=self.cbq.geo.salt), source)
        receiver = ReceiverSession(ReceiverConfig(known_units={"unit-a"}), lambda hello: sink)
        sender.start()
        return sender, receiver


def test_hello_queue_id_and_requeue_round_trip() -> None:
    for frame in (Hello(VERSIONS, "u", 4096, 512, 3, (), False, queue_id=0xDEADBEEF),
                  Hello(VERSIONS, "u", 4096, 512, 3, (), False),
                  HelloAck(1, CODEC_NONE, False, 0, requeue=True),
                  HelloAck(1, CODEC_NONE, False, 7)):
        assert FrameDecoder().receive_data(encode_frame(frame)) == [frame]


def test_a_recreated_queue_is_resynced_and_then_followed(tmp_path: Path) -> None:
    local = Local(tmp_path)
    unit = UnitStore(tmp_path / "store" / "unit-a", "unit-a", VOLUME, BS)
    sink = UnitSink(unit)
    for i in range(6):
        local.write(i, 0x10 + i)
    sender, receiver = local.session(sink)
    shuttle(sender, receiver)
    assert unit.last_applied_seq == 6 and unit.queue_id == local.cbq.geo.salt
    old_image = bytes(local.volume.image)

    # The queue is formatted again (its seqs restart at 1) while the volume keeps
    # its data; the host writes on.
    local.recreate()
    for i in (2, 40, 41):
        local.write(i, 0x80 + i)
    assert local.cbq.last_seq == 3
    sender, receiver = local.session(sink)
    shuttle(sender, receiver)
    assert receiver.requeue is False and not sender.resync_active
    assert unit.queue_id == local.cbq.geo.salt
    # The resync ended at the new queue's acked seq (0: the new consumer started
    # there), which is seq 7 here; the writes after it streamed on.
    assert unit.seq_offset == 7
    assert unit.last_applied_seq == 10 and sink.last_durable_seq() == 3
    assert unit.read_mirror(0, VOLUME) == bytes(local.volume.image)
    assert local.cbq.consumers["peer"].acked_seq == 3
    # The last consistent image before the resync is still restorable.
    with unit.image_at_seq(6) as dev:
        assert dev.pread(0, VOLUME) == old_image
    arrivals = (Path(unit.directory) / ARRIVALS_NAME).read_text().splitlines()
    assert arrivals == ["1 6", "0 0 requeue", "1 3"]

    # Another connection from the same queue is a plain continuation.
    local.write(50, 0xEE)
    sender, receiver = local.session(sink)
    shuttle(sender, receiver)
    assert sender.resync_active is False and unit.last_applied_seq == 11
    unit.close()
    with UnitStore(tmp_path / "store" / "unit-a", "unit-a", VOLUME, BS) as again:
        assert again.seq_offset == 7 and again.queue_id == local.cbq.geo.salt
        assert again.last_durable_seq() == 11


def test_writes_before_the_resync_are_refused(tmp_path: Path) -> None:
    unit = UnitStore(tmp_path / "u", "unit-a", VOLUME, BS)
    unit.apply([WriteRecord(1, 0, b"\1" * BS, 1)])
    sink = UnitSink(unit)
    # A store written before queue ids existed cannot tell a restart from a
    # continuation: it asks for the resync too.
    receiver = ReceiverSession(ReceiverConfig(known_units={"unit-a"}), lambda hello: sink)
    receiver.receive_data(encode_frame(Hello(VERSIONS, "unit-a", VOLUME, BS, 0, (), False,
                                             queue_id=5)))
    [ack] = FrameDecoder().receive_data(receiver.data_to_send())
    assert isinstance(ack, HelloAck) and ack.requeue and ack.durable_seq == 0
    with pytest.raises(LinkProtocolError, match="full resync"):
        receiver.receive_data(encode_frame(Writes(1, CODEC_NONE,
                                                  (WriteRecord(1, 0, b"\2" * BS, 2),))))
    assert unit.read_mirror(0, BS) == b"\1" * BS and unit.last_durable_seq() == 1
    unit.close()
