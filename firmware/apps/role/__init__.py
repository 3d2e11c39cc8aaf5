"""Operator commands for the roles of a volume's copies (see docs/failover.md).

    mirrorunit role status [UNIT] --control SOCK [--json]
    mirrorunit role promote UNIT [--seq N] [--force] --control SOCK
    mirrorunit role serve UNIT --nbd HOST:PORT --control SOCK
    mirrorunit role failback [--peer NAME] [--control LOCAL_SOCK] [--json]

They talk to the running remote unit through its control socket (`role.status`,
`role.promote`, `remote.nbd_start`); `failback` talks to the local unit
(`link.failback`), which pulls the promoted remote's image back.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from firmware.control import LOCAL_SOCKET, REMOTE_SOCKET, ControlError, call

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
    fb = rs.add_parser("failback",
                       help="on the old local: give up its writes since the remote's "
                            "promotion (kept as a conflict image), take the remote's image "
                            "and become the primary again")
    fb.add_argument("--peer", default="remote", help="the remote that was promoted")
    fb.add_argument("--control", type=Path, default=Path(LOCAL_SOCKET),
                    help="the local unit's control socket")
    fb.add_argument("--json", action="store_true")
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
    if cmd == "failback":
        r = call(args.control, "link.failback", timeout=24 * 3600.0, name=args.peer)
        if args.json:
            print(json.dumps(r, indent=2))
            return 0
        if r["completed_earlier"]:
            print(f"failback from {args.peer} had been taken by the remote already; this "
                  f"copy is the primary of generation {r['generation']} from seq {r['seq']}")
            return 0
        print(f"failback from {args.peer} done in {r['seconds']:.1f} s: {r['chunks_compared']}"
              f" chunks compared ({r['chunks_changed_remote']} changed on the remote, "
              f"{r['chunks_changed_here']} here), {r['chunks_moved']} moved "
              f"({r['bytes_moved']} bytes); this copy is the primary of generation "
              f"{r['generation']} from seq {r['seq']} and the remote follows it")
        c = r["conflict"]
        if c is not None and c["extents"]:
            print(f"this copy's own writes since the promotion ({c['bytes']} bytes in "
                  f"{c['extents']} extents) are kept in {c['image']} (extents listed in "
                  f"{c['extents_file']})")
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
