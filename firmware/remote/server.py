"""The remote unit's process: a `LinkServer` in front of a `RemoteStore`.

Each paired local unit is a virtual unit of the store (`STORE/<unit id>/`), opened
on its first connection and kept open while the process runs, so point-in-time
exports, rollbacks and drops work through the control socket whether or not the
local is connected.  A timer moves writes whose commit delay has passed to the
mirror and prunes history beyond retention.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
import zlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from firmware.lineage import Lineage, Policy, Role
from firmware.link.errors import LinkProtocolError, LinkRefused
from firmware.link.frames import (
    CODEC_NONE,
    FailbackPlan,
    FailbackStart,
    Hello,
    SwitchoverDone,
    SwitchoverStart,
    WriteRecord,
    available_codecs,
)
from firmware.link.pairing import ConfiguredPeer, PairingPolicy
from firmware.link.recovery import BackupKey, RecoveryLimiter
from firmware.link.session import ERR_FAILBACK, ERR_HANDED_BACK, ReceiverConfig
from firmware.link.shell import LinkServer
from firmware.link.tls import Identity, PeerStore
from firmware.recovery.keys import backup_key
from firmware.remote.errors import GeometryMismatch, PromoteRefused, RemoteError, UnitBusy
from firmware.remote.format import CHUNK_SIZE
from firmware.remote.meeting import Action, Verdict, meet, peer_lineage_of
from firmware.remote.relay import Relay, RelaySpec
from firmware.remote.stateblocks import SketchSettings
from firmware.remote.store import RemoteStore
from firmware.remote.unit import Retention, UnitStore, validate_unit_id

log = logging.getLogger("mirrorunit.remote")

#: Scratch space of a test-failover clone unless asked otherwise (or the volume's size).
DEFAULT_CLONE_SCRATCH = 1 << 30

#: Rows of the decision table where a split-brain policy makes this copy the target: a
#: promoted unit then gives up its writes on its own (firmware.lineage.decide).
POLICY_GIVE_UP_RULES = frozenset({"forced-zero-changes", "forced-younger",
                                  "diverged-zero-changes", "diverged-younger"})

#: Per-unit log of the seq ranges handed to the store, one "FIRST LAST" line per
#: batch ("FIRST LAST skip" for seqs the local discarded; tests check from it that
#: every seq arrived once, in order).
ARRIVALS_NAME = "arrivals.log"


class UnitSink:
    """A unit store as the link's `WriteSink` / `ResyncSink`.

    Store errors become protocol errors: the connection closes with the reason
    logged, and the unit (and the process) carry on."""

    def __init__(self, unit: UnitStore) -> None:
        self.unit = unit
        self._arrivals = Path(unit.directory) / ARRIVALS_NAME
        #: The queue id of a connected local whose queue is not the one the unit
        #: follows; until its full resync completes, nothing is applied.
        self._requeue: int | None = None
        #: What the lineage decision said at the last HELLO (for status), None before.
        self.meeting: dict[str, Any] | None = None
        #: The unit's generation when the connected local was let in: once the unit
        #: forks (a promotion) that session ends, idle or not.
        self.met_generation: int | None = None
        self._reconcile_arrivals()

    def _reconcile_arrivals(self) -> None:
        last = 0
        if self._arrivals.exists():
            lines = self._arrivals.read_text().splitlines()
            for line in reversed(lines):
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    last = int(parts[1])
                    break
        durable = self.unit.last_durable_seq() - self.unit.seq_offset
        if durable > last:
            # The process died after the store made these durable and before the
            # line was written: they did arrive (once; the journal is contiguous).
            self._log(last + 1, durable, "recovered")

    def _log(self, first: int, last: int, note: str = "") -> None:
        with open(self._arrivals, "a") as f:
            f.write(f"{first} {last}{(' ' + note) if note else ''}\n")

    def check_queue(self, queue_id: int | None) -> bool:
        """Called at HELLO: True if the local's queue is not the one this unit
        follows, so only a full resync may follow."""
        self._requeue = None
        known = self.unit.queue_id
        if queue_id is None or queue_id == known:
            return False
        if known is None and self.unit.last_durable_seq() == 0:
            self._guard(lambda: self.unit.set_queue_id(queue_id))
            return False
        # A unit that never recorded a queue id but holds seqs cannot tell a
        # continuation from a restart: the resync costs digests, a wrong guess data.
        self._requeue = queue_id
        log.warning("unit %s: the local's queue %08x is not queue %s this unit follows "
                    "(up to seq %d); a full resync must come first", self.unit.unit_id,
                    queue_id, "unknown" if known is None else f"{known:08x}",
                    self.unit.last_durable_seq() - self.unit.seq_offset)
        return True

    def _to_unit(self, r: WriteRecord) -> WriteRecord:
        off = self.unit.seq_offset
        return dataclasses.replace(r, seq=r.seq + off,
                                   skip_last=r.skip_last + off if r.is_skip else 0)

    def apply(self, records: Sequence[WriteRecord]) -> int:
        if self._requeue is not None:
            raise LinkProtocolError(f"unit {self.unit.unit_id}: writes of a new queue "
                                    "before its full resync")
        off = self.unit.seq_offset
        try:
            durable = self.unit.apply([self._to_unit(r) for r in records] if off
                                      else records) - off
        except RemoteError as exc:
            raise LinkProtocolError(f"unit {self.unit.unit_id}: {exc}") from None
        # One line per run of writes, and one per skip, so the log shows the skips.
        run: list[WriteRecord] = []
        for r in [*records, None]:
            if r is not None and r.barrier:
                continue  # no seq of its own: the unit's points list it
            if r is None or r.is_skip:
                if run:
                    self._log(run[0].seq, run[-1].seq)
                    run = []
                if r is not None:
                    self._log(r.seq, r.skip_last, "skip")
            else:
                run.append(r)
        return durable

    def last_durable_seq(self) -> int:
        # Asked on every durable poll, so a promotion ends an idle session too.
        if self.met_generation is not None and \
                self.unit.lineage.generation != self.met_generation:
            raise LinkProtocolError(f"unit {self.unit.unit_id}: promoted since this "
                                    "session began; it takes no more replication")
        if self._requeue is not None:
            return 0
        return self.unit.last_durable_seq() - self.unit.seq_offset

    @property
    def chunk_size(self) -> int:
        return self.unit.chunk_size

    @property
    def chunk_count(self) -> int:
        return self.unit.chunk_count

    def begin_resync(self) -> int:
        return self._guard(self.unit.begin_resync)

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        return self._guard(lambda: self.unit.chunk_digests(chunks))

    def write_chunk(self, chunk: int, data: bytes) -> bool:
        return self._guard(lambda: self.unit.write_chunk(chunk, data))

    def resync_complete(self, seq: int) -> None:
        queue = self._requeue
        if queue is not None:
            self._guard(lambda: self.unit.complete_requeue(seq, queue))
            self._requeue = None
            self._log(seq, seq, "requeue")
            return
        self._guard(lambda: self.unit.resync_complete(seq + self.unit.seq_offset))
        self._log(seq, seq, "resync")

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except RemoteError as exc:
            raise LinkProtocolError(f"unit {self.unit.unit_id}: {exc}") from None


#: A unit's sealed config backup in its directory (see firmware.config.peer_backup).
CONFIG_BACKUP_NAME = "config.sealed"


class UnitConfigBackups:
    """The sealed config backups local units hand this remote, one per unit, in
    the unit's directory of the store.  Never opened here: only the unit's admin
    password opens them."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = Path(store_dir)

    def _path(self, unit_id: str) -> Path:
        validate_unit_id(unit_id)
        return self.store_dir / unit_id / CONFIG_BACKUP_NAME

    def put(self, unit_id: str, blob: bytes) -> None:
        from firmware.config.peer_backup import write_blob

        path = self._path(unit_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_blob(path, blob)

    def get(self, unit_id: str) -> bytes | None:
        from firmware.config.peer_backup import read_blob

        return read_blob(self._path(unit_id))

    def key_of(self, blob: bytes) -> BackupKey:
        return backup_key(blob)

    def units(self) -> list[str]:
        """The units whose backup is kept here."""
        if not self.store_dir.is_dir():
            return []
        return sorted(d.name for d in self.store_dir.iterdir()
                      if not d.name.startswith(".") and (d / CONFIG_BACKUP_NAME).is_file())


class _PinnedUnits:
    """`known_units` for the receiver: every pinned peer is a unit it accepts."""

    def __init__(self, peers: PeerStore) -> None:
        self.peers = peers

    def __contains__(self, unit_id: object) -> bool:
        return isinstance(unit_id, str) and self.peers.get(unit_id) is not None

    def __iter__(self) -> Any:
        return iter(self.peers.names())

    def __len__(self) -> int:
        return len(self.peers.names())


class _UsbExport:
    """A USB front end in this process as an export, like an NBD server: its address
    and device, and stop()."""

    def __init__(self, service: Any, stop: threading.Event) -> None:
        self.service, self._stop = service, stop
        self.address = ("usb", 0)
        self.device = service.logical_unit.device

    def stop(self) -> None:
        self._stop.set()
        self.service.stop()


class UnitFailbackSource:
    """A promoted unit handing its role back over one link session (FailbackSource)."""

    def __init__(self, server: RemoteServer, unit: UnitStore, codec: str) -> None:
        self.server = server
        self.unit = unit
        hb = unit.begin_hand_back()
        self.plan = FailbackPlan(random.getrandbits(63), hb.seq, hb.lineage, hb.chunk_size,
                                 hb.chunk_count, hb.changed, hb.dropped, codec)

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        return self.unit.chunk_digests(chunks)

    def read_chunk(self, chunk: int) -> bytes:
        off = chunk * CHUNK_SIZE
        return self.unit.read_mirror(off, min(CHUNK_SIZE, self.unit.volume_size - off))

    def commit(self, seq: int, lineage: Lineage) -> None:
        before = self.unit.last_durable_seq() - self.unit.seq_offset
        self.unit.hand_back(seq, lineage)
        self.server._handed_back(self.unit.unit_id, before, seq)

    def abort(self) -> None:
        self.unit.end_hand_back()


class RemoteServer:
    def __init__(self, *, store_dir: Path, listen: tuple[str, int], identity: Identity,
                 peers: PeerStore, policy: Policy = Policy.MANUAL,
                 commit_delay_s: float | None = None,
                 retention: Retention | None = None, tick: float = 0.2,
                 dead_after: float = 20.0, state_dir: Path | None = None,
                 config_path: Path | None = None,
                 recovery: RecoveryLimiter | None = None,
                 pairing_limiter: RecoveryLimiter | None = None,
                 state_blocks: SketchSettings | None = None,
                 relays: Sequence[RelaySpec] = (),
                 relay_peers: PeerStore | None = None,
                 relay_from: Mapping[str, Collection[str]] | None = None) -> None:
        """With `config_path` (this remote's own config), a local whose certificate's
        fingerprint the config lists under `peers` is pinned when it offers it
        (PAIR_OFFER, firmware/link/pairing.py).  `state_blocks` sizes each unit's
        state-block sketch (firmware/remote/stateblocks.py).

        `relays` forward units to further remotes, pinned in `relay_peers` (not among
        the locals this remote accepts); `relay_from` names, per pinned peer, the
        units that peer may relay here (firmware/remote/relay.py)."""
        self.store = RemoteStore(store_dir, state_blocks=state_blocks)
        #: How a split brain may resolve itself (see firmware.lineage.Policy).
        self.policy = policy
        self.identity = identity
        self.peers = peers
        self.commit_delay_s = commit_delay_s
        self.retention = retention
        self.tick = tick
        self._lock = threading.Lock()
        self._sinks: dict[str, UnitSink] = {}
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
                #: Every export served from this process, NBD or USB, by key: an NBD server's
        #: `<unit>@<point, primary or test-...>:<port>`, the USB front end's `usb:<unit>`
        #: (the status answer lists them under "nbd_exports", the name its readers know).
        self.exports: dict[str, Any] = {}
        self.relay_specs = {r.unit_id: r for r in relays}
        if len(self.relay_specs) != len(relays):
            raise ValueError("one relay per unit")
        if relays and relay_peers is None:
            raise ValueError("relays need the store of their pinned remotes")
        self.relay_peers = relay_peers
        self.relays: dict[str, Relay] = {}
        self._started = False
        relay_from = {k: frozenset(v) for k, v in (relay_from or {}).items()}
        self.state_dir = state_dir if state_dir is not None else default_remote_state_dir(
            Path(store_dir))
        self.backups = UnitConfigBackups(Path(store_dir))
        self._own_cache: tuple[tuple[int, int] | None, bytes | None] = (None, None)
        self.config_path = config_path
        pairing = None
        if config_path is not None:
            pairing = PairingPolicy(
                self._configured_peers,
                pairing_limiter if pairing_limiter is not None
                else RecoveryLimiter(what="pairing"))
        self.link = LinkServer(
            listen, identity, peers,
            ReceiverConfig(known_units=_PinnedUnits(peers), barriers=True),  # type: ignore[arg-type]
            self._open_sink, dead_after=dead_after, backups=self.backups,
            own_backup=self._own_backup,
            recovery=recovery if recovery is not None else RecoveryLimiter(),
            pairing=pairing, open_failback=self._open_failback, switchover=self._switchover,
            relays=lambda peer: relay_from.get(peer, frozenset()))
        #: Seals this remote's own config (its --config) whenever it changes.
        self.sealer: Any = None
        if config_path is not None:
            from firmware.config.peer_backup import OWN_BACKUP_NAME, AutoSealer
            from firmware.config.seal import SealedIdentity
            from firmware.config.store import open_store
            from firmware.link.tls import PEERS_FILE, export_identity

            def identity_now() -> SealedIdentity:
                return SealedIdentity(*export_identity(identity, self.state_dir / PEERS_FILE))

            self.sealer = AutoSealer(open_store(config_path), self.state_dir / OWN_BACKUP_NAME,
                                     identity_now)
        #: Who may receive this remote's own sealed config (its `backup.keepers`).
        self.keepers: Any = None
        if config_path is not None:
            from firmware.config.peer_backup import BackupKeepers
            from firmware.config.store import open_store

            self.keepers = BackupKeepers(open_store(config_path))

    def _configured_peers(self) -> list[ConfiguredPeer]:
        """The locals this remote's config lists, read afresh for every offer (a
        config changed at the console needs no restart).  An unreadable config
        lists nobody."""
        from firmware.config.store import StoreState, open_store

        assert self.config_path is not None
        loaded = open_store(self.config_path).load()
        if loaded.state is not StoreState.OK or loaded.config is None:
            log.warning("pairing: this unit's config is not readable (%s); no peer is "
                        "paired from it", loaded.describe())
            return []
        return [ConfiguredPeer(p["name"], p["fingerprint"]) for p in loaded.config["peers"]]

    def _own_backup(self, peer: str) -> tuple[str, bytes] | None:
        """This remote's own sealed config (sealed on each change of its --config, or
        by `mirrorunit link seal-config`), handed to the connected local `peer` when
        the config names it in `backup.keepers` (and again when the blob changes);
        None for every other peer, and for all of them without a --config."""
        from firmware.config.peer_backup import OWN_BACKUP_NAME, read_blob
        from firmware.link.tls import certificate_name

        if self.keepers is None or not self.keepers.allows(peer):
            return None

        path = self.state_dir / OWN_BACKUP_NAME
        try:
            st = path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp is None:
            return None
        if stamp != self._own_cache[0]:
            self._own_cache = (stamp, read_blob(path))
        blob = self._own_cache[1]
        return None if blob is None else (certificate_name(self.identity.cert_der), blob)

    # ---------------------------------------------------------------- units

    def unit(self, unit_id: str, volume_size: int | None = None,
             block_size: int = 512) -> UnitStore:
        """The open unit, opening it (from disk, or creating it with the geometry
        given) if needed."""
        with self._lock:
            sink = self._sinks.get(unit_id)
            if sink is not None:
                return sink.unit
            if volume_size is None:
                unit = self._open_existing(unit_id)
            else:
                unit = self.store.open_unit(unit_id, volume_size, block_size,
                                            retention=self.retention,
                                            commit_delay_s=self.commit_delay_s)
            self._sinks[unit_id] = UnitSink(unit)
            if self._started:
                self._start_relay(unit)
            return unit

    def _start_relay(self, unit: UnitStore) -> None:
        spec = self.relay_specs.get(unit.unit_id)
        if spec is None or unit.unit_id in self.relays:
            return
        assert self.relay_peers is not None
        relay = Relay(spec, unit, self.identity, self.relay_peers)
        self.relays[unit.unit_id] = relay
        relay.start()
        log.info("unit %s is relayed to %s at %s:%d", unit.unit_id, spec.name, spec.host,
                 spec.port)

    def _open_existing(self, unit_id: str) -> UnitStore:
        from firmware.remote.unit import stored_geometry

        if unit_id not in self.store.unit_ids():
            raise RemoteError(f"no unit {unit_id!r} in {self.store.root_dir}")
        # Geometry comes from the state file; UnitStore re-checks it all.
        volume_size, block_size = stored_geometry(self.store.unit_dir(unit_id))
        return self.store.open_unit(unit_id, volume_size, block_size,
                                    retention=self.retention,
                                    commit_delay_s=self.commit_delay_s)

    def _open_sink(self, hello: Hello) -> UnitSink:
        try:
            self.unit(hello.unit_id, hello.volume_size, hello.block_size)
        except GeometryMismatch as exc:
            raise LinkRefused("geometry", str(exc)) from None
        except UnitBusy as exc:
            raise LinkRefused("busy", str(exc)) from None
        except RemoteError as exc:
            raise LinkRefused("store", str(exc)) from None
        with self._lock:
            sink = self._sinks[hello.unit_id]
        if (sink.unit.volume_size, sink.unit.block_size) != (hello.volume_size,
                                                              hello.block_size):
            raise LinkRefused("geometry", f"unit {hello.unit_id!r} holds a "
                              f"{sink.unit.volume_size}-byte volume of "
                              f"{sink.unit.block_size}-byte blocks")
        try:
            self._meet(sink, hello)
        except RemoteError as exc:
            raise LinkRefused("store", str(exc)) from None
        return sink

    def _meet(self, sink: UnitSink, hello: Hello) -> Verdict:
        """Decide, from both lineages, whether this local's writes may come in; refuse
        with the reason (LinkRefused) when not.  Nothing moves on a refusal."""
        unit = sink.unit
        mine = unit.lineage
        peer_seq = hello.last_seq if hello.last_seq is not None else hello.resume_seq
        peer = hello.lineage or peer_lineage_of(mine)
        if peer is None:
            peer = Lineage.first(Role.PRIMARY, time.time(), random.SystemRandom())
        verdict = meet(mine, unit.copy_seq, peer, peer_seq, told=hello.lineage is not None,
                       policy=self.policy)
        d = verdict.decision
        if unit.promoted and d.rule in POLICY_GIVE_UP_RULES:
            # The split-brain policy chose this copy as the one that gives up its writes
            # (they are kept as a conflict image): it follows the local again.
            log.warning("unit %s: split brain resolved by policy %s (%s): this unit gives "
                        "up its writes", unit.unit_id, self.policy.value, d.rule)
            self.resolve(unit.unit_id)
            mine = unit.lineage
            verdict = meet(mine, unit.copy_seq, peer, peer_seq,
                           told=hello.lineage is not None, policy=self.policy)
            d = verdict.decision
        sink.meeting = {"outcome": d.outcome.value, "rule": d.rule, "reason": d.reason,
                        "peer_seq": peer_seq, "at_ns": time.time_ns(),
                        "refused": verdict.code or None}
        if verdict.action is Action.ADOPT:
            assert hello.lineage is not None
            if mine.generation != hello.lineage.generation or mine.chain != hello.lineage.chain:
                unit.set_lineage(mine.adopt(hello.lineage))
                log.info("unit %s: follows the local's generation %016x (%s)", unit.unit_id,
                         hello.lineage.generation, d.rule)
        elif verdict.action is Action.REFUSE:
            log.error("unit %s: the local's writes are refused: %s (%s: %s)", unit.unit_id,
                      verdict.code, d.rule, d.reason)
            raise LinkRefused(verdict.code, verdict.text)
        sink.met_generation = unit.lineage.generation
        return verdict

    # ---------------------------------------------------------------- roles

    def _open_failback(self, start: FailbackStart) -> UnitFailbackSource:
        """A fenced local asks to take this unit's image back (docs/failover.md)."""
        try:
            unit = self.unit(start.unit_id)
        except RemoteError as exc:
            raise LinkRefused(ERR_FAILBACK, str(exc)) from None
        mine = unit.lineage
        ancestors = {g.generation for g in mine.chain[:-1]}
        if not unit.promoted:
            handed = [e for e in unit.status().events if e.get("event") == "hand-back"]
            if handed and not mine.writer and mine.current.parent in ancestors \
                    and start.lineage.generation in ancestors:
                raise LinkRefused(ERR_HANDED_BACK, f"unit {start.unit_id!r} already handed "
                                  f"its role back at seq {mine.current.fork_seq} to "
                                  f"generation {mine.generation:016x}")
            raise LinkRefused(ERR_FAILBACK, f"unit {start.unit_id!r} is not promoted here: "
                              "it has no role to hand back")
        standby = start.lineage.generation == mine.generation and not start.lineage.writer
        if start.lineage.generation not in ancestors and not standby:
            raise LinkRefused(ERR_FAILBACK, f"unit {start.unit_id!r} was not promoted off "
                              f"generation {start.lineage.generation:016x}; a failback "
                              "needs the copy it was promoted from")
        codec = next((c for c in start.compression if c in available_codecs()), CODEC_NONE)
        try:
            source = UnitFailbackSource(self, unit, codec)
        except RemoteError as exc:
            raise LinkRefused(ERR_FAILBACK, str(exc)) from None
        log.warning("unit %s: failback asked by its local; its host's writes are stopped "
                    "(%d chunks written here since the promotion)", unit.unit_id,
                    len(unit.dirty_chunks()))
        return source

    def _switchover(self, start: SwitchoverStart) -> SwitchoverDone:
        """A planned role reversal asked by the unit's local, which has stopped its host
        and drained its queue: promote at exactly the drained seq (docs/failover.md)."""
        try:
            unit = self.unit(start.unit_id)
        except RemoteError as exc:
            raise LinkRefused(ERR_FAILBACK, str(exc)) from None
        if unit.promoted:
            raise LinkRefused(ERR_FAILBACK, f"unit {start.unit_id!r} is already promoted")
        if unit.lineage.generation != start.lineage.generation:
            raise LinkRefused(ERR_FAILBACK, f"unit {start.unit_id!r} holds generation "
                              f"{unit.lineage.generation:016x}, the local "
                              f"{start.lineage.generation:016x}: not a copy of it to switch to")
        holder = self.link.busy_units().get(start.unit_id)
        if holder is not None:
            raise LinkRefused(ERR_FAILBACK, f"unit {start.unit_id!r} still has a session "
                              f"from {holder}")
        have = unit.last_durable_seq() - unit.seq_offset
        if have != start.seq:
            raise LinkRefused(ERR_FAILBACK, f"not drained: unit {start.unit_id!r} holds the "
                              f"local's writes up to seq {have}, the local's queue up to "
                              f"seq {start.seq}")
        try:
            r = unit.promote(start.seq + unit.seq_offset, forced=False)
        except RemoteError as exc:
            raise LinkRefused(ERR_FAILBACK, str(exc)) from None
        log.warning("unit %s: switchover: promoted at the local's seq %d (generation %016x)",
                    unit.unit_id, r.fork_seq, r.generation)
        return SwitchoverDone(start.unit_id, start.seq, unit.lineage)

    def _handed_back(self, unit_id: str, before: int | None = None,
                     seq: int | None = None) -> None:
        """The unit follows its local again: its writable exports end.  The local's seqs
        before..seq came with the image it took, not as writes: the arrivals log says so."""
        for key in [k for k in self.exports if k.startswith(f"{unit_id}@primary:")]:
            server = self.exports.pop(key)
            server.stop()
            server.device.close()
        with self._lock:
            sink = self._sinks.get(unit_id)
        if sink is not None:
            sink.meeting = None
            if before is not None and seq is not None and seq > before:
                sink._log(before + 1, seq, "hand-back")

    def promote(self, unit_id: str, *, at_seq: int | None = None,
                force: bool = False) -> dict[str, Any]:
        """Promote a unit (see `UnitStore.promote`).  Refused without `force` while the
        unit's local is connected: it is a live primary nobody demoted."""
        unit = self.unit(unit_id)
        holder = self.link.busy_units().get(unit_id)
        if holder is not None and not force:
            raise PromoteRefused(
                f"unit {unit_id!r} is connected from {holder} and was not demoted: its "
                "local is a live primary; promote with force to override it (a split "
                "brain once it reconnects)")
        r = unit.promote(at_seq, forced=holder is not None)
        return {"unit": unit_id, "seq": r.seq, "fork_seq": r.fork_seq,
                "generation": f"{r.generation:016x}", "forced": r.forced,
                "undone": r.undone, "dropped_pending": r.dropped_pending,
                "connected_from": holder}

    def resolve(self, unit_id: str) -> dict[str, Any]:
        """The promoted unit gives up its own writes (kept as a conflict image) and
        follows its local again, after a checksum resync (see `UnitStore.give_up`)."""
        r = self.unit(unit_id).give_up()
        self._handed_back(unit_id)
        return {"unit": unit_id, "generation": f"{r.generation:016x}", "writes": r.writes,
                "chunks": r.chunks, "conflict_image": r.conflict_image,
                "conflict_listing": r.conflict_listing}

    def role_status(self, unit_id: str | None = None) -> dict[str, Any]:
        busy = self.link.busy_units()
        with self._lock:
            sinks = dict(self._sinks)
        out = {}
        for uid, sink in sinks.items():
            if unit_id is not None and uid != unit_id:
                continue
            out[uid] = self._role_of(sink, busy.get(uid))
        if unit_id is not None and unit_id not in out:
            raise RemoteError(f"no unit {unit_id!r} is open here")
        return {"units": out}

    def _role_of(self, sink: UnitSink, connected_from: str | None) -> dict[str, Any]:
        unit = sink.unit
        lin = unit.lineage
        st = unit.status()
        meeting = sink.meeting
        refused = meeting.get("refused") if meeting is not None else None
        # A copy that only received its generation is its secondary, whoever began it.
        role = lin.current.role.value if lin.writer else Role.SECONDARY.value
        return {"role": role, "generation": f"{lin.generation:016x}",
                "lineage": lin.to_dict(), "seq": unit.copy_seq, "promoted": st.promoted,
                "connected_from": connected_from, "peer": meeting,
                "fenced_peer": refused == "fenced", "split_brain": refused == "split-brain"}

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> tuple[str, int]:
        # Units already stored are opened now so their delayed writes keep moving
        # and their history is there to export before their local reconnects.
        for unit_id in self.store.unit_ids():
            try:
                self.unit(unit_id)
            except RemoteError as exc:
                log.error("unit %s cannot be opened: %s", unit_id, exc)
        if self.sealer is not None:
            self.sealer.start()
        with self._lock:
            self._started = True
            for sink in self._sinks.values():
                self._start_relay(sink.unit)
        address = self.link.start()
        self._timer = threading.Thread(target=self._run_timer, name="apply-due", daemon=True)
        self._timer.start()
        return address

    def _run_timer(self) -> None:
        last_prune = time.monotonic()
        while not self._stop.wait(self.tick):
            with self._lock:
                units = [s.unit for s in self._sinks.values()]
            prune = time.monotonic() - last_prune > 10.0
            for unit in units:
                try:
                    unit.apply_due()
                    if prune:
                        unit.prune()
                except RemoteError as exc:
                    log.error("unit %s: applying due writes failed: %s", unit.unit_id, exc)
            for relay in list(self.relays.values()):
                relay.tick()
            if prune:
                last_prune = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self.sealer is not None:
            self.sealer.stop()
        self.link.stop()
        if self._timer is not None:
            self._timer.join()
        for relay in list(self.relays.values()):
            relay.stop()
        for server in list(self.exports.values()):
            server.stop()
        self.store.close()

    # ---------------------------------------------------------------- control

    def status(self) -> dict[str, Any]:
        busy = self.link.busy_units()
        with self._lock:
            units = {uid: s.unit for uid, s in self._sinks.items()}
        out = {}
        for uid, unit in units.items():
            st = dataclasses.asdict(unit.status())
            st["retention"] = dataclasses.asdict(unit.retention)
            st["events"] = st["events"][-8:]
            st["connected_from"] = busy.get(uid)
            st["lineage"] = self._role_of(self._sinks_get(uid), busy.get(uid))
            out[uid] = st
        s = self.link.stats
        return {"role": "remote", "fingerprint": self.identity.fingerprint,
                "listen": _addr(self.link_address), "store": self.store.root_dir,
                "link": dataclasses.asdict(s), "units": out,
                "nbd_exports": {k: _addr(v.address) for k, v in self.exports.items()},
                "relays": {uid: r.status() for uid, r in list(self.relays.items())},
                "guess_limits": self._guess_limits()}

    def _guess_limits(self) -> dict[str, Any]:
        """The unit-wide guess budgets of the certificate-less exchanges (the notifier
        reports each lockout, see firmware/notify/events.py)."""
        out: dict[str, Any] = {}
        if self.link.recovery is not None:
            out["recovery"] = self.link.recovery.snapshot()
        if self.link.pairing is not None:
            out["pairing"] = self.link.pairing.limiter.snapshot()
        return out

    def _sinks_get(self, unit_id: str) -> UnitSink:
        with self._lock:
            return self._sinks[unit_id]

    @property
    def link_address(self) -> tuple[str, int]:
        listener = self.link._listener
        if listener is None:
            return self.link.address
        host, port = listener.getsockname()[:2]
        return host, port

    def handlers(self) -> dict[str, Any]:
        def point_seq(u: UnitStore, point: int | None, seq: int | None) -> int | None:
            if point is None:
                return seq
            if seq is not None:
                raise RemoteError("give a seq or a point, not both")
            return u.point(point).seq

        def export(unit: str, output: str, at_ns: int | None = None,
                   seq: int | None = None, point: int | None = None) -> dict[str, int]:
            u = self.unit(unit)
            seq = point_seq(u, point, seq)
            if at_ns is None and seq is None:
                seq = u.last_applied_seq
            p = u.export(output, at_ns, seq=seq)
            return {"seq": p.seq, "ts": p.ts}

        def points(unit: str, from_ns: int | None = None,
                   to_ns: int | None = None) -> list[dict[str, Any]]:
            u = self.unit(unit)
            applied = u.last_applied_seq
            return [{**dataclasses.asdict(p), "applied": p.seq <= applied}
                    for p in u.points(from_ns, to_ns)]

        def find_point(unit: str, check: str, before_ns: int | None = None,
                       check_timeout: float = 600.0) -> dict[str, Any]:
            from firmware.remote.findpoint import find_point as search
            from firmware.remote.findpoint import run_check

            u = self.unit(unit)
            applied = u.last_applied_seq
            pts = [p for p in u.points(None, before_ns) if p.seq <= applied
                   and not p.in_resync]
            image = Path(self.store.unit_dir(unit)) / f"find-point-{time.time_ns()}.img"
            preferred = u.points_after_state_update(pts)
            try:
                r = search(u, pts, image, lambda img: run_check(check, img, check_timeout),
                           preferred=preferred)
            finally:
                image.unlink(missing_ok=True)
            log.info("unit %s: find-point: %s after %d tries", unit,
                     f"point {r.point.number}" if r.point else "no point", len(r.tries))
            return {"point": dataclasses.asdict(r.point) if r.point else None,
                    "tries": [dataclasses.asdict(t) for t in r.tries],
                    "candidates": r.candidates, "seconds": r.seconds, "linear": r.linear,
                    "after_state_update": r.preferred}

        def state_blocks(unit: str, limit: int = 32) -> dict[str, Any]:
            return self.unit(unit).state_blocks(max(1, min(int(limit), 1024)))

        def export_without(unit: str, output: str, from_seq: int | None = None,
                           to_seq: int | None = None, from_ns: int | None = None,
                           to_ns: int | None = None) -> dict[str, Any]:
            u = self.unit(unit)
            r = u.export_without(output, from_seq, to_seq, from_ns=from_ns, to_ns=to_ns)
            listing = output + ".conflicts.json"
            with open(listing, "w") as f:
                json.dump({"unit": unit, **dataclasses.asdict(r)}, f, indent=2)
            out = dataclasses.asdict(r)
            out["conflicts_file"] = listing
            out["conflict_count"] = len(r.conflicts)
            del out["conflicts"]
            return out

        def replay(unit: str, target: str, from_seq: int | None = None,
                   to_seq: int | None = None, from_ns: int | None = None,
                   to_ns: int | None = None, pace: str = "max") -> dict[str, Any]:
            from firmware.remote.replay import replay as run_replay

            u = self.unit(unit)
            if to_seq is None and to_ns is None:
                to_seq = u.last_applied_seq
            r = run_replay(u, target, from_seq=from_seq, to_seq=to_seq, from_ns=from_ns,
                           to_ns=to_ns, pace=pace)
            return dataclasses.asdict(r)

        def nbd_start(unit: str, address: str, at_ns: int | None = None,
                      seq: int | None = None, point: int | None = None) -> dict[str, Any]:
            from firmware.nbd.server import NbdServer, parse_hostport

            u = self.unit(unit)
            seq = point_seq(u, point, seq)
            host, port = parse_hostport(address)
            if u.promoted:
                # A promoted unit's host gets its mirror itself, writable.
                if at_ns is not None or seq is not None:
                    raise RemoteError(f"unit {unit!r} is promoted: it is served as it is "
                                      "now, not at a point in time")
                wdev = u.promoted_device()
                name = f"{unit}@primary"
                server = NbdServer(wdev, host, port, export_name=name)
                shown = {"seq": u.copy_seq, "ts": 0, "writable": True}
            else:
                dev = u.image_at(at_ns) if at_ns is not None else u.image_at_seq(
                    seq if seq is not None else u.last_applied_seq)
                name = f"{unit}@{dev.point.seq}"
                server = NbdServer(dev, host, port, export_name=name)
                shown = {"seq": dev.point.seq, "ts": dev.point.ts, "writable": False}
            server.start()
            threading.Thread(target=server.serve_forever, name="nbd-export",
                             daemon=True).start()
            key = f"{name}:{server.port}"
            self.exports[key] = server
            return {"key": key, "export": name, "address": _addr(server.address), **shown}

        def test_failover(unit: str, address: str, at_ns: int | None = None,
                          seq: int | None = None,
                          scratch_bytes: int | None = None) -> dict[str, Any]:
            """A writable copy-on-write clone of a point in time, served over NBD while
            replication into the mirror goes on; its writes stay in a scratch file."""
            from firmware.nbd.server import NbdServer, parse_hostport
            from firmware.remote.clone import CloneDevice

            u = self.unit(unit)
            if u.promoted:
                raise RemoteError(f"unit {unit!r} is promoted: serve it with role serve")
            host, port = parse_hostport(address)
            limit = scratch_bytes if scratch_bytes is not None else min(
                u.volume_size, DEFAULT_CLONE_SCRATCH)
            base = u.image_at(at_ns) if at_ns is not None else u.image_at_seq(
                seq if seq is not None else u.last_applied_seq)
            scratch = Path(self.store.unit_dir(unit)) / \
                f"test-failover-{base.point.seq}-{time.time_ns()}.scratch"
            clone = CloneDevice(base, scratch, limit)
            name = f"{unit}@test-{base.point.seq}"
            server = NbdServer(clone, host, port, export_name=name)
            server.start()
            threading.Thread(target=server.serve_forever, name="nbd-test-failover",
                             daemon=True).start()
            key = f"{name}:{server.port}"
            self.exports[key] = server
            log.warning("unit %s: test failover at seq %d served as %s (scratch %d bytes); "
                        "replication goes on", unit, base.point.seq, name, limit)
            return {"key": key, "export": name, "address": _addr(server.address),
                    "seq": base.point.seq, "ts": base.point.ts, "scratch_limit": limit}

        def test_failover_end(unit: str) -> list[dict[str, Any]]:
            """End every test-failover clone of `unit`: their writes are discarded."""
            from firmware.remote.clone import CloneDevice

            ended = []
            for key in [k for k in self.exports if k.startswith(f"{unit}@test-")]:
                server = self.exports.pop(key)
                server.stop()
                dev = server.device
                used = dev.scratch_used if isinstance(dev, CloneDevice) else 0
                dev.close()
                ended.append({"key": key, "scratch_used": used})
                log.warning("unit %s: test failover %s ended; %d bytes written to it "
                            "discarded", unit, key, used)
            return ended

        def test_failover_status(unit: str | None = None) -> list[dict[str, Any]]:
            from firmware.remote.clone import CloneDevice

            return [{"key": k, "address": _addr(s.address),
                     "scratch_used": s.device.scratch_used,
                     "scratch_limit": s.device.scratch_limit}
                    for k, s in self.exports.items() if isinstance(s.device, CloneDevice)
                    and (unit is None or k.startswith(f"{unit}@test-"))]

        def usb_start(unit: str, udc: str | None = None,
                      serial: str | None = None) -> dict[str, Any]:
            """The unit's mirror as a USB disk of a standby host on this board's UDC:
            NOT READY (02/04/0B) until the unit is promoted, then its writable disk."""
            from firmware.remote.standby import MirrorDevice
            from firmware.scsi import LogicalUnit
            from firmware.usb_gadget.configfs import GadgetSettings
            from firmware.usb_gadget.service import UsbService

            u = self.unit(unit)
            if any(k.startswith("usb:") for k in self.exports):
                raise RemoteError("a unit is already served over USB: one gadget per board")
            sn = serial or f"{zlib.crc32(unit.encode()):012d}"
            svc = UsbService(LogicalUnit(MirrorDevice(u), serial=sn),
                             GadgetSettings(udc=udc, serial_number=sn))
            stop = threading.Event()
            svc.start()
            threading.Thread(target=svc.run_main, args=(stop,), name="usb-standby",
                             daemon=True).start()
            key = f"usb:{unit}"
            self.exports[key] = _UsbExport(svc, stop)
            log.warning("unit %s: served over USB (UDC %s, serial %s) as a %s", unit,
                        udc or "first", sn, "primary" if u.serving_host else "standby")
            return {"key": key, "serial": sn, "state": "ready" if u.serving_host
                    else "standby"}

        def nbd_stop(key: str) -> bool:
            server = self.exports.pop(key, None)
            if server is None:
                return False
            server.stop()
            server.device.close()
            return True

        def rollback(unit: str, to_ns: int | None = None,
                     to_seq: int | None = None) -> dict[str, Any]:
            r = self.unit(unit).rollback(to_ns, to_seq=to_seq)
            return {"seq": r.target.seq, "ts": r.target.ts, "undone": r.undone,
                    "dropped_pending": r.dropped_pending}

        def drop(unit: str, from_ns: int | None = None, to_ns: int | None = None,
                 seq_from: int | None = None, seq_to: int | None = None) -> dict[str, Any]:
            if seq_from is not None or seq_to is not None:
                r = self.unit(unit).drop_range(seq_from=seq_from, seq_to=seq_to)
            else:
                r = self.unit(unit).drop_range(from_ns, to_ns)
            return dataclasses.asdict(r)

        def read(unit: str, offset: int, length: int) -> bytes:
            return self.unit(unit).read_mirror(offset, length)

        def promote(unit: str, seq: int | None = None, force: bool = False) -> dict[str, Any]:
            return self.promote(unit, at_seq=seq, force=force)

        def role_status(unit: str | None = None) -> dict[str, Any]:
            return self.role_status(unit)

        return {"role.promote": promote, "role.status": role_status,
                "role.resolve": lambda unit: self.resolve(unit),
                "role.test_failover": test_failover, "role.test_failover_end": test_failover_end,
                "role.test_failover_status": test_failover_status,
                "remote.usb_start": usb_start,
                "status": self.status, "remote.export": export, "remote.nbd_start": nbd_start,
                "remote.points": points, "remote.replay": replay,
                "remote.find_point": find_point, "remote.state_blocks": state_blocks,
                "remote.export_without": export_without,
                "remote.nbd_stop": nbd_stop, "remote.rollback": rollback,
                "remote.drop": drop, "remote.read": read}


def _addr(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def default_remote_state_dir(store: Path) -> Path:
    return store / ".link-state"
