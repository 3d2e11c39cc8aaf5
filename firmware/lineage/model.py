"""The lineage of one volume copy: which generation it holds and how that generation came to be.

A generation is a stretch of a volume's write history with a single writer. A new one starts
whenever a copy becomes writable on its own (a promotion, a forced promotion, a demoted local
that resumes writing): it records its parent and the exact seq it forked at, so two copies
that meet again can tell from their lineages alone where their contents stopped being the
same (see `decide`).

Entries are shared facts: a copy that becomes the target of a peer takes the peer's entries
as they are, because after the resync its contents are the peer's line. What is this copy's
own is `Lineage.writer`: whether the writes of its current generation after the fork were
made here (it started the generation) or received.

Seqs are not generation-local: a line of descent keeps one seq space, so a fork at seq S means
"seqs up to S are shared with the parent, seqs after S are this generation's". The seq a copy
reached inside its current generation is its queue's or store's last seq; it changes with
every write, so it is passed to `decide` rather than kept here. The end of every older
generation in a copy's history is the next entry's fork seq, because a copy's contents always
equal its line (becoming a target replaces what came after the fork).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from firmware.errors import MirrorUnitError

U64_MAX = (1 << 64) - 1
#: entries kept behind the current one; older ones are dropped (their child keeps the id)
MAX_HISTORY = 64


class LineageError(MirrorUnitError, ValueError):
    """A lineage that does not hold together: bad field, broken chain, misuse of an operation."""


class Role(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"
    TEST_CLONE = "test-clone"


#: roles a copy takes when it becomes writable on its own
WRITABLE_ROLES = frozenset({Role.PRIMARY, Role.TEST_CLONE})


class Rng(Protocol):
    """What generation ids are drawn from (`random.SystemRandom()` on a unit, seeded in tests)."""

    def getrandbits(self, k: int, /) -> int: ...


_GENERATION_KEYS = frozenset({"generation", "parent", "fork_seq", "role", "time_ns", "forced"})
_LINEAGE_KEYS = frozenset({"current", "history", "writer"})


def _u64(name: str, value: object) -> int:
    # bool is an int subclass; a True where a seq belongs is a broken peer, not seq 1
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise LineageError(f"{name} must be an unsigned 64-bit integer, not {value!r}")
    return value


def _mapping(name: str, value: object, keys: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise LineageError(f"{name} must be a map, not {type(value).__name__}")
    if set(value) != keys:
        missing = sorted(keys - set(value))
        extra = sorted(str(k) for k in set(value) - keys)
        raise LineageError(f"{name}: missing fields {missing}, unknown fields {extra}")
    return value


@dataclass(frozen=True, slots=True)
class Generation:
    #: random, nonzero: two copies that forked independently never share one by accident
    generation: int
    #: the generation this one forked from; 0 for a first generation
    parent: int
    #: seqs up to and including this one are the parent's; after it, this generation's
    fork_seq: int
    #: the role the copy that started this generation took
    role: Role
    #: wall-clock time of the fork in nanoseconds since the UNIX epoch, as the forking
    #: unit saw it (an integer, like every time on the wire)
    time_ns: int
    #: a promotion that overrode a live, connected, undemoted primary
    forced: bool

    def __post_init__(self) -> None:
        if _u64("generation", self.generation) == 0:
            raise LineageError("generation id 0 is reserved for 'no parent'")
        _u64("parent", self.parent)
        _u64("fork_seq", self.fork_seq)
        if self.parent == self.generation:
            raise LineageError(f"generation {self.generation:#x} is its own parent")
        if not isinstance(self.role, Role):
            raise LineageError(f"role must be a Role, not {self.role!r}")
        _u64("time_ns", self.time_ns)
        if type(self.forced) is not bool:
            raise LineageError(f"forced must be a bool, not {self.forced!r}")

    @property
    def time(self) -> float:
        """The fork's wall-clock time in UNIX seconds."""
        return self.time_ns / 1e9

    @property
    def is_first(self) -> bool:
        return self.parent == 0

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "parent": self.parent,
                "fork_seq": self.fork_seq, "role": self.role.value, "time_ns": self.time_ns,
                "forced": self.forced}

    @classmethod
    def from_dict(cls, doc: object) -> Generation:
        d = _mapping("generation entry", doc, _GENERATION_KEYS)
        role = d["role"]
        if type(role) is not str:
            raise LineageError(f"role must be a string, not {role!r}")
        try:
            parsed = Role(role)
        except ValueError:
            raise LineageError(f"unknown role {role!r}") from None
        return cls(generation=d["generation"], parent=d["parent"], fork_seq=d["fork_seq"],
                   role=parsed, time_ns=d["time_ns"], forced=d["forced"])


def _ns(now: float) -> int:
    """UNIX seconds (as time.time() gives them) in whole nanoseconds."""
    if not math.isfinite(now) or now < 0:
        raise LineageError(f"time must be finite and non-negative, not {now!r}")
    return round(now * 1_000_000_000)


def _new_id(rng: Rng, taken: Iterable[int]) -> int:
    used = set(taken)
    used.add(0)
    while True:
        gid = rng.getrandbits(64)
        if gid not in used:
            return gid


@dataclass(frozen=True, slots=True)
class Lineage:
    current: Generation
    #: the ancestors of `current`, oldest first; each entry's parent is the one before it
    history: tuple[Generation, ...] = ()
    #: this copy started `current` and made its writes after the fork (not received them)
    writer: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.current, Generation):
            raise LineageError("current must be a Generation")
        if type(self.history) is not tuple or not all(
                isinstance(g, Generation) for g in self.history):
            raise LineageError("history must be a tuple of Generation")
        if len(self.history) > MAX_HISTORY:
            raise LineageError(f"history holds {len(self.history)} entries, at most "
                               f"{MAX_HISTORY} are kept")
        if type(self.writer) is not bool:
            raise LineageError(f"writer must be a bool, not {self.writer!r}")
        if self.writer and self.current.role not in WRITABLE_ROLES:
            raise LineageError("a copy cannot have written a generation started as secondary")
        chain = self.chain
        ids = [g.generation for g in chain]
        if len(set(ids)) != len(ids):
            raise LineageError("a generation id appears twice in the history")
        if chain[0].parent in ids:
            raise LineageError("the oldest entry's parent is in its own line")
        for older, newer in zip(chain, chain[1:], strict=False):
            if newer.parent != older.generation:
                raise LineageError(
                    f"generation {newer.generation:#x} names parent {newer.parent:#x}, but "
                    f"the entry before it is {older.generation:#x}")
            if newer.fork_seq < older.fork_seq:
                raise LineageError(
                    f"generation {newer.generation:#x} forks at seq {newer.fork_seq}, before "
                    f"its parent began at seq {older.fork_seq}")

    @property
    def chain(self) -> tuple[Generation, ...]:
        """History and current, oldest first."""
        return (*self.history, self.current)

    @property
    def generation(self) -> int:
        return self.current.generation

    @property
    def is_lone_first(self) -> bool:
        """Nothing recorded but a first generation: never forked, never followed a peer."""
        return not self.history and self.current.is_first

    # ------------------------------------------------------------------ operations

    @classmethod
    def first(cls, role: Role, now: float, rng: Rng) -> Lineage:
        """The lineage of a copy that has none yet: a new store, or one written by code that
        kept no lineage. Its data, whatever it holds, belongs to this first generation."""
        gen = Generation(_new_id(rng, ()), 0, 0, role, _ns(now), False)
        return cls(gen, (), writer=role in WRITABLE_ROLES)

    def fork(self, role: Role, fork_seq: int, now: float, forced: bool, rng: Rng) -> Lineage:
        """This copy becomes writable on its own with its contents as of `fork_seq`.

        `fork_seq` may lie before the start of the current generation (a promotion rolled
        back through history); the new generation's parent is then the ancestor that held
        that seq, and the generations after it leave the line.
        """
        if role not in WRITABLE_ROLES:
            raise LineageError(f"a fork makes a copy writable; {role.value} is not")
        _u64("fork_seq", fork_seq)
        chain = self.chain
        for i in range(len(chain) - 1, -1, -1):
            if chain[i].fork_seq <= fork_seq:
                break
        else:
            raise LineageError(
                f"seq {fork_seq} is older than the oldest recorded generation (which begins "
                f"at seq {chain[0].fork_seq})")
        parent = chain[i]
        line = chain[:i + 1]
        gen = Generation(_new_id(rng, (g.generation for g in chain)), parent.generation,
                         fork_seq, role, _ns(now), bool(forced))
        return Lineage(gen, line[-MAX_HISTORY:], writer=True)

    def adopt(self, peer: Lineage) -> Lineage:
        """This copy becomes the target of `peer`: once resynced its contents are the peer's
        line, so its lineage is too; the writes of that line are received, not its own."""
        return Lineage(peer.current, peer.history, writer=False)

    # ------------------------------------------------------------------ codec

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current.to_dict(),
                "history": [g.to_dict() for g in self.history],
                "writer": self.writer}

    @classmethod
    def from_dict(cls, doc: object) -> Lineage:
        """A lineage from an untrusted map (a peer's HELLO, a file); every field checked."""
        d = _mapping("lineage", doc, _LINEAGE_KEYS)
        history = d["history"]
        if not isinstance(history, list):
            raise LineageError(f"history must be a list, not {type(history).__name__}")
        if len(history) > MAX_HISTORY:
            # refused before building anything from it
            raise LineageError(f"history holds {len(history)} entries, at most "
                               f"{MAX_HISTORY} are kept")
        return cls(Generation.from_dict(d["current"]),
                   tuple(Generation.from_dict(g) for g in history),
                   writer=d["writer"])
