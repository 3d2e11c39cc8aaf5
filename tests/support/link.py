"""Drives the sans-IO journey-link sessions against each other in memory."""

from __future__ import annotations

from firmware.link.session import ReceiverSession, SenderSession


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
