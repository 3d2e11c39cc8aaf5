"""Operator commands for the roles of a volume's copies (see docs/failover.md).

    mirrorunit role status [UNIT] --control SOCK [--json]
    mirrorunit role promote UNIT [--seq N] [--force] --control SOCK
    mirrorunit role serve UNIT --nbd HOST:PORT --control SOCK

They talk to the running remote unit through its control socket (`role.status`,
`role.promote`, `remote.nbd_start`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from firmware.control import REMOTE_SOCKET, ControlError, call

DEFAULT_CONTROL = REMOTE_SOCKET


def register(sub: Any) -> None:
    rp = sub.add_parser("role", help="roles of a volume's copies: status, promote")
    rs = rp.add_subparsers(dest="role_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL),
                        help="the remote unit's control socket")
    st = rs.add_parser("status", parents=[common],
                       help="each unit's role, generation and what its local was told")
    st.add_argument("unit", nargs="?")
    st.add_argument("--json", action="store_true")
    pr = rs.add_parser("promote", parents=[common],
                       help="make a remote unit's mirror a writable primary of its own")
    pr.add_argument("unit")
    pr.add_argument("--seq", type=int, metavar="N",
                    help="the image right after write N (default: the last applied one)")
    pr.add_argument("--force", action="store_true",
                    help="even while the unit's local is connected (a split brain once "
                         "it reconnects)")
    sv = rs.add_parser("serve", parents=[common],
                       help="serve a promoted unit's mirror, writable, over NBD")
    sv.add_argument("unit")
    sv.add_argument("--nbd", required=True, metavar="HOST:PORT")
    rp.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ControlError as exc:
        print(f"mirrorunit role {args.role_command}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    cmd = args.role_command
    if cmd == "status":
        result = call(args.control, "role.status", unit=args.unit)
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            _print_status(result)
        return 0
    if cmd == "promote":
        r = call(args.control, "role.promote", unit=args.unit, seq=args.seq, force=args.force)
        kind = "force-promoted" if r["forced"] else "promoted"
        print(f"unit {r['unit']} {kind} at seq {r['seq']} (the local's seq {r['fork_seq']}), "
              f"generation {r['generation']}: {r['undone']} history entries undone, "
              f"{r['dropped_pending']} received writes dropped; replication into it has "
              "stopped")
        return 0
    r = call(args.control, "remote.nbd_start", unit=args.unit, address=args.nbd)
    print(f"serving unit {args.unit} {'writable' if r.get('writable') else 'read-only'}: "
          f"nbd://{r['address']}/{r['export']}  (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        call(args.control, "remote.nbd_stop", key=r["key"])
    return 0


def _print_status(result: dict[str, Any]) -> None:
    for uid, u in sorted(result["units"].items()):
        print(f"unit {uid}: {u['role']}, generation {u['generation']}, seq {u['seq']}")
        p = u.get("promoted")
        if p:
            print(f"  {'force-' if p['forced'] else ''}promoted at seq {p['seq']}; since "
                  f"then host writes: {p['writes']}, chunks changed: {p['dirty_chunks']}")
        conn = u.get("connected_from")
        print(f"  local: {'connected from ' + conn if conn else 'not connected'}")
        peer = u.get("peer")
        if peer:
            verdict = peer["refused"] or peer["outcome"]
            print(f"  at its last HELLO: {verdict} ({peer['rule']}): {peer['reason']}")
        if u.get("split_brain"):
            print("  SPLIT BRAIN: no data moves until the side that gives up its writes "
                  "is chosen")
