"""Lineages of volume copies: the model, the decision table, its file, and a model of copies."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from firmware.lineage import (
    MAX_HISTORY,
    RULES,
    Decision,
    Generation,
    Lineage,
    LineageCorruption,
    LineageError,
    Outcome,
    Policy,
    Role,
    SeqRange,
    Side,
    decide,
    give_up,
)
from firmware.lineage import store as lineage_store
from firmware.lineage.decide import render_table
from tests.support import REPO

ROOT = REPO
T0, T1, T2 = 1_700_000_000.0, 1_700_000_100.0, 1_700_000_200.0

# ---------------------------------------------------------------------- a small world
#
# A: the local, primary of its first generation. B0: a new remote. B: that remote once it
# follows A. P / PF: B promoted (normally / forced) at seq 50. R: A resuming writes on its own
# at seq 60 after being demoted; R50: the same at seq 50. C: an unrelated volume.

_rng = random.Random(13)
A = Lineage.first(Role.PRIMARY, T0, _rng)
B0 = Lineage.first(Role.SECONDARY, T0, _rng)
B = B0.adopt(A)
P = B.fork(Role.PRIMARY, 50, T1, False, _rng)
PF = B.fork(Role.PRIMARY, 50, T1, True, _rng)
R = A.fork(Role.PRIMARY, 60, T2, True, _rng)
R50 = A.fork(Role.PRIMARY, 50, T2, True, _rng)
C = Lineage.first(Role.PRIMARY, T0, _rng)
A_TAMPERED = Lineage(Generation(A.generation, 0, 0, Role.PRIMARY, A.current.time_ns + 1, False),
                     writer=True)

M, DZC, DYP = Policy.MANUAL, Policy.DISCARD_ZERO_CHANGES, Policy.DISCARD_YOUNGER_PRIMARY


@dataclass(frozen=True)
class Case:
    rule: str
    mine: Lineage
    peer: Lineage
    my_seq: int
    peer_seq: int
    policy: Policy
    outcome: Outcome
    fork_seq: int | None
    conflict: tuple[int, int] | None = None


CASES = [
    Case("inconsistent", A, A_TAMPERED, 10, 10, M, Outcome.UNRELATED, None),
    Case("same-generation-two-writers", A, A, 10, 10, M, Outcome.SPLIT_BRAIN, None),
    Case("same-generation", A, B, 100, 90, M, Outcome.RESUME, None),
    Case("same-generation", B, A, 90, 100, DYP, Outcome.RESUME, None),
    Case("first-generation-secondary", B0, A, 40, 100, M, Outcome.BECOME_TARGET, 40),
    # a secondary ahead of its primary keeps what it would lose
    Case("first-generation-secondary", B0, A, 120, 100, M, Outcome.BECOME_TARGET, 100, (101, 120)),
    Case("first-generation-primary", A, B0, 100, 40, M, Outcome.BECOME_SOURCE, 40),
    Case("fresh-secondary", B0, P, 0, 80, M, Outcome.BECOME_TARGET, 0),
    Case("peer-fresh-secondary", P, B0, 80, 0, M, Outcome.BECOME_SOURCE, 0),
    Case("unrelated", A, C, 10, 20, M, Outcome.UNRELATED, None),
    Case("unrelated", B0, B0.adopt(C).fork(Role.PRIMARY, 0, T1, False, _rng), 5, 5, M,
         Outcome.UNRELATED, None),
    Case("peer-descends-clean", A, P, 50, 70, M, Outcome.BECOME_TARGET, 50),
    Case("peer-descends-clean", A, PF, 50, 70, M, Outcome.BECOME_TARGET, 50),
    # short of the fork: the resync starts where this copy stopped, not at the fork
    Case("peer-descends-clean", B, P, 42, 70, M, Outcome.BECOME_TARGET, 42),
    Case("descends-from-peer-clean", P, A, 70, 50, M, Outcome.BECOME_SOURCE, 50),
    Case("fenced", A, P, 60, 70, M, Outcome.FENCED, 50, (51, 60)),
    Case("fenced", A, P, 60, 50, DZC, Outcome.FENCED, 50, (51, 60)),
    Case("peer-fenced", P, A, 70, 60, DYP, Outcome.PEER_FENCED, 50, (51, 60)),
    Case("replica-follows-promotion", B, P, 55, 70, M, Outcome.BECOME_TARGET, 50, (51, 55)),
    Case("peer-replica-follows-promotion", P, B, 70, 55, M, Outcome.BECOME_SOURCE, 50, (51, 55)),
    Case("forced-peer-zero-changes", A, PF, 60, 50, DZC, Outcome.BECOME_SOURCE, 50),
    Case("forced-zero-changes", PF, A, 50, 60, DZC, Outcome.BECOME_TARGET, 50),
    Case("forced-peer-younger", A, PF, 60, 70, DYP, Outcome.BECOME_SOURCE, 50, (51, 70)),
    Case("forced-younger", PF, A, 70, 60, DYP, Outcome.BECOME_TARGET, 50, (51, 70)),
    Case("split-brain-forced", A, PF, 60, 70, M, Outcome.SPLIT_BRAIN, 50),
    Case("split-brain-forced", A, PF, 60, 70, DZC, Outcome.SPLIT_BRAIN, 50),
    Case("split-brain-forced", PF, A, 50, 60, M, Outcome.SPLIT_BRAIN, 50),
    # a replica does not pick a side in its primary's split brain
    Case("split-brain-forced", B, PF, 55, 50, DZC, Outcome.SPLIT_BRAIN, 50),
    Case("diverged-zero-changes", R50, P, 50, 70, DZC, Outcome.BECOME_TARGET, 50),
    # neither side wrote: the younger fork (R50's, at T2) gives way
    Case("diverged-zero-changes", R50, P, 50, 50, DZC, Outcome.BECOME_TARGET, 50),
    Case("diverged-peer-zero-changes", P, R50, 70, 50, DZC, Outcome.BECOME_SOURCE, 50),
    Case("diverged-peer-zero-changes", P, R50, 50, 50, DZC, Outcome.BECOME_SOURCE, 50),
    Case("diverged-younger", R, P, 65, 70, DYP, Outcome.BECOME_TARGET, 50, (51, 65)),
    Case("diverged-peer-younger", P, R, 70, 65, DYP, Outcome.BECOME_SOURCE, 50, (51, 65)),
    Case("split-brain", R, P, 65, 70, M, Outcome.SPLIT_BRAIN, 50),
    # R holds A's seqs 51..60 that P never received: not zero changes
    Case("split-brain", R, P, 60, 70, DZC, Outcome.SPLIT_BRAIN, 50),
    Case("split-brain", R50, P, 50, 70, M, Outcome.SPLIT_BRAIN, 50),
]


def test_every_rule_of_the_table_has_a_case() -> None:
    assert {c.rule for c in CASES} == {r.name for r in RULES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.rule)
def test_decision_table_row(case: Case) -> None:
    d = decide(case.mine, case.peer, my_seq=case.my_seq, peer_seq=case.peer_seq,
               policy=case.policy)
    assert (d.rule, d.outcome, d.fork_seq) == (case.rule, case.outcome, case.fork_seq)
    expected = None if case.conflict is None else SeqRange(*case.conflict)
    assert d.conflict == expected
    if d.outcome in (Outcome.BECOME_TARGET, Outcome.FENCED):
        assert d.loser is Side.MINE
    elif d.outcome in (Outcome.BECOME_SOURCE, Outcome.PEER_FENCED):
        assert d.loser is Side.PEER
    else:
        assert d.loser is None
    mirror = decide(case.peer, case.mine, my_seq=case.peer_seq, peer_seq=case.my_seq,
                    policy=case.policy)
    assert mirror == _mirror(d, mirror.reason)


def test_fenced_reason_names_the_promotion_and_the_stale_seq() -> None:
    d = decide(A, P, my_seq=60, peer_seq=70)
    assert "promoted at seq 50 on 2023-11-14 22:15:00 UTC; this copy is stale since seq 50" \
        in d.reason
    assert "51..60" in d.reason


def test_rows_come_in_adjacent_mirror_pairs() -> None:
    # What makes the table symmetric by construction: a row's mirror is itself or its
    # neighbour, and the two conditions of a pair exclude each other.
    names = [r.name for r in RULES]
    for i, r in enumerate(RULES):
        assert r.mirror == r.name or r.mirror in names[max(0, i - 1):i + 2]
        assert r.outcome.mirror is next(m for m in RULES if m.name == r.mirror).outcome


def test_give_up_resolves_a_split_brain_on_the_side_that_gives_up() -> None:
    d = give_up(R, P, my_seq=65, peer_seq=70)
    assert (d.outcome, d.rule, d.fork_seq, d.conflict) == (
        Outcome.BECOME_TARGET, "give-up", 50, SeqRange(51, 65))
    d = give_up(A, P, my_seq=60, peer_seq=70)  # the fenced old primary fails back
    assert (d.outcome, d.conflict) == (Outcome.BECOME_TARGET, SeqRange(51, 60))
    assert give_up(A, C, my_seq=1, peer_seq=1).outcome is Outcome.UNRELATED
    assert give_up(A, B, my_seq=5, peer_seq=5).outcome is Outcome.RESUME


def _mirror(d: Decision, reason: str) -> Decision:
    rule = next(r.mirror for r in RULES if r.name == d.rule)
    m = d.mirrored(rule)
    return Decision(m.outcome, m.rule, reason, m.fork_seq, m.loser, m.my_after, m.peer_after)


# ---------------------------------------------------------------------- random lineages

@st.composite
def lineage_families(draw: st.DrawFn) -> list[Lineage]:
    """Lineages of three copies after random promotions and resyncs among them."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    times = st.sampled_from([T0, T1, T2])
    copies = [Lineage.first(draw(st.sampled_from(list(Role))), draw(times), rng)
              for _ in range(3)]
    for _ in range(draw(st.integers(0, 8))):
        i, j = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        if draw(st.booleans()):
            lo = copies[i].chain[0].fork_seq
            seq = draw(st.integers(lo, lo + 30))
            copies[i] = copies[i].fork(draw(st.sampled_from([Role.PRIMARY, Role.TEST_CLONE])),
                                       seq, draw(times), draw(st.booleans()), rng)
        else:
            copies[i] = copies[i].adopt(copies[j])
        if draw(st.booleans()):
            copies[j] = Lineage(copies[j].current, copies[j].history, writer=False)
    return copies


@given(family=lineage_families(), a=st.integers(0, 2), b=st.integers(0, 2),
       seqs=st.tuples(st.integers(0, 80), st.integers(0, 80)),
       policy=st.sampled_from(list(Policy)))
@settings(max_examples=400, deadline=None)
def test_decisions_are_mirror_images(family: list[Lineage], a: int, b: int,
                                     seqs: tuple[int, int], policy: Policy) -> None:
    mine, peer = family[a], family[b]
    d = decide(mine, peer, my_seq=seqs[0], peer_seq=seqs[1], policy=policy)
    back = decide(peer, mine, my_seq=seqs[1], peer_seq=seqs[0], policy=policy)
    assert back == _mirror(d, back.reason)
    # Data only moves towards a side whose later seqs are either nothing or kept.
    if d.outcome.moves_data and d.conflict is None:
        loser_seq = seqs[0] if d.loser is Side.MINE else seqs[1]
        assert d.fork_seq is not None and loser_seq <= d.fork_seq


@given(family=lineage_families())
@settings(max_examples=100, deadline=None)
def test_lineage_round_trips_through_cbor(family: list[Lineage]) -> None:
    for lin in family:
        assert Lineage.from_dict(cbor2.loads(cbor2.dumps(lin.to_dict()))) == lin
        assert lineage_store.decode(lineage_store.encode(lin)) == lin


# ---------------------------------------------------------------------- the model


def test_first_generation_of_an_old_store() -> None:
    lin = Lineage.first(Role.SECONDARY, T0, random.Random(1))
    assert lin.current.parent == 0 and lin.current.fork_seq == 0 and lin.history == ()
    assert lin.is_lone_first and not lin.writer
    assert Lineage.first(Role.PRIMARY, T0, random.Random(1)).writer


def test_fork_records_the_parent_and_rolls_back_through_history() -> None:
    rng = random.Random(2)
    g1 = A.fork(Role.PRIMARY, 10, T1, False, rng)
    g2 = g1.fork(Role.PRIMARY, 30, T2, True, rng)
    assert g2.current.parent == g1.generation and g2.history == (A.current, g1.current)
    assert g2.writer and g2.current.forced
    # promoted at seq 20: the generation that began at 30 leaves the line
    back = g2.fork(Role.PRIMARY, 20, T2, False, rng)
    assert back.history == (A.current, g1.current) and back.current.fork_seq == 20
    back = g2.fork(Role.PRIMARY, 5, T2, False, rng)
    assert back.history == (A.current,) and back.current.parent == A.generation
    with pytest.raises(LineageError, match="writable"):
        g1.fork(Role.SECONDARY, 40, T2, False, rng)


def test_fork_refuses_a_seq_before_the_oldest_recorded_generation() -> None:
    rng = random.Random(3)
    lin = A.fork(Role.PRIMARY, 10, T1, False, rng)
    for seq in range(11, 11 + MAX_HISTORY + 5):
        lin = lin.fork(Role.PRIMARY, seq, T1, False, rng)
    assert len(lin.history) == MAX_HISTORY
    oldest = lin.chain[0].fork_seq
    with pytest.raises(LineageError, match="older than the oldest"):
        lin.fork(Role.PRIMARY, oldest - 1, T1, False, rng)


def test_adopt_takes_the_peers_line_as_received() -> None:
    lin = B0.adopt(P)
    assert lin.chain == P.chain and not lin.writer


def _gen(**over: Any) -> dict[str, Any]:
    return {**A.current.to_dict(), **over}


BAD_DICTS = [
    ("not a map", [1, 2]),
    ("missing field", {"current": _gen(), "history": []}),
    ("unknown field", {"current": _gen(), "history": [], "writer": True, "x": 1}),
    ("writer not bool", {"current": _gen(), "history": [], "writer": 1}),
    ("history not a list", {"current": _gen(), "history": {}, "writer": True}),
    ("generation zero", {"current": _gen(generation=0), "history": [], "writer": True}),
    ("generation over u64", {"current": _gen(generation=1 << 64), "history": [],
                             "writer": True}),
    ("negative fork seq", {"current": _gen(fork_seq=-1), "history": [], "writer": True}),
    ("bool as seq", {"current": _gen(fork_seq=True), "history": [], "writer": True}),
    ("parent is self", {"current": _gen(parent=A.generation), "history": [], "writer": True}),
    ("unknown role", {"current": _gen(role="boss"), "history": [], "writer": True}),
    ("role not str", {"current": _gen(role=1), "history": [], "writer": True}),
    ("time not an integer", {"current": _gen(time_ns=5.0), "history": [], "writer": True}),
    ("time negative", {"current": _gen(time_ns=-1), "history": [], "writer": True}),
    ("time as seconds key", {"current": {**{k: v for k, v in _gen().items() if k != "time_ns"},
                                         "time": 1.5}, "history": [], "writer": True}),
    ("forced not bool", {"current": _gen(forced=0), "history": [], "writer": True}),
    ("entry not a map", {"current": _gen(), "history": [7], "writer": True}),
    ("secondary cannot be writer", {"current": B0.current.to_dict(), "history": [],
                                    "writer": True}),
    ("broken chain", {"current": P.current.to_dict(), "history": [C.current.to_dict()],
                      "writer": True}),
    ("fork before parent", {"current": _gen(parent=B0.generation, fork_seq=1),
                            "history": [{**B0.current.to_dict(), "fork_seq": 9}],
                            "writer": True}),
    ("id twice", {"current": {**P.current.to_dict(), "generation": A.generation},
                  "history": [A.current.to_dict()], "writer": True}),
    ("history too long", {"current": _gen(), "history": [_gen()] * (MAX_HISTORY + 1),
                          "writer": True}),
]


@pytest.mark.parametrize(("why", "doc"), BAD_DICTS, ids=[w for w, _ in BAD_DICTS])
def test_untrusted_lineage_dicts_are_refused(why: str, doc: object) -> None:
    with pytest.raises(LineageError):
        Lineage.from_dict(doc)


# ---------------------------------------------------------------------- the file


def test_store_round_trip_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / lineage_store.FILE_NAME
    assert lineage_store.load(path) is None
    lineage_store.save(path, P)
    assert lineage_store.load(path) == P
    lineage_store.save(path, R)
    assert lineage_store.load(path) == R
    assert [p.name for p in tmp_path.iterdir()] == [lineage_store.FILE_NAME]


def test_store_detects_every_torn_length(tmp_path: Path) -> None:
    raw = lineage_store.encode(P)
    for cut in range(len(raw)):
        with pytest.raises(LineageCorruption, match="torn|CRC"):
            lineage_store.decode(raw[:cut], "f")
    with pytest.raises(LineageCorruption, match="trailing"):
        lineage_store.decode(raw + b"\0", "f")


def test_store_detects_a_flipped_bit_anywhere(tmp_path: Path) -> None:
    raw = lineage_store.encode(P)
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises(LineageCorruption):
            lineage_store.decode(bytes(bad), "f")
    path = tmp_path / "lineage"
    bad = bytearray(raw)
    bad[-1] ^= 1
    path.write_bytes(bytes(bad))
    with pytest.raises(LineageCorruption, match=re.escape(str(path)) + ".*CRC32C mismatch"):
        lineage_store.load(path)


def _sealed(body: bytes, version: int = lineage_store.FORMAT_VERSION) -> bytes:
    h = lineage_store.HEADER
    header = h.pack(lineage_store.MAGIC, version, h.size, len(body), 0)
    return h.pack(lineage_store.MAGIC, version, h.size, len(body),
                  lineage_store._crc(header, body)) + body


def test_store_refuses_another_format_version() -> None:
    with pytest.raises(LineageCorruption, match="format version 2"):
        lineage_store.decode(_sealed(cbor2.dumps(P.to_dict()), version=2))
    assert lineage_store.decode(_sealed(cbor2.dumps(P.to_dict()))) == P


def test_store_refuses_an_oversized_history_and_a_body_that_is_not_a_lineage() -> None:
    doc = {"current": _gen(), "history": [_gen()] * (MAX_HISTORY + 1), "writer": True}
    with pytest.raises(LineageCorruption, match=f"at most {MAX_HISTORY}"):
        lineage_store.decode(_sealed(cbor2.dumps(doc)))
    with pytest.raises(LineageCorruption, match="not CBOR"):
        lineage_store.decode(_sealed(b"\x82\x01"))  # an array cut short
    with pytest.raises(LineageCorruption, match="trails the top-level item"):
        lineage_store.decode(_sealed(cbor2.dumps(P.to_dict()) + b"\x00"))
    with pytest.raises(LineageCorruption, match="bad magic"):
        lineage_store.decode(b"X" * 64)


# ---------------------------------------------------------------------- copies in motion


@dataclass
class Copy:
    name: int
    lineage: Lineage
    primary: bool
    seq: int = 0
    #: block -> (value, seq): what this copy holds
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: every write its contents are made of, in order: (seq, block, value)
    log: list[tuple[int, int, int]] = field(default_factory=list)


BLOCKS = 4


class Copies(RuleBasedStateMachine):
    """Three copies of one volume: writes, promotions, demotions and links coming and going,
    with `decide` applied at every reconnect the way the units apply it."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = random.Random(0)
        self.now = T0
        self.copies = [Copy(0, Lineage.first(Role.PRIMARY, T0, self.rng), True),
                       Copy(1, Lineage.first(Role.SECONDARY, T0, self.rng), False),
                       Copy(2, Lineage.first(Role.SECONDARY, T0, self.rng), False)]
        self.links: set[frozenset[int]] = set()
        self.values = 0
        self.conflicts: list[tuple[int, dict[int, int]]] = []
        self.policy = Policy.MANUAL

    @initialize(policy=st.sampled_from(list(Policy)), paired=st.booleans())
    def start(self, policy: Policy, paired: bool) -> None:
        self.policy = policy
        if paired:  # the remotes were set up from the local, rather than meeting it new
            for cp in self.copies[1:]:
                cp.lineage = cp.lineage.adopt(self.copies[0].lineage)

    def _tick(self) -> float:
        self.now += 1.0
        return self.now

    @rule(c=st.integers(0, 2), block=st.integers(0, BLOCKS - 1))
    def write(self, c: int, block: int) -> None:
        cp = self.copies[c]
        if not cp.primary:
            return
        self.values += 1
        cp.seq += 1
        cp.blocks[block] = (self.values, cp.seq)
        cp.log.append((cp.seq, block, self.values))

    @rule(c=st.integers(0, 2), forced=st.booleans())
    def promote(self, c: int, forced: bool) -> None:
        cp = self.copies[c]
        if cp.primary:
            return
        if not forced and any(self.copies[o].primary for o in self._linked(c)):
            return  # refused while a live, undemoted primary is connected
        cp.lineage = cp.lineage.fork(Role.PRIMARY, cp.seq, self._tick(), forced, self.rng)
        cp.primary = True
        self.links = {link for link in self.links if c not in link}

    @rule(c=st.integers(0, 2))
    def demote(self, c: int) -> None:
        self.copies[c].primary = False

    @rule(a=st.integers(0, 2), b=st.integers(0, 2))
    def disconnect(self, a: int, b: int) -> None:
        self.links.discard(frozenset((a, b)))

    @rule(c=st.integers(0, 2))
    def isolate(self, c: int) -> None:
        """A site lost, or cut off: every link of the copy drops."""
        self.links = {link for link in self.links if c not in link}

    @rule(a=st.integers(0, 2), b=st.integers(0, 2))
    def reconnect(self, a: int, b: int) -> None:
        if a == b:
            return
        x, y = self.copies[a], self.copies[b]
        d = decide(x.lineage, y.lineage, my_seq=x.seq, peer_seq=y.seq, policy=self.policy)
        back = decide(y.lineage, x.lineage, my_seq=y.seq, peer_seq=x.seq, policy=self.policy)
        assert back == _mirror(d, back.reason)
        self._apply(x, y, d)

    @rule()
    def replicate(self) -> None:
        """Every live link carries what its source has (each reconnects if it must)."""
        for link in sorted(self.links, key=sorted):
            a, b = sorted(link)
            if link in self.links:
                self.reconnect(a, b)

    @rule(a=st.integers(0, 2), b=st.integers(0, 2))
    def give_up(self, a: int, b: int) -> None:
        if a == b:
            return
        x, y = self.copies[a], self.copies[b]
        d = decide(x.lineage, y.lineage, my_seq=x.seq, peer_seq=y.seq, policy=self.policy)
        if d.outcome in (Outcome.SPLIT_BRAIN, Outcome.FENCED, Outcome.PEER_FENCED):
            self._apply(x, y, give_up(x.lineage, y.lineage, my_seq=x.seq, peer_seq=y.seq))

    def _linked(self, c: int) -> set[int]:
        return {o for link in self.links if c in link for o in link if o != c}

    def _apply(self, x: Copy, y: Copy, d: Decision) -> None:
        link = frozenset((x.name, y.name))
        if d.outcome is Outcome.RESUME:
            self.links.add(link)
            src, dst = (x, y) if x.seq >= y.seq else (y, x)
            # Same generation means same line: the one behind is an earlier instant.
            assert src.log[:len(dst.log)] == dst.log, d
            self._copy(src, dst)
            assert dst.blocks == src.blocks
        elif d.outcome is Outcome.BECOME_TARGET:
            self._resync(target=x, source=y, d=d)
            self.links.add(link)
        elif d.outcome is Outcome.BECOME_SOURCE:
            self._resync(target=y, source=x, d=d.mirrored(d.rule))
            self.links.add(link)
        else:
            self.links.discard(link)

    def _resync(self, target: Copy, source: Copy, d: Decision) -> None:
        fork = d.fork_seq
        assert fork is not None and d.loser is Side.MINE
        # The fork seq is exact: up to it the two lines are the same writes.
        assert [w for w in target.log if w[0] <= fork] == [w for w in source.log if w[0] <= fork]
        assert all(w[0] in d.conflict for w in target.log if w[0] > fork) if d.conflict else \
            all(w[0] <= fork for w in target.log)
        image = {blk: v for blk, (v, s) in target.blocks.items()
                 if d.conflict is not None and s in d.conflict}
        line = {w[2] for w in source.log}
        for blk, (v, s) in target.blocks.items():
            if source.blocks.get(blk) != (v, s):
                # Overwritten: by a later write of the same line, or kept as a conflict image.
                assert v in line or image.get(blk) == v, (blk, v, s, d)
        if image:
            self.conflicts.append((target.name, image))
        self._copy(source, target)
        target.lineage = target.lineage.adopt(source.lineage)
        target.primary = False

    @staticmethod
    def _copy(src: Copy, dst: Copy) -> None:
        dst.blocks = dict(src.blocks)
        dst.log = list(src.log)
        dst.seq = src.seq

    def teardown(self) -> None:
        # An operator brings every copy that shares history with copy 0 back to it; a second
        # pass catches copy 0 itself moving ahead by resuming from a copy further on.
        winner = self.copies[0]
        joined: list[Copy] = []
        for _ in range(2):
            joined = []
            for cp in self.copies[1:]:
                d = decide(cp.lineage, winner.lineage, my_seq=cp.seq, peer_seq=winner.seq,
                           policy=self.policy)
                if d.outcome not in (Outcome.RESUME, Outcome.BECOME_TARGET, Outcome.UNRELATED):
                    d = give_up(cp.lineage, winner.lineage, my_seq=cp.seq, peer_seq=winner.seq)
                if d.outcome is Outcome.UNRELATED or d.rule == "peer-fresh-secondary":
                    # its line never met copy 0's, or copy 0 holds nothing at all (it would
                    # take this copy's contents): nothing to converge to copy 0
                    continue
                if d.outcome is Outcome.BECOME_TARGET:
                    self._resync(cp, winner, d)
                else:
                    assert d.outcome is Outcome.RESUME
                    self._apply(cp, winner, d)
                joined.append(cp)
        for cp in joined:
            d = decide(cp.lineage, winner.lineage, my_seq=cp.seq, peer_seq=winner.seq)
            assert d.outcome is Outcome.RESUME
            assert cp.blocks == winner.blocks and cp.log == winner.log


TestCopies = Copies.TestCase
TestCopies.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow])


def _copies(policy: Policy = Policy.MANUAL) -> Copies:
    m = Copies()
    m.start(policy=policy, paired=True)
    return m


def _verdict(m: Copies, a: int, b: int) -> Decision:
    x, y = m.copies[a], m.copies[b]
    return decide(x.lineage, y.lineage, my_seq=x.seq, peer_seq=y.seq, policy=m.policy)


def test_site_loss_fences_the_old_primary_and_failback_keeps_its_writes() -> None:
    m = _copies()
    m.write(0, 0)
    m.write(0, 1)
    m.reconnect(1, 0)
    m.isolate(0)  # the local's site is cut off, its host keeps writing
    m.write(0, 2)
    m.write(0, 0)
    m.promote(1, forced=False)
    m.write(1, 1)
    d = _verdict(m, 0, 1)
    assert (d.outcome, d.fork_seq, d.conflict) == (Outcome.FENCED, 2, SeqRange(3, 4))
    before = dict(m.copies[0].blocks)
    m.reconnect(0, 1)
    assert m.copies[0].blocks == before and not m.links  # refused, nothing moved
    m.give_up(0, 1)  # failback
    assert m.conflicts == [(0, {2: 3, 0: 4})]  # exactly the unreplicated writes
    assert m.copies[0].blocks == m.copies[1].blocks
    m.teardown()


def test_a_replica_follows_a_promotion_keeping_what_it_received_after_it() -> None:
    m = _copies()
    m.write(0, 0)
    m.reconnect(1, 0)
    m.isolate(1)
    m.write(0, 1)
    m.write(0, 2)
    m.reconnect(2, 0)
    m.isolate(0)
    m.promote(1, forced=False)  # at seq 1, although copy 2 got up to seq 3
    assert _verdict(m, 2, 1).rule == "replica-follows-promotion"
    m.reconnect(2, 1)
    assert m.conflicts == [(2, {1: 2, 2: 3})]
    assert m.copies[2].blocks == m.copies[1].blocks


@pytest.mark.parametrize(("policy", "promoted_writes", "outcome"), [
    (Policy.MANUAL, True, Outcome.SPLIT_BRAIN),
    (Policy.MANUAL, False, Outcome.SPLIT_BRAIN),
    (Policy.DISCARD_ZERO_CHANGES, True, Outcome.SPLIT_BRAIN),
    (Policy.DISCARD_ZERO_CHANGES, False, Outcome.BECOME_SOURCE),
    (Policy.DISCARD_YOUNGER_PRIMARY, True, Outcome.BECOME_SOURCE),
])
def test_a_forced_promotion_while_the_primary_writes(policy: Policy, promoted_writes: bool,
                                                     outcome: Outcome) -> None:
    m = _copies(policy)
    m.write(0, 0)
    m.reconnect(1, 0)
    m.promote(1, forced=False)
    assert not m.copies[1].primary  # refused: the primary is connected and not demoted
    m.promote(1, forced=True)
    m.write(0, 1)
    if promoted_writes:
        m.write(1, 2)
    assert _verdict(m, 0, 1).outcome is outcome
    blocks = [dict(c.blocks) for c in m.copies]
    m.reconnect(0, 1)
    if outcome is Outcome.SPLIT_BRAIN:
        assert [c.blocks for c in m.copies] == blocks and not m.links
        m.give_up(1, 0)  # resolved by hand on the side that gives up its writes
    assert m.copies[1].blocks == m.copies[0].blocks
    assert m.conflicts == ([(1, {2: 3})] if promoted_writes else [])
    m.teardown()


# ---------------------------------------------------------------------- the doc


def test_failover_doc_renders_the_table() -> None:
    doc = (ROOT / "docs" / "failover.md").read_text()
    section = doc.split("## Generations and the decision table", 1)[1]
    assert render_table() in section, "regenerate the table with render_table()"
