"""Complete `status` answers of a local unit, in the documented shape, for tests of the
readers (the notifier, the console). Each builder fills every required field; a test
changes the fields it is about."""

from __future__ import annotations

from firmware.control.status import (
    CbqStats,
    ConsumerStats,
    LocalStatus,
    PeerLinkStatus,
    UpsReport,
    VolumeStatus,
)


def consumer(needs_resync: bool = False, pending: int = 0) -> ConsumerStats:
    return {"acked_seq": 10, "sent_seq": 10 + pending, "sent_records": 10 + pending,
            "pending_records": pending, "pending_blocks": pending, "pending_bytes": 4096 * pending,
            "oldest_pending_ns": None, "needs_resync": needs_resync}


def cbq(fill: float = 0.1, mode: str = "normal", needs_resync: bool = False) -> CbqStats:
    ring = 64 << 20
    return {"mode": mode, "ring_bytes": ring, "used_bytes": int(ring * fill), "fill": fill,
            "high_water": 0.8, "low_water": 0.5, "last_seq": 10, "durable_seq": 10,
            "queued_records": 0, "queued_blocks": 0, "queued_bytes": 0,
            "oldest_queued_ns": None,
            "consumers": {"remote": consumer(needs_resync), "@mirror": consumer(True)},
            "enqueue_paused": False, "dequeue_paused": False, "dirty_chunks": 0,
            "discards": [], "transitions": [], "recovery_seconds": 0.0}


def volume() -> VolumeStatus:
    return {"size": 64 << 20, "block_size": 4096, "state": "online", "read_only": False,
            "cache_mode": "write-through", "cache_bytes": 0, "cache_limit": 0,
            "applied_seq": 10, "write_cache_enabled": False, "commit_failure": None,
            "reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0, "flushes": 0,
            "commits": 0}


def peer(state: str = "connected", last_error: str | None = None) -> PeerLinkStatus:
    return {"remote": "127.0.0.1:7788", "state": state, "last_error": last_error,
            "connects": 1, "sessions": 1, "pair_offers": 0, "pairings": 0,
            "wire_bytes_sent": 0, "signature": False, "batches_aborted": 0, "skips_sent": 0,
            "blocks_sent": 0, "blocks_acked": 0, "sent_seq": 10, "acked_seq": 10,
            "last_seq": 10, "lag_seqs": 0, "lag_bytes": 0, "lag_seconds": 0.0,
            "needs_resync": False, "resync": None, "resyncs_done": 0, "last_resync": None,
            "last_verify": None, "fenced": None, "split_brain": None, "refused": None}


def ups(flags: str = "OL CHRG", charge: float | None = 80.0) -> UpsReport:
    return {"model": "ina219", "polls": 3, "interval_s": 2.0, "status": flags,
            "charge_percent": charge, "voltage": 8.1, "current": 0.2, "runtime_s": 600.0,
            "runtime": "600 s", "error": None, "policy": {"state": "idle"}}


def local_status(fill: float = 0.1, mode: str = "normal", needs_resync: bool = False,
                 peers: dict[str, PeerLinkStatus] | None = None, ups_flags: str | None = None,
                 charge: float | None = 80.0) -> LocalStatus:
    s: LocalStatus = {
        "role": "local", "version": "0.0", "copyright": "c", "license": "l",
        "uptime_s": 1.0, "disk": "disk.img", "buffer": "buffer.img", "nbd": None,
        "volume": volume(), "power": {"cache_mode": "write-through", "ups": None},
        "cbq": cbq(fill, mode, needs_resync),
    }
    if peers is not None:
        s["link"] = {"unit_id": "u", "fingerprint": "ab" * 32, "role": "primary",
                     "generation": None, "lineage": None, "fenced": None,
                     "split_brain": None, "config_backup": None, "peers": peers}
    if ups_flags is not None:
        s["ups"] = ups(ups_flags, charge)
    return s

