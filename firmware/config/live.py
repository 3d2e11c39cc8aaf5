"""Applying a committed change to the processes that run, without restarting them.

Each live field has one way to take effect: a control operation on the local
unit, or a process (notify, ups) that re-reads the config partition when its
generation changes.  Anything else is reported as needing a restart, so the
operator is never told a change took effect when it did not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..control import ControlError, call
from .errors import NetworkApplyError
from .network import NETWORK_KEYS
from .schema import Config, ConfigDiff

log = logging.getLogger("mirrorunit.config")

Caller = Callable[..., Any]
#: Applies the network settings of a saved config; returns what it did.
NetworkApplier = Callable[[Config], str]

#: live keys taken up by a process that polls the config partition
REREAD_BY = {
    "notify.": "the notify process uses it from its next poll",
    "ups.on_battery_grace_s": "the ups process uses it from its next poll",
    "ups.low_battery_percent": "the ups process uses it from its next poll",
    "admin.password_hash": "in effect at once",
    "admin.seal_key": "the link re-seals the peer backup with it at once",
    "backup.keepers": "the link sends the backup only to these peers from its next poll",
    "unit.name": "used in notifications from the next poll; host name at next boot",
}


@dataclass
class LiveReport:
    applied: list[tuple[str, str]] = field(default_factory=list)
    restart: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"applied   {k}: {how}" for k, how in self.applied]
        out += [f"restart   {k}: {why}" for k, why in self.restart]
        out += [f"FAILED    {k}: {why}" for k, why in self.errors]
        return out


def _unknown_op(e: ControlError) -> bool:
    return "unknown operation" in str(e)


def _apply_network(keys: list[str], cfg: Config, network: NetworkApplier | None,
                   report: LiveReport) -> None:
    if not keys:
        return
    if network is None:
        for key in keys:
            report.restart.append((key, "stored; applied to the system at the next boot"))
        return
    try:
        how = network(cfg)
    except NetworkApplyError as e:
        why = f"{e}; saved, in effect from the next boot"
        report.errors += [(key, why) for key in keys]
        return
    report.applied += [(key, how) for key in keys]


def apply_live(diff: ConfigDiff, cfg: Config, control: str | os.PathLike[str] | None,
               caller: Caller = call, network: NetworkApplier | None = None) -> LiveReport:
    """Push each changed key to whatever takes it up.  `network` (see
    firmware.config.network.NetworkHook) applies network.* to this machine; without
    it they are reported as waiting for the next boot."""
    report = LiveReport()
    unit_reachable = control is not None
    for key in diff.restart:
        report.restart.append((key, "read at start; restart the unit's services"))
    _apply_network([k for k in diff.live if k in NETWORK_KEYS], cfg, network, report)
    for key in diff.live:
        if key in NETWORK_KEYS:
            continue
        how = next((v for k, v in REREAD_BY.items() if key == k or
                    (k.endswith(".") and key.startswith(k))), None)
        if how is not None:
            report.applied.append((key, how))
            continue
        op: tuple[str, dict[str, Any]] | None = None
        if key == "cache.mode":
            op = ("volume.set_cache_mode", {"mode": cfg[key]})
        elif key == "buffer.high_water":
            op = ("cbq.set_high_water", {"high_water": cfg[key]})
        elif key == "link.bandwidth":
            op = ("link.set_bandwidth", {"bandwidth": cfg[key]})
        elif key == "link.compression":
            op = ("link.set_compression", {"compression": cfg[key]})
        elif key == "peers":
            op = ("link.set_peers", {"peers": [dict(p) for p in cfg[key]]})
        if op is None:
            report.restart.append((key, "no running process takes it up live"))
            continue
        if not unit_reachable:
            report.restart.append((key, "stored; no local unit control socket given"))
            continue
        try:
            result = caller(control, op[0], **op[1])
        except ControlError as e:
            if _unknown_op(e):
                report.restart.append((key, f"the running unit has no {op[0]} operation"))
            elif "cannot reach" in str(e):
                unit_reachable = False
                report.restart.append((key, "stored; no local unit is running"))
            else:
                report.errors.append((key, str(e)))
            continue
        log.info("config: %s pushed to the local unit (%s)", key, op[0])
        report.applied.append((key, f"local unit now {result}"))
    return report
