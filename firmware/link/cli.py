"""Options of `mirrorunit local` for the journey link.

`mirrorunit local ... --remote NAME=HOST:PORT` (repeatable) replicates the local
volume to each remote; NAME is the CBQ consumer and the name the remote's
certificate is pinned under.  The operator commands are `firmware.apps.link`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from firmware.link.tls import PeerStore, unit_identity
from firmware.units import parse_size


def default_local_state_dir(buffer: Path) -> Path:
    return buffer.parent / (buffer.name + ".link")


# --------------------------------------------------------------------------- local


def _bandwidth(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def extend_local(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("journey link")
    g.add_argument("--remote", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="replicate to this remote (repeatable); NAME is its CBQ consumer "
                        "and pinned-peer name")
    g.add_argument("--state-dir", type=Path,
                   help="link identity and pinned peers (default: BUFFER.link next to "
                        "the buffer)")
    g.add_argument("--unit-id", help="this unit's id when its identity is first created")
    g.add_argument("--link-bandwidth", type=_bandwidth, metavar="BYTES/S",
                   help="cap each link to this many bytes per second (e.g. 2M)")
    g.add_argument("--compression", choices=("zstd", "zlib", "none"), default="zstd")
    g.add_argument("--link-signature", action="store_true",
                   help="digest handshake per batch: the remote holds each batch until "
                        "this unit confirms its digest (COMMIT) or rejects it (ABORT)")
    g.add_argument("--config", type=Path, metavar="PATH",
                   help="the unit's config partition (sealed for the peers by "
                        "`mirrorunit link seal-config`)")


def _link_factory(unit: Any) -> Any:
    args = unit.settings.args
    remotes = getattr(args, "remote", None) if args is not None else None
    if not remotes:
        return None
    from firmware.local.replication import LinkService, RemoteSpec

    specs = [RemoteSpec.parse(r) for r in remotes]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--remote names must be unique: {names}")
    state_dir = args.state_dir or default_local_state_dir(unit.settings.buffer)
    identity, unit_id = unit_identity(state_dir, args.unit_id)
    peers = PeerStore.in_dir(state_dir)
    cbq = unit.cbq
    if args.peers is None and "remote" in cbq.consumers and "remote" not in names:
        # The default consumer nobody replicates to would pin the queue's space.
        cbq.remove_consumer("remote")
    for name in names:
        if peers.get(name) is None:
            import logging

            logging.getLogger("mirrorunit.link").error(
                "remote %s is not paired: pin its certificate with `mirrorunit pair` "
                "(state dir %s); the link will be refused until then", name, state_dir)
    return LinkService(cbq=cbq, volume=unit.volume, identity=identity, peers=peers,
                       unit_id=unit_id, remotes=specs, state_dir=state_dir,
                       bandwidth=args.link_bandwidth, compression=args.compression,
                       signature=bool(getattr(args, "link_signature", False)),
                       config_path=getattr(args, "config", None))


def _register_factory() -> None:
    from firmware.local.unit import SERVICE_FACTORIES

    if _link_factory not in SERVICE_FACTORIES:
        SERVICE_FACTORIES.append(_link_factory)


_register_factory()
