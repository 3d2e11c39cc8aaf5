"""What two copies of a volume do when they meet: resume, resync one way, or refuse.

`decide` is a pure function of the two lineages, the seqs each copy has reached and the
split-brain policy. It first works out how the lineages relate (`Facts`), then walks
`RULES`, a table in the manner of DRBD's `drbd_uuid_compare`: each row a named condition and
an outcome, the first row that holds wins. Unlike DRBD's bitmap UUIDs, our fork points are
exact seqs, so every outcome that moves data says exactly from which seq, and which range of
the losing side's seqs must first be kept as a conflict image.

The table is symmetric: rows come as mirror pairs (or are their own mirror), so
`decide(a, b)` and `decide(b, a)` are mirror images, and the two units of a link reach the
same verdict each on its own. A copy only ever overwrites its own data on its own verdict, so
units that disagree (two policies) refuse rather than lose anything.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from .model import Generation, Lineage, Role


class Outcome(enum.Enum):
    #: same generation: carry on replicating from the seqs the sides have
    RESUME = "resume"
    #: this copy resyncs from the peer, from `fork_seq`, after saving `conflict`
    BECOME_TARGET = "become-target"
    #: the peer resyncs from this copy (the mirror image of BECOME_TARGET)
    BECOME_SOURCE = "become-source"
    #: this copy is the old primary of a generation the peer was promoted out of: its writes
    #: after the fork are stale and refused; it keeps them until an operator fails back
    FENCED = "fenced"
    #: the peer is such an old primary (the mirror image of FENCED)
    PEER_FENCED = "peer-fenced"
    #: no common generation: these are not copies of one volume's history; refuse
    UNRELATED = "unrelated"
    #: both sides became writable after the fork: refuse, never resync automatically
    SPLIT_BRAIN = "split-brain"

    @property
    def mirror(self) -> Outcome:
        return _MIRROR_OUTCOME.get(self, self)

    @property
    def moves_data(self) -> bool:
        return self in (Outcome.BECOME_TARGET, Outcome.BECOME_SOURCE)


_MIRROR_OUTCOME = {Outcome.BECOME_TARGET: Outcome.BECOME_SOURCE,
                   Outcome.BECOME_SOURCE: Outcome.BECOME_TARGET,
                   Outcome.FENCED: Outcome.PEER_FENCED,
                   Outcome.PEER_FENCED: Outcome.FENCED}


class Policy(enum.Enum):
    """How a split brain (two copies writable after one fork) may resolve itself."""

    #: never: an operator chooses the side that gives up its writes
    MANUAL = "manual"
    #: the side with nothing after the fork becomes the target
    DISCARD_ZERO_CHANGES = "discard-zero-changes"
    #: the side that became writable last becomes the target (its writes kept as conflict)
    DISCARD_YOUNGER_PRIMARY = "discard-younger-primary"


class Side(enum.Enum):
    MINE = "mine"
    PEER = "peer"

    @property
    def mirror(self) -> Side:
        return Side.PEER if self is Side.MINE else Side.MINE


class Relation(enum.Enum):
    SAME = "same"
    #: the peer's line passes through my current generation and forks off it
    PEER_DESCENDS = "peer-descends"
    #: my line passes through the peer's current generation and forks off it
    DESCENDS_FROM_PEER = "descends-from-peer"
    #: both lines fork off a common older generation
    DIVERGED = "diverged"
    #: no generation in common
    UNRELATED = "unrelated"
    #: both lineages hold a generation but record it differently
    INCONSISTENT = "inconsistent"

    @property
    def mirror(self) -> Relation:
        if self is Relation.PEER_DESCENDS:
            return Relation.DESCENDS_FROM_PEER
        if self is Relation.DESCENDS_FROM_PEER:
            return Relation.PEER_DESCENDS
        return self


@dataclass(frozen=True, slots=True)
class SeqRange:
    """Seqs `first` to `last`, both included."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.last:
            raise ValueError(f"empty or bad seq range {self.first}..{self.last}")

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and self.first <= seq <= self.last

    def __str__(self) -> str:
        return f"{self.first}..{self.last}"


def _after(seq: int, fork_seq: int | None) -> SeqRange | None:
    if fork_seq is None or seq <= fork_seq:
        return None
    return SeqRange(fork_seq + 1, seq)


@dataclass(frozen=True, slots=True)
class Facts:
    """How two lineages relate, seen from `mine`; what every rule reads."""

    relation: Relation
    policy: Policy
    my_seq: int
    peer_seq: int
    #: the last seq both copies hold of a shared line: the earlier of the fork and the two
    #: copies' seqs; None when they share no generation
    fork_seq: int | None
    #: the first generation of my line after the common one (None if I am still in it)
    my_fork: Generation | None
    peer_fork: Generation | None
    my_writer: bool
    peer_writer: bool
    my_lone_first: bool
    peer_lone_first: bool
    my_role: Role
    peer_role: Role
    #: why the lineages are INCONSISTENT
    detail: str = ""

    @property
    def my_after(self) -> bool:
        """I hold seqs past the last shared one."""
        return self.fork_seq is not None and self.my_seq > self.fork_seq

    @property
    def peer_after(self) -> bool:
        return self.fork_seq is not None and self.peer_seq > self.fork_seq

    @property
    def forced(self) -> bool:
        """The fork that separated a descendant from the other side overrode a live primary."""
        if self.relation is Relation.PEER_DESCENDS:
            return self.peer_fork is not None and self.peer_fork.forced
        if self.relation is Relation.DESCENDS_FROM_PEER:
            return self.my_fork is not None and self.my_fork.forced
        return False

    @property
    def i_am_younger(self) -> bool:
        """My side became writable after the other side did (and not the reverse)."""
        if self.relation is Relation.DESCENDS_FROM_PEER:
            return True  # my line forked off the peer's generation: it is older by structure
        if self.relation is not Relation.DIVERGED:
            return False
        assert self.my_fork is not None and self.peer_fork is not None
        # Clocks of two units may disagree; the fork seq and the id only break exact ties,
        # so the order is total and both sides agree on it.
        return _age_key(self.my_fork) > _age_key(self.peer_fork)

    @property
    def my_fresh(self) -> bool:
        """A copy that holds no write at all and never wrote on its own (a new store, or
        one that followed a line nobody wrote to yet): it has nothing to lose."""
        return not self.my_writer and self.my_seq == 0

    @property
    def peer_fresh(self) -> bool:
        return not self.peer_writer and self.peer_seq == 0

    def swapped(self) -> Facts:
        return replace(self, relation=self.relation.mirror, my_seq=self.peer_seq,
                       peer_seq=self.my_seq, my_fork=self.peer_fork, peer_fork=self.my_fork,
                       my_writer=self.peer_writer, peer_writer=self.my_writer,
                       my_lone_first=self.peer_lone_first, peer_lone_first=self.my_lone_first,
                       my_role=self.peer_role, peer_role=self.my_role)


def _age_key(g: Generation) -> tuple[int, int, int]:
    return (g.time_ns, g.fork_seq, g.generation)


def _nodes(lineage: Lineage) -> list[int]:
    """Generation ids of a line, oldest first, with the parent a capped history dropped."""
    oldest = lineage.chain[0]
    return ([oldest.parent] if oldest.parent else []) + [g.generation for g in lineage.chain]


def _child_of(lineage: Lineage, gid: int) -> Generation | None:
    for g in lineage.chain:
        if g.parent == gid:
            return g
    return None


def relate(mine: Lineage, peer: Lineage, *, my_seq: int, peer_seq: int,
           policy: Policy = Policy.MANUAL) -> Facts:
    if my_seq < 0 or peer_seq < 0:
        raise ValueError("seqs are unsigned")

    def facts(relation: Relation, fork_seq: int | None = None, my_fork: Generation | None = None,
              peer_fork: Generation | None = None, detail: str = "") -> Facts:
        if fork_seq is not None:
            # A side that had not reached the fork shares only what it has: a resync from
            # the fork itself would skip the seqs in between.
            fork_seq = min(fork_seq, my_seq, peer_seq)
        return Facts(relation, policy, my_seq, peer_seq, fork_seq, my_fork, peer_fork,
                     mine.writer, peer.writer, mine.is_lone_first, peer.is_lone_first,
                     mine.current.role, peer.current.role, detail)

    peer_entries = {g.generation: g for g in peer.chain}
    for g in mine.chain:
        other = peer_entries.get(g.generation)
        if other is not None and other != g:
            return facts(Relation.INCONSISTENT,
                         detail=f"generation {g.generation:#x} is recorded differently")
    my_nodes = set(_nodes(mine))
    common = next((gid for gid in reversed(_nodes(peer)) if gid in my_nodes), None)
    if common is None:
        return facts(Relation.UNRELATED)
    my_fork = None if common == mine.generation else _child_of(mine, common)
    peer_fork = None if common == peer.generation else _child_of(peer, common)
    if my_fork is None and peer_fork is None:
        return facts(Relation.SAME)
    if my_fork is None:
        assert peer_fork is not None
        return facts(Relation.PEER_DESCENDS, peer_fork.fork_seq, None, peer_fork)
    if peer_fork is None:
        return facts(Relation.DESCENDS_FROM_PEER, my_fork.fork_seq, my_fork, None)
    return facts(Relation.DIVERGED, min(my_fork.fork_seq, peer_fork.fork_seq), my_fork,
                 peer_fork)


# ---------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    #: the name of the row of `RULES` that decided
    rule: str
    #: for logs, status and the console
    reason: str
    #: the last seq both sides share: a resync sends the source's seqs after it
    fork_seq: int | None
    #: the side whose seqs after the fork give way (None: nobody's, or not decided)
    loser: Side | None
    #: what each side holds after the fork (shown for a split brain: what each choice costs)
    my_after: SeqRange | None
    peer_after: SeqRange | None

    @property
    def conflict(self) -> SeqRange | None:
        """The loser's seqs after the fork: its blocks written there are kept as a conflict
        image before anything overwrites them."""
        if self.loser is Side.MINE:
            return self.my_after
        if self.loser is Side.PEER:
            return self.peer_after
        return None

    def mirrored(self, rule: str) -> Decision:
        return Decision(self.outcome.mirror, rule, self.reason, self.fork_seq,
                        None if self.loser is None else self.loser.mirror,
                        self.peer_after, self.my_after)


Predicate = Callable[[Facts], bool]
ForkOf = Callable[[Facts], int | None]
Reason = Callable[[Facts], str]


def _fork_of_facts(f: Facts) -> int | None:
    return f.fork_seq


def _fork_of_seqs(f: Facts) -> int | None:
    # No recorded fork: the lower copy is an earlier instant of the other (the invariant
    # replication kept before lineages existed), so the lower seq is what they share.
    return min(f.my_seq, f.peer_seq)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    #: the condition in words, for docs/failover.md
    condition: str
    outcome: Outcome
    when: Predicate
    reason: Reason
    #: the name of this row's mirror image (itself for a symmetric row)
    mirror: str
    fork: ForkOf = _fork_of_facts


def _pair(name: str, mirror: str, condition: str, mirror_condition: str, outcome: Outcome,
          when: Predicate, reason: Reason, mirror_reason: Reason,
          fork: ForkOf = _fork_of_facts) -> tuple[Rule, Rule]:
    """A row and its mirror image: the same condition seen from the peer."""
    return (Rule(name, condition, outcome, when, reason, mirror, fork),
            Rule(mirror, mirror_condition, outcome.mirror, lambda f: when(f.swapped()),
                 mirror_reason, name, lambda f: fork(f.swapped())))


def _symmetric(name: str, condition: str, outcome: Outcome, when: Predicate,
               reason: Reason) -> Rule:
    """A row that is its own mirror: it holds if `when` holds from either side."""
    assert outcome.mirror is outcome
    return Rule(name, condition, outcome, lambda f: when(f) or when(f.swapped()), reason, name)


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _promoted(g: Generation | None) -> str:
    assert g is not None
    kind = "force-promoted" if g.forced else "promoted"
    return f"{kind} at seq {g.fork_seq} on {_at(g.time)}"


def _range(seq: int, fork_seq: int | None) -> str:
    r = _after(seq, fork_seq)
    return "nothing" if r is None else f"seqs {r}"


_DZC = Policy.DISCARD_ZERO_CHANGES
_DYP = Policy.DISCARD_YOUNGER_PRIMARY
_D = Relation.PEER_DESCENDS
_V = Relation.DIVERGED


def _fenced_reason(f: Facts) -> str:
    assert f.peer_fork is not None
    return (f"peer {_promoted(f.peer_fork)}; this copy is stale since seq "
            f"{f.peer_fork.fork_seq} (its seqs {_after(f.my_seq, f.fork_seq)} are refused "
            f"until it fails back)")


def _peer_fenced_reason(f: Facts) -> str:
    assert f.my_fork is not None
    return (f"this copy was {_promoted(f.my_fork)}; the peer is stale since seq "
            f"{f.my_fork.fork_seq} (its seqs {_after(f.peer_seq, f.fork_seq)} are refused)")


def _split_reason(f: Facts) -> str:
    return (f"split brain after seq {f.fork_seq}: this copy holds {_range(f.my_seq, f.fork_seq)}, "
            f"the peer {_range(f.peer_seq, f.fork_seq)}; the side that gives up its writes "
            f"must be chosen by hand")


RULES: tuple[Rule, ...] = (
    _symmetric(
        "inconsistent",
        "both lineages hold a generation id but record it differently",
        Outcome.UNRELATED, lambda f: f.relation is Relation.INCONSISTENT,
        lambda f: f"lineages disagree: {f.detail}"),
    _symmetric(
        "same-generation-two-writers",
        "same current generation, and both copies say they wrote it (a cloned disk)",
        Outcome.SPLIT_BRAIN,
        lambda f: f.relation is Relation.SAME and f.my_writer and f.peer_writer,
        lambda f: "both copies claim to have written the same generation"),
    _symmetric(
        "same-generation",
        "same current generation",
        Outcome.RESUME, lambda f: f.relation is Relation.SAME,
        lambda f: f"same generation: resume (this copy at seq {f.my_seq}, "
                  f"the peer at seq {f.peer_seq})"),
    *_pair(
        "first-generation-secondary", "first-generation-primary",
        "no generation in common, each copy holds only a first generation (a store from "
        "before lineages, or a new pair), this one secondary and the peer primary",
        "the mirror image: this one primary and the peer secondary",
        Outcome.BECOME_TARGET,
        lambda f: (f.relation is Relation.UNRELATED and f.my_lone_first and f.peer_lone_first
                   and f.my_role is Role.SECONDARY and f.peer_role is Role.PRIMARY),
        lambda f: "first generations: this secondary follows the primary's",
        lambda f: "first generations: the secondary follows this primary's",
        fork=_fork_of_seqs),
    *_pair(
        "fresh-secondary", "peer-fresh-secondary",
        "no generation in common, this copy holds no write and never wrote on its own, "
        "the peer is not such a copy",
        "the mirror image: the peer is the empty, never-written copy",
        Outcome.BECOME_TARGET,
        lambda f: f.relation is Relation.UNRELATED and f.my_fresh and not f.peer_fresh,
        lambda f: "this copy is new and empty: it takes the peer's contents",
        lambda f: "the peer is new and empty: it takes this copy's contents",
        fork=lambda f: 0),
    _symmetric(
        "unrelated",
        "no generation in common",
        Outcome.UNRELATED, lambda f: f.relation is Relation.UNRELATED,
        lambda f: "no generation in common: these are not copies of one volume's history"),
    *_pair(
        "peer-descends-clean", "descends-from-peer-clean",
        "the peer's line forks off my current generation at seq S, and I hold nothing "
        "after S",
        "the mirror image: my line forks off the peer's generation, the peer holds nothing "
        "after the fork",
        Outcome.BECOME_TARGET,
        lambda f: f.relation is _D and not f.my_after,
        lambda f: f"peer {_promoted(f.peer_fork)}; this copy has nothing after it and "
                  f"follows",
        lambda f: f"this copy was {_promoted(f.my_fork)}; the peer has nothing after it "
                  f"and follows"),
    *_pair(
        "fenced", "peer-fenced",
        "the peer was promoted (not forced) off my current generation at seq S, I wrote "
        "that generation and hold seqs after S",
        "the mirror image: this copy was promoted, the peer is the old primary with writes "
        "after the fork",
        Outcome.FENCED,
        lambda f: f.relation is _D and f.my_after and f.my_writer and not f.forced,
        _fenced_reason, _peer_fenced_reason),
    *_pair(
        "replica-follows-promotion", "peer-replica-follows-promotion",
        "the peer was promoted (not forced) off my current generation at seq S, I only "
        "received that generation and hold seqs after S",
        "the mirror image: the peer is a replica that received seqs after this copy's "
        "promotion",
        Outcome.BECOME_TARGET,
        lambda f: f.relation is _D and f.my_after and not f.my_writer and not f.forced,
        lambda f: f"peer {_promoted(f.peer_fork)}; the seqs this copy received after it "
                  f"({_after(f.my_seq, f.fork_seq)}) are kept as a conflict image",
        lambda f: f"this copy was {_promoted(f.my_fork)}; the peer keeps the seqs it "
                  f"received after it ({_after(f.peer_seq, f.fork_seq)}) as a conflict image"),
    *_pair(
        "forced-peer-zero-changes", "forced-zero-changes",
        "policy discard-zero-changes; the peer was force-promoted off my generation at seq S "
        "while I kept writing, and the peer holds nothing after S",
        "the mirror image: this copy was force-promoted and holds nothing after the fork",
        Outcome.BECOME_SOURCE,
        lambda f: (f.policy is _DZC and f.relation is _D and f.forced and f.my_after
                   and f.my_writer and not f.peer_after),
        lambda f: f"peer {_promoted(f.peer_fork)} but wrote nothing since: it follows "
                  f"this copy (discard-zero-changes)",
        lambda f: f"this copy was {_promoted(f.my_fork)} but wrote nothing since: it "
                  f"follows the peer (discard-zero-changes)"),
    *_pair(
        "forced-peer-younger", "forced-younger",
        "policy discard-younger-primary; the peer was force-promoted off my generation "
        "while I kept writing: the peer is the younger primary",
        "the mirror image: this copy is the younger, force-promoted primary",
        Outcome.BECOME_SOURCE,
        lambda f: (f.policy is _DYP and f.relation is _D and f.forced and f.my_after
                   and f.my_writer),
        lambda f: f"peer {_promoted(f.peer_fork)} while this copy kept writing; the younger "
                  f"primary gives way, its {_range(f.peer_seq, f.fork_seq)} kept as a "
                  f"conflict image (discard-younger-primary)",
        lambda f: f"this copy was {_promoted(f.my_fork)} while the peer kept writing; "
                  f"this younger primary gives way, its {_range(f.my_seq, f.fork_seq)} kept "
                  f"as a conflict image (discard-younger-primary)"),
    _symmetric(
        "split-brain-forced",
        "one side was force-promoted off the other's generation at seq S and the other "
        "side holds seqs after S",
        Outcome.SPLIT_BRAIN,
        lambda f: f.relation is _D and f.forced and f.my_after,
        _split_reason),
    *_pair(
        "diverged-zero-changes", "diverged-peer-zero-changes",
        "policy discard-zero-changes; both lines fork off an older generation, I hold "
        "nothing after the last shared seq and the peer does (or neither does and my fork "
        "is the younger)",
        "the mirror image: the peer holds nothing after the last shared seq",
        Outcome.BECOME_TARGET,
        lambda f: (f.policy is _DZC and f.relation is _V and not f.my_after
                   and (f.peer_after or f.i_am_younger)),
        lambda f: f"split brain after seq {f.fork_seq}, but this copy wrote nothing since: "
                  f"it follows the peer (discard-zero-changes)",
        lambda f: f"split brain after seq {f.fork_seq}, but the peer wrote nothing since: "
                  f"it follows this copy (discard-zero-changes)"),
    *_pair(
        "diverged-younger", "diverged-peer-younger",
        "policy discard-younger-primary; both lines fork off an older generation and my "
        "fork is the younger (time, then fork seq, then id)",
        "the mirror image: the peer's fork is the younger",
        Outcome.BECOME_TARGET,
        lambda f: f.policy is _DYP and f.relation is _V and f.i_am_younger,
        lambda f: f"split brain after seq {f.fork_seq}; this copy became writable last "
                  f"and gives way, its {_range(f.my_seq, f.fork_seq)} kept as a conflict "
                  f"image (discard-younger-primary)",
        lambda f: f"split brain after seq {f.fork_seq}; the peer became writable last and "
                  f"gives way, its {_range(f.peer_seq, f.fork_seq)} kept as a conflict image "
                  f"(discard-younger-primary)"),
    _symmetric(
        "split-brain",
        "both lines fork off an older generation: two copies became writable on their own",
        Outcome.SPLIT_BRAIN, lambda f: f.relation is _V, _split_reason),
)

RULES_BY_NAME = {r.name: r for r in RULES}
assert len(RULES_BY_NAME) == len(RULES), "rule names are unique"
assert all(RULES_BY_NAME[r.mirror].mirror == r.name for r in RULES), "rows mirror in pairs"

#: outcomes where the loser's seqs after the fork give way
_LOSER = {Outcome.BECOME_TARGET: Side.MINE, Outcome.BECOME_SOURCE: Side.PEER,
          Outcome.FENCED: Side.MINE, Outcome.PEER_FENCED: Side.PEER}


def _decision(rule: Rule, f: Facts) -> Decision:
    fork_seq = rule.fork(f)
    return Decision(rule.outcome, rule.name, rule.reason(f), fork_seq,
                    _LOSER.get(rule.outcome), _after(f.my_seq, fork_seq),
                    _after(f.peer_seq, fork_seq))


def decide(mine: Lineage, peer: Lineage, *, my_seq: int, peer_seq: int,
           policy: Policy = Policy.MANUAL) -> Decision:
    """The verdict for this copy (`mine`, at `my_seq`) meeting `peer` (at `peer_seq`)."""
    f = relate(mine, peer, my_seq=my_seq, peer_seq=peer_seq, policy=policy)
    for rule in RULES:
        if rule.when(f):
            return _decision(rule, f)
    raise AssertionError(f"no rule of the lineage table covers {f}")


def give_up(mine: Lineage, peer: Lineage, *, my_seq: int, peer_seq: int) -> Decision:
    """An operator resolves a split brain or a fencing on this side: it becomes the
    target of `peer` from the last shared seq, its own seqs after it kept as a conflict
    image. Unrelated or inconsistent lineages stay refused; the same generation resumes."""
    f = relate(mine, peer, my_seq=my_seq, peer_seq=peer_seq)
    if f.relation in (Relation.SAME, Relation.UNRELATED, Relation.INCONSISTENT):
        return decide(mine, peer, my_seq=my_seq, peer_seq=peer_seq)
    return Decision(Outcome.BECOME_TARGET, "give-up",
                    f"resolved by hand: this copy follows the peer from seq {f.fork_seq}, "
                    f"its {_range(my_seq, f.fork_seq)} kept as a conflict image",
                    f.fork_seq, Side.MINE, _after(my_seq, f.fork_seq),
                    _after(peer_seq, f.fork_seq))


def render_table() -> str:
    """`RULES` as the Markdown table docs/failover.md carries (a test keeps them equal)."""
    lines = ["| rule | condition (seen from this copy) | outcome |", "|---|---|---|"]
    lines += [f"| `{r.name}` | {r.condition} | `{r.outcome.value}` |" for r in RULES]
    return "\n".join(lines) + "\n"
