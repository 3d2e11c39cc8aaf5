"""`mirrorunit config ...`: show, set, export, import, passwd, backup, restore,
apply-network.

The config partition's path comes from --config, else $MIRRORUNIT_CONFIG, else
DEFAULT_CONFIG_PATH.  With --control, live-applicable changes are pushed to the
running local unit and the command says which changes need a restart.  Network
settings are applied to this machine (systemd-networkd) when they change, on the
card image by default (see firmware/config/network.py).  `config recover` (from a peer)
comes with the journey link's commands.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...config.backup import backup_blob, restore_blob
from ...config.errors import ConfigError, ConfigStoreError, NetworkApplyError, SealError
from ...config.live import apply_live
from ...config.network import (
    DEFAULT_NETWORK_FILE,
    DEFAULT_SYS_CLASS_NET,
    ENV_APPLY,
    NetworkHook,
    NetworkSettings,
    apply_by_default,
    apply_network,
)
from ...config.password import check_admin_password
from ...config.schema import Config, format_show
from ...config.store import (
    DEFAULT_CONFIG_PATH,
    ENV_CONFIG,
    ExportFormat,
    SetResult,
    StoreState,
    open_store,
)
from .. import standalone

ENV_CONTROL = "MIRRORUNIT_CONTROL"


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="PATH",
                   help=f"config partition (default ${ENV_CONFIG} or {DEFAULT_CONFIG_PATH})")


def _add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", default=os.environ.get(ENV_CONTROL), metavar="SOCKET",
                   help="local unit control socket: push live changes to it")


def add_network_options(p: argparse.ArgumentParser, *, with_switch: bool = True) -> None:
    """Where network settings are written and how networkd is told (tests fake both)."""
    g = p.add_argument_group("network settings")
    if with_switch:
        g.add_argument("--apply-network", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="apply changed network settings to this machine (default: on "
                            f"the card image, or when ${ENV_APPLY}=1)")
    g.add_argument("--network-file", default=DEFAULT_NETWORK_FILE, metavar="PATH",
                   help="the systemd-networkd file to write")
    g.add_argument("--networkctl", default="networkctl", metavar="COMMAND",
                   help="networkctl command (split like a shell would)")
    g.add_argument("--sys-class-net", default=DEFAULT_SYS_CLASS_NET, metavar="DIR",
                   help="where the interfaces to reconfigure are listed")


def network_settings(args: argparse.Namespace) -> NetworkSettings:
    return NetworkSettings(path=args.network_file,
                           networkctl=tuple(shlex.split(args.networkctl)),
                           sys_class_net=args.sys_class_net)


def network_hook(args: argparse.Namespace) -> NetworkHook | None:
    """The hook `add_network_options` describes, None when it is switched off."""
    on = args.apply_network if args.apply_network is not None else apply_by_default()
    return NetworkHook(network_settings(args)) if on else None


def register(sub: Any) -> None:
    configure(sub.add_parser("config", help="show and change the unit's configuration"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit config", configure, argv)


def configure(cfg: argparse.ArgumentParser) -> None:
    cs = cfg.add_subparsers(dest="config_command", required=True)

    sh = cs.add_parser("show", help="every field (secrets as set / not set)")
    add_config_option(sh)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_show)

    st = cs.add_parser("set", help="change one field")
    add_config_option(st)
    _add_control(st)
    add_network_options(st)
    st.add_argument("key")
    st.add_argument("value")
    st.set_defaults(func=cmd_set)

    ex = cs.add_parser("export", help="write the config as JSON or CBOR")
    add_config_option(ex)
    ex.add_argument("--format", choices=("json", "cbor"), default="json")
    ex.add_argument("--output", "-o", type=Path, help="file (default: standard output)")
    ex.set_defaults(func=cmd_export)

    im = cs.add_parser("import", help="replace fields from a JSON or CBOR document")
    add_config_option(im)
    _add_control(im)
    im.add_argument("file", type=Path, help="document ('-' for standard input)")
    im.add_argument("--format", choices=("json", "cbor"), default=None,
                    help="default: from the file name, else JSON")
    add_network_options(im)
    im.set_defaults(func=cmd_import)

    an = cs.add_parser("apply-network",
                       help="write the network settings for systemd-networkd (at boot) and "
                            "have it apply them")
    add_config_option(an)
    add_network_options(an, with_switch=False)
    an.add_argument("--write-only", action="store_true",
                    help="only write the file (before systemd-networkd starts)")
    an.set_defaults(func=cmd_apply_network)

    pw = cs.add_parser("passwd", help="set or change the admin password")
    add_config_option(pw)
    pw.add_argument("--stdin", action="store_true",
                    help="read the current (if set) and new password as lines on stdin")
    pw.set_defaults(func=cmd_passwd)

    bk = cs.add_parser("backup", help="write the config sealed under the admin password")
    add_config_option(bk)
    bk.add_argument("output", type=Path)
    bk.add_argument("--stdin", action="store_true", help="read the password from stdin")
    bk.set_defaults(func=cmd_backup)

    rs = cs.add_parser("restore", help="restore a sealed backup (blank or corrupt partition)")
    add_config_option(rs)
    rs.add_argument("blob", type=Path)
    rs.add_argument("--force", action="store_true", help="even over a valid config")
    rs.add_argument("--stdin", action="store_true", help="read the password from stdin")
    rs.set_defaults(func=cmd_restore)

    # Recovery from a peer goes over the journey link, which owns that command.
    from firmware.apps.recovery import add_config_recover

    add_config_recover(cs)


def _err(msg: str) -> int:
    print(f"mirrorunit config: {msg}", file=sys.stderr)
    return 1


def _report(result: SetResult, args: argparse.Namespace) -> int:
    """Exit status 1 when a change is saved but could not be applied (reported)."""
    if not result.diff.changed:
        print("no change")
        return 0
    print(f"saved generation {result.generation}")
    report = apply_live(result.diff, result.config, args.control, network=network_hook(args))
    for line in report.lines():
        print(line)
    return 1 if report.errors else 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args.config)
    try:
        loaded = store.load()
        cfg, _ = store._editable()
    except ConfigStoreError as e:
        return _err(str(e))
    if args.json:
        print(json.dumps({"state": loaded.state.value, "generation": loaded.generation,
                          "config": store.show()}, indent=2))
    else:
        print(f"# {loaded.describe()}")
        print(format_show(cfg))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    try:
        result = open_store(args.config).set(args.key, args.value)
    except (ConfigError, ConfigStoreError) as e:
        return _err(str(e))
    return _report(result, args)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        data = open_store(args.config).export(args.format)
    except ConfigStoreError as e:
        return _err(str(e))
    if args.output:
        args.output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    fmt: ExportFormat = args.format or ("cbor" if str(args.file).endswith(".cbor") else "json")
    try:
        data = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    except OSError as e:
        return _err(f"{args.file}: {e.strerror or e}")
    try:
        result = open_store(args.config).import_(data, fmt)
    except (ConfigError, ConfigStoreError) as e:
        return _err(f"import refused, nothing written: {e}")
    return _report(result, args)


def cmd_apply_network(args: argparse.Namespace) -> int:
    """At boot: a blank or unreadable config gets DHCP, so the unit is reachable for
    recovery from a peer."""
    loaded = open_store(args.config).load()
    if loaded.state is StoreState.OK and loaded.config is not None:
        cfg = loaded.config
    else:
        print(f"mirrorunit config: {loaded.describe()}; using DHCP", file=sys.stderr)
        cfg = Config.defaults()
    try:
        done = apply_network(cfg, network_settings(args), reload=not args.write_only,
                             force=True)
    except (NetworkApplyError, ValueError) as e:
        return _err(str(e))
    print(f"network: {cfg['network.mode']}; {done.describe()}")
    return 0


def _reader(use_stdin: bool) -> Any:
    if use_stdin or not sys.stdin.isatty():
        def read(_prompt: str) -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError("standard input ended")
            return line.rstrip("\n")
        return read
    return getpass.getpass


def cmd_passwd(args: argparse.Namespace) -> int:
    store = open_store(args.config)
    read = _reader(args.stdin)
    try:
        cfg, _ = store._editable()
        if cfg["admin.password_hash"]:
            if not check_admin_password(cfg, read("Current admin password: ")):
                return _err("wrong password; nothing changed")
        new = read("New admin password: ")
        if read("Repeat it: ") != new:
            return _err("the two entries differ; nothing changed")
        result = store.set_admin_password(new)
    except (ConfigError, ConfigStoreError, EOFError) as e:
        return _err(str(e))
    print(f"admin password saved (generation {result.generation})")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    try:
        blob = backup_blob(open_store(args.config), _reader(args.stdin)("Admin password: "))
        args.output.write_bytes(blob)
    except (ConfigStoreError, SealError, ConfigError, EOFError) as e:
        return _err(str(e))
    except OSError as e:
        return _err(f"{args.output}: {e.strerror or e}")
    print(f"sealed backup written to {args.output} ({len(blob)} bytes)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        blob = args.blob.read_bytes()
        result = restore_blob(open_store(args.config), blob,
                              _reader(args.stdin)("Admin password: "), force=args.force)
    except OSError as e:
        return _err(f"{args.blob}: {e.strerror or e}")
    except (ConfigStoreError, SealError, ConfigError, EOFError) as e:
        return _err(f"restore refused, nothing written: {e}")
    print(f"configuration restored (generation {result.generation})")
    return 0
