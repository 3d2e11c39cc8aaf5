"""`mirrorunit ups` (run the monitor against a local unit) and `mirrorunit ups status`;
`mirrorunit local --ups-config PATH` runs it inside the local unit instead."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from ..control import ControlError, call
from .service import DEFAULT_POWEROFF, DEFAULT_UPS_CONTROL, UpsProcess, UpsService, command_hook

DEFAULT_CONTROL = "/run/mirrorunit/local.sock"


def register(sub: Any) -> None:
    p = sub.add_parser("ups", help="UPS monitor: flush the write cache and power off on "
                                   "mains loss")
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


def extend_local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ups-config", default=None, metavar="PATH",
                        help="run the UPS monitor inside the unit with this config's ups.*")
    parser.add_argument("--ups-poweroff-command", default=DEFAULT_POWEROFF)
    from ..local.unit import SERVICE_FACTORIES

    if _local_factory not in SERVICE_FACTORIES:
        SERVICE_FACTORIES.append(_local_factory)


def _local_factory(unit: Any) -> UpsService | None:
    args = unit.settings.args
    path = getattr(args, "ups_config", None)
    if not path:
        return None
    from ..config.cli import open_store

    return UpsService(unit, open_store(path), command_hook(args.ups_poweroff_command))


def cmd_run(args: argparse.Namespace) -> int:
    from ..config.cli import open_store

    try:
        proc = UpsProcess(open_store(args.config), args.control, ups_control=args.ups_control,
                          poweroff=command_hook(args.poweroff_command), interval=args.interval)
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
