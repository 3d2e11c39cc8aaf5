"""Operator commands of config recovery.

- `mirrorunit config recover --from-peer HOST:PORT ...` fetches this unit's sealed
  config backup from a peer and restores it after the admin password is entered.
- `mirrorunit link seal-config` (wired by `firmware.apps.link`) seals the unit's
  config for its peers to keep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from firmware.config.errors import (
    ConfigError,
    ConfigStoreError,
    SealError,
    WrongPassword,
)
from firmware.config.peer_backup import restore_config
from firmware.config.store import open_store
from firmware.control import ControlError, call
from firmware.link.errors import LinkError
from firmware.recovery import (
    PeerRecovery,
    describe_recovery_failure,
    fetch_own_backup,
    seal_into_state_dir,
)
from firmware.units import AddressError, split_host_port


def read_password(use_stdin: bool, prompt: str = "Admin password: ") -> str:
    if use_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise EOFError("no password on standard input")
        return line.rstrip("\n")
    import getpass

    return getpass.getpass(prompt)


def cmd_seal_config(args: argparse.Namespace) -> int:
    """Seal the config for the peers: through a running local unit (its --config),
    or, with --state-dir and --config, straight into a state dir (a remote unit's:
    it hands the blob to each local that connects)."""
    try:
        password = read_password(args.password_stdin)
    except EOFError as exc:
        print(f"mirrorunit link seal-config: {exc}", file=sys.stderr)
        return 1
    if args.state_dir is None:
        try:
            result = call(args.control, "link.seal_config", password=password)
        except ControlError as exc:
            print(f"mirrorunit link seal-config: {exc}", file=sys.stderr)
            return 1
        print(f"config sealed ({result['bytes']} bytes) for {', '.join(result['peers'])}")
        return 0
    if args.config is None:
        print("mirrorunit link seal-config: --state-dir needs --config", file=sys.stderr)
        return 2
    try:
        blob = seal_into_state_dir(Path(args.state_dir), Path(args.config), password)
    except (ConfigStoreError, SealError, OSError, LinkError) as exc:
        print(f"mirrorunit link seal-config: refused: {exc}", file=sys.stderr)
        return 1
    print(f"config sealed ({len(blob)} bytes) into {args.state_dir}")
    return 0


def _address(text: str) -> tuple[str, int] | None:
    try:
        return split_host_port(text)
    except AddressError:
        return None


def cmd_recover(args: argparse.Namespace) -> int:
    if args.fingerprint is not None:
        return _recover_unpinned(args)
    if args.name is None:
        print("mirrorunit config recover: give --fingerprint (a replaced unit) or --name "
              "(a unit whose identity is intact and pins the peer)", file=sys.stderr)
        return 2
    try:
        address = _address(args.from_peer)
        if address is None:
            raise ValueError(f"--from-peer {args.from_peer!r}: expected HOST:PORT")
        unit_id, blob = fetch_own_backup(Path(args.state_dir), args.name, address)
    except (LinkError, OSError, ValueError) as exc:
        print(f"mirrorunit config recover: cannot get the backup: {exc}", file=sys.stderr)
        return 1
    if blob is None:
        print(f"mirrorunit config recover: {args.name} keeps no config backup of unit "
              f"{unit_id}", file=sys.stderr)
        return 1
    print(f"got unit {unit_id}'s sealed config from {args.name} ({len(blob)} bytes)")
    try:
        password = read_password(args.password_stdin)
        generation = restore_config(open_store(args.config), blob, password, force=args.force)
    except WrongPassword:
        print("mirrorunit config recover: wrong admin password; nothing was written",
              file=sys.stderr)
        return 1
    except (ConfigError, ConfigStoreError, SealError, EOFError) as exc:
        print(f"mirrorunit config recover: refused, nothing was written: {exc}",
              file=sys.stderr)
        return 1
    print(f"configuration restored from {args.name} (generation {generation})")
    return 0


def _recover_unpinned(args: argparse.Namespace) -> int:
    address = _address(args.from_peer)
    if address is None:
        print(f"mirrorunit config recover: --from-peer {args.from_peer!r}: expected "
              "HOST:PORT", file=sys.stderr)
        return 2
    recovery = PeerRecovery(open_store(args.config), Path(args.state_dir))
    try:
        unit = recovery.probe(address, args.fingerprint, args.unit, force=args.force)
        print(f"the peer keeps a sealed config backup of unit {unit}")
        password = read_password(args.password_stdin)
        result = recovery.recover(address, args.fingerprint, password, args.unit,
                                  force=args.force)
    except (LinkError, OSError, ValueError, ConfigError, ConfigStoreError, SealError,
            EOFError) as exc:
        print(f"mirrorunit config recover: {describe_recovery_failure(exc, args.from_peer)}",
              file=sys.stderr)
        return 1
    restored = (f"configuration of unit {result.unit_id} restored (generation "
                f"{result.generation})"
                + (f", link identity {result.fingerprint}" if result.fingerprint else ""))
    if result.pin_error is not None:
        print(restored)
        print(f"mirrorunit config recover: the peer was NOT pinned as {result.peer_name}: "
              f"{result.pin_error}; pin it with `mirrorunit pair fetch`", file=sys.stderr)
        return 1
    print(f"{restored}; peer pinned as {result.peer_name}")
    return 0


def add_config_recover(config_commands: Any) -> None:
    """`mirrorunit config recover`: called by firmware.apps.config with its sub-commands."""
    rc = config_commands.add_parser(
        "recover", help="fetch this unit's sealed config from a peer and restore it")
    rc.add_argument("--from-peer", required=True, metavar="HOST:PORT",
                    help="the peer's journey-link address")
    rc.add_argument("--fingerprint", metavar="SHA256",
                    help="the peer's certificate fingerprint: recover a replaced unit "
                         "(no identity the peer knows) and restore its identity too")
    rc.add_argument("--unit", default=None,
                    help="with --fingerprint: the unit id to recover, if the peer keeps "
                         "several units' backups")
    rc.add_argument("--name", default=None,
                    help="without --fingerprint: the peer's pinned name (this unit's "
                         "identity is intact)")
    rc.add_argument("--state-dir", required=True, type=Path,
                    help="this unit's link state directory (its identity and pinned peers)")
    rc.add_argument("--config", default=None, metavar="PATH",
                    help="config partition to restore into")
    rc.add_argument("--force", action="store_true", help="even over a valid config")
    rc.add_argument("--password-stdin", action="store_true",
                    help="read the admin password from standard input")
    rc.set_defaults(func=cmd_recover)
