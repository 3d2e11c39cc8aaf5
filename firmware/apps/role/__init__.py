"""Operator commands for the roles of a volume's copies (see docs/failover.md).

    mirrorunit role status [UNIT] --control SOCK [--json]
    mirrorunit role promote UNIT [--seq N] [--force] --control SOCK
    mirrorunit role serve UNIT --nbd HOST:PORT --control SOCK
    mirrorunit role failback [--peer NAME] [--control LOCAL_SOCK] [--json]
    mirrorunit role resolve UNIT --give-up-here --control SOCK     (on the remote)
    mirrorunit role switchover [--peer NAME] [--control LOCAL_SOCK] [--json]
    mirrorunit role test-failover UNIT --nbd HOST:PORT [--seq N] [--scratch SIZE] --control SOCK
    mirrorunit role test-failover UNIT --end --control SOCK

They talk to the running remote unit through its control socket (`role.status`,
`role.promote`, `remote.nbd_start`); `failback` talks to the local unit
(`link.failback`), which pulls the promoted remote's image back.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from firmware.control import LOCAL_SOCKET, REMOTE_SOCKET, ControlError, call

from ..options import size

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
    how = sv.add_mutually_exclusive_group(required=True)
    how.add_argument("--nbd", metavar="HOST:PORT")
    how.add_argument("--usb", action="store_true",
                     help="as a USB disk on this board's UDC: a hot standby (NOT READY, the "
                          "size visible) until the unit is promoted, then writable")
    sv.add_argument("--usb-udc", metavar="NAME", help="UDC to bind (default: the first)")
    sv.add_argument("--usb-serial", metavar="TEXT")
    sv.add_argument("--seq", type=int, metavar="N",
                    help="over NBD, a unit not promoted: the image right after write N")
    # failback and switchover run on the local unit, against one of its remotes
    on_local = argparse.ArgumentParser(add_help=False)
    on_local.add_argument("--peer", default="remote", help="the remote to fail back from or "
                          "switch with")
    on_local.add_argument("--control", type=Path, default=Path(LOCAL_SOCKET),
                          help="the local unit's control socket")
    on_local.add_argument("--json", action="store_true")
    rs.add_parser("failback", parents=[on_local],
                  help="on the old local: give up its writes since the remote's "
                       "promotion (kept as a conflict image), take the remote's image "
                       "and become the primary again")
    tf = rs.add_parser("test-failover", parents=[common],
                       help="on the remote: serve a writable copy-on-write clone of a point "
                            "in time over NBD while replication goes on; its writes never "
                            "reach the mirror and are discarded when it ends")
    tf.add_argument("unit")
    tf.add_argument("--nbd", metavar="HOST:PORT")
    tf.add_argument("--seq", type=int, metavar="N",
                    help="the image right after write N (default: the last applied one)")
    tf.add_argument("--scratch", type=size, metavar="SIZE",
                    help="the most the clone may hold of its own writes (default 1G or "
                         "the volume's size)")
    tf.add_argument("--end", action="store_true", help="end the unit's test clones")
    rs.add_parser("switchover", parents=[on_local],
                  help="on the local: planned role reversal; from the primary the "
                       "remote takes over at the drained seq (no resync) and this "
                       "copy becomes its standby; from the standby it takes the "
                       "remote's changes back and becomes the primary")
    rv = rs.add_parser("resolve", parents=[common],
                       help="on the remote: a promoted unit gives up its own writes (kept "
                            "as a conflict image) and follows its local again after a "
                            "checksum resync; on the local side, `role failback` is the "
                            "same choice the other way")
    rv.add_argument("unit")
    rv.add_argument("--give-up-here", action="store_true", required=True,
                    help="say that this unit's writes since its promotion are the ones "
                         "given up")
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
    if cmd == "test-failover":
        if args.end:
            for e in call(args.control, "role.test_failover_end", unit=args.unit):
                print(f"ended {e['key']}: {e['scratch_used']} bytes written to it discarded")
            return 0
        if not args.nbd:
            print("mirrorunit role test-failover: --nbd HOST:PORT or --end is needed",
                  file=sys.stderr)
            return 2
        r = call(args.control, "role.test_failover", unit=args.unit, address=args.nbd,
                 seq=args.seq, scratch_bytes=args.scratch)
        _wait_for_stop(f"test failover of unit {args.unit} at seq {r['seq']}, writable: "
                       f"nbd://{r['address']}/{r['export']} (scratch {r['scratch_limit']} "
                       "bytes; replication goes on; Ctrl-C ends it and discards its writes)")
        for e in call(args.control, "role.test_failover_end", unit=args.unit):
            print(f"ended {e['key']}: {e['scratch_used']} bytes written to it discarded")
        return 0
    if cmd == "switchover":
        r = call(args.control, "link.switchover", timeout=24 * 3600.0, name=args.peer)
        if args.json:
            print(json.dumps(r, indent=2))
        elif r["direction"] == "to-remote":
            print(f"switched over to {args.peer} in {r['seconds']:.2f} s (queue drained in "
                  f"{r['drain_seconds']:.2f} s, {r['records_moved']} writes, "
                  f"{r['bytes_moved']} bytes): the remote is the primary from seq "
                  f"{r['seq']}; this copy is its standby (its host sees NOT READY)")
        else:
            print(f"switched back from {args.peer} in {r['seconds']:.2f} s: "
                  f"{r['chunks_moved']} chunks ({r['bytes_moved']} bytes) the remote "
                  f"changed were taken; this copy is the primary of generation "
                  f"{r['generation']} from seq {r['seq']}")
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
    if cmd == "resolve":
        r = call(args.control, "role.resolve", timeout=600.0, unit=args.unit)
        print(f"unit {r['unit']} gave up {r['writes']} host writes in {r['chunks']} chunks, "
              f"kept in {r['conflict_image']} (chunks listed in {r['conflict_listing']}); it "
              f"follows generation {r['generation']} again and resyncs by checksum when its "
              "local connects")
        return 0
    if cmd == "promote":
        r = call(args.control, "role.promote", unit=args.unit, seq=args.seq, force=args.force)
        kind = "force-promoted" if r["forced"] else "promoted"
        print(f"unit {r['unit']} {kind} at seq {r['seq']} (the local's seq {r['fork_seq']}), "
              f"generation {r['generation']}: {r['undone']} history entries undone, "
              f"{r['dropped_pending']} received writes dropped; replication into it has "
              "stopped")
        return 0
    if args.usb:
        r = call(args.control, "remote.usb_start", unit=args.unit, udc=args.usb_udc,
                 serial=args.usb_serial)
        try:
            _wait_for_stop(f"serving unit {args.unit} over USB (serial {r['serial']}) as a "
                           f"{r['state']} (Ctrl-C to stop)")
        finally:
            call(args.control, "remote.nbd_stop", key=r["key"])
        return 0
    r = call(args.control, "remote.nbd_start", unit=args.unit, address=args.nbd,
             seq=args.seq)
    try:
        _wait_for_stop(f"serving unit {args.unit} "
                       f"{'writable' if r.get('writable') else 'read-only'}: "
                       f"nbd://{r['address']}/{r['export']}  (Ctrl-C to stop)")
    finally:
        call(args.control, "remote.nbd_stop", key=r["key"])
    return 0


def _wait_for_stop(banner: str) -> None:
    """Print `banner`, then wait until Ctrl-C (SIGINT) or SIGTERM.

    Both are blocked from before the banner and taken with sigwait(), so neither is lost:
    not one sent as soon as the banner is read (before the wait has begun), nor a SIGINT
    this command was started with ignored (as a shell without job control starts a
    background job), which Python never turns into KeyboardInterrupt. The command runs no
    other thread the kernel could hand them to instead."""
    stop = {signal.SIGINT, signal.SIGTERM}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        print(banner, flush=True)
        signal.sigwait(stop)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


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
