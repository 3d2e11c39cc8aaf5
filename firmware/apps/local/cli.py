"""`mirrorunit local` (run the local unit) and the operator commands that talk to a running
one: `status`, `cbq inspect|pause|resume|discard`, `flush`, `standby`, `promote`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...link.frames import CODEC_PREFERENCES
from ...local.unit import DEFAULT_CACHE_MODE
from ...ups.service import DEFAULT_POWEROFF
from .. import DEFAULT_CONTROL, standalone
from ..options import ascii_text, rate, size
from .settings import DEFAULT_EXPORT, DEFAULT_NBD, settings_from_args


def _fraction(text: str) -> float:
    v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0.05 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be between 5% and 100%")
    return v


def add_local_options(lo: argparse.ArgumentParser) -> None:
    """Every option of `mirrorunit local`, the services' after the unit's own."""
    from ..gadget import add_gadget_options

    lo.add_argument("--disk", type=Path, required=True, help="local mirror file or device")
    lo.add_argument("--size", type=size, help="volume size when creating the disk (e.g. 1G)")
    lo.add_argument("--buffer", type=Path, required=True, help="CBQ file or partition")
    lo.add_argument("--buffer-size", type=size, help="CBQ size when creating it")
    lo.add_argument("--block-size", type=int, default=512, choices=(512, 4096))
    lo.add_argument("--disk-id", metavar="KIND:VALUE",
                    help="stable identity the --disk device must have (serial:, wwn:, "
                         "partuuid:, uuid:, as udev reports them); the unit waits for it at "
                         "start, refuses another disk, and goes offline while it is unplugged")
    lo.add_argument("--buffer-id", metavar="KIND:VALUE",
                    help="stable identity the --buffer device must have (as --disk-id)")
    lo.add_argument("--device-wait", type=float, default=45.0, metavar="SECONDS",
                    help="how long to wait at start for a disk named by identity "
                         "(default 45)")
    lo.add_argument("--nbd", default=DEFAULT_NBD, metavar="HOST:PORT",
                    help="NBD front end address ('' to disable)")
    lo.add_argument("--export-name", default=DEFAULT_EXPORT)
    lo.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    lo.add_argument("--cache-mode", choices=("write-back", "write-through"),
                    default=DEFAULT_CACHE_MODE.value,
                    help="write-through (default) acknowledges a write once it is on the "
                         "mirror and in the CBQ; write-back acknowledges from RAM and is "
                         "only safe with a working UPS")
    lo.add_argument("--cache-limit", type=size, default=32 << 20)
    lo.add_argument("--high-water", type=_fraction, default=0.8,
                    help="CBQ fill at which it goes compact (default 80%%)")
    lo.add_argument("--peer", action="append", dest="peers", metavar="NAME",
                    help="a remote peer's CBQ consumer name (repeatable; default 'remote')")
    lo.add_argument("--standby", action="store_true",
                    help="start as a hot standby: size visible, data refused until promoted")

    # USB front end
    lo.add_argument("--frontend", choices=("nbd", "usb"), default="nbd",
                    help="'usb' also serves the volume as a USB disk through the gadget "
                         "(NBD keeps running unless --nbd '' is given)")
    add_gadget_options(lo, prefix="usb-")
    s = lo.add_argument_group("SCSI logical unit (USB front end)")
    s.add_argument("--scsi-vendor", type=ascii_text(8), default="MirrorUn",
                   help="INQUIRY vendor, 8 ASCII max")
    s.add_argument("--scsi-product", type=ascii_text(16), default="MirrorUnit Disk",
                   help="INQUIRY product, 16 ASCII max")
    s.add_argument("--scsi-revision", type=ascii_text(4), default="0001",
                   help="INQUIRY revision, 4 ASCII max")
    s.add_argument("--scsi-serial", type=ascii_text(64), default=None,
                   help="unit serial number (VPD 0x80; default: the USB serial)")
    s.add_argument("--lun-read-only", action="store_true",
                   help="present the volume write-protected to the USB host")

    # replication
    g = lo.add_argument_group("journey link")
    g.add_argument("--remote", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="replicate to this remote (repeatable); NAME is its CBQ consumer "
                        "and pinned-peer name")
    g.add_argument("--state-dir", type=Path,
                   help="link identity and pinned peers (default: BUFFER.link next to "
                        "the buffer)")
    g.add_argument("--unit-id", help="this unit's id when its identity is first created")
    g.add_argument("--link-bandwidth", type=rate, metavar="RATE",
                   help="cap each link's replication traffic (e.g. 2M, 10MB/s, 80Mbit/s; "
                        "0: no cap); changed live by `config set link.bandwidth`")
    g.add_argument("--compression", choices=CODEC_PREFERENCES, default="auto",
                   help="codec of the replication traffic (auto: the best both units "
                        "have); changed live by `config set link.compression`")
    g.add_argument("--link-signature", action="store_true",
                   help="digest handshake per batch: the remote holds each batch until "
                        "this unit confirms its digest (COMMIT) or rejects it (ABORT)")
    g.add_argument("--config", type=Path, metavar="PATH",
                   help="the unit's config partition (sealed for the peers by "
                        "`mirrorunit link seal-config`)")

    # UPS monitor
    lo.add_argument("--ups-config", default=None, metavar="PATH",
                    help="run the UPS monitor inside the unit with this config's ups.*")
    lo.add_argument("--ups-poweroff-command", default=DEFAULT_POWEROFF)
    lo.add_argument("--ups-external", default=None, metavar="MODEL",
                    help="a UPS of this model is watched for this unit by a separate "
                         "`mirrorunit ups` process (said at start and in status)")


def configure(lo: argparse.ArgumentParser) -> None:
    add_local_options(lo)
    lo.set_defaults(func=cmd_local)


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit local", configure, argv)


def cmd_local(args: argparse.Namespace) -> int:
    from .services import run

    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"mirrorunit local: {e}", file=sys.stderr)
        return 2
    return run(settings)


def register(sub: Any) -> None:
    configure(sub.add_parser("local", help="run the local unit (volume + CBQ + front end)"))

    st = sub.add_parser("status", help="show a running unit's status")
    st.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_operator(_status))

    cbq = sub.add_parser("cbq", help="circular buffer queue tools")
    cs = cbq.add_subparsers(dest="cbq_command", required=True)
    ins = cs.add_parser("inspect", help="check a CBQ file offline")
    ins.add_argument("path", type=Path)
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=lambda args: inspect(args.path, args.json))
    for name, helptext in (("pause", "stop one side of the queue"),
                           ("resume", "restart one side of the queue")):
        sp = cs.add_parser(name, help=helptext)
        sp.add_argument("side", choices=("enqueue", "dequeue"))
        sp.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
        sp.set_defaults(func=_operator(_cbq_side))
    dc = cs.add_parser("discard", help="drop queued writes FIRST..LAST from what peers get")
    dc.add_argument("first", type=int)
    dc.add_argument("last", type=int)
    dc.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    dc.set_defaults(func=_operator(_cbq_discard))

    for name, helptext, func in (
            ("flush", "flush the RAM write cache to stable storage", _flush),
            ("standby", "refuse data access (size stays visible)", _set_state),
            ("promote", "leave standby: serve reads and writes", _set_state)):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
        sp.set_defaults(func=_operator(func))


# --------------------------------------------------------------------------- operator commands


def _operator(command: Callable[[argparse.Namespace], None]) -> Callable[
        [argparse.Namespace], int]:
    """A command on a running unit's control socket: its errors are one line and exit 1."""
    def run(args: argparse.Namespace) -> int:
        from ...control import ControlError

        try:
            command(args)
        except ControlError as e:
            print(f"mirrorunit: {e}", file=sys.stderr)
            return 1
        return 0
    return run


def _status(args: argparse.Namespace) -> None:
    from ...control import call

    result = call(args.control, "status")
    print(json.dumps(result, indent=2, default=str) if args.json else format_status(result))


def _cbq_side(args: argparse.Namespace) -> None:
    from ...control import call

    call(args.control, f"cbq.{args.cbq_command}", side=args.side)
    print(f"{args.side} {'stopped' if args.cbq_command == 'pause' else 'restarted'}")


def _cbq_discard(args: argparse.Namespace) -> None:
    from ...control import call

    r = call(args.control, "cbq.discard", first=args.first, last=args.last)
    print(f"discarded {r['discarded']} queued writes")


def _flush(args: argparse.Namespace) -> None:
    from ...control import call

    secs = call(args.control, "volume.flush")
    print(f"write cache flushed in {secs:.3f} s")


def _set_state(args: argparse.Namespace) -> None:
    from ...control import call

    state = call(args.control, "volume.set_state",
                 state="standby" if args.command == "standby" else "ready")
    print(f"volume is {state}")


def inspect(path: Path, as_json: bool) -> int:
    """`mirrorunit cbq inspect`: check a CBQ file offline; 1 when it is not clean."""
    from ...cbq import CbqError, CircularBufferQueue
    from ...storage import FileStorage

    try:
        storage = FileStorage(path, read_only=True)
    except OSError as e:
        print(f"mirrorunit cbq inspect: {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        q = CircularBufferQueue(storage, read_only=True)
        report: dict[str, Any] = {"path": str(path), "superblock_generation": q.generation,
                                  "geometry": q.geo.to_cbor(), **q.stats(), **q.verify()}
    except CbqError as e:
        print(f"mirrorunit cbq inspect: {path}: {e}", file=sys.stderr)
        return 2
    finally:
        storage.close()
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        g = report["geometry"]
        print(f"CBQ {path}")
        print(f"  superblock generation {report['superblock_generation']}, ring "
              f"{g['ring_size']} bytes at offset {g['ring_start']}, align {g['align']}")
        print(f"  volume {g['volume_blocks']} x {g['block_size']} bytes, "
              f"chunk {g['chunk_size']}")
        print(f"  mode {report['mode']}, fill {report['fill']:.1%} "
              f"(high-water {report['high_water']:.0%}), last seq {report['last_seq']}")
        print(f"  tail offset {report['tail_offset']}, head offset {report['head_offset']}, "
              f"{report['recovered_past_checkpoint']} records past the last checkpoint")
        print("  records: " + ", ".join(f"{k} {v}" for k, v in report["records"].items()))
        for name, c in report["consumers"].items():
            print(f"  consumer {name}: acked {c['acked_seq']}, pending "
                  f"{c['pending_records']} records"
                  + (", needs resync" if c["needs_resync"] else ""))
        if report["dirty_chunks"]:
            print(f"  dirty map: {report['dirty_chunks']} chunks")
        if report["clean"]:
            print("  verified: clean")
        else:
            bad = report["first_bad"]
            print(f"  CORRUPT: {bad['reason']}")
    return 0 if report["clean"] else 1


def format_status(s: dict[str, Any]) -> str:
    v, q = s["volume"], s["cbq"]
    lines = [
        f"MirrorUnit {s['role']} unit, version {s['version']}, up {s['uptime_s']} s",
        f"  volume   {v['size']} bytes ({v['block_size']}-byte blocks), {v['state']}, "
        f"cache {v['cache_mode']} ({v['cache_bytes']} bytes dirty)",
        f"  io       {v['writes']} writes / {v['bytes_written']} bytes, "
        f"{v['reads']} reads / {v['bytes_read']} bytes, {v['flushes']} flushes",
    ]
    if s.get("nbd"):
        n = s["nbd"]
        lines.append(f"  nbd      nbd://{n['address']}/{n['export']} "
                     f"({n['connections']} connected)")
    lines.append(
        f"  cbq      mode {q['mode']}, fill {q['fill']:.1%} of {q['ring_bytes']} bytes, "
        f"last seq {q['last_seq']}, queued {q['queued_records']} writes / "
        f"{q['queued_bytes']} bytes"
        + (", ENQUEUE STOPPED" if q["enqueue_paused"] else "")
        + (", DEQUEUE STOPPED" if q["dequeue_paused"] else ""))
    for name, c in q["consumers"].items():
        if name.startswith("@"):
            continue
        lines.append(f"  peer     {name}: sent {c['sent_seq']}, acked {c['acked_seq']}, "
                     f"pending {c['pending_records']}"
                     + (", needs checksum resync" if c["needs_resync"] else ""))
    if q["dirty_chunks"]:
        lines.append(f"  dirty    {q['dirty_chunks']} chunks changed while not queued")
    for t in q["transitions"][-3:]:
        lines.append(f"  event    {t['change']}: {t['why']}")
    return "\n".join(lines)
