"""`mirrorunit ups` (run the monitor against a local unit) and `mirrorunit ups status`;
`mirrorunit local --ups-config PATH` runs it inside the local unit instead (apps/local)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...control import ControlError, call
from ...ups.service import DEFAULT_POWEROFF, DEFAULT_UPS_CONTROL, UpsProcess, command_hook
from .. import DEFAULT_CONTROL, standalone


@dataclass(frozen=True, slots=True)
class UpsSettings:
    """The monitor as its own process, on a local unit's control socket."""

    control: str = DEFAULT_CONTROL
    #: the config partition (None: the default one)
    config: str | None = None
    ups_control: str = DEFAULT_UPS_CONTROL
    interval: float = 2.0
    poweroff_command: str = DEFAULT_POWEROFF


def settings_from_args(args: argparse.Namespace) -> UpsSettings:
    return UpsSettings(control=args.control, config=args.config, ups_control=args.ups_control,
                       interval=args.interval, poweroff_command=args.poweroff_command)


def register(sub: Any) -> None:
    configure(sub.add_parser("ups", help="UPS monitor: flush the write cache and power off "
                                         "on mains loss"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit ups", configure, argv)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="SOCKET",
                   help="the local unit's control socket")
    p.add_argument("--config", default=None, metavar="PATH", help="config partition")
    p.add_argument("--ups-control", default=DEFAULT_UPS_CONTROL, metavar="SOCKET",
                   help="this process's own control socket (status)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--poweroff-command", default=DEFAULT_POWEROFF)
    p.set_defaults(func=cmd_run)
    ps = p.add_subparsers(dest="ups_command")
    st = ps.add_parser("status", help="the UPS monitor's status")
    st.add_argument("--ups-control", default=argparse.SUPPRESS, metavar="SOCKET")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)


def cmd_run(args: argparse.Namespace) -> int:
    return run(settings_from_args(args))


def run(s: UpsSettings) -> int:
    from ...config.store import open_store

    try:
        proc = UpsProcess(open_store(s.config), s.control, ups_control=s.ups_control,
                          poweroff=command_hook(s.poweroff_command), interval=s.interval)
        proc.start()
    except (ControlError, OSError) as e:
        print(f"mirrorunit ups: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: proc._stop.set())
    try:
        proc.wait()
    finally:
        proc.stop()
    return 0


def format_ups(s: dict[str, Any]) -> str:
    pol = s.get("policy", {})
    lines = [f"UPS {s.get('model')}: {s.get('status')}, charge "
             f"{'unknown' if s.get('charge_percent') is None else str(s['charge_percent']) + '%'}"
             f", runtime {s.get('runtime')}",
             f"  policy {pol.get('state')}"
             + (f", shutdown in {pol['shutdown_in_s']:.0f} s" if pol.get("shutdown_in_s")
                is not None else "")
             + (f", last flush {pol['last_flush_s']:.3f} s" if pol.get("last_flush_s")
                is not None else "")]
    if s.get("error"):
        lines.append(f"  error  {s['error']}")
    for e in s.get("events", [])[-5:]:
        lines.append(f"  step   {e['step']}: {e['reason']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        s = call(args.ups_control, "status", timeout=10.0)
    except ControlError as e:
        print(f"mirrorunit ups: {e}", file=sys.stderr)
        return 1
    print(json.dumps(s, indent=2) if args.json else format_ups(s))
    return 0
