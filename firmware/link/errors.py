"""The journey link's error tree: every failure of the link is a `LinkError`."""

from __future__ import annotations

from ..errors import MirrorUnitError


class LinkError(MirrorUnitError):
    """Base of every journey-link failure."""


class LinkProtocolError(LinkError):
    """The peer sent something the protocol does not allow; the connection must close.

    `reason` is a short human-readable sentence for the log and the ERROR frame.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LinkRefused(LinkError):
    """A connection was refused at HELLO time (unknown unit, busy unit, bad identity...).

    `code` is a stable token carried in the ERROR frame; `text` explains it to a person.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class SourceGap(LinkError):
    """The write source cannot rewind to the seq the remote asked for (records released).

    Only a resync can bring the remote back; the link cannot.
    """


class TlsIdentityError(LinkError):
    """A key, certificate or pinned-peer file is missing, unreadable or inconsistent."""


class PeerNotPinned(LinkError):
    """The peer's certificate is not the one pinned for it; refused before any data."""
