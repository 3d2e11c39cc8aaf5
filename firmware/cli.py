"""`mirrorunit`: one command, a sub-command per role and per operator task."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .units import parse_size

DEFAULT_CONTROL = "/run/mirrorunit/local.sock"

#: Modules that add sub-commands (a `register(subparsers)` function whose parsers set
#: `func`) and options of `mirrorunit local` (`extend_local(parser)`).  Each role's
#: commands live beside its code.
EXTENSIONS = (
    "firmware.usb_gadget.cli",
    "firmware.link.cli",
    "firmware.apps.link",
    "firmware.apps.role",
    "firmware.remote.cli",
    "firmware.config.cli",
    "firmware.ups.cli",
    "firmware.console.cli",
    "firmware.notify.cli",
    "firmware.appliance",
    "firmware.ssh_access",
)


def _extensions() -> list[Any]:
    import importlib

    mods = []
    for name in EXTENSIONS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if not e.name or not (name + ".").startswith(e.name + "."):
                raise  # the module exists but something it needs is missing
    return mods


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _fraction(text: str) -> float:
    v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0.05 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be between 5% and 100%")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirrorunit", description="Remote data-mirroring unit.")
    p.add_argument("--version", action="version", version=f"mirrorunit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    lo = sub.add_parser("local", help="run the local unit (volume + CBQ + front end)")
    lo.add_argument("--disk", type=Path, required=True, help="local mirror file or device")
    lo.add_argument("--size", type=_size, help="volume size when creating the disk (e.g. 1G)")
    lo.add_argument("--buffer", type=Path, required=True, help="CBQ file or partition")
    lo.add_argument("--buffer-size", type=_size, help="CBQ size when creating it")
    lo.add_argument("--block-size", type=int, default=512, choices=(512, 4096))
    lo.add_argument("--nbd", default="127.0.0.1:10809", metavar="HOST:PORT",
                    help="NBD front end address ('' to disable)")
    lo.add_argument("--export-name", default="mirrorunit")
    lo.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    lo.add_argument("--cache-mode", choices=("write-back", "write-through"),
                    default="write-back")
    lo.add_argument("--cache-limit", type=_size, default=32 << 20)
    lo.add_argument("--high-water", type=_fraction, default=0.8,
                    help="CBQ fill at which it goes compact (default 80%%)")
    lo.add_argument("--peer", action="append", dest="peers", metavar="NAME",
                    help="a remote peer's CBQ consumer name (repeatable; default 'remote')")
    lo.add_argument("--standby", action="store_true",
                    help="start as a hot standby: size visible, data refused until promoted")

    st = sub.add_parser("status", help="show a running unit's status")
    st.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    st.add_argument("--json", action="store_true")

    cbq = sub.add_parser("cbq", help="circular buffer queue tools")
    cs = cbq.add_subparsers(dest="cbq_command", required=True)
    ins = cs.add_parser("inspect", help="check a CBQ file offline")
    ins.add_argument("path", type=Path)
    ins.add_argument("--json", action="store_true")
    for name, helptext in (("pause", "stop one side of the queue"),
                           ("resume", "restart one side of the queue")):
        sp = cs.add_parser(name, help=helptext)
        sp.add_argument("side", choices=("enqueue", "dequeue"))
        sp.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    dc = cs.add_parser("discard", help="drop queued writes FIRST..LAST from what peers get")
    dc.add_argument("first", type=int)
    dc.add_argument("last", type=int)
    dc.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))

    for name, helptext in (("flush", "flush the RAM write cache to stable storage"),
                           ("standby", "refuse data access (size stays visible)"),
                           ("promote", "leave standby: serve reads and writes")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    for mod in _extensions():
        if hasattr(mod, "extend_local"):
            mod.extend_local(lo)
        if hasattr(mod, "register"):
            mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from .control import ControlError, call

    if getattr(args, "func", None) is not None:
        return int(args.func(args))
    try:
        if args.command == "local":
            return _run_local(args)
        if args.command == "status":
            result = call(args.control, "status")
            print(json.dumps(result, indent=2, default=str) if args.json
                  else format_status(result))
            return 0
        if args.command == "cbq" and args.cbq_command == "inspect":
            return _inspect(args.path, args.json)
        if args.command == "cbq":
            if args.cbq_command in ("pause", "resume"):
                call(args.control, f"cbq.{args.cbq_command}", side=args.side)
                print(f"{args.side} {'stopped' if args.cbq_command == 'pause' else 'restarted'}")
            else:
                r = call(args.control, "cbq.discard", first=args.first, last=args.last)
                print(f"discarded {r['discarded']} queued writes")
            return 0
        if args.command == "flush":
            secs = call(args.control, "volume.flush")
            print(f"write cache flushed in {secs:.3f} s")
            return 0
        if args.command in ("standby", "promote"):
            state = call(args.control, "volume.set_state",
                         state="standby" if args.command == "standby" else "ready")
            print(f"volume is {state}")
            return 0
    except ControlError as e:
        print(f"mirrorunit: {e}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


def _run_local(args: argparse.Namespace) -> int:
    from .local import LocalSettings, LocalUnit, LocalUnitError
    from .volume import CacheMode

    settings = LocalSettings(
        disk=args.disk, buffer=args.buffer, control=args.control, size=args.size,
        buffer_size=args.buffer_size, block_size=args.block_size, nbd=args.nbd or None,
        export_name=args.export_name, cache_mode=CacheMode(args.cache_mode),
        cache_limit=args.cache_limit, high_water=args.high_water,
        peers=args.peers or ["remote"], standby=args.standby, args=args)
    try:
        unit = LocalUnit(settings)
        unit.start()
    except (LocalUnitError, OSError) as e:
        print(f"mirrorunit local: {e}", file=sys.stderr)
        return 2
    unit.run_forever()
    return 0


def _inspect(path: Path, as_json: bool) -> int:
    from .cbq import CbqError, CircularBufferQueue
    from .storage import FileStorage

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


if __name__ == "__main__":
    sys.exit(main())
