"""`mirrorunit remote`: run the remote unit, and operate its virtual units.

    mirrorunit remote --listen HOST:PORT --store DIR [--state-dir DIR]
        [--commit-delay S] [--retention-bytes N] [--retention-age S] [--control SOCK]
    mirrorunit remote status|export|rollback|drop ...

The operator commands talk to the running daemon through its control socket.  When
no daemon answers there they open the store directory themselves (a unit's lock
keeps them from touching a unit a daemon holds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.control import REMOTE_SOCKET
from firmware.lineage import Policy
from firmware.units import AddressError, split_host_port

from .. import standalone
from ..options import size

DEFAULT_REMOTE_CONTROL = REMOTE_SOCKET
#: The journey-link port a remote unit listens on (peers name it in their address).
DEFAULT_LINK_PORT = 7310
log = logging.getLogger("mirrorunit.remote")


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """The remote unit's daemon."""

    listen: tuple[str, int]
    #: one subdirectory per unit
    store: Path
    #: link identity and pinned units; None: STORE/.link-state
    state_dir: Path | None = None
    unit_id: str | None = None
    commit_delay: float | None = None
    retention_bytes: int | None = None
    retention_age: float | None = None
    control: Path = Path(DEFAULT_REMOTE_CONTROL)
    config: Path | None = None
    recovery_max_failures: int = 5
    recovery_window: float = 600.0
    #: Wrong proofs from all sources together in one window before every source is
    #: locked out (and the administrator notified).
    recovery_unit_max_failures: int = 50
    pairing_max_failures: int = 5
    pairing_window: float = 600.0
    #: firmware.lineage.Policy value
    split_brain_policy: str = "manual"
    #: Entries of each unit's state-block table (firmware/remote/stateblocks.py).
    state_blocks: int = 256
    #: Units forwarded to further remotes: `UNIT=NAME@HOST:PORT` each.
    relays: tuple[str, ...] = ()
    #: `NAME=SHA256`: the fingerprint a relay's remote NAME must show (pinned at first
    #: contact).
    relay_fingerprints: tuple[str, ...] = ()
    #: `NAME=UNIT[,UNIT...]`: units the pinned peer NAME may relay to this remote.
    relay_from: tuple[str, ...] = ()


def settings_from_args(args: argparse.Namespace) -> RemoteSettings:
    """`args.listen` and `args.store` are given (the caller checks)."""
    return RemoteSettings(
        listen=args.listen, store=args.store, state_dir=args.state_dir, unit_id=args.unit_id,
        commit_delay=args.commit_delay, retention_bytes=args.retention_bytes,
        retention_age=args.retention_age, control=args.control, config=args.config,
        recovery_max_failures=args.recovery_max_failures,
        recovery_window=args.recovery_window,
        recovery_unit_max_failures=args.recovery_unit_max_failures,
        pairing_max_failures=args.pairing_max_failures, pairing_window=args.pairing_window,
        split_brain_policy=args.split_brain_policy, state_blocks=args.state_blocks,
        relays=tuple(args.relay), relay_fingerprints=tuple(args.relay_fingerprint),
        relay_from=tuple(args.relay_from))


def settings_from_config(cfg: Any, *, store_path: str, state_dir: Path, store_dir: Path,
                         control: str, listen_port: int = DEFAULT_LINK_PORT) -> RemoteSettings:
    """What the appliance runs: the link on every address, the store on the data
    partition, this unit's config sealed for its locals.  Nothing else in the Config
    concerns the daemon's start (the peers it lists are read as they connect)."""
    return RemoteSettings(listen=("0.0.0.0", listen_port), store=store_dir,
                          state_dir=state_dir, config=Path(store_path), control=Path(control),
                          split_brain_policy=cfg["remote.split_brain_policy"])


def command_line(s: RemoteSettings) -> list[str]:
    """The `mirrorunit remote` command line that runs these settings; defaults left out."""
    d = RemoteSettings(s.listen, s.store)
    host, port = s.listen
    argv = ["remote", "--listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "--store", str(s.store)]
    if s.state_dir is not None:
        argv += ["--state-dir", str(s.state_dir)]
    if s.config is not None:
        argv += ["--config", str(s.config)]
    argv += ["--control", str(s.control)]
    for opt, value, default in (
            ("--unit-id", s.unit_id, d.unit_id),
            ("--commit-delay", s.commit_delay, d.commit_delay),
            ("--retention-bytes", s.retention_bytes, d.retention_bytes),
            ("--retention-age", s.retention_age, d.retention_age),
            ("--recovery-max-failures", s.recovery_max_failures, d.recovery_max_failures),
            ("--recovery-window", s.recovery_window, d.recovery_window),
            ("--recovery-unit-max-failures", s.recovery_unit_max_failures,
             d.recovery_unit_max_failures),
            ("--pairing-max-failures", s.pairing_max_failures, d.pairing_max_failures),
            ("--pairing-window", s.pairing_window, d.pairing_window),
            ("--split-brain-policy", s.split_brain_policy, d.split_brain_policy),
            ("--state-blocks", s.state_blocks, d.state_blocks)):
        if value != default:
            argv += [opt, str(value)]
    for opt, values in (("--relay", s.relays), ("--relay-fingerprint", s.relay_fingerprints),
                        ("--relay-from", s.relay_from)):
        for v in values:
            argv += [opt, v]
    return argv


def _pairs(option: str, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not (sep and name and rest):
            raise ValueError(f"{option} {v!r}: expected NAME=VALUE")
        out[name] = rest
    return out


def relay_options(s: RemoteSettings) -> dict[str, Any]:
    """The RemoteServer arguments of the relay options (ValueError names a bad one)."""
    from firmware.remote.relay import RelaySpec

    fps = _pairs("--relay-fingerprint", s.relay_fingerprints)
    specs = [RelaySpec.parse(r) for r in s.relays]
    specs = [RelaySpec(r.unit_id, r.name, r.host, r.port, fps.get(r.name)) for r in specs]
    unknown = set(fps) - {r.name for r in specs}
    if unknown:
        raise ValueError(f"--relay-fingerprint for {sorted(unknown)}: no --relay names it")
    relay_from = {name: tuple(u for u in units.split(",") if u)
                  for name, units in _pairs("--relay-from", s.relay_from).items()}
    return {"relays": specs, "relay_from": relay_from}


def parse_point(text: str) -> tuple[str, int]:
    """A replay endpoint: ("seq", N) for an integer, else ("ns", instant)."""
    t = text.strip()
    if t.isdigit():
        return "seq", int(t)
    return "ns", parse_time(t)


def _table_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= n <= 1 << 16:
        raise argparse.ArgumentTypeError(f"{n} is not in 1..65536")
    return n


def parse_range(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """FROM..TO, each end a seq (an integer) or an instant (see parse_point)."""
    lo, sep, hi = text.partition("..")
    if not sep or not lo.strip() or not hi.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not FROM..TO")
    return parse_point(lo), parse_point(hi)


def parse_time(text: str) -> int:
    """An instant as nanoseconds since the epoch: ISO 8601 ('2024-05-01T12:00:00Z',
    local time without a zone), seconds since the epoch ('1714564800.25'), or
    'ns:1714564800250000000'."""
    t = text.strip()
    if t.startswith("ns:"):
        return int(t[3:])
    try:
        secs = float(t)
    except ValueError:
        pass
    else:
        return int(round(secs * 1e9))
    try:
        dt = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time (ISO 8601, epoch seconds or ns:<int>)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def _hostport(text: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(text, empty_host=True)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return host or "0.0.0.0", port


def register(sub: Any) -> None:
    configure(sub.add_parser("remote", help="run the remote unit or operate its virtual units"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit remote", configure, argv)


def configure(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("--listen", type=_hostport, metavar="HOST:PORT",
                    help="journey-link address to serve")
    rp.add_argument("--store", type=Path, help="directory holding one subdirectory per unit")
    rp.add_argument("--state-dir", type=Path,
                    help="link identity and pinned units (default STORE/.link-state)")
    rp.add_argument("--unit-id", help="this remote's id when its identity is first created")
    rp.add_argument("--commit-delay", type=float, metavar="S",
                    help="hold received writes S seconds before they reach the mirror")
    rp.add_argument("--retention-bytes", type=size, metavar="N",
                    help="keep at most N bytes of point-in-time history per unit")
    rp.add_argument("--retention-age", type=float, metavar="S",
                    help="keep point-in-time history for S seconds")
    rp.add_argument("--state-blocks", type=_table_size, default=256, metavar="N",
                    help="entries of each unit's state-block table (blocks the host "
                         "rewrites most, see `remote state-blocks`)")
    rp.add_argument("--control", type=Path, default=Path(DEFAULT_REMOTE_CONTROL))
    rp.add_argument("--config", type=Path, metavar="PATH",
                    help="this remote's config partition: each new generation is sealed "
                         "for the locals to keep, and the locals its peers list are "
                         "pinned when they offer their certificate")
    rp.add_argument("--recovery-max-failures", type=int, default=5, metavar="N",
                    help="wrong admin-password proofs allowed per source address and "
                         "window in the recovery exchange")
    rp.add_argument("--recovery-window", type=float, default=600.0, metavar="S",
                    help="length of that window in seconds")
    rp.add_argument("--recovery-unit-max-failures", type=int, default=50, metavar="N",
                    help="wrong proofs from all sources together per window before every "
                         "source is locked out (twice as long each time) and the "
                         "administrator is notified")
    rp.add_argument("--pairing-max-failures", type=int, default=5, metavar="N",
                    help="pairing offers of certificates the config does not list, "
                         "allowed per source address and window")
    rp.add_argument("--split-brain-policy", default="manual",
                    choices=[p.value for p in Policy],
                    help="how a split brain may resolve itself: manual (an operator "
                         "chooses), discard-zero-changes, discard-younger-primary "
                         "(docs/failover.md)")
    rp.add_argument("--pairing-window", type=float, default=600.0, metavar="S",
                    help="length of that window in seconds")
    rp.add_argument("--relay", action="append", default=[], metavar="UNIT=NAME@HOST:PORT",
                    help="forward what this remote applies for UNIT to the further remote "
                         "NAME, in order (a chain; docs/failover.md)")
    rp.add_argument("--relay-fingerprint", action="append", default=[],
                    metavar="NAME=SHA256", help="the certificate fingerprint relay remote "
                    "NAME must show; pinned at the first contact")
    rp.add_argument("--relay-from", action="append", default=[], metavar="NAME=UNIT[,UNIT]",
                    help="units the pinned peer NAME (a remote relaying them) may stream "
                         "to this remote")
    rs = rp.add_subparsers(dest="remote_command")

    def op(name: str, helptext: str) -> argparse.ArgumentParser:
        p = rs.add_parser(name, help=helptext)
        p.add_argument("--control", type=Path, default=Path(DEFAULT_REMOTE_CONTROL))
        p.add_argument("--store", type=Path, help="store directory (used when no daemon runs)")
        return p

    st = op("status", "units, lag, resync, history")
    st.add_argument("--json", action="store_true")
    ex = op("export", "a unit's image at a point in time, to a file or over NBD")
    ex.add_argument("--unit", required=True)
    g = ex.add_mutually_exclusive_group()
    g.add_argument("--at", type=parse_time, help="instant (ISO 8601, epoch s, ns:N)")
    g.add_argument("--seq", type=int, help="right after write SEQ")
    g.add_argument("--point", type=int, metavar="N",
                   help="at consistent point N (see `remote points`)")
    g.add_argument("--without", type=parse_range, metavar="FROM..TO",
                   help="as it is now, with the writes of seqs (or instants) FROM..TO "
                        "taken out; blocks a later write covers are kept and listed in "
                        "OUTPUT.conflicts.json")
    o = ex.add_mutually_exclusive_group(required=True)
    o.add_argument("--output", type=Path, help="image file to write")
    o.add_argument("--nbd", metavar="HOST:PORT", help="serve read-only over NBD until Ctrl-C")
    pt = op("points", "the consistent points (host flushes and FUA writes) of a unit")
    pt.add_argument("unit", nargs="?", metavar="UNIT")
    pt.add_argument("--unit", dest="unit_option", metavar="UNIT", help=argparse.SUPPRESS)
    pt.add_argument("--from", dest="t_from", type=parse_time, help="from this instant")
    pt.add_argument("--to", dest="t_to", type=parse_time, help="up to this instant")
    pt.add_argument("--json", action="store_true")
    rpl = op("replay", "re-issue a unit's recorded writes and barriers onto a target")
    rpl.add_argument("unit", metavar="UNIT")
    rpl.add_argument("--from", dest="r_from", type=parse_point, required=True,
                     help="start: a seq (an integer) or an instant; the target starts as "
                          "the image there")
    rpl.add_argument("--to", dest="r_to", type=parse_point,
                     help="end: a seq or an instant (default: the last applied write)")
    rpl.add_argument("--target", required=True, help="image file, or nbd://HOST:PORT/EXPORT")
    rpl.add_argument("--pace", choices=("recorded", "max"), default="max")
    rpl.add_argument("--json", action="store_true")
    fp = op("find-point", "the newest consistent point a check command accepts")
    fp.add_argument("unit", metavar="UNIT")
    fp.add_argument("--check", required=True, metavar="'COMMAND {image}'",
                    help="run on the image at each point tried; exit 0 accepts it "
                         "(e.g. 'e2fsck -fn {image}'); it must not write the image")
    fp.add_argument("--before", type=parse_time, help="only points up to this instant")
    fp.add_argument("--check-timeout", type=float, default=600.0, metavar="S",
                    help="a check running longer counts as a refusal")
    fp.add_argument("--json", action="store_true")
    sb = op("state-blocks", "the blocks a unit's host rewrites most, near its barriers")
    sb.add_argument("unit", metavar="UNIT")
    sb.add_argument("--limit", type=int, default=32, metavar="N", help="list at most N runs")
    sb.add_argument("--json", action="store_true")
    rb = op("rollback", "rewind a unit's mirror itself to a point in time")
    rb.add_argument("--unit", required=True)
    g = rb.add_mutually_exclusive_group(required=True)
    g.add_argument("--to", type=parse_time)
    g.add_argument("--to-seq", type=int)
    dr = op("drop", "drop delayed writes of a time range before they reach the mirror")
    dr.add_argument("--unit", required=True)
    dr.add_argument("--from", dest="t_from", type=parse_time, required=True)
    dr.add_argument("--to", dest="t_to", type=parse_time, required=True)
    rp.set_defaults(func=cmd_remote)


def cmd_remote(args: argparse.Namespace) -> int:
    if args.remote_command is None:
        if args.listen is None or args.store is None:
            print("mirrorunit remote: --listen and --store are required to run the remote "
                  "unit", file=sys.stderr)
            return 2
        return serve(settings_from_args(args))
    from firmware.control import ControlError, call

    if args.remote_command == "points":
        args.unit = args.unit or args.unit_option
        if args.unit is None:
            print("mirrorunit remote points: name the UNIT", file=sys.stderr)
            return 2
    try:
        call(args.control, "status", timeout=5)
        online = True
    except ControlError:
        online = False
    try:
        if online:
            return _online(args, lambda op, **kw: call(args.control, op, **kw))
        if args.store is None:
            print(f"mirrorunit remote: no daemon answers on {args.control}; give --store to "
                  "work on the store directory directly", file=sys.stderr)
            return 1
        return _offline(args)
    except (ControlError, Exception) as exc:  # reported to the operator, exit code says it
        print(f"mirrorunit remote {args.remote_command}: {exc}", file=sys.stderr)
        return 1


def _print_status(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    print(f"MirrorUnit remote unit, fingerprint {result.get('fingerprint', '?')}")
    if "listen" in result:
        print(f"  listening {result['listen']}, store {result['store']}")
    for uid, u in sorted(result["units"].items()):
        conn = u.get("connected_from")
        print(f"  unit {uid}: {'connected from ' + conn if conn else 'not connected'}")
        print(f"    volume {u['volume_size']} bytes, applied seq {u['last_applied_seq']}, "
              f"durable seq {u['last_durable_seq']}, lag {u['lag_seqs']} writes / "
              f"{u['pending_bytes']} bytes / {u['lag_seconds']:.1f} s, "
              f"received {u['bytes_received']} bytes")
        print(f"    history {u['history_records']} entries / {u['history_bytes']} bytes, "
              f"oldest restorable seq {u['oldest_restorable_seq']}"
              + (f", RESYNC since seq {u['resync']['start_seq']}" if u["resync"] else "")
              + ("" if u["equal_to_local"] else ", differs from local (drop/rollback)"))
        newest = u.get("newest_point")
        if newest:
            print(f"    {u['points']} consistent points, newest {newest['number']} at seq "
                  f"{newest['seq']} ({_fmt(newest['ts'])})")


_FRONT_ENDS = {1: "nbd", 2: "scsi"}
_BARRIER_KINDS = {1: "flush", 2: "fua", 3: "flush+fua"}


def _print_points(points: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(points, indent=2))
        return
    print(f"{'point':>7} {'seq':>10}  {'time (UTC)':<29} {'bytes since':>12}  "
          f"{'barrier':<14} notes")
    for p in points:
        what = (f"{_FRONT_ENDS.get(p['front_end'], '?')} "
                f"{_BARRIER_KINDS.get(p['kind'], '?')} {p['opcode']:#04x}")
        notes = ", ".join(n for n, on in (("inside resync: not consistent", p["in_resync"]),
                                          ("not on the mirror yet", not p["applied"])) if on)
        print(f"{p['number']:>7} {p['seq']:>10}  {_fmt(p['ts']):<29} {p['bytes_since']:>12}  "
              f"{what:<14} {notes}")


def _online(args: argparse.Namespace, call: Any) -> int:
    cmd = args.remote_command
    if cmd == "status":
        _print_status(call("status"), args.json)
    elif cmd == "points":
        _print_points(call("remote.points", unit=args.unit, from_ns=args.t_from,
                           to_ns=args.t_to), args.json)
    elif cmd == "find-point":
        r = call("remote.find_point", unit=args.unit, check=args.check,
                 before_ns=args.before, check_timeout=args.check_timeout,
                 timeout=24 * 3600.0)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            for t in r["tries"]:
                print(f"  point {t['number']} (seq {t['seq']}, {_fmt(t['ts'])}): "
                      f"{'accepted' if t['passed'] else 'refused'} in {t['seconds']:.2f} s, "
                      f"{t['blocks_written']} blocks moved")
            p = r["point"]
            tried = f"{len(r['tries'])} of {r['candidates']} points tried in {r['seconds']:.1f} s"
            if p is None:
                print(f"no point of unit {args.unit} passes the check ({tried})")
                return 1
            print(f"point {p['number']} (seq {p['seq']}, {_fmt(p['ts'])}) is the newest the "
                  f"check accepts ({tried}); export it with `mirrorunit remote export --unit "
                  f"{args.unit} --point {p['number']} --output FILE`")
    elif cmd == "replay":
        kw: dict[str, Any] = {}
        for name, value in (("from", args.r_from), ("to", args.r_to)):
            if value is not None:
                kw[f"{name}_{value[0]}"] = value[1]
        target = args.target if args.target.startswith("nbd://") else \
            str(Path(args.target).resolve())
        r = call("remote.replay", unit=args.unit, target=target, pace=args.pace, **kw)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print(f"replayed unit {args.unit} from seq {r['start_seq']} to {r['end_seq']} onto "
                  f"{args.target}: {r['writes']} writes ({r['bytes']} bytes), "
                  f"{r['barriers']} barriers in {r['seconds']:.2f} s"
                  + (f", at most {r['max_lag_ms']:.1f} ms late" if args.pace == "recorded"
                     else ""))
    elif cmd == "state-blocks":
        r = call("remote.state_blocks", unit=args.unit, limit=args.limit)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print(f"unit {args.unit}: {r['writes']} writes, {r['barriers']} barriers seen; "
                  f"{r['tracked']} of {r['capacity']} blocks tracked")
            print(f"{'block':>12} {'blocks':>6} {'offset':>14} {'count':>8} {'per s':>8} "
                  f"{'per barrier':>11} {'near barrier':>12} {'vs neighbours':>13}")
            for e in r["state_blocks"]:
                print(f"{e['block']:>12} {e['nblocks']:>6} {e['offset']:>14} "
                      f"{e['count']:>8.1f} {e['per_second']:>8.2f} {e['per_barrier']:>11.2f} "
                      f"{e['barrier_affinity'] * 100:>11.0f}% {e['neighbour_ratio']:>12.1f}x")
    elif cmd == "export" and args.without is not None:
        if args.output is None:
            print("mirrorunit remote export: --without writes a file (--output)",
                  file=sys.stderr)
            return 2
        (lo_kind, lo), (hi_kind, hi) = args.without
        r = call("remote.export_without", unit=args.unit, output=str(args.output.resolve()),
                 **{f"from_{lo_kind}": lo, f"to_{hi_kind}": hi})
        print(f"exported unit {args.unit} at seq {r['seq']} without seqs {r['first_seq']}.."
              f"{r['last_seq']} ({r['writes_removed']} writes, {r['blocks_restored']} blocks "
              f"restored) to {args.output}; {r['conflict_count']} conflicting blocks listed "
              f"in {r['conflicts_file']}")
    elif cmd == "export" and args.output is not None:
        r = call("remote.export", unit=args.unit, output=str(args.output.resolve()),
                 at_ns=args.at, seq=args.seq, point=args.point)
        print(f"exported unit {args.unit} at seq {r['seq']} ({_fmt(r['ts'])}) to {args.output}")
    elif cmd == "export":
        r = call("remote.nbd_start", unit=args.unit, address=args.nbd, at_ns=args.at,
                 seq=args.seq, point=args.point)
        print(f"serving unit {args.unit} at seq {r['seq']} ({_fmt(r['ts'])}) read-only: "
              f"nbd://{r['address']}/{r['export']}  (Ctrl-C to stop)", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            call("remote.nbd_stop", key=r["key"])
    elif cmd == "rollback":
        r = call("remote.rollback", unit=args.unit, to_ns=args.to, to_seq=args.to_seq)
        print(f"unit {args.unit} rolled back to seq {r['seq']} ({_fmt(r['ts'])}): "
              f"{r['undone']} history entries undone, {r['dropped_pending']} delayed writes "
              "dropped")
    elif cmd == "drop":
        r = call("remote.drop", unit=args.unit, from_ns=args.t_from, to_ns=args.t_to)
        print(f"unit {args.unit}: dropped {r['count']} delayed writes "
              f"(seqs {r['first_seq']}..{r['last_seq']}, {r['bytes']} bytes)")
    return 0


def _offline(args: argparse.Namespace) -> int:
    """The same operations on the store directory, with no daemon running."""
    from firmware.link.tls import PeerStore, unit_identity
    from firmware.remote.server import RemoteServer, default_remote_state_dir

    state_dir = default_remote_state_dir(args.store)
    identity, _ = unit_identity(state_dir)
    server = RemoteServer(store_dir=args.store, listen=("127.0.0.1", 0), identity=identity,
                          peers=PeerStore.in_dir(state_dir))
    handlers = server.handlers()
    try:
        if args.remote_command == "status":
            for uid in server.store.unit_ids():
                server.unit(uid)
            result = server.status()
            result.pop("listen", None)
            _print_status(result, args.json)
            return 0
        unit = getattr(args, "unit", None)
        if unit is not None:
            server.unit(unit)

        def call(op: str, **kw: Any) -> Any:
            return handlers[op](**kw)

        return _online(args, call)
    finally:
        for srv in list(server.exports.values()):
            srv.stop()
        server.store.close()


def _fmt(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(
        timespec="milliseconds")


def serve(s: RemoteSettings) -> int:
    """Run the remote unit until SIGTERM/SIGINT."""
    from firmware.control import ControlServer
    from firmware.link.recovery import RecoveryLimiter
    from firmware.link.tls import PeerStore, unit_identity
    from firmware.remote.relay import RELAY_PEERS_FILE
    from firmware.remote.server import RemoteServer, default_remote_state_dir
    from firmware.remote.stateblocks import SketchSettings
    from firmware.remote.unit import Retention

    state_dir = s.state_dir or default_remote_state_dir(s.store)
    identity, unit_id = unit_identity(state_dir, s.unit_id)
    try:
        relays = relay_options(s)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    retention = None
    if s.retention_bytes is not None or s.retention_age is not None:
        retention = Retention(max_bytes=s.retention_bytes, max_age_s=s.retention_age)
    server = RemoteServer(store_dir=s.store, listen=s.listen, identity=identity,
                          peers=PeerStore.in_dir(state_dir), commit_delay_s=s.commit_delay,
                          retention=retention, state_dir=state_dir, config_path=s.config,
                          recovery=RecoveryLimiter(
                              max_failures=s.recovery_max_failures,
                              window_s=s.recovery_window,
                              unit_max_failures=s.recovery_unit_max_failures),
                          pairing_limiter=RecoveryLimiter(
                              max_failures=s.pairing_max_failures,
                              window_s=s.pairing_window, what="pairing"),
                          policy=Policy(s.split_brain_policy),
                          state_blocks=SketchSettings(capacity=s.state_blocks),
                          relay_peers=PeerStore(state_dir / RELAY_PEERS_FILE), **relays)
    host, port = server.start()
    control = ControlServer(s.control, server.handlers())
    control.start()
    log.info("remote unit %s (fingerprint %s) listening on %s:%d, store %s, control %s",
             unit_id, identity.fingerprint, host, port, s.store, s.control)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        control.stop()
        server.stop()
        log.info("remote unit stopped cleanly")
    return 0
