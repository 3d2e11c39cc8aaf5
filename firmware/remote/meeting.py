"""What a remote unit does with a local that says HELLO: the lineage decision as a verdict.

Pure: the server feeds in the unit's lineage and seq and the HELLO's, and carries out the
verdict (record an adopted lineage, refuse with the code and text given).  The decision
itself is `firmware.lineage.decide`; this module says what this slice of the product
does with each outcome, and words the refusal for the side that receives it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

from firmware.lineage import Decision, Lineage, Outcome, Policy, Relation, Role, decide, relate
from firmware.link.session import ERR_DIVERGED as REFUSED_DIVERGED
from firmware.link.session import ERR_FENCED as REFUSED_FENCED
from firmware.link.session import ERR_SPLIT_BRAIN as REFUSED_SPLIT_BRAIN
from firmware.link.session import ERR_UNRELATED as REFUSED_UNRELATED


class Action(enum.Enum):
    #: replicate as before
    RESUME = "resume"
    #: replicate as before, and record the peer's lineage as this unit's
    ADOPT = "adopt"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    #: the unit's side of the decision (for its log and status)
    decision: Decision
    #: the local's side of it, whose reason reads right to the local
    peer_decision: Decision
    #: for REFUSE: the ERROR frame's code and text
    code: str = ""
    text: str = ""


def peer_lineage_of(mine: Lineage) -> Lineage | None:
    """The lineage of an older local that sends none: the first generation of this
    unit's line if that was a primary's (all an older local ever wrote), else None (a
    first generation nobody recorded)."""
    root = mine.chain[0]
    if root.is_first and root.role is Role.PRIMARY:
        return Lineage(root, (), writer=True)
    return None


def meet(mine: Lineage, my_seq: int, peer: Lineage, peer_seq: int, *, told: bool = True,
         policy: Policy = Policy.MANUAL) -> Verdict:
    """The verdict for a local with lineage `peer` at `peer_seq`.  `told` is False when
    the local sent no lineage and `peer` stands in for it (`peer_lineage_of`, or a first
    generation made up): such a lineage is decided on, never recorded."""
    other = peer
    d = decide(mine, other, my_seq=my_seq, peer_seq=peer_seq, policy=policy)
    theirs = decide(other, mine, my_seq=peer_seq, peer_seq=my_seq, policy=policy)
    o = d.outcome
    if o is Outcome.RESUME:
        return Verdict(Action.RESUME, d, theirs)
    if o is Outcome.BECOME_TARGET and (
            d.conflict is None or d.rule in ("first-generation-secondary", "fresh-secondary")):
        # This unit is an earlier instant of the local's line (or a store from before
        # lineages, whose queue check still guards a re-created queue): it follows.
        return Verdict(Action.ADOPT if told else Action.RESUME, d, theirs)
    if o in (Outcome.PEER_FENCED, Outcome.BECOME_SOURCE) and _promoted_here(mine, other):
        f = relate(mine, other, my_seq=my_seq, peer_seq=peer_seq, policy=policy)
        g = f.my_fork if f.relation is Relation.DESCENDS_FROM_PEER else None
        if g is not None:
            kind = "force-promoted" if g.forced else "promoted"
            text = (f"{kind} at seq {g.fork_seq} on {_when(g.time)}; this copy is stale "
                    f"since seq {g.fork_seq}")
            if peer_seq > g.fork_seq:
                text += f" (its seqs {g.fork_seq + 1}..{peer_seq} are refused)"
            return Verdict(Action.REFUSE, d, theirs, REFUSED_FENCED, text)
    if o is Outcome.SPLIT_BRAIN:
        return Verdict(Action.REFUSE, d, theirs, REFUSED_SPLIT_BRAIN, theirs.reason)
    if o is Outcome.UNRELATED:
        return Verdict(Action.REFUSE, d, theirs, REFUSED_UNRELATED, theirs.reason)
    return Verdict(Action.REFUSE, d, theirs, REFUSED_DIVERGED,
                   f"{theirs.reason}; nothing moves until a failback or a manual resolve")


def _promoted_here(mine: Lineage, peer: Lineage) -> bool:
    """This unit became a primary on its own after the peer's generation."""
    return mine.writer and mine.current.role is Role.PRIMARY and \
        mine.generation != peer.generation


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
