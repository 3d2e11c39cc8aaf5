"""Command-line parts of the journey link.

- `mirrorunit local ... --remote NAME=HOST:PORT` (repeatable) replicates the local
  volume to each remote; NAME is the CBQ consumer and the name the remote's
  certificate is pinned under.
- `mirrorunit pair show|add|fetch|list|remove` manages this unit's identity and
  the certificates it pins (see docs/replication.md, "Pairing").
- `mirrorunit link status|pause|resume|verify|seal-config` talks to a running local unit.
- `mirrorunit config recover --from-peer HOST:PORT ...` fetches this unit's sealed
  config backup from a peer and restores it after the admin password is entered.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from firmware.link.errors import LinkError, PeerNotPinned
from firmware.link.tls import (
    CERT_FILE,
    Identity,
    PeerStore,
    fingerprint,
    load_or_create_identity,
    normalize_fingerprint,
)

DEFAULT_CONTROL = "/run/mirrorunit/local.sock"


def certificate_name(cert_der: bytes) -> str:
    """The common name a unit put in its certificate (its unit id)."""
    cert = x509.load_der_x509_certificate(cert_der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise LinkError("certificate has no common name")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def unit_identity(state_dir: Path, unit_id: str | None = None) -> tuple[Identity, str]:
    """Load (or create on first start) this unit's identity; its id is the
    certificate's common name, chosen at random unless `unit_id` is given."""
    if not (state_dir / CERT_FILE).exists():
        identity = load_or_create_identity(state_dir, unit_id or f"unit-{secrets.token_hex(6)}")
    else:
        identity = load_or_create_identity(state_dir, unit_id or "unused")
    name = certificate_name(identity.cert_der)
    if unit_id is not None and unit_id != name:
        raise LinkError(f"the identity in {state_dir} belongs to unit {name!r}, not {unit_id!r}")
    return identity, name


def default_local_state_dir(buffer: Path) -> Path:
    return buffer.parent / (buffer.name + ".link")


# --------------------------------------------------------------------------- pair


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir)
    print("mirrorunit pair: give --state-dir (the unit's link state directory)",
          file=sys.stderr)
    raise SystemExit(2)


def fetch_certificate(host: str, port: int, timeout: float = 10.0,
                      identity: Identity | None = None) -> bytes:
    """The certificate a unit listening at host:port presents.  Nothing is trusted
    here: the caller compares its fingerprint with one obtained out of band."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as sock:
            der = sock.getpeercert(binary_form=True)
    if not der:
        raise PeerNotPinned(f"{host}:{port} presented no certificate")
    return der


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
            host, _, port = args.address.rpartition(":")
            identity, _ = unit_identity(state_dir)
            der = fetch_certificate(host.strip("[]"), int(port), identity=identity)
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


def _read_password(use_stdin: bool, prompt: str = "Admin password: ") -> str:
    if use_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise EOFError("no password on standard input")
        return line.rstrip("\n")
    import getpass

    return getpass.getpass(prompt)


def _seal_config(args: argparse.Namespace) -> int:
    """Seal the config for the peers: through a running local unit (its --config),
    or, with --state-dir and --config, straight into a state dir (a remote unit's:
    it hands the blob to each local that connects)."""
    from firmware.config.errors import ConfigStoreError, SealError
    from firmware.control import ControlError, call

    try:
        password = _read_password(args.password_stdin)
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
    from firmware.config.peer_backup import OWN_BACKUP_NAME, seal_config, write_blob
    from firmware.config.store import ConfigStore, StoreSettings

    if args.config is None:
        print("mirrorunit link seal-config: --state-dir needs --config", file=sys.stderr)
        return 2
    from firmware.config.seal import SealedIdentity
    from firmware.link.tls import PEERS_FILE, export_identity

    state_dir = Path(args.state_dir)
    try:
        identity = None
        if (state_dir / CERT_FILE).exists():
            ident, _ = unit_identity(state_dir)
            identity = SealedIdentity(*export_identity(ident, state_dir / PEERS_FILE))
        blob = seal_config(ConfigStore(StoreSettings(str(args.config))), password, identity)
        write_blob(state_dir / OWN_BACKUP_NAME, blob)
    except (ConfigStoreError, SealError, OSError, LinkError) as exc:
        print(f"mirrorunit link seal-config: refused: {exc}", file=sys.stderr)
        return 1
    print(f"config sealed ({len(blob)} bytes) into {args.state_dir}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    if args.fingerprint is not None:
        return _recover_unpinned(args)
    if args.name is None:
        print("mirrorunit config recover: give --fingerprint (a replaced unit) or --name "
              "(a unit whose identity is intact and pins the peer)", file=sys.stderr)
        return 2
    from firmware.config.cli import open_store
    from firmware.config.errors import ConfigError, ConfigStoreError, SealError, WrongPassword
    from firmware.config.peer_backup import restore_config
    from firmware.link.shell import fetch_config_backup

    state_dir = Path(args.state_dir)
    try:
        identity, unit_id = unit_identity(state_dir)
        peers = PeerStore.in_dir(state_dir)
        if peers.get(args.name) is None:
            raise PeerNotPinned(f"peer {args.name!r} is not pinned in {state_dir}")
        host, _, port = args.from_peer.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--from-peer {args.from_peer!r}: expected HOST:PORT")
        blob = fetch_config_backup((host.strip("[]"), int(port)), identity, peers,
                                   args.name, unit_id)
    except (LinkError, OSError, ValueError) as exc:
        print(f"mirrorunit config recover: cannot get the backup: {exc}", file=sys.stderr)
        return 1
    if blob is None:
        print(f"mirrorunit config recover: {args.name} keeps no config backup of unit "
              f"{unit_id}", file=sys.stderr)
        return 1
    print(f"got unit {unit_id}'s sealed config from {args.name} ({len(blob)} bytes)")
    try:
        password = _read_password(args.password_stdin)
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


def describe_recovery_failure(exc: BaseException, address: str) -> str:
    """One sentence an operator can act on, for each way a recovery fails."""
    from firmware.config.errors import (
        ConfigError,
        ConfigStoreError,
        SealFormatError,
        SealTampered,
        WrongPassword,
    )
    from firmware.link.errors import LinkRefused, TlsIdentityError
    from firmware.link.recovery import (
        ERR_DAMAGED,
        ERR_NAME_UNIT,
        ERR_NO_BACKUP,
        ERR_RATE_LIMITED,
        ERR_WRONG_PASSWORD,
    )

    if isinstance(exc, LinkRefused):
        if exc.code == ERR_WRONG_PASSWORD:
            return f"Wrong admin password: {exc.text}. Nothing was written."
        if exc.code == ERR_NO_BACKUP:
            return f"The peer at {address} keeps no config backup for this unit ({exc.text})."
        if exc.code == ERR_RATE_LIMITED:
            return f"The peer refuses more attempts for now: {exc.text}."
        if exc.code == ERR_DAMAGED:
            return f"The peer's copy is damaged: {exc.text}."
        if exc.code == ERR_NAME_UNIT:
            return f"The peer keeps several units' backups: give this unit's id ({exc.text})."
        return f"The peer at {address} refused: {exc.code}: {exc.text}."
    if isinstance(exc, PeerNotPinned):
        return f"Wrong peer fingerprint, nothing fetched: {exc}."
    if isinstance(exc, WrongPassword):
        return "Wrong admin password: the backup does not open. Nothing was written."
    if isinstance(exc, SealTampered | SealFormatError):
        return f"The peer's copy of the backup is damaged ({exc}); nothing was written."
    if isinstance(exc, ConfigStoreError | ConfigError | TlsIdentityError):
        return f"Refused, nothing was written: {exc}."
    if isinstance(exc, OSError):
        why = exc.strerror or str(exc) or type(exc).__name__
        return f"Cannot reach the peer at {address}: {why}."
    return f"Recovery failed: {exc}."


def _recover_unpinned(args: argparse.Namespace) -> int:
    from firmware.config.cli import open_store
    from firmware.config.errors import ConfigError, ConfigStoreError, SealError
    from firmware.link.restore import PeerRecovery

    host, _, port = args.from_peer.rpartition(":")
    if not host or not port.isdigit():
        print(f"mirrorunit config recover: --from-peer {args.from_peer!r}: expected "
              "HOST:PORT", file=sys.stderr)
        return 2
    address = (host.strip("[]"), int(port))
    recovery = PeerRecovery(open_store(args.config), Path(args.state_dir))
    try:
        unit = recovery.probe(address, args.fingerprint, args.unit, force=args.force)
        print(f"the peer keeps a sealed config backup of unit {unit}")
        password = _read_password(args.password_stdin)
        result = recovery.recover(address, args.fingerprint, password, args.unit,
                                  force=args.force)
    except (LinkError, OSError, ValueError, ConfigError, ConfigStoreError, SealError,
            EOFError) as exc:
        print(f"mirrorunit config recover: {describe_recovery_failure(exc, args.from_peer)}",
              file=sys.stderr)
        return 1
    print(f"configuration of unit {result.unit_id} restored (generation {result.generation})"
          + (f", link identity {result.fingerprint}" if result.fingerprint else "")
          + f"; peer pinned as {result.peer_name}")
    return 0


def add_config_recover(config_commands: Any) -> None:
    """`mirrorunit config recover`: called by firmware.config.cli with its sub-commands."""
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
    rc.set_defaults(func=_recover)


def _link(args: argparse.Namespace) -> int:
    from firmware.control import ControlError, call

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
    sc.set_defaults(func=_seal_config)
