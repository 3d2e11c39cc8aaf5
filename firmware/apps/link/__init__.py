"""Operator commands of the journey link.

- `mirrorunit pair show|add|fetch|list|remove` manages this unit's identity and
  the certificates it pins (see docs/replication.md, "Pairing").
- `mirrorunit link status|pause|resume|verify|seal-config` talks to a running local
  unit (`seal-config` is config recovery's, `firmware.apps.recovery`).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from pathlib import Path
from typing import Any

from firmware.apps.recovery import cmd_seal_config
from firmware.control import LOCAL_SOCKET, ControlError, call
from firmware.link.errors import LinkError
from firmware.link.tls import (
    PeerStore,
    certificate_name,
    fetch_certificate,
    fingerprint,
    normalize_fingerprint,
    unit_identity,
)
from firmware.units import split_host_port

DEFAULT_CONTROL = LOCAL_SOCKET


# --------------------------------------------------------------------------- pair


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir)
    print("mirrorunit pair: give --state-dir (the unit's link state directory)",
          file=sys.stderr)
    raise SystemExit(2)


def _pair(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    try:
        if args.pair_command == "show":
            identity, unit_id = unit_identity(state_dir, args.unit_id)
            if args.pem:
                print(identity.cert_pem, end="")
            else:
                print(f"unit id      {unit_id}")
                print(f"fingerprint  {identity.fingerprint}")
                print(f"certificate  {identity.cert_path}")
            return 0
        peers = PeerStore.in_dir(state_dir)
        if args.pair_command == "list":
            for name in peers.names():
                p = peers.get(name)
                assert p is not None
                print(f"{name}  {p.fingerprint}")
            return 0
        if args.pair_command == "remove":
            peers.unpin(args.name)
            print(f"unpinned {args.name}")
            return 0
        if args.pair_command == "add":
            text = Path(args.cert).read_text() if args.cert != "-" else sys.stdin.read()
            der = ssl.PEM_cert_to_DER_cert(text)
        else:  # fetch
            host, port = split_host_port(args.address)
            identity, _ = unit_identity(state_dir)
            der = fetch_certificate(host, port, identity=identity)
        fp = fingerprint(der)
        name = args.name or certificate_name(der)
        expected = args.fingerprint
        if expected is None:
            print(f"peer {name} presents fingerprint\n  {fp}")
            if not sys.stdin.isatty():
                print("mirrorunit pair: no --fingerprint given and no terminal to confirm "
                      "on; refusing to pin an unverified certificate", file=sys.stderr)
                return 1
            answer = input("Does this match the fingerprint shown on the peer? [yes/no] ")
            if answer.strip().lower() != "yes":
                print("not pinned")
                return 1
            expected = fp
        else:
            expected = normalize_fingerprint(expected)
        peers.pin(name, der, expected_fingerprint=expected)
        print(f"pinned {name} ({fp})")
        return 0
    except (LinkError, OSError, ValueError) as exc:
        print(f"mirrorunit pair: {exc}", file=sys.stderr)
        return 1


def _link(args: argparse.Namespace) -> int:
    try:
        if args.link_command == "status":
            result = call(args.control, "link.status")
        else:
            result = call(args.control, f"link.{args.link_command}", name=args.name)
    except ControlError as exc:
        print(f"mirrorunit link: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


def register(sub: Any) -> None:
    pr = sub.add_parser("pair", help="this unit's link identity and its pinned peers")
    ps = pr.add_subparsers(dest="pair_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="the unit's link state directory")
    show = ps.add_parser("show", parents=[common],
                         help="print this unit's id and certificate fingerprint")
    show.add_argument("--unit-id", help="id to use if the identity is created now")
    show.add_argument("--pem", action="store_true", help="print the certificate (PEM)")
    add = ps.add_parser("add", parents=[common], help="pin a peer from its certificate file")
    add.add_argument("--cert", required=True, help="PEM file ('-' for stdin)")
    add.add_argument("--name", help="pin under this name (default: the certificate's unit id)")
    add.add_argument("--fingerprint", help="refuse unless the certificate has this SHA-256")
    fe = ps.add_parser("fetch", parents=[common],
                       help="fetch a listening peer's certificate over TLS and pin it")
    fe.add_argument("--address", required=True, metavar="HOST:PORT")
    fe.add_argument("--name", help="pin under this name (default: the peer's unit id)")
    fe.add_argument("--fingerprint",
                    help="the fingerprint the peer printed; without it you are asked")
    ps.add_parser("list", parents=[common], help="list pinned peers")
    rm = ps.add_parser("remove", parents=[common], help="unpin a peer")
    rm.add_argument("name")
    pr.set_defaults(func=_pair)

    li = sub.add_parser("link", help="journey links of a running local unit")
    ls = li.add_subparsers(dest="link_command", required=True)
    st = ls.add_parser("status", help="per-remote link state, lag and resync")
    st.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    for name, helptext in (("pause", "disconnect a remote and stop sending to it"),
                           ("resume", "reconnect a paused remote"),
                           ("verify", "compare the volumes by digest (moves no data)")):
        sp = ls.add_parser(name, help=helptext)
        sp.add_argument("name", help="the remote's name")
        sp.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    li.set_defaults(func=_link)
    sc = ls.add_parser("seal-config", help="seal the unit's config under the admin "
                                           "password for its peers to keep")
    sc.add_argument("--control", type=Path, default=Path(DEFAULT_CONTROL))
    sc.add_argument("--state-dir", type=Path,
                    help="write into this link state dir instead (a remote unit's)")
    sc.add_argument("--config", type=Path, metavar="PATH", help="config partition (with "
                                                                "--state-dir)")
    sc.add_argument("--password-stdin", action="store_true",
                    help="read the admin password from standard input")
    sc.set_defaults(func=cmd_seal_config)
