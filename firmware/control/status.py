"""The local unit's `status` answer on its control socket, as one typed shape.

The producers (the volume, the queue, the replication service, the front ends, the UPS
monitor, `LocalUnit.status`) annotate what they return with these types, so mypy holds
them to it. The readers (the notifier, the console, the panel) get the answer decoded
from the control socket, from another process: `read_local_status` checks it once, at
that boundary, against the same types and raises `StatusShapeError` naming the first
field that does not fit. Past that point a reader indexes the fields it needs without
guessing at their shape.

Keys a newer unit adds are kept and not checked; a field that a reader relies on and that
is missing or of the wrong type is an error. Nested parts no reader interprets (a
lineage, the UPS policy's state) are typed `Any`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict, TypeGuard, TypeVar, Union, cast

from ..errors import MirrorUnitError


class StatusShapeError(MirrorUnitError, ValueError):
    """A status answer that does not have the documented shape."""


class VolumeStatus(TypedDict):
    size: int
    block_size: int
    state: str
    read_only: bool
    #: The configured mode; `write_cache_enabled` says whether the cache is in use.
    cache_mode: str
    cache_bytes: int
    cache_limit: int
    applied_seq: int
    write_cache_enabled: bool
    #: Why the write cache was turned off, if a commit failed.
    commit_failure: str | None
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    flushes: int
    commits: int
    #: Barriers (FLUSH, SYNCHRONIZE CACHE, FUA completions) the host sent, and how
    #: many of them the queue could not record (overflow, paused, nothing written yet).
    #: Not required: a unit from before barriers does not report them.
    barriers: NotRequired[int]
    barriers_unrecorded: NotRequired[int]
    #: False while the mirror's disk is gone (the volume is offline), with why, and how
    #: often that happened since start.
    medium_present: NotRequired[bool]
    medium_lost: NotRequired[str | None]
    medium_losses: NotRequired[int]


class ConsumerStats(TypedDict):
    """One reader of the queue: a remote peer, or `@mirror` (names starting with `@` are
    the unit's own consumers, not peers)."""

    acked_seq: int
    sent_seq: int
    sent_records: int
    pending_records: int
    pending_blocks: int
    pending_bytes: int
    oldest_pending_ns: int | None
    needs_resync: bool


class CbqStats(TypedDict):
    mode: str
    ring_bytes: int
    used_bytes: int
    #: used_bytes / ring_bytes, 0.0 .. 1.0
    fill: float
    high_water: float
    low_water: float
    last_seq: int
    durable_seq: int
    queued_records: int
    queued_blocks: int
    queued_bytes: int
    oldest_queued_ns: int | None
    consumers: dict[str, ConsumerStats]
    enqueue_paused: bool
    dequeue_paused: bool
    dirty_chunks: int
    discards: list[Any]
    transitions: list[Any]
    recovery_seconds: float | None
    #: BARRIER records appended, and barriers that could not be (overflow, paused);
    #: not reported by a unit from before barriers.
    barriers: NotRequired[int]
    barriers_unrecorded: NotRequired[int]


class RefusalStatus(TypedDict):
    """Why the remote refused this copy's session (fenced, split brain...)."""

    code: str
    reason: str
    since_ns: int


class ResyncProgress(TypedDict):
    """A checksum resync or a verify while it runs (a peer's `resync`)."""

    #: full, dirty or verify
    kind: str
    #: chunks the exchange covers, and the chunk size
    chunks: int
    chunk_bytes: int
    #: the seq the remote is resynced to (or verified at)
    seq: int
    started_ns: int
    #: chunks whose digests both ends compared so far, and of those the ones that differ
    chunks_done: int
    chunks_differing: int
    chunks_per_s: float
    mib_per_s: float
    #: seconds to go at the rate so far (None before the first answer)
    eta_s: float | None


class PeerLinkStatus(TypedDict):
    remote: str
    #: connected, resyncing, retrying, paused, or the code of the remote's refusal
    #: (fenced, split-brain, diverged, unrelated...)
    state: str
    last_error: str | None
    connects: int
    sessions: int
    pair_offers: int
    pairings: int
    wire_bytes_sent: int
    #: The cap of this link in bytes/s (None: none), the codec of its next batch (None:
    #: no session), the codecs it offers at HELLO, and the uncompressed record bytes of
    #: the WRITES it sent beside those frames' bytes.  Not required: a unit from before
    #: link settings does not report them.
    bandwidth: NotRequired[float | None]
    compression: NotRequired[str | None]
    compression_offered: NotRequired[list[str]]
    write_data_bytes: NotRequired[int]
    write_wire_bytes: NotRequired[int]
    #: whether batches wait in the remote's receive buffer for a signature
    signature: bool
    batches_aborted: int
    skips_sent: int
    blocks_sent: int
    blocks_acked: int
    sent_seq: int | None
    acked_seq: int | None
    last_seq: int
    lag_seqs: int
    lag_bytes: int
    lag_seconds: float
    needs_resync: bool
    resync: ResyncProgress | None
    resyncs_done: int
    last_resync: Any
    last_verify: Any
    fenced: str | None
    split_brain: str | None
    refused: RefusalStatus | None


class LinkStatus(TypedDict):
    unit_id: str
    fingerprint: str
    #: this copy's role in its lineage: primary, secondary, standby...
    role: str
    generation: str | None
    lineage: Any
    fenced: str | None
    split_brain: str | None
    config_backup: Any
    peers: dict[str, PeerLinkStatus]


class NbdStatus(TypedDict):
    address: str
    export: str
    connections: int


class HostConnection(TypedDict):
    #: not-attached, powered, configured or suspended
    connection: str
    udc_state: str | None
    changes: int


class UsbStatus(TypedDict):
    gadget: str
    udc: str | None
    serving: bool
    read_only: bool
    bot_state: str
    host: HostConnection


class UpsReport(TypedDict):
    model: str
    polls: int
    interval_s: float
    #: NUT-style flags: "OL CHRG", "OB DISCHRG LB"...
    status: str
    charge_percent: float | None
    voltage: float | None
    current: float | None
    runtime_s: float | None
    runtime: str
    error: str | None
    policy: Any
    #: only in the answer of a separate `mirrorunit ups` process
    config_generation: NotRequired[int]
    events: NotRequired[list[Any]]


class PowerStatus(TypedDict):
    cache_mode: str
    #: what backs the unit against a power cut, None: nothing
    ups: str | None


class ExternalDiskStatus(TypedDict):
    #: e.g. "serial:S6XNNS0T123456"
    identity: str
    #: its device node now (None while it is missing)
    node: str | None
    present: bool
    losses: int
    returns: int


class LocalStatus(TypedDict):
    role: str
    version: str
    copyright: str
    license: str
    uptime_s: float
    disk: str
    buffer: str
    #: None without the NBD front end
    nbd: NbdStatus | None
    volume: VolumeStatus
    power: PowerStatus
    cbq: CbqStats
    #: present when the unit runs the service of that name
    link: NotRequired[LinkStatus]
    usb: NotRequired[UsbStatus]
    #: the unit's own UPS monitor, or (merged by a reader) a separate `mirrorunit ups`
    ups: NotRequired[UpsReport]
    #: the data disk named by a stable identity (external storage), watched through udev
    external_disk: NotRequired[ExternalDiskStatus]
    buffer_disk: NotRequired[ExternalDiskStatus]


class LockoutReport(TypedDict):
    length_s: float
    failures: int
    number: int
    #: [source network, wrong tries] pairs
    prefixes: list[Any]


class GuessBudget(TypedDict):
    """A unit-wide budget of wrong tries in a certificate-less exchange (recovery,
    pairing) on a remote (firmware/link/recovery.py RecoveryLimiter.snapshot)."""

    what: str
    lockouts: int
    locked_for_s: float
    unit_max_failures: int
    window_s: float
    last_lockout: LockoutReport | None


class RemoteStatus(TypedDict):
    """A remote unit's `status` answer, as far as its readers (the notifier) rely on it."""

    role: str
    fingerprint: str
    listen: str
    store: str
    link: Any
    units: dict[str, Any]
    nbd_exports: dict[str, str]
    guess_limits: dict[str, GuessBudget]


T = TypeVar("T")


def read_unit_status(obj: object) -> LocalStatus | RemoteStatus:
    """A local's or a remote's `status` answer, told apart by its role."""
    if isinstance(obj, Mapping) and obj.get("role") == "remote":
        return check_shape(obj, RemoteStatus, "status")
    return read_local_status(obj)


def is_remote_status(status: LocalStatus | RemoteStatus) -> TypeGuard[RemoteStatus]:
    return status["role"] == "remote"


def read_local_status(obj: object) -> LocalStatus:
    """`obj` (a decoded `status` answer) as a LocalStatus, or StatusShapeError."""
    return check_shape(obj, LocalStatus, "status")


def read_ups_report(obj: object) -> UpsReport:
    """`obj` (a `mirrorunit ups` process's `status` answer) as an UpsReport."""
    return check_shape(obj, UpsReport, "ups")


def check_shape(obj: object, tp: type[T], where: str) -> T:
    """`obj` unchanged, once it is known to fit the type `tp`."""
    _check(obj, tp, where)
    return cast(T, obj)


def _check(value: object, tp: Any, where: str) -> None:
    if tp is Any:
        return
    origin = typing.get_origin(tp)
    if origin is NotRequired:
        _check(value, typing.get_args(tp)[0], where)
        return
    if origin in (Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                _check(value, alt, where)
                return
            except StatusShapeError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else StatusShapeError(
            f"{where}: {_describe(value)} is none of {_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise StatusShapeError(f"{where}: expected null, got {_describe(value)}")
        return
    if typing.is_typeddict(tp):
        if not isinstance(value, Mapping):
            raise StatusShapeError(f"{where}: expected an object, got {_describe(value)}")
        # NotRequired is read from the resolved hints, not __required_keys__, which
        # Python 3.11 gets wrong for string annotations
        for key, field_type in typing.get_type_hints(tp, include_extras=True).items():
            if key not in value:
                if typing.get_origin(field_type) is not NotRequired:
                    raise StatusShapeError(f"{where}.{key}: missing")
                continue
            _check(value[key], field_type, f"{where}.{key}")
        return
    if origin is dict:
        if not isinstance(value, Mapping):
            raise StatusShapeError(f"{where}: expected an object, got {_describe(value)}")
        _, item = typing.get_args(tp)
        for key, v in value.items():
            if not isinstance(key, str):
                raise StatusShapeError(f"{where}: key {key!r} is not a string")
            _check(v, item, f"{where}.{key}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise StatusShapeError(f"{where}: expected a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check(v, item, f"{where}[{i}]")
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        # JSON has one number type: a float field may arrive as an integer
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"status shape: no check for {tp!r} at {where}")
    if not ok(value):
        raise StatusShapeError(f"{where}: expected {_name(tp)}, got {_describe(value)}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
