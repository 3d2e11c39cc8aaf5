"""Drives the sans-IO journey-link sessions against each other in memory."""

from __future__ import annotations

from firmware.link.memory import MemorySource
from firmware.link.session import ReceiverSession, ResyncPlan, SenderSession


class ChunkedSource(MemorySource):
    """A memory source with a volume image (4 KiB chunks) and a resync plan to hand out
    once; `finished` lists each resync's (differing chunks, seq)."""

    chunk_size = 4096

    def __init__(self, image: bytearray, plan: ResyncPlan | None) -> None:
        super().__init__()
        self.image, self.plan = image, plan
        self.finished: list[tuple[list[int], int]] = []

    def resync_plan(self, remote_durable: int) -> ResyncPlan | None:
        plan, self.plan = self.plan, None
        return plan

    def read_chunk(self, chunk: int) -> bytes:
        n = self.chunk_size
        return bytes(self.image[chunk * n:(chunk + 1) * n])

    def resync_finished(self, plan: ResyncPlan, differing: list[int], seq: int) -> None:
        self.finished.append((differing, seq))


def shuttle(sender: SenderSession, receiver: ReceiverSession, rounds: int = 50) -> None:
    """Move bytes both ways until neither side has anything to say."""
    for _ in range(rounds):
        sender.pump()
        out = sender.data_to_send()
        if out:
            receiver.receive_data(out)
        back = receiver.data_to_send()
        if back:
            sender.receive_data(back)
        if not out and not back:
            return
    raise AssertionError("sessions did not settle")
